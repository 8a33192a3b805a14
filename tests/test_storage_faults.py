"""Object-storage faults: a proxy in front of the real SeaweedFS server injects 503 SlowDown,
500 InternalError, dropped connections and stalls.

Transient faults are retried (one retry layer, counted through the proxy: attempts never
multiply), permanent ones fail with one line after the configured retries, in bounded time.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pandas as pd
import pytest
import zarr

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.shards import Catalog, ErrorPolicy, catalog, read_rows
from streamprune.storage import RetryPolicy
from streamprune.workspace import Workspace
from faultproxy import FaultProxy
from helpers import run_cli
from shardgen import write_shards

FAST = {"retries": 3, "retry_backoff": 0.02, "retry_max_backoff": 0.2, "timeout": 1.0}


@pytest.fixture
def proxy(s3server):
    with FaultProxy(s3server.endpoint_url, seed=0) as p:
        yield p


@pytest.fixture(scope="module")
def bucket(s3server):
    import uuid

    return s3server.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def data(s3server, bucket, tmp_path_factory):
    """3 shards x 20 samples uploaded once for this module; returns (local paths, s3 prefix)."""
    shards = write_shards(str(tmp_path_factory.mktemp("faults") / "data"), 3, 20)
    fs = s3server.fs()
    for s in shards:
        fs.put_file(s, f"{bucket}/data/{os.path.basename(s)}")
    return shards, f"s3://{bucket}/data/"


@pytest.fixture
def root(bucket, request):
    """bucket/prefix for this test's workspace, inside the module's bucket."""
    return f"{bucket}/{re.sub(r'[^a-z0-9-]', '-', request.node.name.lower())[:40]}-{os.urandom(3).hex()}"


def _opts(s3server, proxy, **retry) -> dict:
    """Storage options that reach the server through the proxy."""
    return proxy.storage_options(s3server.storage_options, **retry)


def _env(s3server, endpoint: str, **retry) -> dict:
    env = {**s3server.env, "AWS_ENDPOINT_URL": endpoint}
    env.update({storage.RETRY_OPTIONS[k]: str(v) for k, v in retry.items()})
    return env


def _parts(ws: str, opts: dict | None = None) -> pd.DataFrame:
    cat = Catalog(Workspace(ws, opts))
    return pd.concat([p for _, p in cat.iter_parts()], ignore_index=True)


# the retry policy ---------------------------------------------------------------------------
def test_retry_policy_from_environment_and_options(monkeypatch):
    assert RetryPolicy.from_options({}) == RetryPolicy()
    monkeypatch.setenv("STREAMPRUNE_RETRIES", "7")
    monkeypatch.setenv("STREAMPRUNE_TIMEOUT", "2.5")
    p = RetryPolicy.from_options({"retry_backoff": 0.1})
    assert (p.retries, p.attempts, p.timeout, p.retry_backoff) == (7, 8, 2.5, 0.1)
    assert RetryPolicy.from_options({"retries": 0}).attempts == 1  # options win over the environment
    monkeypatch.setenv("STREAMPRUNE_RETRY_BACKOFF", "")  # set but empty: as if unset
    assert RetryPolicy.from_options({}).retry_backoff == RetryPolicy().retry_backoff
    random.seed(0)
    p = RetryPolicy(retries=10, retry_backoff=0.5, retry_max_backoff=3.0)
    for n in range(1, 11):
        base = min(0.5 * 2 ** (n - 1), 3.0)
        assert 0.5 * base <= p.delay(n) < 1.5 * base
    with pytest.raises(StreamPruneError, match="retries"):
        RetryPolicy.from_options({"retries": "many"})
    with pytest.raises(StreamPruneError, match="non-negative"):
        RetryPolicy.from_options({"retries": -1})
    with pytest.raises(StreamPruneError, match="timeout positive"):  # a zero timeout would fail every request
        RetryPolicy.from_options({"timeout": 0})
    # streamprune's keys never reach s3fs, and a policy change gives another filesystem.
    fs = storage.get_fs("s3://b/x", {"anon": True, "retries": 2, "timeout": 3})
    assert fs.config_kwargs["read_timeout"] == 3 and fs.retries == 1 and "retries" not in fs.storage_options
    assert storage.get_fs("s3://b/x", {"anon": True, "retries": 2, "timeout": 3}) is fs
    assert storage.get_fs("s3://b/x", {"anon": True, "retries": 3, "timeout": 3}) is not fs


def test_which_errors_are_retried():
    transient = [TimeoutError("read"), ConnectionResetError(104, "reset"),
                 OSError(5, "An error occurred (InternalError) when calling the GetObject operation"),
                 OSError("503 Service Unavailable"), RuntimeError("server replied 502")]
    permanent = [FileNotFoundError("s3://b/k"), PermissionError("denied"), ValueError("expected 500 rows, got 499"),
                 KeyError("connection_id"), OSError("shard 15003 is truncated"), OSError("bad magic number")]
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)
    assert [storage.is_transient(e) for e in permanent] == [False] * len(permanent)
    calls = []

    def bad_rows():
        calls.append(1)
        raise ValueError("expected 500 rows, got 499")

    with pytest.raises(StreamPruneError, match="expected 500 rows") as err:  # tried once, not retried
        storage.retry(bad_rows, "reading x", {"retries": 3, "retry_backoff": 0.01})
    assert calls == [1] and "gave up" not in str(err.value)


def test_s3_retry_handler_retries_throttling_and_server_errors_within_the_policy():
    from types import SimpleNamespace

    handler = storage._RetryHandler(RetryPolicy(retries=2, retry_backoff=0.01))

    def response(status: int, code: str = "") -> tuple:
        return SimpleNamespace(status_code=status), ({"Error": {"Code": code}} if code else {})

    assert handler(1, response=response(429)) > 0  # Too Many Requests, whatever its error code
    assert handler(2, response=response(503, "SlowDown")) > 0
    assert handler(3, response=response(503, "SlowDown")) is None  # the third of 3 attempts was the last
    assert handler(1, response=response(403, "AccessDenied")) is None
    assert handler(1, response=response(200)) is None


def test_retry_makes_every_attempt_of_the_policy_at_errors_outside_s3_requests():
    """Errors no S3 request handler saw (local or mounted storage) are retried by storage.retry itself."""
    calls = []

    def reset():
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(StreamPruneError, match=r"Connection reset by peer \(gave up after 3 attempts\)$"):
        storage.retry(reset, "/mnt/data/a.tar", {"retries": 2, "retry_backoff": 0})
    assert len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError(2, "No such file or directory")

    calls.clear()
    with pytest.raises(StreamPruneError) as err:
        storage.retry(missing, "/mnt/data/b.tar", {"retries": 2, "retry_backoff": 0})
    assert len(calls) == 1 and "gave up" not in str(err.value)  # not transient: not retried
    outcomes = iter([TimeoutError("timed out"), "ok"])

    def flaky():
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return out

    assert storage.retry(flaky, "/mnt/data/c.tar", {"retries": 2, "retry_backoff": 0}) == "ok"


# transient faults: retried, results identical -------------------------------------------------
def test_catalog_through_transient_faults_cli(s3server, root, data, proxy, tmp_path):
    shards, prefix = data
    ref = str(tmp_path / "ref")
    catalog(shards, ref, scheduler="sync")
    # Throttling on the first requests, then one request in six fails with 503 or 500; the
    # workspace is on S3 too, so marker and part writes are hit as well.
    proxy.set(status=503, first=3, rate=1 / 6)
    ws = f"s3://{root}/ws"
    out = run_cli("-v", "catalog", prefix, "-w", ws, "--scheduler", "sync",
                  env=_env(s3server, proxy.endpoint_url, retries=8, retry_backoff=0.02, timeout=2))
    assert "3 shards, 60 samples" in out.stdout
    assert re.search(r"S3 \w+ /\S+: 503 SlowDown; retry 1 of 8 in \d", out.stderr), out.stderr
    assert proxy.faults >= 3 and "Traceback" not in out.stderr
    proxy.set()
    pd.testing.assert_frame_equal(_parts(ref), _parts(ws, s3server.storage_options))


def test_reading_samples_through_faults_and_stalls(s3server, data, proxy, tmp_path):
    shards, prefix = data
    ws = Workspace(str(tmp_path / "ws"), s3server.storage_options)
    catalog([prefix], ws, scheduler="sync")
    rows = np.arange(60)
    clean = {r: s.members for r, s in read_rows(Catalog(ws), rows, ErrorPolicy("fail"), coalesce_gap=0)}
    assert len(clean) == 60
    faulty = Workspace(ws.url, _opts(s3server, proxy, retries=10, retry_backoff=0.01, timeout=1.0))
    for fault in ({"status": 500, "first": 1, "rate": 0.3}, {"reset": True, "first": 1, "rate": 0.2},
                  {"delay": 1.5, "first": 2}):
        proxy.set(**fault)
        before = proxy.faults
        got = {r: s.members for r, s in read_rows(Catalog(faulty), rows, ErrorPolicy("fail"), coalesce_gap=0)}
        assert got == clean, fault
        assert proxy.faults > before, fault


def test_zarr_through_faults_uses_the_same_policy(s3server, root, proxy):
    url = f"s3://{root}/z.zarr"
    opts = _opts(s3server, proxy, retries=10, retry_backoff=0.01)
    proxy.set(status=503, rate=0.3)
    data = np.arange(1000, dtype=np.float32)
    arr = zarr.create_array(storage.zarr_store(url, opts), shape=(1000,), chunks=(100,), dtype="float32")
    arr[:] = data
    back = zarr.open_array(storage.zarr_store(url, opts), mode="r")[:]
    assert np.array_equal(back, data) and proxy.faults > 0
    # Permanent faults: the policy's attempts, once each (no multiplying retry layers), then one line.
    proxy.set(status=500, rate=1.0)
    before = len(proxy.log)
    with pytest.raises(Exception) as err:
        zarr.open_array(storage.zarr_store(url, {**opts, "retries": 2}), mode="r")[:]
    line = storage.error_line(err.value)
    assert line is not None and "\n" not in line and "gave up" in line, line
    tries = pd.Series([path for _, path, _ in proxy.log[before:]]).value_counts()
    assert tries.max() == 3, tries  # zarr looks for several keys at once; none is tried more than 3 times


# permanent faults: one line, bounded time --------------------------------------------------------
def test_permanent_throttling_is_one_line_after_retries_cli(s3server, data, proxy, tmp_path):
    _, prefix = data
    proxy.set(status=503, rate=1.0)
    out = run_cli("catalog", prefix, "-w", str(tmp_path / "ws"), "--scheduler", "sync", check=False,
                  env=_env(s3server, proxy.endpoint_url, **FAST))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.fullmatch(rf"Error: cannot access {prefix}: S3 error SlowDown: .*injected fault \(gave up after 4 "
                        r"attempts\)", lines[0]), lines[0]
    assert proxy.requests == 4  # the policy's attempts, not attempts x botocore's x s3fs's


@pytest.mark.parametrize("fault,pattern,requests", [
    ({"status": 500, "rate": 1.0}, r"S3 error InternalError: .*injected fault", 4),
    ({"delay": 3.0, "rate": 1.0}, r"ReadTimeoutError: Read timeout on endpoint URL", 4),
    # aiohttp sends an idempotent request once more on a fresh connection when a kept-alive one
    # is closed under it: 4 attempts are 8 requests at the proxy.
    ({"reset": True, "rate": 1.0}, r"ConnectionClosedError: Connection was closed", 8),
])
def test_permanent_fault_is_one_line_in_bounded_time(s3server, data, proxy, tmp_path, fault, pattern, requests,
                                                     caplog):
    _, prefix = data
    proxy.set(**fault)
    caplog.set_level("INFO", logger="streamprune.storage")
    with pytest.raises(StreamPruneError) as err:
        catalog([prefix], str(tmp_path / "ws"), storage_options=_opts(s3server, proxy, **FAST), scheduler="sync")
    msg = str(err.value)
    assert "\n" not in msg and re.fullmatch(rf"cannot access {prefix}: {pattern}.* \(gave up after 4 attempts\)",
                                            msg), msg
    assert proxy.requests == requests
    # Bounded time, read from the retry schedule rather than a wall clock (which a loaded machine
    # stretches): 4 attempts of at most the 1 s request timeout, 3 backoffs each under 1.5 x
    # min(0.02 * 2**(n-1), 0.2) s, then give up.
    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    delays = [float(m) for m in re.findall(r"; retry \d of 3 in ([\d.]+)s", " ".join(retries))]
    assert [int(n) for n in re.findall(r"; retry (\d) of 3", " ".join(retries))] == [1, 2, 3], retries
    assert all(d <= 1.5 * min(0.02 * 2 ** n, 0.2) + 0.005 for n, d in enumerate(delays)), delays
    assert any("giving up after 4 attempts" in r.getMessage() for r in caplog.records)


def test_unreachable_endpoint_is_one_line(s3server, data, tmp_path):
    _, prefix = data
    opts = {**s3server.storage_options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, **FAST}
    with pytest.raises(StreamPruneError, match=r"^cannot access s3://\S+: EndpointConnectionError: Could not "
                                               r"connect to the endpoint URL: .* \(gave up after 4 attempts\)$"):
        catalog([prefix], str(tmp_path / "ws"), storage_options=opts, scheduler="sync")


def test_workspace_faults_on_s3_are_one_line(s3server, root, data, proxy):
    shards, _ = data
    proxy.set(status=500, rate=1.0, match="/ws/")
    with pytest.raises(StreamPruneError) as err:
        catalog(shards, f"s3://{root}/ws", storage_options=_opts(s3server, proxy, **FAST), scheduler="sync")
    assert re.fullmatch(rf"cannot access s3://{root}/ws/\S+: (S3 error InternalError|HTTP 500): .* \(gave up "
                        r"after 4 attempts\)", str(err.value)), str(err.value)
    assert not s3server.fs().exists(f"{root}/ws/_stages/catalog.json")


def test_damaged_zarr_chunk_on_s3_is_one_line_naming_the_array(s3server, root):
    """A chunk object overwritten with other bytes: one line naming the array by its s3:// URL."""
    url = f"s3://{root}/z.zarr"
    opts = s3server.storage_options
    zarr.create_array(storage.zarr_store(url, opts), data=np.arange(1000, dtype=np.float32), chunks=(100,))
    s3server.fs().pipe_file(f"{root}/z.zarr/c/3", b"not a chunk")
    with pytest.raises(Exception) as err:
        zarr.open_array(storage.zarr_store(url, opts), mode="r")[:]
    line = storage.zarr_read_error_line(err.value)
    assert line is not None and line.startswith(f"{url} cannot be read ("), line


