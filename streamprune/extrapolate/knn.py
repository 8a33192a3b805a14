"""kNN score extrapolation: each row's score is the exp(-d)-weighted mean of its seed neighbours'.

Reads ``graph/seeds.zarr`` (every row's k nearest seed rows, a seed excluding itself) chunk by
chunk, looks the neighbours' measured scores up in the seed table, and writes
``extrapolated/<score>-knn.zarr``.  ``k="auto"`` picks k from {10, 20, 50, 100} (capped by the
graph's k) by leave-one-out Pearson over the seed rows: seed scores only, never full-data scores.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import Rule, StreamPruneError, check_optional_whole, whole
from streamprune.evaluate import pearson
from streamprune.extrapolate.common import (
    SeedScores,
    as_workspace,
    marker_key,
    output_path,
    register_method,
    score_fingerprint,
    seed_scores,
    write_chunks,
)
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)

K_CANDIDATES = (10, 20, 50, 100)
MAX_VALIDATION_ROWS = 100_000  # seed rows used by choose_k (Pearson to about ±0.003)


# --------------------------------------------------------------------------- pure math


def knn_weights(distances: np.ndarray, dtype=np.float32) -> np.ndarray:
    """exp(-(d - d_min)) per row, d_min over the row's finite distances; missing (inf/NaN) get 0.

    Proportional to exp(-d) within a row, without underflow for large distances.  Computed in
    float64, returned as ``dtype``.
    """
    d = np.asarray(distances, np.float64)
    ok = np.isfinite(d)
    dmin = np.min(np.where(ok, d, np.inf), axis=-1, keepdims=True)
    dmin = np.where(np.isfinite(dmin), dmin, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp(-(np.where(ok, d, 0.0) - dmin))
    return np.where(ok, w, 0.0).astype(dtype, copy=False)


def knn_predict(neighbor_scores: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
    """Weighted mean of the first ``k`` neighbours' scores (NaN scores and missing neighbours ignored).

    A row with no usable neighbour gets NaN.
    """
    s = np.asarray(neighbor_scores, np.float64)[:, :k]
    d = np.asarray(distances, np.float64)[:, :k]
    usable = np.isfinite(s) & np.isfinite(d)
    w = knn_weights(np.where(usable, d, np.inf)).astype(np.float64)
    total = w.sum(axis=1)
    num = (w * np.where(usable, s, 0.0)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, num / np.where(total > 0, total, 1.0), np.nan)
    return out.astype(np.float32)


def k_candidates(graph_k: int, candidates: tuple[int, ...] = K_CANDIDATES) -> list[int]:
    """The candidate k values capped by the graph's k (deduplicated, ascending)."""
    return sorted({min(int(c), int(graph_k)) for c in candidates})


def choose_k(neighbor_scores: np.ndarray, distances: np.ndarray, targets: np.ndarray,
             candidates: tuple[int, ...] = K_CANDIDATES) -> tuple[int, dict[int, float]]:
    """The k maximising Pearson(prediction, target) over held-out seed rows; ties go to the smaller k.

    ``neighbor_scores``/``distances`` are the seed rows' seed neighbours (themselves excluded) and
    ``targets`` their measured scores.  Returns (k, {k: pearson}); k is the smallest candidate
    when no candidate has a defined correlation.
    """
    ks = k_candidates(np.shape(distances)[1], candidates)
    table = {k: pearson(knn_predict(neighbor_scores, distances, k), targets) for k in ks}
    best = ks[0]
    for k in ks:
        if np.isfinite(table[k]) and (not np.isfinite(table[best]) or table[k] > table[best]):
            best = k
    return best, table


# --------------------------------------------------------------------------- the stage


def _open_graph(ws: Workspace, graph: str):
    from streamprune.index import read_graph

    return read_graph(ws, graph)


OPTIONS = {"k": Rule(lambda v: v == "auto" or whole(1)(v), "'auto' or a whole number >= 1")}


def _predict_chunk(ws: Workspace, start: int, stop: int, score: str, graph: str, k: int) -> np.ndarray:
    """kNN predictions for rows [start, stop) (seed and invalid rows are overridden by the writer)."""
    nbr_arr, dist_arr = _open_graph(ws, graph)
    nbr = nbr_arr[start:stop, :k]
    dist = dist_arr[start:stop, :k]
    return knn_predict(seed_scores(ws, score).lookup(nbr), dist, k)


def validation_rows(seeds: SeedScores, n: int, max_rows: int = MAX_VALIDATION_ROWS, seed: int = 0) -> np.ndarray:
    """Held-out seed rows for choosing a parameter: those with a finite score among the graph's ``n``
    rows, at most ``max_rows`` of them (a fixed random sample), sorted."""
    rows = seeds.rows[np.isfinite(seeds.values) & (seeds.rows < n)]
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return rows


