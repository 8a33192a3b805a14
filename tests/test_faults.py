"""Faults under real machinery: dask workers SIGKILLed mid-run, a full disk, per-worker memory limits.

No mocks: workers are real LocalCluster processes killed with SIGKILL, a full disk is the kernel's
EFBIG from RLIMIT_FSIZE (lowered mid-run, SIGXFSZ ignored), memory limits are dask's own.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import given, settings, strategies as st

from streamprune.compute import (MEMORY_SHARE, chunk_rows_for, disk_errors, disk_full_message, map_tasks,
                                 parse_memory, worker_count)
from streamprune.decode import DecodeConfig
from streamprune.embed import default_chunk_rows, embed, task_row_bytes
from streamprune.errors import StreamPruneError
from streamprune.shards import Catalog, catalog
from streamprune.subset import subset
from streamprune.train import TrainConfig, train
from streamprune.workspace import Workspace
from helpers import kill_python_when, run_cli, run_killing_a_worker
from shardgen import write_shards

CHUNK = 20  # embed chunk rows: 320 rows -> 16 tasks
N_ROWS = 320


def _records(ws: str, stage: str, prefix: str = "") -> list[str]:
    """Chunk records of the run in progress of ``stage`` (layout records excluded)."""
    paths = glob.glob(os.path.join(ws, "_stages", stage, "*", "chunks", f"{prefix}*.json"))
    names = (os.path.basename(p)[:-5] for p in paths)
    return sorted(n for n in names if not n.startswith((".tmp", "layout")))


def _emb(ws: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")
    return g["emb"][:], g["labels"][:], g["valid"][:]


def _assert_same_embeddings(ref, ws: str) -> None:
    for a, b in zip(ref, _emb(ws)):
        np.testing.assert_array_equal(a, b)  # float32 on CPU, fixed batches: bitwise


def _leftovers(root: str) -> list[str]:
    """Temporary files of atomic writes (ours: .tmp-*, zarr's: *.partial) left below ``root``."""
    return [p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
            if os.path.basename(p).startswith(".tmp-") or p.endswith(".partial")]


def _copy_without_embed(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("embeddings.zarr", "embed.json", "embed"))
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with catalog, subset and a trained MLP (no embeddings), and a clean sync embed of it."""
    tmp = tmp_path_factory.mktemp("faults")
    shards = write_shards(str(tmp / "data"), 8, 40, kind="npy", dim=16)
    ws = str(tmp / "base")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    train(ws, TrainConfig(model="mlp", epochs=1, batch_size=32), DecodeConfig(), scheduler="sync")
    clean = _copy_without_embed(ws, str(tmp / "clean"))
    embed(clean, chunk_rows=CHUNK, scheduler="sync")
    return {"ws": ws, "shards": shards, "ref": _emb(clean), "tmp": tmp}


# --------------------------------------------------------------------------- worker killed mid-run


@pytest.mark.slow
def test_worker_sigkilled_during_embed_is_retried(trained, tmp_path):
    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    out = run_killing_a_worker("streamprune.embed", lambda: len(_records(ws, "embed")),
                               lambda address: embed(ws, chunk_rows=CHUNK, scheduler=address), min_records=3)
    m = out["result"]
    print(f"\nworker killed with {out['records']}/16 chunks recorded; tasks re-run after the death: {out['rerun']}")
    assert 3 <= out["records"] < 16
    assert out["killed_pid"] not in out["pids_after"]  # the nanny replaced the dead worker process
    assert out["rerun"] >= 1  # the scheduler re-ran what the dead worker held
    assert m["counts"]["n"] == N_ROWS and m["counts"]["n_valid"] == N_ROWS
    _assert_same_embeddings(trained["ref"], ws)


# --------------------------------------------------------------------------- full disk


def _fill_disk_code(pattern: str, min_records: int, limit: int, argv: list[str]) -> str:
    """``python -c`` code: run the CLI with ``argv``; once ``min_records`` files match ``pattern``,
    lower RLIMIT_FSIZE to ``limit`` bytes so that every larger write fails with EFBIG."""
    return (
        "import glob, os, resource, signal, threading, time\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "def fill():\n"
        f"    while len([p for p in glob.glob({pattern!r}) if 'layout' not in p]) < {min_records}:\n"
        "        time.sleep(0.005)\n"
        f"    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "threading.Thread(target=fill, daemon=True).start()\n"
        "from streamprune.cli import cli\n"
        f"cli({argv!r}, prog_name='streamprune')\n")


def _run_code(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "STREAMPRUNE_PROGRESS": "0", **env})


@pytest.mark.slow
def test_disk_full_during_embed_fails_cleanly_and_resumes(trained, tmp_path):
    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    argv = ["embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync"]
    pattern = os.path.join(ws, "_stages", "embed", "*", "chunks", "*.json")
    out = _run_code(_fill_disk_code(pattern, 3, 2048, argv), {"STREAMPRUNE_TASK_DELAY": "0.2"})
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith("Error: embed: rows ")
    assert f": file too large (EFBIG) writing {os.path.join(ws, 'embeddings.zarr', 'emb', 'c')}{os.sep}" in line
    assert line.endswith("re-run the same command to resume")
    assert not os.path.exists(os.path.join(ws, "_stages", "embed.json"))
    done = [int(c) for c in _records(ws, "embed")]
    assert 3 <= len(done) < N_ROWS // CHUNK
    dim = trained["ref"][0].shape[1]
    for c in done:  # a recorded chunk has all its outputs, complete
        assert os.path.getsize(os.path.join(ws, "embeddings.zarr", "emb", "c", str(c), "0")) == CHUNK * dim * 4
        for name in ("labels", "valid"):
            assert os.path.exists(os.path.join(ws, "embeddings.zarr", name, "c", str(c)))
    assert not _leftovers(ws)
    first_missing = min(set(range(N_ROWS // CHUNK)) - set(done))
    assert not os.path.exists(os.path.join(ws, "embeddings.zarr", "emb", "c", str(first_missing), "0"))

    out = run_cli(*argv)  # the limit is gone: resume
    assert f"{N_ROWS} of {N_ROWS} rows" in out.stdout
    _assert_same_embeddings(trained["ref"], ws)


@pytest.mark.slow
def test_disk_full_during_client_path_embed_fails_cleanly_and_resumes(trained, tmp_path):
    """The GPU layout (this process encodes, a background thread writes each chunk and records it):
    a failed write stops the stage with the writer's one line, every recorded chunk is complete,
    and a re-run resumes to the same embeddings."""
    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    pattern = os.path.join(ws, "_stages", "embed", "*", "chunks", "*.json")
    code = _fill_disk_code(pattern, 3, 2048, []).replace(
        "from streamprune.cli import cli\ncli([], prog_name='streamprune')\n",
        "import sys\nfrom streamprune.embed import embed\nfrom streamprune.errors import StreamPruneError\n"
        "try:\n"
        f"    embed({ws!r}, chunk_rows={CHUNK}, scheduler='sync', encode='client')\n"
        "except StreamPruneError as exc:\n"
        "    sys.exit(f'Error: {exc}')\n")
    assert "encode='client'" in code
    out = _run_code(code, {"STREAMPRUNE_TASK_DELAY": "0.2"})
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: embed: rows ") and "file too large (EFBIG) writing " in line, out.stderr
    assert not os.path.exists(os.path.join(ws, "_stages", "embed.json"))
    done = [int(c) for c in _records(ws, "embed")]
    assert 3 <= len(done) < N_ROWS // CHUNK
    dim = trained["ref"][0].shape[1]
    for c in done:  # recorded only after its write: complete
        assert os.path.getsize(os.path.join(ws, "embeddings.zarr", "emb", "c", str(c), "0")) == CHUNK * dim * 4
    from streamprune.embed import embed

    m = embed(ws, chunk_rows=CHUNK, scheduler="sync", encode="client")
    assert m["timings"]["path"] == "client" and m["counts"]["n"] == N_ROWS
    _assert_same_embeddings(trained["ref"], ws)


def test_disk_full_during_catalog_fails_cleanly_and_resumes(trained, tmp_path):
    ws = str(tmp_path / "ws")
    argv = ["catalog", *trained["shards"], "-w", ws, "--scheduler", "sync"]
    parts = os.path.join(ws, "catalog", "parts")
    out = _run_code(_fill_disk_code(os.path.join(parts, "*.parquet"), 3, 512, argv),
                    {"STREAMPRUNE_TASK_DELAY": "0.2"})
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and line.startswith(f"Error: catalog: file too large (EFBIG) writing {parts}{os.sep}")
    written = glob.glob(os.path.join(parts, "*.parquet"))
    assert 3 <= len(written) < 8 and not _leftovers(ws)
    for p in written:  # a part (the catalog's chunk record) exists only complete
        assert len(pd.read_parquet(p)) == 40
    run_cli(*argv)
    a, b = Catalog(Workspace(ws)), Catalog(Workspace(trained["ws"]))
    assert np.array_equal(a.keys(), b.keys())
    pd.testing.assert_frame_equal(a.shards[["url", "n_samples", "row_start"]], b.shards[["url", "n_samples", "row_start"]])


def test_disk_full_names_the_file_whose_write_failed(trained, tmp_path):
    """A failed write() raises ENOSPC/EFBIG without a file name; zarr's local store, the atomic JSON writer,
    the atomic output files (reshard tars, keys), the score table, the report's plots and the leases name
    theirs, so the one line says which disk is full."""
    ws = shutil.copytree(trained["ws"], str(tmp_path / "ws"))
    out = str(tmp_path / "out")
    code = (
        "import pickle, resource, signal, numpy as np, zarr\n"
        "from streamprune import storage\n"
        "from streamprune.compute import disk_full_message\n"
        "from streamprune.prune import atomic_output\n"
        "from streamprune.export import export_scores\n"
        "from streamprune.report import _plt, _save\n"
        "from streamprune.leases import _create\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "store = storage.zarr_store(%(out)r + '/a.zarr')\n"
        "assert pickle.loads(pickle.dumps(store)) == store\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "def tar():\n"
        "    with atomic_output(%(out)r + '/c.tar') as f:\n"
        "        f.write(bytes(8192))\n"
        "for write in (lambda: zarr.create_array(store, data=np.ones(4096), compressors=None),\n"
        "              lambda: storage.write_bytes_atomic(%(out)r + '/b.json', bytes(8192)), tar,\n"
        "              lambda: export_scores(%(ws)r, %(out)r + '/d.csv'),\n"
        "              lambda: _save(_plt().figure(figsize=(8, 8)), %(out)r + '/e.png'),\n"
        "              lambda: _create(%(out)r + '/f.lease', bytes(8192), None)):\n"
        "    try:\n"
        "        write()\n"
        "    except Exception as exc:\n"
        "        print(disk_full_message(exc))\n") % {"out": out, "ws": ws}
    got = _run_code(code, {})
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) == 6, got.stdout
    for line, name in zip(lines, ("a.zarr/c/0", "b.json", "c.tar", "d.csv", "e.png", "f.lease")):
        assert line.startswith(f"file too large (EFBIG) writing {os.path.join(out, name)}; free space"), line
    argv = ["subset", "-w", ws, "--fraction", "0.3", "--force"]
    got = _run_code(_fill_disk_code(os.path.join(ws, "*.json"), 1, 300, argv), {})
    assert got.returncode == 1 and got.stderr.startswith(
        f"Error: file too large (EFBIG) writing {os.path.join(ws, 'subset', 'rows.zarr')}{os.sep}"), got.stderr


def test_disk_full_message_names_the_target_file():
    for code, text in ((errno.ENOSPC, "no space left on device (ENOSPC)"), (errno.EFBIG, "file too large (EFBIG)"),
                       (errno.EDQUOT, "(EDQUOT)")):
        exc = OSError(code, os.strerror(code), "/ws/embeddings.zarr/emb/c/3/0.0123456789abcdef0123456789abcdef.partial")
        msg = disk_full_message(exc, "embed")
        assert msg.startswith("embed: ") and text in msg and "writing /ws/embeddings.zarr/emb/c/3/0;" in msg
    ours = OSError(errno.ENOSPC, "x", "/ws/_stages/.tmp-0123456789abcdef0123456789abcdef-3.json")
    assert "writing /ws/_stages/3.json;" in disk_full_message(ours)
    reshard = OSError(errno.ENOSPC, "x", "/out/.tmp-0123456789ab-pruned-000003.tar.partial")
    assert "writing /out/pruned-000003.tar;" in disk_full_message(reshard)
    try:  # found behind a wrapping exception too
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert disk_full_message(outer).startswith("no space left on device (ENOSPC);")
    if os.path.exists("/dev/full"):  # faiss's C++ writer reports a full disk as a RuntimeError with the C text
        import faiss

        index = faiss.IndexFlatL2(8)
        index.add(np.zeros((1000, 8), np.float32))
        with pytest.raises(StreamPruneError, match=r"^index: no space left on device \(ENOSPC\); free space"), \
                disk_errors("index"):
            faiss.write_index(index, "/dev/full")
    assert disk_full_message(RuntimeError("write error in f: 0 != 4096 (File too large)")).startswith(
        "file too large (EFBIG);")
    assert disk_full_message(OSError(errno.ENOENT, "gone", "/x")) is None
    assert disk_full_message(ValueError("x")) is None
    with pytest.raises(StreamPruneError, match="^stage: no space left"), disk_errors("stage"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), disk_errors("stage"):
        raise PermissionError(errno.EACCES, "denied")


# --------------------------------------------------------------------------- signals


def _signal_mid_embed(ws: str, sig: int, scheduler: str, group: bool = False) -> subprocess.CompletedProcess:
    """Run `embed` through the CLI; once 3 chunks are recorded send ``sig`` to it (to its whole process
    group with ``group``, as a terminal's Ctrl-C or a batch scheduler's cancel does)."""
    import signal

    argv = [sys.executable, "-m", "streamprune.cli", "embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler",
            scheduler]
    env = {**os.environ, "STREAMPRUNE_PROGRESS": "0", "STREAMPRUNE_TASK_DELAY": "0.2"}
    # SIGINT's default action, as in a terminal: a test run started in the background by a shell without
    # job control ignores SIGINT, and the stage would inherit that (and finish, exit 0, despite the signal)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while len(_records(ws, "embed")) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        (os.killpg if group else os.kill)(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_sigterm_mid_stage_is_one_line_and_releases_the_lease(trained, tmp_path):
    """SIGTERM (kill, a batch scheduler preempting the job) unwinds like Ctrl-C: one line, exit 143, the
    stage's lease released (a re-run on another host need not wait for it to expire), and the re-run
    resumes to the embeddings of an uninterrupted run."""
    import signal

    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    out = _signal_mid_embed(ws, signal.SIGTERM, "sync")
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert out.stderr.strip() == "terminated (SIGTERM); re-run the same command to resume"
    assert not glob.glob(os.path.join(ws, "_stages", "*.lease")) and not _leftovers(ws)
    done = _records(ws, "embed")
    assert 3 <= len(done) < N_ROWS // CHUNK and not os.path.exists(os.path.join(ws, "_stages", "embed.json"))
    run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync")
    _assert_same_embeddings(trained["ref"], ws)


def test_local_cluster_workers_ignore_sigint():
    """Ctrl-C reaches every process of the terminal's group: the local cluster's workers ignore it (each
    printed a KeyboardInterrupt traceback above the command's line) and the stage's process stops them."""
    import signal

    from streamprune import compute

    with compute.client_for("local", 2) as client:
        assert set(client.run(lambda: signal.getsignal(signal.SIGINT) is signal.SIG_IGN).values()) == {True}
        pids = client.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)
        assert sorted(map_tasks(_square, [(i,) for i in range(4)], scheduler=client.scheduler.address)) == [0, 1, 4, 9]
        assert client.run(os.getpid) == pids  # the same processes: none was interrupted


@pytest.mark.slow
def test_ctrl_c_on_a_local_cluster_is_one_line(trained, tmp_path):
    import signal

    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    out = _signal_mid_embed(ws, signal.SIGINT, "local", group=True)
    assert out.returncode == 130 and out.stderr.strip() == "interrupted; re-run the same command to resume", \
        out.stderr
    assert not glob.glob(os.path.join(ws, "_stages", "*.lease"))
    run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync")
    _assert_same_embeddings(trained["ref"], ws)


# --------------------------------------------------------------------------- damaged workspace files


def test_damaged_checkpoint_and_errors_file_are_one_line_and_repairable(trained, tmp_path):
    """A damaged model.pt or errors.jsonl (a copy cut short, an edit) stops the stage with one line naming
    the file and saying what to do, instead of torch's or json's traceback; doing it repairs the workspace."""
    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    model = os.path.join(ws, "train", "model.pt")
    with open(model, "r+b") as f:
        f.truncate(100)
    out = run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (f"Error: {model} is damaged or not a checkpoint (RuntimeError: PytorchStreamReader "
                                  "failed reading zip archive: failed finding central directory); remove it (and "
                                  "re-run the stage that wrote it, with --force) or use a new workspace")
    os.unlink(model)
    train(ws, TrainConfig(model="mlp", epochs=1, batch_size=32), DecodeConfig(), scheduler="sync", force=True)

    errors = os.path.join(ws, "errors.jsonl")
    with open(errors, "a") as f:
        f.write('{"stage": "embed", "key": \n')
    out = run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    n = len(open(errors).read().splitlines())
    assert out.stderr.strip() == (f"Error: {errors} line {n} is not valid JSON (Expecting value); it was damaged or "
                                  "edited: fix or remove that line (a stage that runs again rewrites its own lines)")
    with open(errors) as f:
        lines = f.read().splitlines()[:-1]
    with open(errors, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync")  # resumes and commits
    _assert_same_embeddings(trained["ref"], ws)


def test_damaged_zarr_data_is_one_line_naming_the_array(trained, tmp_path):
    """A zarr chunk or zarr.json cut short raised its codec's error (zstd, blosc, a reshape, JSON) with a
    traceback; it is one line naming the array.  A caller's wrong write inside zarr stays a bug (no line)."""
    from streamprune import storage

    ws = shutil.copytree(trained["tmp"] / "clean", str(tmp_path / "ws"))
    chunk = os.path.join(ws, "embeddings.zarr", "emb", "c", "0", "0")
    with open(chunk, "r+b") as f:
        f.truncate(100)
    out = run_cli("index", "-w", ws, "--graph", "all", "--k", "5", "--scheduler", "sync", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().startswith(f"Error: {os.path.join(ws, 'embeddings.zarr', 'emb')} cannot be read "
                                         "(ValueError: cannot reshape array of size 25 into shape ("), out.stderr
    assert out.stderr.strip().endswith("): it is damaged or was written by another tool; remove the output of the "
                                       "stage that wrote it and re-run that stage with --force, or use a new workspace")
    meta = os.path.join(ws, "embeddings.zarr", "labels", "zarr.json")
    with open(meta, "r+b") as f:
        f.truncate(40)
    line = storage.zarr_read_error_line(pytest.raises(Exception, zarr.open_group(storage.zarr_store(
        os.path.join(ws, "embeddings.zarr")), mode="r").__getitem__, "labels").value)
    assert line is not None and line.startswith(f"{os.path.join(ws, 'embeddings.zarr', 'labels')}") and \
        "cannot be read (JSONDecodeError: " in line, line
    arr = zarr.create_array(storage.zarr_store(str(tmp_path / "w.zarr")), shape=(4,), dtype="float32")
    with pytest.raises(ValueError) as wrong:
        arr[0:2] = np.zeros((2, 2), np.float32)
    assert storage.zarr_read_error_line(wrong.value) is None
    arr[:] = 1
    for bad_read in (lambda: arr[9], lambda: arr.get_orthogonal_selection((np.array([1, 9]),)), lambda: arr["f"]):
        with pytest.raises(IndexError) as wrong:  # a caller's selection out of bounds: a bug, not damaged data
            bad_read()
        assert storage.zarr_read_error_line(wrong.value) is None


# --------------------------------------------------------------------------- memory limits


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 1 << 40), per_row=st.integers(1, 1 << 24), floor=st.integers(1, 1 << 12),
       extra=st.integers(0, 1 << 20))
def test_chunk_rows_for_fits_the_budget(limit, per_row, floor, extra):
    cap = floor + extra
    rows = chunk_rows_for(limit, per_row, floor, cap)
    assert floor <= rows <= cap
    budget = int(limit * MEMORY_SHARE)
    if floor < rows < cap:  # neither clamp: the largest power of two within the budget
        assert rows & (rows - 1) == 0 and rows * per_row <= budget < 2 * rows * per_row
    if rows > floor:
        assert rows * per_row <= budget
    assert chunk_rows_for(2 * limit, per_row, floor, cap) >= rows  # monotone in the limit
    assert chunk_rows_for(limit, 2 * per_row, floor, cap) <= rows


def test_chunk_rows_for_examples_and_bad_input():
    gib = 1 << 30
    assert chunk_rows_for(4 * gib, 1 << 20, 1, None) == 1024  # 1 GiB of 1 MiB rows
    assert chunk_rows_for(4 * gib, 3 << 20, 1, None) == 256  # 341 rows fit: 256
    assert chunk_rows_for(4 * gib, 1 << 20, 2048, None) == 2048  # the floor wins
    assert chunk_rows_for(4 * gib, 1, 1, 1 << 16) == 1 << 16  # the cap wins
    assert chunk_rows_for(100, 1000, 1, None) == 1
    for bad in ((0, 1, 1, None), (1, 0, 1, None), (1, 1, 0, None), (1, 1, 8, 4)):
        with pytest.raises(ValueError):
            chunk_rows_for(*bad)


def test_worker_count_and_parse_memory():
    gib = 1 << 30
    assert worker_count(100, cores=16) == 16
    assert worker_count(3, cores=16) == 3
    assert worker_count(100, 8 * gib, total_memory=64 * gib, cores=16) == 8  # memory-bound
    assert worker_count(100, 128 * gib, total_memory=64 * gib, cores=16) == 1  # never zero
    assert parse_memory("4GiB") == 4 * gib and parse_memory("500MB") == 500_000_000
    assert parse_memory(1234) == 1234 and parse_memory(None) is None
    for bad in ("lots", "-1GB", 0, "0B"):
        with pytest.raises(StreamPruneError, match="--memory-limit"):
            parse_memory(bad)


def test_embed_default_chunk_rows_shrinks_to_the_memory_limit():
    # 224x224x3 uint8 images (~110 KB encoded) into 512-d float32: a 4096-row task holds ~1.5 GB
    per_row = task_row_bytes(224 * 224 * 3, 110_000, 512)
    assert default_chunk_rows(512, 4) == 4096
    assert default_chunk_rows(512, 4, per_row, 64 << 30) == 4096  # plenty: the default stands
    assert default_chunk_rows(512, 4, per_row, 4 << 30) == 2048  # 1 GiB share / ~420 KB per row
    assert default_chunk_rows(512, 4, per_row, 1 << 20) == 64  # floor
    assert default_chunk_rows(16, 4) == 16384  # >= 1 MB of output per chunk


def test_embed_memory_limit_sets_chunks_and_keeps_finished_work(trained, tmp_path):
    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    m = embed(ws, scheduler="sync", memory_limit="4MiB")
    per_row = task_row_bytes(16 * 4, int(Catalog(Workspace(ws)).shards["size"].sum()) // N_ROWS,
                             trained["ref"][0].shape[1])
    expect = chunk_rows_for(4 << 20, per_row, 64, 16384)
    assert m["config"]["chunk_rows"] == expect and 64 < expect < N_ROWS
    assert zarr.open_group(os.path.join(ws, "embeddings.zarr"))["emb"].chunks[0] == expect
    _assert_same_embeddings(trained["ref"], ws)
    # another limit (or none) later is a resource choice, not a new configuration: skipped, not refused
    assert embed(ws, scheduler="sync").get("skipped") and embed(ws, scheduler="sync", memory_limit="8GiB")["skipped"]
    with pytest.raises(StreamPruneError, match="--memory-limit"):
        embed(ws, scheduler="sync", memory_limit="lots")


def _hog(nbytes: int) -> None:
    block = np.ones(nbytes, np.uint8)  # touched pages: resident
    time.sleep(5)
    return int(block[-1])


@pytest.mark.slow
def test_local_cluster_enforces_memory_limit():
    import dask

    from streamprune.compute import client_for

    # A task over its worker's limit is killed by the nanny wherever it runs; after
    # allowed-failures re-runs (3 by default; 1 here to keep the test short) one clear line.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), client_for("local", 1, "500MiB") as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["memory_limit"] for w in workers] == [500 << 20]
        with pytest.raises(StreamPruneError) as info:
            map_tasks(_hog, [(900 << 20,)], scheduler=client.scheduler.address, desc="hog")
    msg = str(info.value)
    assert msg.startswith("hog: a dask worker died each of the 2 times a task ran (out of memory? raise --memory-limit")
    assert "\n" not in msg


def _square(x: int) -> int:
    return x * x


def _pid(_i: int) -> int:
    time.sleep(0.2)  # long enough that every worker gets a task
    return os.getpid()


def test_shared_local_cluster_serves_every_local_stage_once():
    """Inside shared_local_cluster() "local" tasks run on one cluster (the same worker processes for
    every call, closed at the end); a stage with its own memory limit still starts its own."""
    from streamprune import compute

    with compute.shared_local_cluster():
        a = set(map_tasks(_pid, [(i,) for i in range(8)], scheduler="local"))
        b = set(map_tasks(_pid, [(i,) for i in range(8)], scheduler="local"))
        with compute.shared_local_cluster():  # nested: the same scope
            c = set(map_tasks(_pid, [(i,) for i in range(8)], scheduler="local"))
        own = set(map_tasks(_pid, [(i,) for i in range(2)], scheduler="local", memory_limit="1GiB"))
        cluster = compute._SHARED[0]["cluster"]
        with compute.client_for("local") as client:
            pids = set(client.run(os.getpid).values())
    assert len(pids) == compute.worker_count(os.cpu_count() or 1) and os.getpid() not in pids
    assert a | b | c <= pids and not (own & pids)
    assert not compute._SHARED and cluster.status.name == "closed"
    after = set(map_tasks(_pid, [(i,) for i in range(2)], scheduler="local"))
    assert not (after & pids)


def _profiler_enabled() -> bool:
    import dask

    return dask.config.get("distributed.worker.profile.enabled")


def _profiler_thread_samples(_i: int) -> bool:
    """Whether this worker's statistical profiler collected anything while a task ran."""
    from distributed import get_worker

    deadline = time.time() + 0.3
    while time.time() < deadline:
        sum(range(10_000))  # Python work the profiler would sample
    return bool(get_worker().profile_recent.get("count", 0))


def test_local_workers_run_without_the_statistical_profiler():
    """The local clusters' workers (own and shared) run with dask's 10 ms stack sampler off, which
    costs ~8 % of a decode task's CPU; the calling process's dask config is left as it was."""
    import importlib

    import dask

    from streamprune import compute

    importlib.import_module("distributed")  # loads distributed's config defaults into dask.config

    assert dask.config.get("distributed.worker.profile.enabled") is True  # dask's default, here
    with compute.client_for("local", 2) as client:
        assert set(client.run(_profiler_enabled).values()) == {False}
        assert map_tasks(_profiler_thread_samples, [(0,)], scheduler=client.scheduler.address) == [False]
    with compute.shared_local_cluster(), compute.client_for("local") as client:
        assert set(client.run(_profiler_enabled).values()) == {False}
    assert dask.config.get("distributed.worker.profile.enabled") is True


def test_stage_tracks_tasks_on_its_own_client_not_the_callers():
    """A caller that already holds a Client (a notebook, a test harness) is the current client of
    its thread, on another event loop.  The stage must wait for its tasks on its own client's
    loop: tracking them on the caller's loop raced with a retried gather ("Event bound to a
    different event loop") and stalls outright while the caller's loop is busy, as it is here."""
    import threading

    from dask.distributed import Client, LocalCluster, default_client

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster.scheduler_address) as callers:  # its own loop, not the scheduler's
        assert default_client() is callers
        release = threading.Event()
        callers.loop.add_callback(release.wait, 60)  # the caller's loop is busy until released
        threading.Timer(30, release.set).start()  # the stage takes ~1 s; a stalled one is freed at 30 s
        result = map_tasks(_square, [(i,) for i in range(6)], scheduler=cluster.scheduler_address, desc="sq")
        stalled = release.is_set()
        release.set()
    assert not stalled, "the stage waited on the caller's event loop"
    assert result == [i * i for i in range(6)]