def test_redact_hides_every_known_credential_whole(monkeypatch):
    """Credentials of 4 characters or more are replaced whole, a longer one before a shorter one it contains
    (no tail of it left behind), and a SigV4 'Credential=' scope is hidden even for an unknown key id."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    opts = {"key": "AKIDEXAMPLE12", "secret": "s3cr", "token": "abc"}
    text = "key AKIDEXAMPLE12 id AKIDEXAMPLE secret s3cr token abc Credential=OTHERKEY/20240101/us-east-1/s3"
    assert storage.redact(text, opts) == "key *** id *** secret *** token abc Credential=***/20240101/us-east-1/s3"
    # credentials of storage options once used are hidden in later lines that do not pass them (log records)
    storage.get_fs("s3://b/x", {"key": "kq7z", "secret": "sq7zsecret"})
    assert storage.redact("denied for kq7z with sq7zsecret") == "denied for *** with ***"


def test_s3_error_code_is_found_anywhere_in_the_exception_chain():
    """An error raised while a botocore error was being handled (its __context__, not a 'from' cause) is
    described by that error's S3 code: an access problem says to check the credentials."""
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    try:
        try:
            raise denied
        except ClientError:
            raise OSError("reading the object failed")
    except OSError as exc:
        line = storage.describe_storage_error(exc, "s3://b/k.tar")
    assert line == "permission denied: s3://b/k.tar (AccessDenied: reading the object failed); check the credentials"


