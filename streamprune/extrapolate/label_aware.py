"""Label-aware extrapolation: neighbour label disagreement, quantile-mapped onto the seed scores.

**Disagreement** of row i: the exp(−(d − d_min))-weighted fraction of its k nearest neighbours
among *all* rows (``graph/all.zarr``) whose label differs from its own.  Hard and ambiguous
samples sit where classes meet, and mislabelled samples sit among another class, so the signal
tracks training-dynamics scores (DU, EL2N, forgetting) without any extra training and without the
in-sample/out-of-sample shift of regressors fitted on seed rows (the subset model memorised its
seed rows, mislabelled ones included).

**Label-aware scores** for a seed score S: seed rows keep their measured S; every other valid row
gets its disagreement *rank* mapped onto the distribution of measured seed scores (quantile
mapping), so seed and extrapolated rows share one scale and one ranking.  For scores where low
means hard (AUM, margin) the mapping is reversed.

It helps when the score reflects label ambiguity (DU, EL2N, forgetting, AUM on supervised data).
It cannot help for scores unrelated to labels, nor for unsupervised runs whose pseudo-labels come
from the same embedding (neighbours then agree by construction).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import Rule, StreamPruneError, check_optional_whole, whole
from streamprune.extrapolate.knn import knn_weights
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace

OPTIONS = {"k": Rule(whole(1), "a whole number >= 1")}
RANK_ROWS = 1 << 16  # values ranked by binary search at a time (each needs a few int64 temporaries)


# pure functions --------------------------------------------------------------------------------
def label_disagreement(own: np.ndarray, neighbour_labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Weighted fraction of neighbours whose label differs from the row's own (NaN when undefined).

    Neighbours with label −1 (unknown/invalid) are ignored; a row with label −1 or no usable
    neighbour gets NaN.
    """
    own = np.asarray(own)
    nl = np.asarray(neighbour_labels)
    w = knn_weights(distances, np.float64) * (nl >= 0)
    total = w.sum(axis=1)
    diff = (w * (nl != own[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = diff / total
    out[(total <= 0) | (own < 0)] = np.nan
    return out


def majority_disagrees(own: np.ndarray, neighbour_labels: np.ndarray, distances: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """True where the weighted neighbour majority label is not the row's own label."""
    nl = np.asarray(neighbour_labels)
    w = knn_weights(distances, np.float64) * (nl >= 0)
    cells = (np.arange(len(own))[:, None] * num_classes + np.clip(nl, 0, None)).reshape(-1)
    votes = np.bincount(cells, weights=w.reshape(-1), minlength=len(own) * num_classes).reshape(len(own), num_classes)
    has = votes.sum(axis=1) > 0
    return has & (np.asarray(own) >= 0) & (votes.argmax(axis=1) != np.asarray(own))


def _mid_ranks(srt: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The average 1-based rank of each of ``v`` among sorted ``srt`` (ties share it)."""
    return (np.searchsorted(srt, v, "left") + 1 + np.searchsorted(srt, v, "right")) / 2.0


def within_quantiles(values: np.ndarray, mask: np.ndarray | None = None, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Average-rank quantiles in (0, 1) of the finite ``values`` among themselves (NaN stays NaN).

    With ``mask``, only the masked rows are ranked (among themselves) and the others get NaN.
    Holds one sorted copy of the ranked values in their own dtype and a mask, and ranks
    ``chunk_rows`` at a time: beside the (N,) float64 result, about 6 bytes per row for float32.
    """
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float64)
    ok = np.isfinite(v) if mask is None else np.isfinite(v) & np.asarray(mask, bool)
    out = np.full(v.shape, np.nan)
    srt = v[ok]  # a copy: sorted in place
    srt.sort()
    n = len(srt)
    for s in range(0, len(v) if n else 0, chunk_rows):
        sel = np.flatnonzero(ok[s:s + chunk_rows]) + s
        out[sel] = (_mid_ranks(srt, v[sel]) - 0.5) / n
    return out


def noise_ranks(disagreement: np.ndarray, seed: np.ndarray, seed_margin: np.ndarray | None = None) -> np.ndarray:
    """How likely each row is mislabelled: its quantile within its own population (NaN = unknown).

    Seed rows are in-sample for the subset model, which memorised their labels, wrong ones
    included: a mislabelled seed row is embedded among the class of its wrong label, so its
    disagreement is biased low (measured on digits with 10 % flipped labels: 0.24–0.39 on average
    for flipped seed rows, 0.97–0.98 for flipped other rows).  Ranked together, the other rows'
    flips fill the drop and most mislabelled seeds are kept.  So seed rows and other rows are
    ranked apart, and a drop of the top quantiles takes the same fraction of each (the subset
    is a uniform sample: both hold the same share of noise).  Other rows rank by disagreement;
    seed rows by the mean of two quantiles: disagreement and low ``seed_margin`` (the subset
    model's AUM from its recorded logits, (N,) with NaN off the seeds; a row without one ranks
    by disagreement alone).  A row with NaN disagreement gets NaN.

    The (N,) float64 array of :func:`noise_table`'s ranks; the prune stage keeps the table instead.
    """
    d = np.asarray(disagreement)
    seed = np.asarray(seed, bool)
    if seed.shape != d.shape:
        raise ValueError(f"noise_ranks: seed mask has shape {seed.shape}, disagreement {d.shape}")
    return noise_table(d, seed, None if seed_margin is None else np.asarray(seed_margin)[seed])[:]


class NoiseRanks:
    """:func:`noise_ranks` in 5 bytes a row instead of 8: each row's rank as the sum of the two ends of its
    value's run in its population's sorted values (4 B below 2^31 rows) and the seed flag.  A slice of
    rows gives their float64 ranks, computed as :func:`within_quantiles` computes them."""

    def __init__(self, rank_sums: np.ndarray, seed: np.ndarray, n_other: int, n_seed: int):
        self.rank_sums, self.seed, self.n_other, self.n_seed = rank_sums, seed, n_other, n_seed
        self.missing = np.iinfo(rank_sums.dtype).max  # NaN disagreement: no rank

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rank_sums.shape

    def __len__(self) -> int:
        return len(self.rank_sums)

    def __getitem__(self, rows: slice) -> np.ndarray:
        sums, seed = self.rank_sums[rows], self.seed[rows]
        out = sums.astype(np.float64)
        out *= 0.5  # (mid-rank - 0.5) = (left + 1 + right) / 2 - 0.5, exact in float64 as within_quantiles has it
        out /= np.where(seed, float(max(self.n_seed, 1)), float(max(self.n_other, 1)))  # n = 0: no row has a rank
        out[sums == self.missing] = np.nan
        return out


def _as_floats(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    return v if np.issubdtype(v.dtype, np.floating) else v.astype(np.float64)


def _rank_sums(srt: np.ndarray, v: np.ndarray, dtype: Any) -> np.ndarray:
    """Per value of ``v``, the sum of the two ends of its run in sorted ``srt`` (its mid-rank, doubled, minus
    one), as ``dtype``; searched ``RANK_ROWS`` values at a time, so the int64 positions stay small."""
    out = np.empty(len(v), dtype)
    for a in range(0, len(v), RANK_ROWS):
        part = v[a:a + RANK_ROWS]
        out[a:a + RANK_ROWS] = np.searchsorted(srt, part, "left") + np.searchsorted(srt, part, "right")
    return out


def noise_table(disagreement: Any, seed: np.ndarray, seed_margin: np.ndarray | None = None) -> NoiseRanks:
    """:func:`noise_ranks` as a :class:`NoiseRanks`: the same ranks, without an (N,) float64 array.

    ``disagreement`` is an (N,) array or a zarr array, read ``select.CHUNK_ROWS`` rows at a time (four
    passes); ``seed_margin`` holds the margins of the seed rows only, in row order.  Beside the table's
    5 bytes per row it holds first a sorted copy of the other rows' finite disagreement (4 B each for
    float32), then 17 bytes per seed row (their float64 mean quantiles, a sorted copy, a mask).
    """
    from streamprune.select import CHUNK_ROWS  # read at call time: tests shrink it

    seed = np.asarray(seed, bool)
    n = len(seed)
    if tuple(disagreement.shape) != seed.shape:
        raise ValueError(f"noise_ranks: seed mask has shape {seed.shape}, disagreement {tuple(disagreement.shape)}")
    n_seeds = int(np.count_nonzero(seed))
    if seed_margin is not None and len(seed_margin) != n_seeds:
        raise ValueError(f"noise_ranks: {len(seed_margin)} seed margins for {n_seeds} seed rows")
    starts = range(0, n, CHUNK_ROWS)
    kind = np.uint32 if 2 * n < np.iinfo(np.uint32).max else np.uint64  # a sum of two ends is below 2n
    sums = np.full(n, np.iinfo(kind).max, kind)

    def chunk(a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # disagreement, seed flags, ranked other rows
        v, s = _as_floats(disagreement[a:a + CHUNK_ROWS]), seed[a:a + CHUNK_ROWS]
        return v, s, np.isfinite(v) & ~s

    # other rows: by disagreement, among themselves
    dtype = _as_floats(disagreement[:0]).dtype
    srt = np.empty(sum(int(np.count_nonzero(chunk(a)[2])) for a in starts), dtype)
    at = 0
    for a in starts:
        v, _, ok = chunk(a)
        srt[at:at + np.count_nonzero(ok)] = v[ok]
        at += np.count_nonzero(ok)
    srt.sort()
    for a in starts:
        v, _, ok = chunk(a)
        sums[a:a + CHUNK_ROWS][ok] = _rank_sums(srt, v[ok], kind)
    n_other = len(srt)
    del srt

    # seed rows: by the mean of their disagreement and low-margin quantiles among the seeds, ranked again
    seed_dis = np.empty(n_seeds, dtype)
    at = 0
    for a in starts:
        v, s, _ = chunk(a)
        seed_dis[at:at + np.count_nonzero(s)] = v[s]
        at += np.count_nonzero(s)
    q = within_quantiles(seed_dis, chunk_rows=RANK_ROWS)
    del seed_dis
    if seed_margin is not None:
        low = -_as_floats(seed_margin)
        srt = low[np.isfinite(low)]
        srt.sort()
        for a in range(0, n_seeds if len(srt) else 0, RANK_ROWS):
            m, qd = low[a:a + RANK_ROWS], q[a:a + RANK_ROWS]
            ok = np.isfinite(m) & ~np.isnan(qd)  # a seed without a margin keeps its disagreement quantile
            qd[ok] = (qd[ok] + (_mid_ranks(srt, m[ok]) - 0.5) / len(srt)) / 2
        del low, srt
    ok = np.isfinite(q)
    srt = q[ok]
    srt.sort()
    at = 0
    for a in starts:
        rows = np.flatnonzero(seed[a:a + CHUNK_ROWS])
        qs, good = q[at:at + len(rows)], ok[at:at + len(rows)]
        sums[a + rows[good]] = _rank_sums(srt, qs[good], kind)
        at += len(rows)
    return NoiseRanks(sums, seed, n_other, len(srt))


def quantile_mapper(values: np.ndarray, reference: np.ndarray, reverse: bool = False):
    """A function mapping any slice of ``values`` onto the quantiles of ``reference`` (see :func:`quantile_map`).

    Holds one sorted copy of the finite values (their own dtype: 4 bytes per row for float32) and
    the sorted reference; each call ranks its slice by binary search, so the whole array is mapped
    chunk by chunk without an (N,) rank or output array.
    """
    values = np.asarray(values)
    ref = np.sort(np.asarray(reference, np.float64)[np.isfinite(reference)])
    if len(ref) == 0:
        raise ValueError("quantile_map: no finite reference values")
    srt = np.sort(values[np.isfinite(values)])
    n = len(srt)

    def mapped(chunk: np.ndarray) -> np.ndarray:
        chunk = np.asarray(chunk, srt.dtype)
        out = np.full(len(chunk), np.nan)
        ok = np.isfinite(chunk)
        if not n or not ok.any():
            return out
        v = chunk[ok]
        q = (_mid_ranks(srt, v) - 0.5) / n  # ties share their average rank
        out[ok] = np.quantile(ref, 1.0 - q if reverse else q)
        return out

    return mapped


def quantile_map(values: np.ndarray, reference: np.ndarray, reverse: bool = False) -> np.ndarray:
    """Map each value's rank onto the quantiles of ``reference`` (monotone; NaN stays NaN).

    Ties share their average rank, so equal inputs get equal outputs; the result lies within
    [min(reference), max(reference)].  ``reverse`` maps high values onto low quantiles.
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    return quantile_mapper(values, reference, reverse)(values)


# stages ------------------------------------------------------------------------------------------
def _labels_valid(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    labels = storage.read_1d(g["labels"], np.int32, "label disagreement")  # class ids: 4 bytes a row
    valid = g["valid"][:]
    if not (labels[valid] >= 0).any():
        raise StreamPruneError("label disagreement needs labels: the embeddings have none (label key 'none'?); "
                               "use --label-key or --labels pseudo:K")
    return labels, valid


def _graph_labels(graph, labels: np.ndarray, valid: np.ndarray, r0: int, r1: int, k: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Own labels, neighbour labels and distances of graph rows r0:r1 (-1: no label, invalid or missing)."""
    nb = np.clip(graph["neighbors"][r0:r1, :k], -1, None)
    nl = np.where((nb >= 0) & valid[nb], labels[nb], -1)  # nb = -1 reads the last row: masked out
    own = np.where(valid[r0:r1], labels[r0:r1], -1)
    return own, nl, graph["distances"][r0:r1, :k]


def _check_options(k: int | None, chunk_rows: int | None) -> None:
    if k is not None:
        OPTIONS["k"].check(k, "--k")
    check_optional_whole(chunk_rows, "--chunk-rows")


def disagreement_path() -> str:
    """Workspace-relative path of the label-disagreement array."""
    return "scores/label_disagreement.zarr"


@releases_leases
def compute_disagreement(workspace: str | Workspace, *, k: int | None = None, chunk_rows: int | None = None,
                         force: bool = False, storage_options: dict | None = None) -> dict:
    """Label disagreement of every row from ``graph/all.zarr``; chunked, resumable, (N,) float32.

    ``k`` defaults to min(20, the graph's k); ``chunk_rows`` to the graph's zarr chunk (each read
    decompresses its chunks once).  A resumed run keeps the chunking of the run it resumes.
    """
    _check_options(k, chunk_rows)
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    emb_m = ws.require("embed", "label disagreement")
    graph_m = ws.require("index-all", "label disagreement")
    graph = zarr.open_group(storage.zarr_store(ws.path("graph", "all.zarr"), ws.storage_options), mode="r")
    if k is None:
        k = min(20, int(graph_m["counts"]["k"]))
    if graph["neighbors"].shape[1] < k:  # before begin: a refused option leaves a --force run's old results in place
        raise StreamPruneError(f"label disagreement: k={k} but the all-rows graph has only "
                               f"{graph['neighbors'].shape[1]} neighbours; re-run `streamprune index --k {k} --force`")
    run = ws.begin("score", {"score": "label_disagreement", "rows": "all", "k": k},
                   {"embed": emb_m["fingerprint"], "graph": graph_m["fingerprint"]}, force=force,
                   key="score-label_disagreement")
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    labels, valid = _labels_valid(ws)
    n = len(labels)
    url = ws.path(disagreement_path())
    if run.chunk_done("layout") is None:
        zarr.create_array(storage.zarr_store(url, ws.storage_options), shape=(n,),
                          chunks=(int(chunk_rows or graph["neighbors"].chunks[0]),), dtype="float32",
                          fill_value=np.nan, overwrite=True)
        run.mark_chunk("layout")
    arr = zarr.open_array(storage.zarr_store(url, ws.storage_options), mode="r+")
    chunk_rows = int(arr.chunks[0])  # chunk c covers rows c·chunk_rows on: as laid out when the run began
    done = run.done_chunks()
    for c, r0 in enumerate(range(0, n, chunk_rows)):
        if str(c) in done:
            continue
        r1 = min(n, r0 + chunk_rows)
        arr[r0:r1] = label_disagreement(*_graph_labels(graph, labels, valid, r0, r1, k)).astype(np.float32)
        run.mark_chunk(c, {"rows": r1 - r0})
    vals = arr[:]
    arr.attrs.update({"score": "label_disagreement", "rows": "all", "k": k})
    return run.commit(outputs={"score": disagreement_path()},
                      counts={"n": n, "n_valid": int(np.isfinite(vals).sum()), "mean": float(np.nanmean(vals))},
                      timings={"compute_s": round(time.time() - t0, 3)})


def disagreement_array(ws: Workspace) -> zarr.Array:
    """The (N,) label-disagreement zarr array, unread: slice it to read rows."""
    ws.require("score-label_disagreement", "read label disagreement")
    return zarr.open_array(storage.zarr_store(ws.path(disagreement_path()), ws.storage_options), mode="r")


def read_disagreement(ws: Workspace) -> np.ndarray:
    """The (N,) label-disagreement array."""
    return disagreement_array(ws)[:]


def noise_estimate(ws: Workspace, k: int = 20, chunk_rows: int | None = None) -> np.ndarray:
    """Rows whose weighted neighbour majority carries another label (likely mislabelled), (N,) bool.

    Reads the graph ``chunk_rows`` rows at a time (default: one zarr chunk of the graph).
    """
    labels, valid = _labels_valid(ws)
    num_classes = int(labels[valid].max()) + 1
    graph = zarr.open_group(storage.zarr_store(ws.path("graph", "all.zarr"), ws.storage_options), mode="r")
    chunk_rows = chunk_rows or graph["neighbors"].chunks[0]
    out = np.zeros(len(labels), bool)
    for r0 in range(0, len(labels), chunk_rows):
        r1 = min(len(labels), r0 + chunk_rows)
        out[r0:r1] = majority_disagrees(*_graph_labels(graph, labels, valid, r0, r1, k), num_classes)
    return out


def _predict_mapped(ws: Workspace, start: int, stop: int, mapped_url: str) -> np.ndarray:
    return zarr.open_array(storage.zarr_store(mapped_url, ws.storage_options), mode="r")[start:stop]


@releases_leases
def extrapolate_label_aware(ws: str | Workspace, score: str = "du", *, k: int | None = None, chunk_rows: int | None = None,
                            scheduler: str | None = "sync", force: bool = False,
                            storage_options: dict | None = None) -> dict:
    """Seed rows keep their scores; other rows get their disagreement rank on the seed-score scale."""
    from streamprune.extrapolate import common
    from streamprune.scores import get_score

    _check_options(k, chunk_rows)
    ws = common.as_workspace(ws, storage_options)
    dm = compute_disagreement(ws, k=k, chunk_rows=chunk_rows, force=force, storage_options=storage_options)
    chunk_rows = chunk_rows or 1 << 16
    seeds = common.seed_scores(ws, score)
    try:
        higher = get_score(score).higher_is_harder
    except ValueError:
        higher = True
    run = ws.begin("extrapolate", {"score": score, "method": "label-aware", "k": dm["config"]["k"],
                                   "predictor": "disagreement"},
                   {"disagreement": dm["fingerprint"], "score": seeds.fingerprint}, force=force,
                   key=common.marker_key(score, "label-aware"))
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    target = read_disagreement(ws)  # (N,) float32; with the sorted copy ~9 bytes per row in all
    n = len(target)
    target[seeds.rows[np.isfinite(seeds.values)]] = np.nan  # seeds keep their measured scores
    mapper = quantile_mapper(target, seeds.values, reverse=not higher)
    mapped_url = storage.join(ws.path("_stages", run.key, run.fingerprint[:16]), "mapped.zarr")
    arr = zarr.create_array(storage.zarr_store(mapped_url, ws.storage_options), shape=(n,), chunks=(chunk_rows,),
                            dtype="float32", fill_value=np.nan, overwrite=True)
    for s in range(0, n, chunk_rows):
        arr[s:s + chunk_rows] = mapper(target[s:s + chunk_rows]).astype(np.float32)
    del target, mapper
    counts = common.write_chunks(ws, run, score, "label-aware", n, _predict_mapped, (mapped_url,),
                                 chunk_rows=chunk_rows, scheduler=scheduler)
    return run.commit(outputs={"extrapolated": common.output_path(score, "label-aware")},
                      counts=counts, timings={"extrapolate_s": round(time.time() - t0, 3)})


def _register() -> None:
    from streamprune.extrapolate.common import register_method

    register_method("label-aware", extrapolate_label_aware, OPTIONS)


_register()
