"""Hash-based uniform subset selection: a pure function of (key, seed).

A sample is in the subset when ``u(key, seed) < fraction`` with ``u`` a 64-bit keyed BLAKE2b hash
mapped to [0, 1).  No global permutation is needed, membership is reproducible, and a sample keeps
its membership when shards are added or moved (the URL is not hashed).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Iterable

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import StreamPruneError, check_seed
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace

_SCALE = float(2**64)
log = logging.getLogger(__name__)


def key_uniform(keys: Iterable[str], seed: int) -> np.ndarray:
    """Uniform value in [0, 1] per key, deterministic for ``seed`` (its 64-bit hash / 2^64: the top 2^10
    hashes round to exactly 1.0 in float64, so :func:`in_subset` keeps every key at fraction 1).

    Each key's hash continues a copy of one keyed state (the key block is compressed once, not per
    sample) and the digests are read as little-endian uint64 in one buffer: the same values as
    hashing each key from scratch, 2.4x faster (200k keys: 0.12 against 0.30 s on the CPU box).
    """
    salt = int(seed).to_bytes(8, "little", signed=True)
    fresh = hashlib.blake2b(digest_size=8, key=salt).copy

    def digest(k: str) -> bytes:
        h = fresh()
        h.update(k.encode())
        return h.digest()

    raw = b"".join(map(digest, keys))
    return np.frombuffer(raw, "<u8").astype(np.float64) / _SCALE


def in_subset(keys: Iterable[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean membership of each key in the ``fraction`` subset for ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise StreamPruneError(f"--fraction must be in (0, 1], got {fraction}")
    u = key_uniform(keys, seed)
    return np.ones(len(u), bool) if fraction >= 1.0 else u < fraction


TASK_ROWS = 1 << 20  # catalog rows hashed per task
ORDERED_TASKS = 32  # tasks run at most this far ahead of the first unwritten one (results held: <= 8 MB each)


@releases_leases
def subset(workspace: str | Workspace, *, fraction: float = 0.2, seed: int = 0, storage_options: dict | None = None,
           force: bool = False, chunk_rows: int = 1 << 20, scheduler: str | None = "sync") -> dict:
    """Select the subset rows of the catalog and write them sorted to ``subset/rows.zarr``.

    Keys are hashed one task per ~``TASK_ROWS`` catalog rows (whole shards), under ``scheduler``
    (``"sync"``: in this process; a cluster hashes a billion keys in parallel, ~10 minutes on one
    core); the client writes the row ids in row order as tasks finish, holding at most one output
    chunk plus the results of tasks that finished ahead of an earlier one, which are at most
    ``ORDERED_TASKS`` (tasks further ahead wait to be submitted).  Every write of the output is
    recorded with the tasks it completes, so a killed run resumes after the last recorded write.
    """
    from streamprune.compute import map_tasks
    from streamprune.shards import Catalog

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    if not 0.0 < fraction <= 1.0:
        raise StreamPruneError(f"--fraction must be in (0, 1], got {fraction}")
    check_seed(seed, "--seed", signed=True)
    cat_marker = ws.require("catalog", "subset")
    config = {"fraction": float(fraction), "seed": int(seed)}
    run = ws.begin("subset", config, {"catalog": cat_marker["fingerprint"]}, force=force)
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    cat = Catalog(ws)
    store = storage.zarr_store(ws.path("subset", "rows.zarr"), ws.storage_options)
    groups = shard_groups(cat.shards.n_samples.to_numpy(np.int64), TASK_ROWS)
    # Each write of the output is recorded as a chunk named by the tasks it completes; a killed run
    # resumes after the last recorded write, dropping rows a later, unrecorded write may have left.
    done = [int(c) for c in run.done_chunks()]
    resumed = run.chunk_done(max(done)) if done else None
    if resumed is not None:
        arr = zarr.open_array(store, mode="r+")
        arr.resize((int(resumed["rows"]),))
        log.info("subset: resuming after %d of %d tasks", resumed["tasks"], len(groups))
    else:
        arr = zarr.create_array(store, shape=(0,), chunks=(chunk_rows,), dtype="int64", overwrite=True,
                                fill_value=-1)
    start = int(resumed["tasks"]) if resumed else 0
    state = {"next": start, "written": arr.shape[0], "buffered": 0}
    ahead: dict[int, np.ndarray] = {}  # results of tasks that finished before an earlier one
    buf: list[np.ndarray] = []

    def _collect(i: int, rows: np.ndarray) -> None:
        ahead[start + i] = rows
        while state["next"] in ahead:
            part = ahead.pop(state["next"])
            state["next"] += 1
            buf.append(part)
            state["buffered"] += len(part)
            if state["buffered"] >= chunk_rows:
                state["written"] = _flush(arr, buf, state["written"])
                buf.clear()
                state["buffered"] = 0
                run.mark_chunk(state["next"], {"tasks": state["next"], "rows": state["written"]})

    todo = groups[start:]
    map_tasks(_hash_rows, [(ws, g, fraction, seed) for g in todo], scheduler=scheduler if len(todo) > 1 else "sync",
              desc="subset", unit="row", weights=[int(cat.shards.n_samples.iloc[g].sum()) for g in todo],
              on_result=_collect, inflight_per_worker=4, keep=False, ordered_window=ORDERED_TASKS)
    written = _flush(arr, buf, state["written"])
    return run.commit(outputs={"rows": "subset/rows.zarr"},
                      counts={"n_subset": written, "n_samples": cat.n_samples,
                              "realised_fraction": written / cat.n_samples if cat.n_samples else 0.0},
                      timings={"select_s": round(time.time() - t0, 3), "tasks": len(groups), "tasks_resumed": start})


def shard_groups(sizes: np.ndarray, rows: int) -> list[list[int]]:
    """Consecutive shard indices in groups of about ``rows`` samples (at least one shard each)."""
    groups: list[list[int]] = []
    total = rows
    for i, size in enumerate(np.asarray(sizes, np.int64)):
        if total >= rows:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += int(size)
    return groups


def _hash_rows(ws: Workspace, shards: list[int], fraction: float, seed: int) -> np.ndarray:
    """Catalog row ids (ascending) of the subset members among the samples of ``shards``."""
    from streamprune.shards import Catalog

    cat = Catalog(ws)
    parts = [np.flatnonzero(in_subset(cat.part_keys(i), fraction, seed)) + cat.row_start[i] for i in shards]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _flush(arr: zarr.Array, buf: list[np.ndarray], written: int) -> int:
    if not buf:
        return written
    rows = np.concatenate(buf)
    arr.resize((written + len(rows),))
    arr[written:written + len(rows)] = rows
    return written + len(rows)


def subset_rows(ws: Workspace) -> np.ndarray:
    """Sorted row ids of the subset (m int64s: a few bytes per subset row, held in memory)."""
    ws.require("subset", "read subset")
    return zarr.open_array(storage.zarr_store(ws.path("subset", "rows.zarr"), ws.storage_options), mode="r")[:]
