"""Score propagation: seed scores diffused over the all-rows kNN graph, seeds clamped.

Label propagation with clamping (Zhou et al. 2004; with clamped seeds it converges to the harmonic
solution of Zhu et al. 2003): every valid non-seed row repeatedly takes the exp(-d)-weighted mean
of its neighbours' current values,

    f <- D^-1 W f,    f_seed = measured score (clamped after every step),

where W holds row i's ``knn_weights`` over its k nearest valid rows in ``graph/all.zarr`` (a
directed graph: each row averages over its own out-neighbours, so its weights depend only on its
own table row).  Non-seed rows start at the seed-score mean.  The iteration stops when the largest
change of a non-seed row, relative to the seed-score standard deviation, is below ``tol`` and no
row was newly reached by a seed in that step — or after ``max_iter`` steps.  Rows no seed reaches
(components without a seed, or beyond ``max_iter`` hops) keep the seed mean; they are counted.

Out of core: one iteration is one pass of chunk tasks over the graph (chunk_rows x k neighbours
each).  A task gathers its neighbours' values from the previous iterate, held whole in memory
once per worker process (N float32 + N bool: 5 bytes per row).  Iterates ping-pong between two
zarr scratch slots under the run's ``_stages`` directory; each chunk is recorded (overwriting its
record with the iteration number) after it is written, and a ``progress`` record after every
complete iteration, so a killed run resumes inside the iteration it was in.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr

from streamprune import storage
from streamprune.compute import client_for, map_tasks
from streamprune.errors import Rule, StreamPruneError, check_optional_whole, finite, whole
from streamprune.extrapolate.common import (
    as_workspace,
    marker_key,
    output_path,
    read_valid,
    register_method,
    score_fingerprint,
    seed_scores,
    write_chunks,
)
from streamprune.extrapolate.knn import _check_rows, knn_weights
from streamprune.leases import releases_leases
from streamprune.workspace import StageRun, Workspace

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 50


# --------------------------------------------------------------------------- pure math


def seed_stats(values: np.ndarray) -> tuple[float, float]:
    """(mean, population std) of the clamped seed values, in float64."""
    v = np.asarray(values, np.float64)
    if not len(v):
        raise ValueError("seed_stats: no seed values")
    return float(v.mean()), float(v.std())


def initial_iterate(valid: np.ndarray, clamp: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """(f0, reached0): seeds at their value, other valid rows at ``fill``, invalid rows NaN / unreached.

    ``clamp`` holds the measured value of seed rows and NaN elsewhere.
    """
    valid = np.asarray(valid, bool)
    clamp = np.asarray(clamp, np.float64)
    seed = valid & np.isfinite(clamp)
    f = np.where(seed, clamp, np.where(valid, fill, np.nan))
    return f.astype(np.float32), seed


def propagate_block(neighbor_values: np.ndarray, neighbor_reached: np.ndarray, distances: np.ndarray,
                    current: np.ndarray, reached: np.ndarray, clamp: np.ndarray, fill: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One step f <- D^-1 W f for a block of rows: (new values float32, new reached flags).

    ``neighbor_values`` (n, k): the previous iterate at the rows' neighbours (NaN = no neighbour or
    an invalid row: weight 0); ``neighbor_reached`` (n, k) their reached flags; ``distances``
    (n, k) Euclidean; ``current`` (n,) the rows' own previous values (NaN = invalid row: stays NaN
    and unreached); ``reached`` (n,) their flags; ``clamp`` (n,) measured seed values (NaN for
    non-seeds).  Seed rows take their clamp value; a row is reached once a neighbour with a
    positive weight is; rows not reached take ``fill``.
    """
    v = np.asarray(neighbor_values, np.float64)
    d = np.asarray(distances, np.float64)
    usable = np.isfinite(v) & np.isfinite(d)
    w = knn_weights(np.where(usable, d, np.inf)).astype(np.float64)
    total = w.sum(axis=1)
    num = (w * np.where(usable, v, 0.0)).sum(axis=1)
    mean = np.divide(num, total, out=np.zeros_like(total), where=total > 0)
    clamp = np.asarray(clamp, np.float64)
    seed = np.isfinite(clamp)
    excluded = ~np.isfinite(np.asarray(current, np.float64))
    new_reached = (np.asarray(reached, bool) | (np.asarray(neighbor_reached, bool) & (w > 0)).any(axis=1) | seed)
    new_reached &= ~excluded
    out = np.where(seed, clamp, np.where(new_reached & (total > 0), mean, fill))
    out[excluded] = np.nan
    return out.astype(np.float32), new_reached


