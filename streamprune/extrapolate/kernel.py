"""Kernel regression: Nadaraya–Watson over each row's seed neighbours with a Gaussian kernel.

    prediction_i = Σ_j K(d_ij / h) s_j / Σ_j K(d_ij / h),    K(u) = exp(-u² / 2)

over the k nearest seed rows j of row i in ``graph/seeds.zarr`` (a seed row excludes itself), with
their measured scores s_j.  Computed as exp(-(d² - d_min²) / 2h²) per row: proportional to
K(d/h) within the row, without underflow at large distances or small h.  Against kNN's fixed
exp(-d) weights the bandwidth h sets how fast weights fall with distance, in the embedding's own
distance units: huge h gives the plain mean of the k neighbours, tiny h the nearest seed.

``bandwidth="auto"`` picks h from multiples (0.1 .. 4) of the median seed-neighbour distance by
leave-one-out Pearson over the seed rows (their seed neighbours never include themselves): seed
scores only, never full-data scores.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import Rule, StreamPruneError, check_optional_whole, finite
from streamprune.extrapolate.common import (
    as_workspace,
    marker_key,
    output_path,
    register_method,
    score_fingerprint,
    seed_scores,
    write_chunks,
)
from streamprune.extrapolate.knn import MAX_VALIDATION_ROWS, _check_rows, pearson, validation_rows
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)

BANDWIDTH_MULTIPLES = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


# --------------------------------------------------------------------------- pure math


def gaussian_weights(distances: np.ndarray, bandwidth: float) -> np.ndarray:
    """exp(-(d² - d_min²) / 2h²) per row (∝ the Gaussian kernel of d/h); missing (inf/NaN) get 0."""
    d = np.asarray(distances, np.float64)
    ok = np.isfinite(d)
    d2 = np.where(ok, d * d, np.inf)
    d2min = np.min(d2, axis=-1, keepdims=True)
    d2min = np.where(np.isfinite(d2min), d2min, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp(-(np.where(ok, d2, 0.0) - d2min) / (2.0 * float(bandwidth) ** 2))
    return np.where(ok, w, 0.0)


def kernel_predict(neighbor_scores: np.ndarray, distances: np.ndarray, bandwidth: float) -> np.ndarray:
    """Nadaraya–Watson prediction per row (NaN scores and missing neighbours ignored; NaN if none usable)."""
    s = np.asarray(neighbor_scores, np.float64)
    d = np.asarray(distances, np.float64)
    usable = np.isfinite(s) & np.isfinite(d)
    w = gaussian_weights(np.where(usable, d, np.inf), bandwidth)
    total = w.sum(axis=1)
    num = (w * np.where(usable, s, 0.0)).sum(axis=1)
    out = np.full(len(total), np.nan)
    np.divide(num, total, out=out, where=total > 0)
    return out.astype(np.float32)


def median_distance(neighbor_scores: np.ndarray, distances: np.ndarray) -> float:
    """Median distance to a usable seed neighbour: the bandwidth grid's unit.

    Falls back to the smallest positive usable distance when the median is 0, and to 1.0 when
    there is no positive distance at all.
    """
    s = np.asarray(neighbor_scores, np.float64)
    d = np.asarray(distances, np.float64)
    usable = d[np.isfinite(s) & np.isfinite(d)]
    if not len(usable):
        return 1.0
    med = float(np.median(usable))
    if med > 0:
        return med
    pos = usable[usable > 0]
    return float(pos.min()) if len(pos) else 1.0


def choose_bandwidth(neighbor_scores: np.ndarray, distances: np.ndarray, targets: np.ndarray,
                     multiples: tuple[float, ...] = BANDWIDTH_MULTIPLES
                     ) -> tuple[float, float, dict[float, float], float]:
    """(h, its multiple, {multiple: Pearson}, median distance) maximising held-out Pearson.

    ``neighbor_scores``/``distances`` are held-out seed rows' seed neighbours (themselves
    excluded) and ``targets`` their measured scores.  Ties go to the smaller multiple; the
    multiple closest to 1 is taken when no multiple has a defined correlation.
    """
    med = median_distance(neighbor_scores, distances)
    table = {float(m): pearson(kernel_predict(neighbor_scores, distances, m * med), targets) for m in multiples}
    best = None
    for m, p in table.items():
        if np.isfinite(p) and (best is None or p > table[best]):
            best = m
    if best is None:
        best = min(table, key=lambda m: (abs(math.log(m)), m))
    return best * med, best, table, med


# --------------------------------------------------------------------------- the stage


def validation_sample(ws: Workspace, score: str, max_rows: int = MAX_VALIDATION_ROWS, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neighbour scores, distances, targets) of held-out seed rows from graph/seeds.zarr (seed scores only)."""
    from streamprune.index import read_graph

    nbr_arr, dist_arr = read_graph(ws, "seeds")
    seeds = seed_scores(ws, score)
    rows = validation_rows(seeds, nbr_arr.shape[0], max_rows, seed)
    k = nbr_arr.shape[1]
    if not len(rows):
        return np.zeros((0, k)), np.zeros((0, k)), np.zeros(0)
    nbr = nbr_arr.get_orthogonal_selection((rows,))
    dist = np.asarray(dist_arr.get_orthogonal_selection((rows,)), np.float64)
    own = nbr == rows[:, None]  # the seeds graph never holds the row itself; be safe anyway
    dist = np.where(own | (nbr < 0), np.inf, dist)
    return seeds.lookup(np.where(own, -1, nbr)), dist, seeds.lookup(rows)


