"""Catalog: rows, keys and offsets from local disk and S3; bad input; crash-then-resume."""

import io
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from streamprune.errors import StreamPruneError
from streamprune.shards import Catalog, catalog, read_sample_range
from streamprune.workspace import Workspace
from helpers import count_files, kill_when, run_cli
from shardgen import make_samples, write_shards
from streamprune.tario import iter_tar, write_tar


def _table(ws_url, storage_options=None):
    ws = Workspace(ws_url, storage_options)
    cat = Catalog(ws)
    parts = pd.concat([p for _, p in cat.iter_parts()], ignore_index=True)
    return cat, parts


def test_catalog_rows_keys_offsets(shards, tmp_path):
    m = catalog(shards, str(tmp_path / "ws"), scheduler="sync")
    assert m["counts"] == {"n_shards": 10, "n_samples": 200, "bytes": sum(os.path.getsize(s) for s in shards),
                           "errors": 0}
    cat, parts = _table(str(tmp_path / "ws"))
    assert list(cat.shards.url) == sorted(shards)
    assert list(cat.shards.row_start) == list(range(0, 200, 20))
    assert list(parts.key) == [f"s{i:07d}" for i in range(200)]
    rows = np.array([0, 19, 20, 137, 199])
    assert list(cat.keys(rows)) == [f"s{i:07d}" for i in rows]
    # Offsets reproduce each sample by a ranged read.
    for row in rows:
        shard = int(cat.shard_of([row])[0])
        rec = cat.part(shard).iloc[row - cat.row_start[shard]]
        got = read_sample_range(cat.shards.url[shard], int(rec.offset), int(rec.end))
        assert [s.key for s in got] == [rec.key]


def test_streaming_pass_over_parts_caches_none(shards, tmp_path):
    """iter_parts holds one part at a time: a pass over every shard must not fill the random-access
    cache of part() (up to 65 parts: the subset stage's peak RSS grew with the shard count)."""
    catalog(shards, str(tmp_path / "ws"), scheduler="sync")
    cat = Catalog(Workspace(str(tmp_path / "ws")))
    cached = cat.part(3)
    seen = [(i, p) for i, p in cat.iter_parts()]
    assert [i for i, _ in seen] == list(range(10))
    assert seen[3][1] is cached  # an already cached part is reused, not read again
    assert list(cat._parts) == [3]
    assert list(pd.concat([p for _, p in seen]).key) == [f"s{i:07d}" for i in range(200)]


def test_catalog_patterns(shards, tmp_path):
    d = os.path.dirname(shards[0])
    brace = os.path.join(d, "shard-{000000..000009}.tar")
    a = catalog([brace], str(tmp_path / "a"), scheduler="sync")
    b = catalog([os.path.join(d, "*.tar")], str(tmp_path / "b"), scheduler="sync")
    c = catalog([d], str(tmp_path / "c"), scheduler="sync")
    assert a["counts"] == b["counts"] == c["counts"]
    with pytest.raises(StreamPruneError, match="no shards match"):
        catalog([os.path.join(d, "nothing-*.tar")], str(tmp_path / "d"), scheduler="sync")


