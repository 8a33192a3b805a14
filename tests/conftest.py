"""Shared fixtures: tiny shard sets, a real SeaweedFS S3 server, a dask LocalCluster."""

from __future__ import annotations

import os

import pytest

from shardgen import write_shards

os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")
# the suite checks faiss plans: on a machine with a GPU, keep index tests off the torch engine
os.environ.setdefault("STREAMPRUNE_INDEX_DEVICE", "none")


@pytest.fixture(autouse=True)
def _no_lease_outlives_its_test():
    """A test that begins a stage outside a stage function and never commits it (a run it killed
    in-process) leaves the stage's lease held by this process: give it back, so that what one test
    holds never shows in another's lease checks."""
    yield
    from streamprune import leases

    for lease in leases.held():
        leases.release(lease)


@pytest.fixture
def shards(tmp_path):
    """10 shards x 20 png samples."""
    return write_shards(str(tmp_path / "data"), 10, 20)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on a free loopback port for the whole test session."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3bucket(s3server, request):
    """A fresh bucket named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    s3server.make_bucket(name)
    return name


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask LocalCluster with 2 worker processes; yields its scheduler address."""
    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield cluster.scheduler_address
    cluster.close()