# --------------------------------------------------------------------------- crash and resume gaps


@pytest.mark.slow
def test_killed_subset_decode_cache_resumes_identically(trained, tmp_path):
    """The decode cache of `score` (one task per chunk of subset rows) resumes after SIGKILL."""
    cfg = dict(model="mlp", epochs=2, batch_size=32, chunk_rows=10)
    ref, ws = (shutil.copytree(trained["ws"], str(tmp_path / n),
                               ignore=shutil.ignore_patterns("train", "train.json", "scores", "score-*"))
               for n in ("ref", "ws"))
    train(ref, TrainConfig(**cfg), DecodeConfig(), scheduler="sync")
    code = ("from streamprune.train import train, TrainConfig; from streamprune.decode import DecodeConfig; "
            f"train({ws!r}, TrainConfig(**{cfg!r}), DecodeConfig(), scheduler='sync')")
    kill_python_when(code, lambda: len(_records(ws, "train", "cache-")) >= 3,
                     env={"STREAMPRUNE_TASK_DELAY": "0.3"}, timeout=120)
    n_done = len(_records(ws, "train", "cache-"))
    assert not os.path.exists(os.path.join(ws, "_stages", "train.json")) and n_done >= 3
    train(ws, TrainConfig(**cfg), DecodeConfig(), scheduler="sync")
    a = zarr.open_group(os.path.join(ref, "train", "cache.zarr"), mode="r")
    b = zarr.open_group(os.path.join(ws, "train", "cache.zarr"), mode="r")
    for name in ("x", "labels", "valid"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    da = zarr.open_group(os.path.join(ref, "train", "dynamics.zarr"), mode="r")
    db = zarr.open_group(os.path.join(ws, "train", "dynamics.zarr"), mode="r")
    np.testing.assert_array_equal(da["true_prob"][:], db["true_prob"][:])


def _embedding_workspace(root: str, x: np.ndarray, chunk: int) -> Workspace:
    """A workspace holding only embeddings.zarr and its embed marker."""
    from streamprune import storage

    ws = Workspace(root)
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="w")
    group.create_array("emb", data=x, chunks=(chunk, x.shape[1]))
    group.create_array("labels", data=np.zeros(len(x), np.int64), chunks=(chunk,))
    group.create_array("valid", data=np.ones(len(x), bool), chunks=(chunk,))
    ws.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": len(x)})
    return ws