def test_retry_passes_a_finished_one_line_error_through_unretried():
    """A StreamPruneError raised inside a retried call is already the final one-line report (an inner retry
    gave up, or a validation failed): it is neither retried again, multiplying the attempts, nor re-worded."""
    calls = []
    inner = StreamPruneError("cannot access s3://b/k: ReadTimeoutError: timed out (gave up after 5 attempts)")

    def gave_up():
        calls.append(1)
        raise inner

    with pytest.raises(StreamPruneError) as err:
        storage.retry(gave_up, "s3://b/k", {"retries": 3, "retry_backoff": 0})
    assert err.value is inner and len(calls) == 1


def test_a_failed_read_is_not_taken_for_a_missing_file(tmp_path):
    """Only "not found" reads as absent: any other failure (here a folder where a JSON file should be) is
    raised, never reported as a missing marker or part (which would make a stage redo or skip work)."""
    (tmp_path / "marker.json").mkdir()
    assert storage.read_json(str(tmp_path / "absent.json")) is None
    with pytest.raises(StreamPruneError, match="marker.json"):
        storage.read_json(str(tmp_path / "marker.json"))

    def denied():
        raise StreamPruneError("permission denied: s3://b/k") from PermissionError("denied")

    with pytest.raises(StreamPruneError, match="permission denied"):
        storage.none_if_missing(denied)


def test_listing_on_s3_sees_objects_written_by_other_clients(s3server, s3bucket):
    """A listing is never served from a cache: parts written by other workers since the last listing of the
    same prefix (a resumed or parallel run) are seen."""
    opts = s3server.storage_options
    url = f"s3://{s3bucket}/ws/parts"
    storage.write_bytes_atomic(f"{url}/a.parquet", b"a", opts)
    assert storage.listdir(url, opts) == ["a.parquet"]
    s3server.fs().pipe_file(f"{s3bucket}/ws/parts/b.parquet", b"b")  # another client
    assert storage.listdir(url, opts) == ["a.parquet", "b.parquet"]