def test_catalog_skip_when_done_and_append(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    again = catalog(shards, ws, scheduler="sync")
    assert again.get("skipped")
    more = write_shards(os.path.dirname(shards[0]), 2, 20, first=10)
    parts_before = set(os.listdir(os.path.join(ws, "catalog", "parts")))
    m = catalog(shards + more, ws, scheduler="sync")
    assert m["counts"]["n_samples"] == 240 and not m.get("skipped")
    parts_after = set(os.listdir(os.path.join(ws, "catalog", "parts")))
    assert parts_before < parts_after and len(parts_after - parts_before) == 2  # old parts re-used


def test_catalog_on_dask_cluster_equals_local(shards, tmp_path, dask_cluster):
    catalog(shards, str(tmp_path / "a"), scheduler="sync")
    catalog(shards, str(tmp_path / "b"), scheduler=dask_cluster)
    ca, pa = _table(str(tmp_path / "a"))
    cb, pb = _table(str(tmp_path / "b"))
    pd.testing.assert_frame_equal(pa, pb)
    pd.testing.assert_frame_equal(ca.shards, cb.shards)


def test_catalog_from_s3_equals_local(shards, tmp_path, s3server, s3bucket):
    fs = s3server.fs()
    for s in shards:
        fs.put_file(s, f"{s3bucket}/data/{os.path.basename(s)}")
    fs.pipe_file(f"{s3bucket}/data/README.txt", b"not a shard")  # a prefix means the *.tar objects below it
    opts = s3server.storage_options
    catalog(shards, str(tmp_path / "local"), scheduler="sync")
    catalog([f"s3://{s3bucket}/data/"], f"s3://{s3bucket}/ws", storage_options=opts, scheduler="threads")
    cl, pl = _table(str(tmp_path / "local"))
    cs, ps = _table(f"s3://{s3bucket}/ws", opts)
    pd.testing.assert_frame_equal(pl, ps)
    assert list(cs.shards.n_samples) == list(cl.shards.n_samples)
    assert list(cs.shards.url) == [f"s3://{s3bucket}/data/{os.path.basename(s)}" for s in sorted(shards)]
    # Brace patterns and globs work on S3 too, through the CLI with credentials from the environment.
    out = run_cli("catalog", f"s3://{s3bucket}/data/shard-{{000000..000004}}.tar", "-w", str(tmp_path / "cli"),
                  "--scheduler", "sync", env=s3server.env)
    assert "5 shards, 100 samples" in out.stdout
    # Keys and secret never reach the workspace.
    for root, _, files in os.walk(tmp_path / "cli"):
        for f in files:
            blob = open(os.path.join(root, f), "rb").read()
            assert s3server.secret_key.encode() not in blob and s3server.access_key.encode() not in blob


def test_missing_bucket_is_one_line(s3server, tmp_path):
    out = run_cli("catalog", "s3://no-such-bucket-xyz/data/", "-w", str(tmp_path / "ws"), "--scheduler", "sync",
                  env=s3server.env, check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket-xyz" in lines[0] and "Traceback" not in out.stderr


def test_a_storage_error_on_a_users_cluster_names_the_worker_and_its_environment(shards, tmp_path, s3server,
                                                                                   s3bucket, monkeypatch):
    """Workers the user started read storage with their own environment: one that lacks the credentials
    the client has fails, and the line says where and why instead of only "Unable to locate credentials"."""
    from dask.distributed import LocalCluster

    fs = s3server.fs()
    for s in shards[:2]:
        fs.put_file(s, f"{s3bucket}/data/{os.path.basename(s)}")
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)  # the workers start without any AWS settings; the CLI below gets them
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        worker = next(iter(cluster.scheduler_info["workers"]))
        out = run_cli("catalog", f"s3://{s3bucket}/data/", "-w", str(tmp_path / "ws"), "--scheduler",
                      cluster.scheduler_address, env=s3server.env, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert f"cannot access s3://{s3bucket}/data/" in line
    assert line.endswith(f"(on dask worker {worker}, which reaches storage with its own environment: it needs the "
                         "credentials, endpoint (or --storage-options) and paths this client uses)")
    # The same shards through the client's own scheduler: the client's environment, no error.
    assert "2 shards" in run_cli("catalog", f"s3://{s3bucket}/data/", "-w", str(tmp_path / "ws"), "--scheduler",
                                 "sync", env=s3server.env).stdout


def test_task_errors_name_the_worker_only_on_a_users_cluster():
    from streamprune.compute import _Failed

    def failed(message):
        return _Failed(StreamPruneError(message), "tcp://10.0.0.7:40123")

    for scheduler in ("local", None, "threads"):  # a cluster this process started shares its environment
        assert str(failed("not found: s3://b/x.tar").error(scheduler)) == "not found: s3://b/x.tar"
    assert str(failed("embed: shard a.tar: bad label").error("tcp://10.0.0.1:8786")) == \
        "embed: shard a.tar: bad label (on dask worker tcp://10.0.0.7:40123)"
    assert "its own environment" in str(failed("catalog: permission denied: s3://b/x.tar").error("tcp://h:1"))
    assert str(_Failed(StreamPruneError("x")).error("tcp://h:1")) == "x"  # raised in this process
    in_process = _Failed(StreamPruneError("not found: s3://b/x.tar"), "inproc://192.0.2.2/1/2")
    assert str(in_process.error("inproc://192.0.2.2/1/1")) == "not found: s3://b/x.tar"  # a worker in this process


def _bad_shards(d):
    os.makedirs(d, exist_ok=True)
    good = os.path.join(d, "a-good.tar")
    write_tar(good, make_samples(5, start=0))
    trunc = os.path.join(d, "b-trunc.tar")
    write_tar(trunc, make_samples(5, start=100))
    data = open(trunc, "rb").read()
    open(trunc, "wb").write(data[: len(data) // 2 + 100])
    notar = os.path.join(d, "c-notar.tar")
    open(notar, "wb").write(b"just some text, not a tar\n" * 40)
    empty = os.path.join(d, "d-empty.tar")
    write_tar(empty, [])
    dup = os.path.join(d, "e-dup.tar")
    s = make_samples(3, start=200)
    write_tar(dup, s + [s[1]])
    return good, trunc, notar, empty, dup


@pytest.mark.parametrize("which,expect", [
    (1, r"shard .*b-trunc\.tar, key s0000103: corrupt or truncated tar"),
    (2, r"shard .*c-notar\.tar: not a tar file"),
    (3, r"shard .*d-empty\.tar: empty shard"),
    (4, r"shard .*e-dup\.tar, key s0000201: duplicate key"),
])
def test_bad_input_one_clear_line(tmp_path, which, expect):
    bad = _bad_shards(str(tmp_path / "data"))
    out = run_cli("catalog", bad[0], bad[which], "-w", str(tmp_path / "ws"), "--scheduler", "sync", check=False)
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert re.search(expect, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "ws" / "_stages" / "catalog.json")


def test_bad_glob_one_line(tmp_path):
    out = run_cli("catalog", str(tmp_path / "nope-*.tar"), "-w", str(tmp_path / "ws"), check=False)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "no shards match" in out.stderr


def test_skip_records_every_problem(tmp_path):
    bad = _bad_shards(str(tmp_path / "data"))
    out = run_cli("catalog", *bad, "-w", str(tmp_path / "ws"), "--scheduler", "sync", "--on-error", "skip")
    assert "errors recorded" in out.stdout
    errors = [json.loads(line) for line in open(tmp_path / "ws" / "errors.jsonl")]
    got = {(os.path.basename(e["shard"]), e["key"], e["reason"]) for e in errors}
    assert got == {("b-trunc.tar", "s0000103", "corrupt_tar"), ("c-notar.tar", None, "corrupt_tar"),
                   ("d-empty.tar", None, "empty_shard"), ("e-dup.tar", "s0000201", "duplicate_key")}
    assert len(errors) == 4
    cat, parts = _table(str(tmp_path / "ws"))
    # good: 5, truncated: the complete samples before the damage (3), dup: 3 (second copy dropped).
    assert dict(zip(cat.shards.url.map(os.path.basename), cat.shards.n_samples)) == {
        "a-good.tar": 5, "b-trunc.tar": 3, "c-notar.tar": 0, "d-empty.tar": 0, "e-dup.tar": 3}
    st = json.loads(run_cli("status", "-w", str(tmp_path / "ws"), "--json").stdout)
    assert st["errors"]["total"] == len(errors) and st["n_samples"] == 11


def test_catalog_killed_then_resumed_is_identical(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 12, 30)
    ref = str(tmp_path / "ref")
    catalog(shards, ref, scheduler="sync")
    ws = str(tmp_path / "ws")
    parts = os.path.join(ws, "catalog", "parts")
    kill_when(["catalog", *shards, "-w", ws, "--scheduler", "sync"], lambda: count_files(parts, ".parquet") >= 4,
              env={"STREAMPRUNE_TASK_DELAY": "0.3"})
    assert not os.path.exists(os.path.join(ws, "_stages", "catalog.json"))
    done_before = count_files(parts, ".parquet")
    assert 4 <= done_before < 12
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync")
    a, pa = _table(ref)
    b, pb = _table(ws)
    pd.testing.assert_frame_equal(a.shards, b.shards)
    pd.testing.assert_frame_equal(pa, pb)
    assert not [f for f in os.listdir(parts) if f.startswith(".tmp")]


def test_local_cluster_run_prints_only_the_summary(tmp_path):
    """On the default local cluster the command prints its summary line, not the scheduler's INFO
    log or the tracebacks of connections closed at shutdown."""
    shards = write_shards(str(tmp_path / "data"), 3, 10)
    proc = run_cli("catalog", *shards, "-w", str(tmp_path / "ws"))
    assert "catalog: 3 shards, 30 samples" in proc.stdout + proc.stderr
    assert "distributed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[:2000]


def test_max_member_bytes_below_one_is_refused(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 1, 3)
    with pytest.raises(StreamPruneError, match="--max-member-bytes must be a whole number of bytes >= 1, not -1"):
        catalog(shards, str(tmp_path / "ws"), scheduler="sync", max_member_bytes=-1)
    assert not (tmp_path / "ws" / "_stages").exists()


def test_recatalog_names_the_results_it_made_out_of_date(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 3, 10)
    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync")
    first = run_cli("subset", "-w", ws, "--fraction", "0.5", "--scheduler", "sync")
    assert "out of date" not in first.stderr
    again = run_cli("catalog", *shards[:2], "-w", ws, "--scheduler", "sync")
    assert "note: 1 result(s) made from the previous ones are now out of date (subset)" in again.stderr
    assert "catalog: 2 shards, 20 samples" in again.stdout
    assert "out of date" not in run_cli("catalog", *shards[:2], "-w", ws, "--scheduler", "sync").stderr  # skipped


def test_stale_note_names_only_what_the_command_made_stale(tmp_path):
    """`score --force` with other epochs re-trains and then recomputes its score: nothing it leaves
    is out of date, so no note; a later re-catalogue names the results it made out of date once."""
    shards = write_shards(str(tmp_path / "data"), 3, 20, kind="npy", dim=8)
    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync")
    common = ["score", "-w", ws, "--score", "el2n", "--model", "mlp", "--input", "vector", "--scheduler", "sync"]
    first = run_cli(*common, "--fraction", "0.5", "--epochs", "2")
    assert "out of date" not in first.stderr
    again = run_cli(*common, "--epochs", "3", "--force")
    assert "out of date" not in again.stderr, again.stderr
    recat = run_cli("catalog", *shards[:2], "-w", ws, "--scheduler", "sync")
    assert "note: 3 result(s) made from the previous ones are now out of date (score-el2n, subset, train)" \
        in recat.stderr


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shard_cut_short_after_catalog_reports_each_lost_sample(tmp_path, where, request):
    """A shard truncated after `catalog`: the samples still whole are read, and every lost one has
    its own record (one ranged read covers them all, so one record for the run would leave the
    others invalid without a word).  On S3 a ranged read past the end is answered differently
    (the object's bytes up to its end, or an InvalidRange error when none are left)."""
    from streamprune.shards import ErrorPolicy, read_rows

    os.makedirs(tmp_path / "data")
    path = str(tmp_path / "data" / "s.tar")
    write_tar(path, make_samples(6, kind="npy"))
    data = open(path, "rb").read()
    if where == "s3":
        s3server = request.getfixturevalue("s3server")
        url, opts = f"s3://{request.getfixturevalue('s3bucket')}/data/s.tar", s3server.storage_options
        s3server.fs().pipe_file(url[5:], data)
        ws = Workspace(url.rsplit("/", 2)[0] + "/ws", opts)
        catalog([url], ws, scheduler="sync")

        def cut_to(n):
            s3server.fs().pipe_file(url[5:], data[:n])
    else:
        ws = Workspace(str(tmp_path / "ws"))
        catalog([path], ws, scheduler="sync")

        def cut_to(n):
            open(path, "wb").write(data[:n])
    cat = Catalog(ws)
    cut_to(int(cat.part(0).end[3]))  # samples 0-3 whole, 4 and 5 gone
    handler = ErrorPolicy("skip")
    got = [(row, s.key) for row, s in read_rows(cat, np.arange(6), handler)]
    assert got == [(i, f"s{i:07d}") for i in range(4)]
    assert [(e["key"], e["reason"]) for e in handler.records] == [("s0000004", "changed_shard"),
                                                                  ("s0000005", "changed_shard")]
    with pytest.raises(StreamPruneError, match=r"s\.tar, key s0000004: shard is shorter than catalogued"):
        list(read_rows(cat, np.arange(6), ErrorPolicy("fail")))
    handler = ErrorPolicy("skip")  # a read that starts past the new end: no byte of it is left
    assert list(read_rows(cat, np.array([4, 5]), handler)) == []
    assert [(e["key"], e["reason"]) for e in handler.records] == [("s0000004", "changed_shard"),
                                                                  ("s0000005", "changed_shard")]


def test_member_name_not_utf8_is_one_line(tmp_path):
    """A member name that is not UTF-8 cannot be a key (keys are stored as text): rejected with one
    line naming shard and key, not a traceback from the catalog table."""
    import io
    import tarfile

    os.makedirs(tmp_path / "data")
    path = str(tmp_path / "data" / "s.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name in ["a.cls", "b\xff.cls", "b\xff.png", "c.cls"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    out = run_cli("catalog", path, "-w", str(tmp_path / "ws"), "--scheduler", "sync", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "s.tar, key b\\xff: member name 'b\\xff.cls' is not valid UTF-8" in out.stderr, out.stderr
    m = catalog([path], str(tmp_path / "ws"), scheduler="sync", on_error="skip")
    assert m["counts"]["n_samples"] == 2
    assert Catalog(Workspace(str(tmp_path / "ws"))).keys().tolist() == ["a", "c"]
    errors = [json.loads(line) for line in open(tmp_path / "ws" / "errors.jsonl")]
    assert [(e["key"], e["reason"]) for e in errors] == [("b\\xff", "unsafe_name")]


def test_parts_are_not_reused_across_scan_options(tmp_path):
    """A part records what its scan rejected: one made under a smaller --max-member-bytes is not
    reused under a bigger one (the sample it left out is read), and one whose scan skipped errors
    does not let a fail-mode run through."""
    os.makedirs(tmp_path / "data")
    path = str(tmp_path / "data" / "s.tar")
    samples = make_samples(4, kind="npy", dim=64)  # .npy members of 384 bytes
    samples[2][1]["cls"] = b"1" * 1000
    write_tar(path, samples)
    ws = str(tmp_path / "ws")
    m = catalog([path], ws, scheduler="sync", on_error="skip", max_member_bytes=500)
    assert m["counts"]["n_samples"] == 3 and m["counts"]["errors"] == 1
    with pytest.raises(StreamPruneError, match=r"key s0000002: member s0000002\.cls is 1000 bytes"):
        catalog([path], ws, scheduler="sync", max_member_bytes=500, force=True)
    m = catalog([path], ws, scheduler="sync", force=True)
    assert m["counts"]["n_samples"] == 4 and m["counts"]["errors"] == 0


def test_shard_rewritten_in_place_after_catalog_reports_each_changed_sample(tmp_path):
    """A shard re-written after `catalog` with the same byte layout but other keys, or with a member of one sample
    renamed: the catalogued byte ranges no longer hold the catalogued samples, and each one is reported as a
    changed shard (the renamed one with what the tar reader found), never returned under the catalog's key."""
    from streamprune.shards import ErrorPolicy, read_rows

    os.makedirs(tmp_path / "data")
    path = str(tmp_path / "data" / "s.tar")
    write_tar(path, make_samples(4, kind="npy"))
    ws = Workspace(str(tmp_path / "ws"))
    catalog([path], ws, scheduler="sync")
    cat = Catalog(ws)
    before = open(path, "rb").read()
    write_tar(path, make_samples(4, kind="npy", prefix="t"))
    assert len(open(path, "rb").read()) == len(before)
    handler = ErrorPolicy("skip")
    assert list(read_rows(cat, np.arange(4), handler)) == []
    assert [(e["key"], e["reason"]) for e in handler.records] == [(f"s{i:07d}", "changed_shard") for i in range(4)]
    assert all("sample bytes do not match the catalog (shard changed since `catalog`?)" in e["message"]
               for e in handler.records)
    with pytest.raises(StreamPruneError, match=r"s\.tar, key s0000000: sample bytes do not match the catalog"):
        list(read_rows(cat, np.arange(4), ErrorPolicy("fail")))

    # the third sample's second member renamed in place to an unsafe name: its first member still parses
    # under the catalog's key, but the sample is not what was catalogued
    second = [m.offset for m in iter_tar(io.BytesIO(before)) if m.name.startswith("s0000002.")][1]
    damaged = bytearray(before)
    assert damaged[second:second + 12] == b"s0000002.cls"
    damaged[second:second + 12] = b"/s000002.cls"
    damaged[second + 148:second + 156] = b"        "
    damaged[second + 148:second + 155] = b"%06o\0" % sum(damaged[second:second + 512])
    open(path, "wb").write(bytes(damaged))
    handler = ErrorPolicy("skip")
    assert [(row, s.key) for row, s in read_rows(cat, np.arange(4), handler)] == [
        (0, "s0000000"), (1, "s0000001"), (3, "s0000003")]
    assert [(e["key"], e["reason"]) for e in handler.records] == [("s0000002", "changed_shard")]
    assert re.search(r"do not match the catalog \(shard changed since `catalog`\?\): .*unsafe member name "
                     r"'/s000002\.cls'", handler.records[0]["message"]), handler.records[0]["message"]


def test_catalog_read_errors_name_the_problem(tmp_path):
    """Reading a catalog: a missing shard table says to re-run catalog, row ids outside the catalog are refused
    with its range, and an --on-error mode other than fail or skip is named."""
    from streamprune.shards import ErrorPolicy

    ws = Workspace(str(tmp_path / "ws"))
    catalog(write_shards(str(tmp_path / "data"), 2, 5), ws, scheduler="sync")
    cat = Catalog(ws)
    assert cat.shard_of(np.array([0, 4, 5, 9])).tolist() == [0, 0, 1, 1]
    for bad in ([10], [-1], [3, 10]):
        with pytest.raises(StreamPruneError, match=r"row ids out of range \[0, 10\)"):
            cat.shard_of(np.array(bad))
    with pytest.raises(StreamPruneError, match=r"row ids out of range"):
        cat.keys(np.array([12]))
    os.remove(ws.path("catalog", "shards.parquet"))
    with pytest.raises(StreamPruneError, match=r"catalog file .*shards\.parquet is missing; re-run "
                                               r"`streamprune catalog --force`"):
        Catalog(ws)
    with pytest.raises(StreamPruneError, match="--on-error must be 'fail' or 'skip', not 'ignore'"):
        ErrorPolicy("ignore")


def test_a_brace_range_with_a_digit_too_many_is_one_line_not_a_hang(shards, tmp_path):
    """braceexpand builds each {A..B} range as a list before the first name is looked at: an extra digit in a
    range held catalog for minutes and gigabytes; such a pattern is refused in one line, before any work."""
    from streamprune.storage import MAX_BRACE_NAMES, brace_names

    assert [brace_names(p) for p in ("d-{000000..000099}.tar", "d-{5..1}", "d-{1..9..2}-{a,b}", r"d-\{1..9}")] == [
        100, 5, 5, 1]
    ws = str(tmp_path / "ws")
    pattern = os.path.join(os.path.dirname(shards[0]), "shard-{000000..0099999999999}.tar")
    with pytest.raises(StreamPruneError) as err:
        catalog([shards[0], pattern], ws, scheduler="sync")
    assert str(err.value) == (f"shard pattern {pattern!r} expands to 100,000,000,000 names, more than the "
                              f"{MAX_BRACE_NAMES:,} allowed; check its {{first..last}} range")
    assert not os.path.exists(os.path.join(ws, "_stages"))


def test_shard_rewritten_with_the_same_size_is_catalogued_again(tmp_path):
    """The catalog's inputs include each shard's version tag (local: mtime), not only its size: a shard
    rewritten in place with the same size is scanned again, not served from the old part."""
    path = str(tmp_path / "s.tar")
    write_tar(path, [("a", {"cls": b"0"}), ("b", {"cls": b"1"})])
    ws = str(tmp_path / "ws")
    catalog([path], ws, scheduler="sync")
    size, mtime = os.path.getsize(path), os.stat(path).st_mtime_ns
    write_tar(path, [("x", {"cls": b"0"}), ("y", {"cls": b"1"})])
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert os.path.getsize(path) == size
    m = catalog([path], ws, scheduler="sync")
    assert not m.get("skipped") and Catalog(Workspace(ws)).keys().tolist() == ["x", "y"]


def test_reading_rows_back_uses_the_catalogs_member_limit(tmp_path):
    """Rows are read back under the --max-member-bytes they were catalogued with: a member grown past it since
    (shard rewritten with the same layout) is reported, not read."""
    from streamprune.shards import ErrorPolicy, read_rows

    path = str(tmp_path / "s.tar")
    write_tar(path, [("a", {"bin": b"x" * 900}), ("b", {"cls": b"1"})])
    ws = str(tmp_path / "ws")
    catalog([path], ws, scheduler="sync", max_member_bytes=1000)
    cat = Catalog(Workspace(ws))
    assert cat.max_member_bytes == 1000
    write_tar(path, [("a", {"bin": b"x" * 1020}), ("b", {"cls": b"1"})])  # 1020 bytes: the same padded blocks
    policy = ErrorPolicy("skip")
    assert [s.key for _, s in read_rows(cat, np.arange(2), policy)] == ["b"]
    assert [(r["key"], r["reason"]) for r in policy.records] == [("a", "changed_shard")]
    assert "1020 bytes, over the limit of 1000" in policy.records[0]["message"]


def test_a_folder_of_shards_is_searched_for_tar_files_at_every_depth(tmp_path):
    """A folder given as the shards means every regular file named *.tar below it, at any depth; a folder
    named like a shard ('x.tar/') is searched, not taken for a shard, and other files are left alone."""
    from streamprune.storage import expand_shards

    d = tmp_path / "data"
    for rel in ("a.tar", "sub/b.tar", "x.tar/c.tar", "notes.txt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        write_tar(str(d / rel), make_samples(1, start=len(rel)))
    assert expand_shards([str(d)]) == [str(d / r) for r in ("a.tar", "sub/b.tar", "x.tar/c.tar")]
    assert expand_shards([str(d / "*.tar")]) == [str(d / "a.tar")]
    m = catalog([str(d)], str(tmp_path / "ws"), scheduler="sync")
    assert m["counts"]["n_shards"] == 3