@pytest.mark.slow
def test_killed_ondisk_index_add_resumes_identically(tmp_path):
    """The on-disk add phase of `index` (one task per shard index, merged after) resumes after SIGKILL."""
    from streamprune.index import build_index, read_graph

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6000, 16)) + 4 * rng.standard_normal((40, 16))[rng.integers(0, 40, 6000)])
    x = x.astype(np.float32)
    opts = dict(graph="all", k=6, factory="IVF32,PQ4", refine=0, nprobe=8, scheduler="sync", chunk_rows=1000,
                recall_queries=100, ondisk_threshold=1000)
    clean, killed = _index_killed_midway(tmp_path, x, 500, opts, "shard-", delay=0.3)
    assert killed.marker("index-all") is None and len(_records(killed.url, "index-all", "shard-")) < 6
    m = build_index(killed, **opts)["all"]
    assert m["counts"]["ondisk"]
    for a, b in zip(read_graph(clean, "all"), read_graph(killed, "all")):
        np.testing.assert_array_equal(a[:], b[:])


def _index_killed_midway(tmp_path, x: np.ndarray, emb_chunk: int, opts: dict, records: str, delay: float):
    """Two workspaces of embeddings ``x``: one indexed without interruption, one killed (SIGKILL) once two
    chunk records starting with ``records`` are written."""
    from streamprune.index import build_index

    clean = _embedding_workspace(str(tmp_path / "clean"), x, emb_chunk)
    killed = _embedding_workspace(str(tmp_path / "killed"), x, emb_chunk)
    build_index(clean, **opts)
    code = f"from streamprune.index import build_index; build_index({killed.url!r}, **{opts!r})"
    kill_python_when(code, lambda: len(_records(killed.url, "index-all", records)) >= 2,
                     env={"STREAMPRUNE_TASK_DELAY": str(delay)}, timeout=120)
    return clean, killed