def max_change(new: np.ndarray, current: np.ndarray, clamp: np.ndarray) -> float:
    """Largest |new - current| over valid non-seed rows (0.0 when there are none)."""
    new, current = np.asarray(new, np.float64), np.asarray(current, np.float64)
    ok = np.isfinite(new) & np.isfinite(current) & ~np.isfinite(np.asarray(clamp, np.float64))
    return float(np.abs(new[ok] - current[ok]).max()) if ok.any() else 0.0


def gather(values: np.ndarray, neighbors: np.ndarray, missing: float | bool) -> np.ndarray:
    """``values[neighbors]`` with ``missing`` where a neighbour id is < 0 or out of range."""
    nbr = np.asarray(neighbors, np.int64)
    ok = (nbr >= 0) & (nbr < len(values))
    return np.where(ok, values[np.where(ok, nbr, 0)], missing)


def is_converged(delta: float, n_new: int, tol: float) -> bool:
    """Converged: relative change below ``tol`` (or none at all) and no row newly reached in the step."""
    return bool((delta < tol or delta == 0) and n_new == 0)


@dataclass
class Propagation:
    """Result of an in-memory propagation (the reference the chunked stage reproduces)."""

    values: np.ndarray  # (N,) float32, NaN for invalid rows
    reached: np.ndarray  # (N,) bool
    iterations: int
    deltas: list[float]  # relative max change per iteration
    converged: bool


def propagate_in_memory(neighbors: np.ndarray, distances: np.ndarray, clamp: np.ndarray, valid: np.ndarray, *,
                        tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER) -> Propagation:
    """Whole-graph propagation in memory with the same steps and stopping rule as the stage."""
    valid = np.asarray(valid, bool)
    clamp = np.where(valid, np.asarray(clamp, np.float64), np.nan)
    seed = np.isfinite(clamp)
    mean, std = seed_stats(clamp[seed])
    scale = std if std > 0 else 1.0
    f, reached = initial_iterate(valid, clamp, mean)
    deltas: list[float] = []
    converged = False
    for _ in range(max_iter):
        new, new_reached = propagate_block(gather(f, neighbors, np.nan), gather(reached, neighbors, False),
                                           distances, f, reached, clamp, mean)
        deltas.append(max_change(new, f, clamp) / scale)
        n_new = int(np.count_nonzero(new_reached & ~reached))
        f, reached = new, new_reached
        if is_converged(deltas[-1], n_new, tol):
            converged = True
            break
    return Propagation(f, reached, len(deltas), deltas, converged)


# --------------------------------------------------------------------------- chunk tasks


@dataclass(frozen=True)
class _Job:
    """What a chunk task needs (picklable for distributed schedulers)."""

    ws: Workspace
    score: str
    scratch: str  # URL of the iterate group
    token: str  # identifies this scratch layout (process caches key on it)
    k: int
    mean: float


_CACHE: dict[str, dict] = {}  # per process: the opened arrays and latest iterate of one run (by token)
_CACHE_LOCK = threading.Lock()


def _slot(t: int) -> str:
    return str(t % 2)