def validation_table(ws: Workspace, score: str, graph: str = "seeds", max_rows: int = MAX_VALIDATION_ROWS,
                     seed: int = 0) -> tuple[int, dict[int, float], int]:
    """(chosen k, {k: Pearson}, rows used) by leave-one-out prediction of seed rows from the graph."""
    nbr_arr, dist_arr = _open_graph(ws, graph)
    seeds = seed_scores(ws, score)
    rows = validation_rows(seeds, nbr_arr.shape[0], max_rows, seed)
    if len(rows) < 3:
        ks = k_candidates(nbr_arr.shape[1])
        return ks[0], {k: float("nan") for k in ks}, int(len(rows))
    nbr = nbr_arr.get_orthogonal_selection((rows,))
    dist = dist_arr.get_orthogonal_selection((rows,))
    # A seeds graph never holds the row itself; a graph that does would leak its own score into the
    # held-out prediction.  Its entry goes to the end of the row, so that k neighbours are still k.
    own = nbr == rows[:, None]
    if own.any():
        order = np.argsort(own, axis=1, kind="stable")
        nbr = np.where(own, -1, nbr)
        dist = np.where(own, np.inf, dist)
        nbr, dist = np.take_along_axis(nbr, order, axis=1), np.take_along_axis(dist, order, axis=1)
    k, table = choose_k(seeds.lookup(nbr), dist, seeds.lookup(rows))
    return k, table, int(len(rows))


@releases_leases
def extrapolate_knn(ws: str | Workspace, score: str = "du", *, k: int | str = "auto", graph: str = "seeds",
                    force: bool = False, scheduler: str | None = "sync", chunk_rows: int | None = None,
                    storage_options: dict | None = None) -> dict:
    """Write extrapolated/<score>-knn.zarr from the seed graph; returns the stage marker."""
    ws = as_workspace(ws, storage_options)
    key = marker_key(score, "knn")
    OPTIONS["k"].check(k, "--k")
    check_optional_whole(chunk_rows, "--chunk-rows")
    index_marker = ws.marker(f"index-{graph}")
    if index_marker is None:
        raise StreamPruneError(f"{key}: graph '{graph}' has not been built in {ws.url}; run `streamprune index` first")
    nbr_arr, _ = _open_graph(ws, graph)
    n, graph_k = nbr_arr.shape
    if k != "auto" and k > graph_k:  # before begin: a refused option leaves a --force run's old results in place
        raise StreamPruneError(f"{key}: k={k} exceeds the graph's k={graph_k}; "
                               f"rebuild it with `streamprune index --k {k} --force`")
    inputs = {"graph": index_marker["fingerprint"], "score": score_fingerprint(ws, score, key)}
    config = {"score": score, "method": "knn", "k": k, "graph": graph, "chunk_rows": chunk_rows}
    run = ws.begin("extrapolate", config, inputs, force=force, key=key)
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    _check_rows(ws, n, key)
    rec = run.chunk_done("choose-k")
    if rec is None:
        if k == "auto":
            chosen, table, n_val = validation_table(ws, score, graph)
        else:
            chosen, table, n_val = int(k), {}, 0
        rec = {"k": int(chosen), "validation": {str(c): v for c, v in table.items()}, "n_validation": n_val}
        run.mark_chunk("choose-k", rec)
    log.info("%s: k=%d (validation Pearson %s)", key, rec["k"], rec["validation"])
    t1 = time.time()
    counts = write_chunks(ws, run, score, "knn", n, _predict_chunk, (score, graph, rec["k"]),
                          chunk_rows=chunk_rows or nbr_arr.chunks[0], scheduler=scheduler)
    group = zarr.open_group(storage.zarr_store(ws.path(output_path(score, "knn")), ws.storage_options), mode="r+")
    group.attrs.update({"k": rec["k"], "graph": graph, "validation_pearson": rec["validation"]})
    return run.commit(outputs={"extrapolated": output_path(score, "knn")},
                      counts={**counts, "k": rec["k"], "validation_pearson": rec["validation"],
                              "n_validation": rec["n_validation"]},
                      timings={"choose_k_s": round(t1 - t0, 3), "predict_s": round(time.time() - t1, 3)})


def _check_rows(ws: Workspace, n: int, key: str) -> None:
    from streamprune.index import open_embeddings

    emb, _, _ = open_embeddings(ws, key)
    if emb.shape[0] != n:
        raise StreamPruneError(f"{key}: the graph has {n} rows but embeddings.zarr has {emb.shape[0]}; "
                               "re-run `streamprune index`")


register_method("knn", extrapolate_knn, OPTIONS)