def test_output_removed_by_hand_mid_run_is_written_again(trained, tmp_path):
    """A user who deletes the half-written output of a killed run (to "start clean") and runs the same
    command again gets the output of an uninterrupted run: the chunk records that described the removed
    rows are dropped, not trusted (they said: not found, naming the workspace; or left rows empty)."""
    from streamprune.index import build_index, read_graph

    ws = _copy_without_embed(trained["ws"], str(tmp_path / "ws"))
    code = f"from streamprune.embed import embed; embed({ws!r}, chunk_rows={CHUNK}, scheduler='sync')"
    kill_python_when(code, lambda: len(_records(ws, "embed")) >= 3, env={"STREAMPRUNE_TASK_DELAY": "0.2"},
                     timeout=120)
    shutil.rmtree(os.path.join(ws, "embeddings.zarr"))
    out = run_cli("embed", "-w", ws, "--chunk-rows", str(CHUNK), "--scheduler", "sync")
    assert f"embed: {os.path.join(ws, 'embeddings.zarr')} is gone; doing its " in out.stderr
    _assert_same_embeddings(trained["ref"], ws)

    x = np.random.default_rng(5).standard_normal((600, 8)).astype(np.float32)
    opts = dict(graph="all", k=4, factory="Flat", refine=0, scheduler="sync", chunk_rows=50, recall_queries=50)
    clean, killed = _index_killed_midway(tmp_path, x, 100, opts, "search-", delay=0.2)
    shutil.rmtree(os.path.join(killed.url, "graph", "all.zarr"))
    build_index(killed, **opts)
    for a, b in zip(read_graph(clean, "all"), read_graph(killed, "all")):
        np.testing.assert_array_equal(a[:], b[:])