def _arrays(job: _Job) -> dict:
    """The graph and scratch arrays of this run, opened once per process (metadata reads cost)."""
    with _CACHE_LOCK:
        state = _CACHE.get(job.token)
        if state is None:
            _CACHE.clear()  # one run per process at a time: drop another run's iterate
            so = job.ws.storage_options
            graph = zarr.open_group(storage.zarr_store(job.ws.path("graph", "all.zarr"), so), mode="r")
            scratch = zarr.open_group(storage.zarr_store(job.scratch, so), mode="r+")
            state = {"neighbors": graph["neighbors"], "distances": graph["distances"],
                     **{name: scratch[name] for name in ("f0", "f1", "r0", "r1")}, "iterate": None}
            _CACHE[job.token] = state
        return state


def _iterate(job: _Job, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The complete iterate ``t`` (values, reached), read once per process and iteration: 5 bytes per row."""
    arrays = _arrays(job)
    with _CACHE_LOCK:
        hit = arrays["iterate"]
        if hit is None or hit[0] != t:
            arrays["iterate"] = None  # free the previous one before reading the next
            hit = (t, np.asarray(arrays["f" + _slot(t)][:], np.float32), np.asarray(arrays["r" + _slot(t)][:], bool))
            arrays["iterate"] = hit
        return hit[1], hit[2]


def _clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _step_task(job: _Job, t: int, start: int, stop: int) -> dict:
    """Iteration ``t`` of rows [start, stop) (t = 0: the initial iterate), written to its scratch slot."""
    ws = job.ws
    arrays = _arrays(job)
    clamp = seed_scores(ws, job.score).lookup(np.arange(start, stop, dtype=np.int64))
    if t == 0:
        valid = read_valid(ws, start, stop)
        new, new_reached = initial_iterate(valid, clamp, job.mean)
        delta, n_new_reached = 0.0, int(np.count_nonzero(new_reached))
    else:
        prev, prev_reached = _iterate(job, t - 1)
        nbr = arrays["neighbors"][start:stop, :job.k]
        dist = arrays["distances"][start:stop, :job.k]
        current, reached = prev[start:stop], prev_reached[start:stop]
        clamp = np.where(np.isfinite(current), clamp, np.nan)
        new, new_reached = propagate_block(gather(prev, nbr, np.nan), gather(prev_reached, nbr, False), dist,
                                           current, reached, clamp, job.mean)
        delta = max_change(new, current, clamp)
        n_new_reached = int(np.count_nonzero(new_reached & ~reached))
    arrays["f" + _slot(t)][start:stop] = new
    arrays["r" + _slot(t)][start:stop] = new_reached
    return {"iter": t, "delta": delta, "n_new": n_new_reached, "n_valid": int(np.count_nonzero(np.isfinite(new))),
            "n_reached": int(np.count_nonzero(new_reached))}


def _predict_final(ws: Workspace, start: int, stop: int, job: _Job, t: int) -> np.ndarray:
    """Rows [start, stop) of the last iterate (write_chunks overrides seed and invalid rows)."""
    return np.asarray(_arrays(job)["f" + _slot(t)][start:stop], np.float32)


# --------------------------------------------------------------------------- the stage


OPTIONS = {"tol": Rule(lambda v: finite(v) and v >= 0, "a finite number >= 0"),
           "max_iter": Rule(whole(1), "a whole number >= 1")}


def _check_options(tol: float, max_iter: int, k: int | None, chunk_rows: int | None) -> None:
    OPTIONS["tol"].check(tol, "--tol")
    OPTIONS["max_iter"].check(max_iter, "--max-iter")
    for value, name in ((k, "--k"), (chunk_rows, "--chunk-rows")):
        check_optional_whole(value, name)


def _setup(ws: Workspace, run: StageRun, key: str, score: str, n: int, chunk_rows: int) -> dict:
    """Seed statistics and the scratch layout (recorded, so a resumed run reuses both)."""
    rec = run.chunk_done("setup")
    if rec is not None and rec.get("n") == n and rec.get("chunk_rows") == chunk_rows:
        return rec
    seeds = seed_scores(ws, score)
    if len(seeds.rows) and (seeds.rows[0] < 0 or seeds.rows[-1] >= n):
        raise StreamPruneError(f"{key}: subset rows reach {int(seeds.rows[-1])} but the graph has {n} rows")
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    valid = np.asarray(group["valid"].get_orthogonal_selection((seeds.rows,)), bool) if len(seeds.rows) else \
        np.zeros(0, bool)
    use = valid & np.isfinite(seeds.values)
    if not use.any():
        raise StreamPruneError(f"{key}: no seed row has a valid embedding and a finite '{score}' score")
    mean, std = seed_stats(seeds.values[use])
    scratch = _scratch_url(ws, run)
    out = zarr.open_group(storage.zarr_store(scratch, ws.storage_options), mode="w")
    for slot in "01":
        out.create_array("f" + slot, shape=(n,), chunks=(chunk_rows,), dtype="float32", fill_value=np.nan,
                         compressors=None)
        out.create_array("r" + slot, shape=(n,), chunks=(chunk_rows,), dtype="bool", fill_value=False)
    rec = {"n": n, "chunk_rows": chunk_rows, "mean": mean, "std": std, "n_seeds": int(use.sum()),
           "token": uuid.uuid4().hex}
    run.mark_chunk("setup", rec)
    return rec


@contextmanager
def _one_scheduler(scheduler: str | None, n_tasks: int) -> Iterator[str | None]:
    """``scheduler`` for a run of many map_tasks calls: a local cluster is started once, not per iteration."""
    if scheduler in (None, "local", "processes"):
        with client_for(scheduler, n_tasks) as client:
            yield client.scheduler.address
    else:
        yield scheduler


def _scratch_url(ws: Workspace, run: StageRun) -> str:
    # Inside the run's record directory: removed together with it when the marker is committed.
    return storage.join(ws.path("_stages", run.key, run.fingerprint[:16]), "iterate.zarr")


def _run_iterations(run: StageRun, job: _Job, n: int, chunk_rows: int, *, tol: float, max_iter: int, scale: float,
                    scheduler: str | None) -> dict:
    """Iterate until converged or ``max_iter``, resuming from the records; returns the progress record."""
    progress = run.chunk_done("progress") or {"iter": -1, "converged": False, "history": []}
    starts = list(range(0, n, chunk_rows))
    first = True
    while progress["iter"] < 0 or not (progress["converged"] or progress["iter"] >= max_iter):
        t = progress["iter"] + 1
        results: dict[int, dict] = {}
        if first:  # chunks a killed run finished in this iteration
            done = run.done_chunks()
            for c in range(len(starts)):
                rec = run.chunk_done(f"it-{c}") if f"it-{c}" in done else None
                if rec is not None and rec.get("iter") == t:
                    results[c] = rec
            first = False
        todo = [c for c in range(len(starts)) if c not in results]

        def _record(i: int, result: dict, todo=todo, results=results) -> None:
            run.mark_chunk(f"it-{todo[i]}", result)
            results[todo[i]] = result

        t0 = time.time()
        map_tasks(_step_task, [(job, t, starts[c], min(n, starts[c] + chunk_rows)) for c in todo],
                  scheduler=scheduler, desc=f"propagate {job.score} iteration {t}", unit="row",
                  weights=[min(chunk_rows, n - starts[c]) for c in todo], on_result=_record)
        delta = max(float(r["delta"]) for r in results.values()) / scale
        n_new = sum(int(r["n_new"]) for r in results.values())
        converged = t >= 1 and is_converged(delta, n_new, tol)
        history = progress["history"] + ([{"iter": t, "delta": delta, "n_new": n_new,
                                           "s": round(time.time() - t0, 3)}] if t >= 1 else [])
        progress = {"iter": t, "converged": converged, "history": history,
                    "delta": delta if t >= 1 else None,
                    "n_valid": sum(int(r["n_valid"]) for r in results.values()),
                    "n_reached": sum(int(r["n_reached"]) for r in results.values())}
        run.mark_chunk("progress", progress)
        if t >= 1:
            log.info("%s: iteration %d, relative change %.3g, %d rows newly reached", run.key, t, delta, n_new)
    return progress


@releases_leases
def extrapolate_propagate(ws: str | Workspace, score: str = "du", *, tol: float = DEFAULT_TOL,
                          max_iter: int = DEFAULT_MAX_ITER, k: int | None = None, force: bool = False,
                          scheduler: str | None = "sync", chunk_rows: int | None = None,
                          storage_options: dict | None = None) -> dict:
    """Propagate seed scores over graph/all.zarr into extrapolated/<score>-propagate.zarr; returns the marker.

    ``k``: neighbours per row used (None = all the graph holds).
    """
    ws = as_workspace(ws, storage_options)
    key = marker_key(score, "propagate")
    _check_options(tol, max_iter, k, chunk_rows)
    index_marker = ws.marker("index-all")
    if index_marker is None:
        raise StreamPruneError(f"{key}: graph 'all' has not been built in {ws.url}; "
                               "run `streamprune index --graph all` first")
    from streamprune.index import read_graph

    nbr_arr, _ = read_graph(ws, "all")
    n, graph_k = nbr_arr.shape
    if k is not None and k > graph_k:  # before begin: a refused option leaves a --force run's old results in place
        raise StreamPruneError(f"{key}: k={k} exceeds the graph's k={graph_k}; "
                               f"rebuild it with `streamprune index --graph all --k {k} --force`")
    inputs = {"graph": index_marker["fingerprint"], "score": score_fingerprint(ws, score, key)}
    config = {"score": score, "method": "propagate", "tol": float(tol), "max_iter": int(max_iter),
              "k": None if k is None else int(k), "chunk_rows": chunk_rows}
    run = ws.begin("extrapolate", config, inputs, force=force, key=key)
    if run.already_done:
        return run.previous | {"skipped": True}
    _check_rows(ws, n, key)
    rows_per_task = int(chunk_rows or nbr_arr.chunks[0])
    t0 = time.time()
    setup = _setup(ws, run, key, score, n, rows_per_task)
    job = _Job(ws, score, _scratch_url(ws, run), setup["token"], int(k or graph_k), float(setup["mean"]))
    scale = setup["std"] if setup["std"] > 0 else 1.0
    try:
        with _one_scheduler(scheduler, -(-n // rows_per_task)) as sched:
            progress = _run_iterations(run, job, n, rows_per_task, tol=float(tol), max_iter=int(max_iter),
                                       scale=scale, scheduler=sched)
            t1 = time.time()
            counts = write_chunks(ws, run, score, "propagate", n, _predict_final, (job, progress["iter"]),
                                  chunk_rows=rows_per_task, scheduler=sched)
    finally:
        _clear_cache()
    n_unreached = progress["n_valid"] - progress["n_reached"]
    group = zarr.open_group(storage.zarr_store(ws.path(output_path(score, "propagate")), ws.storage_options),
                            mode="r+")
    group.attrs.update({"iterations": progress["iter"], "converged": progress["converged"], "k": job.k})
    return run.commit(outputs={"extrapolated": output_path(score, "propagate")},
                      counts={**counts, "iterations": progress["iter"], "delta": progress["delta"],
                              "converged": progress["converged"], "n_unreached": n_unreached, "k": job.k,
                              "seed_mean": setup["mean"], "seed_std": setup["std"], "n_seeds": setup["n_seeds"],
                              "history": [{"iter": h["iter"], "delta": h["delta"], "n_new": h["n_new"]}
                                          for h in progress["history"]]},
                      timings={"iterate_s": round(t1 - t0, 3), "write_s": round(time.time() - t1, 3),
                               "iteration_s": [h["s"] for h in progress["history"]]})


register_method("propagate", extrapolate_propagate, OPTIONS)