def _predict_chunk(ws: Workspace, start: int, stop: int, score: str, bandwidth: float) -> np.ndarray:
    """Kernel predictions for rows [start, stop) (seed and invalid rows are overridden by the writer)."""
    from streamprune.index import read_graph

    nbr_arr, dist_arr = read_graph(ws, "seeds", require=False)
    nbr = nbr_arr[start:stop]
    dist = np.where(nbr >= 0, dist_arr[start:stop], np.inf)
    return kernel_predict(seed_scores(ws, score).lookup(nbr), dist, bandwidth)


OPTIONS = {"bandwidth": Rule(lambda v: v == "auto" or (finite(v) and v > 0), "'auto' or a distance > 0")}


def _check_bandwidth(bandwidth) -> None:
    OPTIONS["bandwidth"].check(bandwidth, "--bandwidth")


@releases_leases
def extrapolate_kernel(ws: str | Workspace, score: str = "du", *, bandwidth: str | float = "auto",
                       force: bool = False, scheduler: str | None = "sync", chunk_rows: int | None = None,
                       storage_options: dict | None = None) -> dict:
    """Write extrapolated/<score>-kernel.zarr by Gaussian kernel regression over seed neighbours; returns the marker."""
    ws = as_workspace(ws, storage_options)
    key = marker_key(score, "kernel")
    _check_bandwidth(bandwidth)
    check_optional_whole(chunk_rows, "--chunk-rows")
    index_marker = ws.marker("index-seeds")
    if index_marker is None:
        raise StreamPruneError(f"{key}: graph 'seeds' has not been built in {ws.url}; "
                               "run `streamprune index --graph seeds` first")
    inputs = {"graph": index_marker["fingerprint"], "score": score_fingerprint(ws, score, key)}
    config = {"score": score, "method": "kernel", "bandwidth": bandwidth if bandwidth == "auto" else float(bandwidth),
              "chunk_rows": chunk_rows}
    run = ws.begin("extrapolate", config, inputs, force=force, key=key)
    if run.already_done:
        return run.previous | {"skipped": True}
    from streamprune.index import read_graph

    t0 = time.time()
    nbr_arr, _ = read_graph(ws, "seeds")
    n = nbr_arr.shape[0]
    _check_rows(ws, n, key)
    rec = run.chunk_done("bandwidth")
    if rec is None:
        if bandwidth == "auto":
            scores, dist, targets = validation_sample(ws, score)
            h, multiple, table, med = choose_bandwidth(scores, dist, targets)
            rec = {"bandwidth": h, "multiple": multiple, "median_distance": med,
                   "validation": {str(m): p for m, p in table.items()}, "n_validation": int(len(targets))}
        else:
            rec = {"bandwidth": float(bandwidth), "multiple": None, "median_distance": None, "validation": {},
                   "n_validation": 0}
        run.mark_chunk("bandwidth", rec)
    log.info("%s: bandwidth %.4g (validation Pearson %s)", key, rec["bandwidth"], rec["validation"])
    t1 = time.time()
    counts = write_chunks(ws, run, score, "kernel", n, _predict_chunk, (score, rec["bandwidth"]),
                          chunk_rows=int(chunk_rows or nbr_arr.chunks[0]), scheduler=scheduler)
    group = zarr.open_group(storage.zarr_store(ws.path(output_path(score, "kernel")), ws.storage_options), mode="r+")
    group.attrs.update({"bandwidth": rec["bandwidth"], "validation_pearson": rec["validation"]})
    return run.commit(outputs={"extrapolated": output_path(score, "kernel")},
                      counts={**counts, "bandwidth": rec["bandwidth"], "bandwidth_multiple": rec["multiple"],
                              "median_distance": rec["median_distance"], "validation_pearson": rec["validation"],
                              "n_validation": rec["n_validation"]},
                      timings={"choose_bandwidth_s": round(t1 - t0, 3), "predict_s": round(time.time() - t1, 3)})


register_method("kernel", extrapolate_kernel, OPTIONS)