def _touch(directory: str, i: int) -> int:
    open(os.path.join(directory, str(i)), "w").close()  # the task has started
    return i


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_map_tasks_bounds_tasks_in_flight(tmp_path, scheduler):
    """With inflight_per_worker, tasks are submitted as results are handed over: finished results
    waiting for a slow on_result (embed encoding in this process) cannot pile up on the workers."""
    from streamprune.compute import worker_count

    seen = []

    def slow_consumer(i, value):
        seen.append(len(os.listdir(tmp_path)))
        time.sleep(0.05)

    n = 20
    out = map_tasks(_touch, [(str(tmp_path), i) for i in range(n)], scheduler=scheduler, threads=2,
                    inflight_per_worker=1, on_result=slow_consumer)
    assert out == list(range(n)) and len(seen) == n
    window = 2 if scheduler == "threads" else worker_count(n)
    # when the k-th result is handed over, `window` tasks were submitted first and one more after each earlier result
    assert all(started <= window + k - 1 for k, started in enumerate(seen, 1)), seen


def _slow_first(directory: str, i: int) -> int:
    open(os.path.join(directory, str(i)), "w").close()  # the task has started
    if i == 0:
        time.sleep(0.5)
    return i


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_map_tasks_ordered_window_waits_for_the_slow_task(tmp_path, scheduler):
    """With ordered_window=3 no task 3 or later starts before task 0 is done, however fast the others
    are: a caller writing results in input order holds at most 3 (subset's row ids)."""
    started_when_first_done = []
    order = []

    def consume(i, value):
        order.append(i)
        if i == 0:
            started_when_first_done.append(sorted(int(f) for f in os.listdir(tmp_path)))

    out = map_tasks(_slow_first, [(str(tmp_path), i) for i in range(12)], scheduler=scheduler, threads=4,
                    on_result=consume, ordered_window=3, keep=False)
    assert out == [None] * 12 and sorted(order) == list(range(12))
    assert set(started_when_first_done[0]) <= {0, 1, 2}, started_when_first_done


def test_one_behind_runs_in_order_one_step_behind_and_reraises():
    """OneBehind: calls run one at a time in submission order; submit() waits for the previous call
    (so at most one is pending) and re-raises its error; close() re-raises the last one unless quiet."""
    import threading

    from streamprune.compute import OneBehind

    log, running = [], threading.Event()

    def step(i: int) -> None:
        assert not running.is_set()  # never two at once
        running.set()
        time.sleep(0.02)
        log.append((i, threading.current_thread().name))
        running.clear()

    bg = OneBehind("test-bg")
    for i in range(5):
        bg.submit(step, i)
        assert len(log) >= i  # the previous call had finished when this one was handed over
    bg.close()
    assert [i for i, _ in log] == list(range(5))
    assert all(name.startswith("test-bg") for _, name in log)

    def fail() -> None:
        raise OSError("disk gone")

    bg = OneBehind("test-bg")
    bg.submit(fail)
    with pytest.raises(OSError, match="disk gone"):
        bg.submit(step, 9)  # the previous call's error, in the caller
    bg.submit(fail)
    with pytest.raises(OSError, match="disk gone"):
        bg.close()
    bg = OneBehind("test-bg")
    bg.submit(fail)
    bg.close(quiet=True)  # a caller already unwinding keeps its own error


def _refuse(directory: str, i: int) -> int:
    open(os.path.join(directory, f"{i}-{time.time_ns()}"), "w").close()  # one file per run of the task
    raise StreamPruneError(f"row {i}: bad input")


def test_a_user_error_in_a_task_is_its_own_line_and_never_retried(tmp_path):
    """A StreamPruneError raised in a task on a cluster reaches the caller as it was raised, after one
    run: retries are for tasks whose worker died, not for bad input."""
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with pytest.raises(StreamPruneError) as err:
            map_tasks(_refuse, [(str(tmp_path), 0)], scheduler=cluster.scheduler_address, desc="refuse")
    assert str(err.value) == "row 0: bad input" and len(os.listdir(tmp_path)) == 1


def _slow_square(x: int) -> int:
    time.sleep(0.3)
    return x * x


def test_scheduler_lost_mid_stage_is_one_line():
    """The scheduler going away mid-stage: one line saying to re-run, not the client's traceback."""
    import threading

    from dask.distributed import LocalCluster

    from streamprune.compute import map_tasks

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0")
    got = []

    def first_result(i, value):
        got.append(value)
        if len(got) == 1:
            threading.Thread(target=cluster.close).start()  # the scheduler and its worker go away

    try:
        with pytest.raises(StreamPruneError) as err:
            map_tasks(_slow_square, [(i,) for i in range(40)], scheduler=cluster.scheduler_address, desc="embed",
                      on_result=first_result, inflight_per_worker=2)
    finally:
        cluster.close()
    assert str(err.value) == (f"embed: lost the dask scheduler {cluster.scheduler_address} mid-stage; the finished "
                              "chunks are kept: re-run the same command to resume")
    assert 1 <= len(got) < 40


def test_cluster_without_workers_warns_and_the_stage_runs_once_one_joins(monkeypatch, caplog):
    """A stage on a scheduler with no workers says so (it would otherwise wait without a word), and
    finishes once a worker joins."""
    import logging
    import threading

    from dask.distributed import LocalCluster

    from streamprune import compute

    monkeypatch.setattr(compute, "NO_WORKERS_CHECK_S", 0.2)
    cluster = LocalCluster(n_workers=0, processes=False, dashboard_address=":0")
    try:
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(result=map_tasks(
            pow, [(2, 3), (3, 2)], scheduler=cluster.scheduler_address)), daemon=True)
        with caplog.at_level(logging.WARNING, logger="streamprune.compute"):
            runner.start()
            deadline = time.time() + 30
            while "has no workers" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
            assert f"dask scheduler {cluster.scheduler_address} has no workers" in caplog.text
            assert runner.is_alive() and "result" not in out
            cluster.scale(1)
            runner.join(60)
        assert out["result"] == [8, 9]
        assert caplog.text.count("has no workers") == 1
    finally:
        cluster.close()
