"""The ``index`` stage: a faiss index over the embeddings and a batched kNN search into a graph.

Two graphs (see docs/index.md):

* ``seeds`` — for every row, its k nearest *seed* rows (valid subset rows; a seed excludes
  itself). kNN extrapolation reads it.
* ``all`` — for every row, its k nearest valid rows, the row itself excluded. The GCN reads it.

Each graph has its own index (``index/<name>.faissindex``) built from ``embeddings.zarr``:

1. *plan* — ``Flat`` (exact) up to ``FLAT_MAX_ROWS`` indexed rows, else IVF-PQ with parameters
   from N and D (:func:`auto_params`); ``factory`` overrides.  With ``factory="auto"`` and a CUDA
   GPU visible to torch, the search is exact on the GPU instead (:class:`TorchExactIndex`, engine
   ``torch``) when the indexed vectors fit there and the work is small enough
   (:func:`choose_engine`): no faiss index is trained or written, steps 2-3 are skipped.
2. *train* — on a random sample of valid rows gathered from zarr (30–64 points per centroid);
   above ``TRAIN_MEMORY`` bytes the sample is streamed (two-level k-means out of core).
3. *add* — streamed in chunks.  Above ``ondisk_threshold`` rows the rows are added by range tasks
   into shard indexes that share the trained quantizer and merged on disk
   (``faiss.contrib.ondisk.merge_ondisk``) into ``index/<name>.ivfdata``.
4. *tune* — exact ground truth for a sample of queries (one streaming pass); ``nprobe`` is the
   smallest of 16, 32, ... reaching ``TARGET_RECALL`` on a separate tuning sample.
5. *search* — one task per chunk of ``chunk_rows`` rows; each task reads its rows' embeddings,
   searches, optionally re-ranks ``refine * k`` candidates with exact distances from the stored
   embeddings, and writes its own chunk of ``graph/<name>.zarr`` (so each writer owns whole zarr
   chunks), then the chunk is recorded as done.  The index is loaded once per worker process.
6. *recall* — recall@k of the written graph against the exact ground truth, in
   ``index/params.json`` and the stage marker ``_stages/index-<name>.json``.

Memory: the candidate mask (one byte per row), the training sample while it fits
``TRAIN_MEMORY`` (a larger one is streamed through a local spill file: :func:`streamed_kmeans`),
one chunk of queries and results, and the index itself (PQ codes + ids: about ``m + 8`` bytes per
indexed row, on disk above the threshold).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from streamprune import storage
from streamprune.compute import disk_errors, map_tasks
from streamprune.errors import StreamPruneError, check_optional_whole
from streamprune.heap import bound_heap, trim_heap
from streamprune.leases import releases_leases
from streamprune.workspace import StageRun, Workspace, fingerprint as stage_fingerprint

log = logging.getLogger(__name__)

GRAPHS = ("seeds", "all")
FLAT_MAX_ROWS = 50_000  # exact search below: N queries x N rows x D flops stay in seconds to minutes
HNSW_MIN_NLIST = 1 << 13  # from here the coarse quantizer is an HNSW graph (assignment in O(log nlist))
ROWS_PER_LIST = 128  # from 1M rows: about this many rows per inverted list
MAX_NLIST_LOG2 = 18
TWO_LEVEL_MIN_NLIST = 1 << 10  # from here CPU k-means is two-level: sqrt(nlist) clusters, then sub-clusters
MIN_POINTS_PER_CENTROID = 30
POINTS_PER_CENTROID = 64  # training sample target (faiss: 30-256); 256 with a GPU
MAX_PQ_BYTES = 64
TRAIN_BYTES = 1 << 30  # training sample budget (float32), unless 30 points per centroid need more
TRAIN_MEMORY = 256 << 20  # a larger training sample is streamed through a spill file (streamed_kmeans)
PQ_TRAIN_ROWS = 1 << 16  # what faiss's PQ training uses at most (256 points x 256 centroids)
INDEX_MEMORY_BUDGET = 4 << 30  # in-memory index above this (codes + ids) is built on disk
TARGET_RECALL = 0.95
NPROBE_PLATEAU = 0.002  # recall gained by doubling nprobe below which the tuning stops: the codes limit it
NPROBE_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_NPROBE = 32  # when no tuning queries are available
DEFAULT_REFINE = 4
# --refine auto re-ranks only while the embeddings are at most this big: every search chunk reads them
# whole (candidates are spread over all rows), about 1.5 s per GiB from the page cache against ~17 s for
# the chunk's search (measured at 2M rows of 256-d); above it the re-rank outgrows the search, and past
# the page cache each chunk reads them from disk.
RERANK_MAX_BYTES = 8 << 30
TUNE_QUERIES = 500
GRAPH_CHUNK_ROWS = 1 << 16
TASK_CANDIDATES = 1 << 22
SLAB_BYTES = 64 << 20  # rows of embeddings.zarr read at once by gathers and streaming passes
LOCAL_COPY_HEADROOM = 1 << 30  # free local disk left beside a local copy of remote embeddings
INDEX_MMAP_THRESHOLD = 4 << 20  # buffers from here are mmap-served (heap.bound_heap): slabs, candidates, results
KMEANS_NITER = 10  # CPU; 20 with a GPU
TORCH_GPU_FRACTION = 0.4  # of free GPU memory the indexed vectors (float32) may take for the torch engine
TORCH_MAX_MACS = 2e16  # queries x indexed rows x width above which IVF-PQ beats exact GPU search (~1 min on an H100)
TORCH_BLOCK_BYTES = 1 << 30  # one block of the (queries x indexed rows) float32 distance matrix
TORCH_MAX_QUERY_BLOCK = 4096
TORCH_QUERY_SPAN = 1 << 16  # query rows copied to the device (and results back) at a time
TORCH_SEARCH_THREADS = 4  # graph chunks in flight with the torch engine: one's zarr read/write overlaps another's search


# --------------------------------------------------------------------------- pure parameter choice


def auto_nlist(n: int) -> int:
    """Inverted lists for ``n`` rows: ~4·sqrt(n) below 1M; from 1M the power of two nearest n / 128, at most 2^18.

    From 1M rows the lists keep ~128 rows each (nlist grows with n), so a query probes about the
    same number of lists and rows at any n and the search grows ~linearly: with 30 rows per list
    (2^16 lists at 2M rows) recall 0.97 needed twice the probes, each paying the per-list PQ table.
    """
    if n < 1_000_000:
        return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))
    return 1 << min(MAX_NLIST_LOG2, int(round(math.log2(n / ROWS_PER_LIST))))


def auto_pq_bytes(d: int, refine: bool = True) -> int:
    """PQ code bytes for width ``d``: a divisor of d, at most 64; about d/8 with an exact re-rank, else d/4.

    With the re-rank, PQ only has to bring the true neighbours into the R·k candidates, whose
    exact distances then decide: on 256-d embeddings (200k and 2M rows, nprobe 32, 4·k
    candidates) PQ32 reached recall@20 0.978 / 0.970 against PQ64's 0.987 / 0.973, searching
    40–44 % faster and holding 40 instead of 72 bytes per row.  Widths under 64 keep at least
    min(d/4, 8) bytes.
    """
    target = d // 4 if not refine else max(d // 8, min(d // 4, 8))
    target = max(1, min(MAX_PQ_BYTES, target))
    return max(m for m in range(1, target + 1) if d % m == 0)


def auto_params(n: int, d: int, refine: bool = True) -> dict:
    """The factory string and its parameters for ``n`` indexed rows of width ``d`` (``refine``: exact re-rank on)."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot index {n} rows of width {d}")
    if n <= FLAT_MAX_ROWS:
        return {"factory": "Flat", "nlist": 0, "m": 0}
    nlist, m = auto_nlist(n), auto_pq_bytes(d, refine)
    quantizer = "_HNSW32" if nlist >= HNSW_MIN_NLIST else ""
    return {"factory": f"IVF{nlist}{quantizer},PQ{m}", "nlist": nlist, "m": m}


def train_size(n: int, nlist: int, d: int, points_per_centroid: int = POINTS_PER_CENTROID) -> int:
    """Training sample rows: ``points_per_centroid`` per list within ``TRAIN_BYTES``, never under 30."""
    if nlist <= 0:
        return min(n, 1 << 16)
    budget_rows = TRAIN_BYTES // (4 * d)
    return int(min(n, max(MIN_POINTS_PER_CENTROID * nlist, min(points_per_centroid * nlist, budget_rows))))


def ondisk_rows(code_size: int, budget: int = INDEX_MEMORY_BUDGET) -> int:
    """Indexed rows above which an IVF index goes on disk: codes + 8-byte ids exceed ``budget``."""
    return budget // (code_size + 8)


def default_chunk_rows(emb_chunk_rows: int, candidates: int = 21) -> int:
    """Graph rows per task: up to 65536, fewer when each query keeps many candidates (k·refine).

    A task holds ``rows x candidates`` ids and distances (about 40 bytes each with the re-rank's
    bookkeeping): at most 2^22 candidates, ~160 MiB.  Whole chunks of embeddings.zarr.
    """
    rows = min(GRAPH_CHUNK_ROWS, TASK_CANDIDATES // max(1, candidates))
    return emb_chunk_rows * max(1, rows // emb_chunk_rows)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids < 0 ignored; empty truths skipped)."""
    scores = []
    for f, t in zip(found, truth):
        t = set(t[t >= 0].tolist())
        if t:
            scores.append(len(t & set(f[f >= 0].tolist())) / len(t))
    return float(np.mean(scores)) if scores else float("nan")


def select_neighbors(ids: np.ndarray, sq_dists: np.ndarray, query_rows: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each candidate row, the query row itself and missing ids (-1) dropped.

    Returns ids (q, k) int64 (-1 = none) and Euclidean distances (q, k) float32 (inf = none),
    ascending; equal distances keep the candidates' order.
    """
    ids = np.array(ids, dtype=np.int64, copy=True)
    sq = np.array(sq_dists, dtype=np.float32, copy=True)
    bad = (ids < 0) | (ids == np.asarray(query_rows, np.int64)[:, None]) | ~np.isfinite(sq)
    ids[bad] = -1
    sq[bad] = np.inf
    order = np.argsort(sq, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)
    sq = np.take_along_axis(sq, order, axis=1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sq = np.pad(sq, ((0, 0), (0, pad)), constant_values=np.inf)
    dist = np.sqrt(np.maximum(sq, 0.0, dtype=np.float32))
    dist[ids < 0] = np.inf
    return ids, dist


# --------------------------------------------------------------------------- inputs


def open_embeddings(ws: Workspace, for_stage: str) -> tuple[zarr.Array, zarr.Array, dict]:
    """The ``emb`` and ``valid`` arrays of embeddings.zarr (checked) and the embed marker."""
    marker = ws.require("embed", for_stage)
    url = ws.path("embeddings.zarr")
    try:
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="r")
        emb, valid = group["emb"], group["valid"]
    except (FileNotFoundError, KeyError) as exc:
        raise StreamPruneError(f"{for_stage}: {url} is missing or incomplete ({exc}); "
                               "re-run `streamprune embed --force`") from None
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise StreamPruneError(f"{for_stage}: {url}/emb must be (N, D), got shape {emb.shape}")
    if emb.dtype not in (np.float16, np.float32):
        raise StreamPruneError(f"{for_stage}: {url}/emb must be float16 or float32, got {emb.dtype}")
    if valid.shape != (emb.shape[0],):
        raise StreamPruneError(f"{for_stage}: {url}/valid has shape {valid.shape} but emb has {emb.shape[0]} rows")
    return emb, valid, marker


def candidate_mask(ws: Workspace, name: str, valid: np.ndarray) -> np.ndarray:
    """Rows the ``name`` index holds: valid rows, or valid subset rows for ``seeds`` (N bools)."""
    if name == "all":
        return np.asarray(valid, bool)
    from streamprune.subset import subset_rows

    rows = subset_rows(ws)
    if len(rows) and (rows[0] < 0 or rows[-1] >= len(valid)):
        bad = rows[0] if rows[0] < 0 else rows[-1]
        raise StreamPruneError(f"index-seeds: subset row {bad} is outside the {len(valid)} rows of embeddings.zarr; "
                               "re-run `streamprune embed`")
    mask = np.zeros(len(valid), bool)
    mask[rows] = True
    mask &= valid
    return mask


def sample_rows(mask: np.ndarray, size: int, seed: int, block: int = 1 << 22) -> np.ndarray:
    """``size`` distinct rows where ``mask`` is true, uniformly at random, sorted."""
    n_true = int(np.count_nonzero(mask))
    size = min(size, n_true)
    if size == n_true:
        return np.flatnonzero(mask).astype(np.int64)
    pick = np.sort(np.random.default_rng(seed).choice(n_true, size, replace=False))
    out, seen = [], 0
    for s in range(0, len(mask), block):
        m = mask[s:s + block]
        c = int(np.count_nonzero(m))
        lo, hi = np.searchsorted(pick, [seen, seen + c])
        if hi > lo:
            out.append(np.flatnonzero(m)[pick[lo:hi] - seen] + s)
        seen += c
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)  # size 0: no block holds one


def _slab_rows(emb: zarr.Array) -> int:
    """Rows of embeddings read at once: whole zarr chunks within ``SLAB_BYTES``."""
    chunk = emb.chunks[0]
    return chunk * max(1, SLAB_BYTES // (4 * emb.shape[1] * chunk))


def gather_rows(emb: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Float32 embeddings of sorted ``rows``, read slab by slab (only touched chunks)."""
    out = np.empty((len(rows), emb.shape[1]), np.float32)
    slab = _slab_rows(emb)
    bounds = np.searchsorted(rows, np.arange(0, emb.shape[0] + slab, slab))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            out[lo:hi] = emb.get_orthogonal_selection((rows[lo:hi],))
    return out


def gather_sq_distances(queries: np.ndarray, ids: np.ndarray, emb: zarr.Array) -> np.ndarray:
    """Exact squared L2 between each query and its candidate rows (inf for ids < 0).

    Candidate pairs are grouped by slab of rows (a radix sort on the slab number); each slab is
    read once (whole when a quarter of its rows are wanted, else only the wanted rows) and faiss
    computes the pairs' distances in place.  Memory: one slab plus a few arrays of the pairs.
    """
    faiss = _faiss()
    q, kc = ids.shape
    out = np.full(q * kc, np.inf, np.float32)
    flat = np.ascontiguousarray(ids, np.int64).ravel()
    pos = np.flatnonzero(flat >= 0)
    if not len(pos):
        return out.reshape(q, kc)
    queries = np.ascontiguousarray(queries, np.float32)
    n, d, slab = emb.shape[0], emb.shape[1], _slab_rows(emb)
    n_slabs = -(-n // slab)
    slab_of = (flat[pos] // slab).astype(np.uint16 if n_slabs <= 1 << 16 else np.int64)
    pos = pos[np.argsort(slab_of, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(slab_of, minlength=n_slabs))])
    for j in np.flatnonzero(np.diff(bounds)):
        sel = pos[bounds[j]:bounds[j + 1]]
        s, e = j * slab, min(n, (j + 1) * slab)
        local = flat[sel] - s
        present = np.zeros(e - s, bool)
        present[local] = True
        if np.count_nonzero(present) * 4 >= e - s:
            vecs = emb[s:e]
        else:
            vecs = emb.get_orthogonal_selection((np.flatnonzero(present) + s,))
            local = (np.cumsum(present) - 1)[local]
        vecs = np.ascontiguousarray(vecs, np.float32)
        qi = np.ascontiguousarray(sel // kc, np.int64)
        local = np.ascontiguousarray(local, np.int64)
        dis = np.empty(len(sel), np.float32)
        faiss.pairwise_indexed_L2sqr(d, len(sel), faiss.swig_ptr(queries), faiss.swig_ptr(qi), faiss.swig_ptr(vecs),
                                     faiss.swig_ptr(local), faiss.swig_ptr(dis))
        out[sel] = dis
    return out.reshape(q, kc)


def iter_blocks(emb: zarr.Array, mask: np.ndarray, bar=None, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, float32 vectors) of the masked rows, slab by slab (``bar`` advanced by rows scanned).

    ``mask`` covers rows ``start`` to ``start + len(mask)``.
    """
    slab = _slab_rows(emb)
    for s in range(start, start + len(mask), slab):
        m = mask[s - start:s - start + slab]
        if m.any():
            rows = np.flatnonzero(m) + s
            yield rows.astype(np.int64), emb[s:s + len(m)][m].astype(np.float32, copy=False)
        if bar is not None:
            bar.update(len(m))


def _progress(total: int, desc: str):
    """A progress bar for a loop in this process (map_tasks draws its own)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, mininterval=1.0,
                disable=os.environ.get("STREAMPRUNE_PROGRESS", "1") == "0")


# --------------------------------------------------------------------------- faiss helpers


def _faiss():
    import faiss

    return faiss


def use_gpu() -> bool:
    """Whether faiss can use a GPU here (faiss-gpu installed and a device visible)."""
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _ivf(index):
    faiss = _faiss()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def make_index(d: int, factory: str):
    """An empty faiss index for ``factory`` that accepts row ids (IVF directly, others via IDMap2)."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(d, factory)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StreamPruneError(f"index: faiss cannot build {factory!r} for width {d}: {first}") from None
    if index.metric_type != faiss.METRIC_L2:
        raise StreamPruneError(f"index: factory {factory!r} must use L2 distance")
    if _ivf(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def describe_index(index) -> dict:
    """nlist, PQ bytes and code size of an index (0 where they do not apply)."""
    faiss = _faiss()
    ivf = _ivf(index)
    if ivf is None:
        return {"nlist": 0, "m": 0, "code_size": 4 * index.d}
    inner = faiss.downcast_index(ivf)
    m = int(getattr(getattr(inner, "pq", None), "M", 0) or 0)
    return {"nlist": int(ivf.nlist), "m": m, "code_size": int(ivf.code_size)}


def _level1(x: np.ndarray, nlist: int, niter: int, seed: int, gpu: bool = False):
    """The first level of two-level k-means: sqrt(nlist) clusters of ``x`` (a faiss ``Kmeans``)."""
    faiss = _faiss()
    nc1 = max(1, int(math.sqrt(nlist)))
    km = faiss.Kmeans(x.shape[1], nc1, niter=niter, seed=seed, max_points_per_centroid=2000, gpu=gpu)
    km.train(x)
    return km


def _level2(sizes: np.ndarray, points_of, nlist: int, d: int, niter: int, seed: int, gpu: bool = False) -> np.ndarray:
    """Sub-clusters of each first-level cluster, ``nlist`` in all, in proportion to the clusters' sizes.

    ``points_of(c)`` returns the (float32) points of cluster ``c``; only one cluster is held at a time.
    """
    faiss = _faiss()
    alloc = np.cumsum(sizes) * nlist // max(1, int(sizes.sum()))
    alloc[1:] -= alloc[:-1].copy()
    out = np.empty((nlist, d), np.float32)
    filled = 0
    for c in np.flatnonzero(alloc):
        kc = int(alloc[c])
        sub = points_of(c)
        if len(sub) <= kc:  # degenerate: fewer points than sub-clusters, use the points themselves
            out[filled:filled + kc] = np.resize(sub, (kc, d))
        else:
            sub_km = faiss.Kmeans(d, kc, niter=niter, seed=seed + 1 + int(c), max_points_per_centroid=256,
                                  min_points_per_centroid=1, gpu=gpu)  # sizes follow level 1: ~30+ points each
            sub_km.train(sub)
            out[filled:filled + kc] = sub_km.centroids
        filled += kc
    return out


def two_level_kmeans(x: np.ndarray, nlist: int, niter: int, seed: int) -> np.ndarray:
    """``nlist`` centroids by two-level k-means: sqrt(nlist) clusters, then sub-clusters in each.

    About sqrt(nlist)/2 times cheaper than flat k-means; faiss's contrib.clustering does the same.
    """
    km = _level1(x, nlist, niter, seed)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=km.k)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return _level2(sizes, lambda c: x[order[starts[c]:starts[c + 1]]], nlist, x.shape[1], niter, seed)


def streamed_kmeans(emb: zarr.Array, rows: np.ndarray, nlist: int, niter: int, seed: int, *,
                    memory: int = TRAIN_MEMORY, gpu: bool = False, spill_dir: str | None = None) -> np.ndarray:
    """Two-level k-means over the sorted sample ``rows`` of ``emb`` in about ``memory`` bytes.

    The same algorithm as :func:`two_level_kmeans`, out of core: level 1 trains on a uniform part
    of the sample that fits a quarter of ``memory``; the whole sample is then streamed from zarr
    block by block, assigned to its level-1 cluster and appended, grouped by cluster, to a spill
    file (``spill_dir``, default ``$TMPDIR``; removed on exit, even on a kill); level 2 reads one
    cluster's points at a time.  Memory: the level-1 part, one block, one cluster and the
    ``nlist x d`` centroids, whatever the sample size; disk: the sample (4·d bytes per row).
    """
    d = emb.shape[1]
    row_bytes = 4 * d
    rng = np.random.default_rng(seed)
    n1 = min(len(rows), max(1, memory // (4 * row_bytes)))
    km = _level1(gather_rows(emb, np.sort(rng.choice(rows, n1, replace=False))), nlist, niter, seed, gpu)
    block = max(1, memory // (4 * row_bytes))
    segments: list[list[tuple[int, int]]] = [[] for _ in range(km.k)]
    sizes = np.zeros(km.k, np.int64)
    where = f"index: the training sample's spill file in {spill_dir or tempfile.gettempdir()} (set TMPDIR)"
    with disk_errors(where), tempfile.TemporaryFile(dir=spill_dir) as spill:
        for s in range(0, len(rows), block):
            x = gather_rows(emb, rows[s:s + block])
            _, assign = km.index.search(x, 1)
            assign = assign.ravel()
            counts = np.bincount(assign, minlength=km.k)
            starts = spill.tell() + row_bytes * np.concatenate([[0], np.cumsum(counts)])
            spill.write(memoryview(x[np.argsort(assign, kind="stable")]).cast("B"))
            for c in np.flatnonzero(counts):
                segments[c].append((int(starts[c]), int(counts[c])))
            sizes += counts
            del x

        def points_of(c: int) -> np.ndarray:
            out = np.empty((int(sizes[c]), d), np.float32)
            view, at = memoryview(out).cast("B"), 0
            for offset, count in segments[c]:
                spill.seek(offset)
                at += spill.readinto(view[at:at + count * row_bytes])
            return out

        return _level2(sizes, points_of, nlist, d, niter, seed, gpu)


def train_index(index, emb: zarr.Array, rows: np.ndarray, *, seed: int = 0, gpu: bool = False,
                memory: int | None = None) -> bool:
    """Train ``index`` on the sorted sample ``rows`` of ``emb``.

    IVF coarse quantizers of 1024+ lists (any size with a GPU when the sample exceeds ``memory``)
    are trained by two-level k-means: in memory (:func:`two_level_kmeans`) when the sample fits
    ``memory`` bytes, else streamed (:func:`streamed_kmeans`).  A streamed quantizer's encoder (PQ)
    is then trained on a uniform part of the sample (faiss uses at most 65,536 points for PQ).
    Smaller IVFs use faiss's own k-means on the GPU (when present) or CPU.  ``memory`` defaults
    to ``TRAIN_MEMORY``.  Returns whether the quantizer was trained streamed.
    """
    faiss = _faiss()
    if index.is_trained:
        return False
    memory = TRAIN_MEMORY if memory is None else memory
    ivf = _ivf(index)
    d = emb.shape[1]
    niter = 2 * KMEANS_NITER if gpu else KMEANS_NITER
    for part in (faiss.downcast_index(index), faiss.downcast_index(ivf) if ivf is not None else None):
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False  # on by default for PQ factories; 10x the training time
        if part is not None and hasattr(part, "use_precomputed_table"):
            part.use_precomputed_table = -1  # nlist x m x 256 floats (1 GiB at 2^15 x 32): not worth it
    fits = len(rows) * 4 * d <= memory
    x = None
    streamed = False
    if ivf is not None:
        ivf.cp.niter = niter
        ivf.cp.seed = seed
        direct = isinstance(faiss.downcast_index(index), faiss.IndexIVF) and len(rows) > ivf.nlist
        streamed = direct and not fits
        if streamed:
            centroids = streamed_kmeans(emb, rows, ivf.nlist, niter, seed, memory=memory, gpu=gpu)
        elif direct and not gpu and ivf.nlist >= TWO_LEVEL_MIN_NLIST:
            x = gather_rows(emb, rows)
            centroids = two_level_kmeans(x, ivf.nlist, niter, seed)
        else:
            centroids = None
            if gpu:
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        if centroids is not None:
            ivf.quantizer.train(centroids)
            ivf.quantizer.add(centroids)
    if x is None:
        if not fits:  # a uniform part within memory: a streamed quantizer leaves only the encoder to train
            keep = min(len(rows), max(PQ_TRAIN_ROWS, memory // (4 * d)))
            rows = np.sort(np.random.default_rng(seed).choice(rows, keep, replace=False))
        x = gather_rows(emb, rows)
    try:
        index.train(x)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StreamPruneError(f"index: training failed on {len(x)} rows: {reason}") from None
    return streamed


def set_search_params(index, params: dict) -> None:
    """Apply nprobe (and the HNSW quantizer's efSearch) to a loaded index."""
    faiss = _faiss()
    if params.get("nprobe") and _ivf(index) is not None:
        ps = faiss.ParameterSpace()
        ps.set_index_parameter(index, "nprobe", int(params["nprobe"]))
        if isinstance(faiss.downcast_index(_ivf(index).quantizer), faiss.IndexHNSW):
            ps.set_index_parameter(index, "quantizer_efSearch", max(64, 2 * int(params["nprobe"])))


def search_rows(index, x: np.ndarray, rows: np.ndarray, k: int, refine: int, emb: zarr.Array | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest indexed rows of queries ``x`` (ids ``rows``, excluded from their own results).

    With ``refine`` R >= 1, the top R·k candidates are re-ranked by exact distances computed
    from ``emb``; otherwise distances are the index's (approximate for PQ).
    """
    kc = k * max(1, refine) + 1
    sq, ids = index.search(np.ascontiguousarray(x, np.float32), kc)
    if refine:
        ids = np.where(ids == rows[:, None], -1, ids)
        sq = gather_sq_distances(x, ids, emb)
    return select_neighbors(ids, sq, rows, k)


def exact_knn(queries: np.ndarray, query_rows: np.ndarray, blocks, k: int,
              device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows (self excluded) of ``queries`` over (rows, vectors) ``blocks``.

    faiss on the CPU, or with ``device`` float64 arithmetic with torch there (the torch engine's
    recall check on a GPU: independent of its fp16 candidate search, and no CPU pass over N rows).
    """
    if device is not None:
        return _exact_knn_torch(queries, query_rows, blocks, k, device)
    faiss = _faiss()
    heap = faiss.ResultHeap(len(queries), k + 1)
    for rows, xb in blocks:
        sq, local = faiss.knn(queries, xb, min(k + 1, len(xb)))
        heap.add_result(sq, np.where(local >= 0, rows[np.maximum(local, 0)], -1))
    heap.finalize()
    return select_neighbors(heap.I, heap.D, query_rows, k)


def _exact_knn_torch(queries: np.ndarray, query_rows: np.ndarray, blocks, k: int, device: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    import torch

    dev = torch.device(device)
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float64)).to(dev)
    best_sq = torch.full((len(q), 0), np.inf, dtype=torch.float64, device=dev)
    best_id = torch.full((len(q), 0), -1, dtype=torch.int64, device=dev)
    as_t = lambda a, dt: a.to(dev, dt) if torch.is_tensor(a) else torch.from_numpy(np.asarray(a)).to(dev, dt)  # noqa: E731
    with torch.no_grad():
        for rows, xb in blocks:  # numpy blocks read from zarr, or the torch engine's device blocks
            x = as_t(xb, torch.float64)
            sq = torch.cdist(q, x).square_() if len(x) else torch.zeros((len(q), 0), dtype=torch.float64, device=dev)
            ids = as_t(rows, torch.int64).expand(len(q), -1)
            cat_sq, cat_id = torch.cat([best_sq, sq], 1), torch.cat([best_id, ids], 1)
            top, pos = cat_sq.topk(min(k + 1, cat_sq.shape[1]), dim=1, largest=False, sorted=True)
            best_sq, best_id = top, cat_id.gather(1, pos)
    return select_neighbors(best_id.cpu().numpy(), best_sq.cpu().numpy(), query_rows, k)


# --------------------------------------------------------------------------- exact search with torch on a GPU


def choose_engine(factory: str, n: int, n_index: int, d: int, gpu_free_bytes: int | None) -> str:
    """``torch`` (exact GPU search) or ``faiss``: torch needs ``factory="auto"``, a GPU, room and bounded work."""
    if factory != "auto" or gpu_free_bytes is None:
        return "faiss"
    if n_index * d * 6 > TORCH_GPU_FRACTION * gpu_free_bytes or n * n_index * d > TORCH_MAX_MACS:  # fp32 + fp16 rows
        return "faiss"
    return "torch"


def torch_search_device() -> str | None:
    """The device of the torch engine: "cuda" when torch sees a GPU, else None.

    ``STREAMPRUNE_INDEX_DEVICE`` overrides it: ``none`` turns the engine off (faiss everywhere),
    ``cpu`` runs it on the CPU (tests and comparisons only: faiss is faster there).
    """
    forced = os.environ.get("STREAMPRUNE_INDEX_DEVICE", "").strip().lower()
    if forced:
        return None if forced == "none" else forced
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def _free_bytes(device: str | None) -> int | None:
    """Free memory of the torch engine's device (None: no engine; CPU: unbounded here)."""
    if device is None:
        return None
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return 1 << 62


_TF32 = {"depth": 0, "saved": False}
_TF32_LOCK = threading.Lock()


@contextmanager
def tf32_matmul():
    """TF32 matmuls on CUDA while any thread is inside (the flag is process-wide: a plain
    save-and-restore per thread could leave it on, or turn it off under another thread's search).
    Used by this module's search and by the GCN's training and whole-graph forward."""
    import torch

    with _TF32_LOCK:
        if _TF32["depth"] == 0:
            _TF32["saved"] = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
        _TF32["depth"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32["depth"] -= 1
            if _TF32["depth"] == 0:
                torch.backends.cuda.matmul.allow_tf32 = _TF32["saved"]


class TorchExactIndex:
    """Exact L2 search over indexed rows held on a torch device, with a faiss-like ``search``.

    Candidates come from one matmul per block of queries (``|x|^2 - 2 q.x``), then the best
    ``2 kc + 8`` of each query are re-ranked with float32 distances computed directly
    (``sum((q - x)^2)``), so the returned distances do not suffer the matmul's rounding.

    ``candidates``: the matmul's precision.  ``"fp16"`` (the default on CUDA) multiplies a half
    copy of the rows, centred on their mean and scaled into the unit ball (distances are unchanged
    by the shift and only scaled, so the ranking is the same, and no product can overflow); it
    runs at twice the TF32 rate, and its inputs carry TF32's 10-bit mantissa.  ``"tf32"`` (fp32
    with TF32 matmuls on CUDA, plain fp32 on a CPU) is the default elsewhere.  The re-rank is
    float32 either way; the stage's recall check measures what the candidates miss.
    Memory on the device: the indexed vectors (float32, plus float16 with ``"fp16"``) and one
    block of distances (``TORCH_BLOCK_BYTES``); on the host: one slab of embeddings while loading.
    """

    def __init__(self, emb: zarr.Array, mask: np.ndarray, device: str = "cuda",
                 block_bytes: int = TORCH_BLOCK_BYTES, candidates: str | None = None):
        import torch

        self.device = torch.device(device)
        self.candidates = candidates or ("fp16" if self.device.type == "cuda" else "tf32")
        if self.candidates not in ("fp16", "tf32"):
            raise StreamPruneError(f"candidates must be fp16 or tf32, not {self.candidates!r}")
        self.d = int(emb.shape[1])
        self.ntotal = int(np.count_nonzero(mask))
        self.block_bytes = int(block_bytes)
        self.x = torch.empty((self.ntotal, self.d), dtype=torch.float32, device=self.device)
        self.ids = torch.empty(self.ntotal, dtype=torch.int64, device=self.device)
        pos = 0
        for rows, xb in iter_blocks(emb, mask):
            self.x[pos:pos + len(rows)].copy_(torch.from_numpy(np.ascontiguousarray(xb, np.float32)))
            self.ids[pos:pos + len(rows)].copy_(torch.from_numpy(rows))
            pos += len(rows)
        if self.candidates == "fp16" and self.ntotal:
            self.shift = self.x.mean(dim=0, dtype=torch.float64).float()
            scale = float(max(float((self.x - self.shift).norm(dim=1).max()), 1e-30))
            self.scale = 1.0 / scale
            self.xm = torch.empty((self.ntotal, self.d), dtype=torch.float16, device=self.device)
            for s0 in range(0, self.ntotal, 1 << 16):
                self.xm[s0:s0 + (1 << 16)] = ((self.x[s0:s0 + (1 << 16)] - self.shift) * self.scale).half()
            self.sq_norms = self.xm.float().square().sum(dim=1).half()
        else:
            self.xm, self.shift, self.scale = self.x, None, 1.0
            self.sq_norms = (self.x * self.x).sum(dim=1)

    def vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """The float32 vectors of ``rows`` from the device copy (None unless every one is indexed):
        the recall check's queries of the all-rows graph without a zarr gather, which reads every
        chunk for 1,000 random rows (2 GB at 1M x 512)."""
        import torch

        rows_t = torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        pos = torch.searchsorted(self.ids, rows_t).clamp_(max=max(self.ntotal - 1, 0))
        if not self.ntotal or not bool((self.ids[pos] == rows_t).all()):
            return None
        return self.x[pos].cpu().numpy()

    def blocks(self, rows: int = 1 << 16) -> Iterator[tuple]:
        """(row ids, vectors) device blocks of the indexed rows, for :func:`exact_knn` (the recall
        check then reads nothing from zarr: 2 GB at 1M x 512)."""
        for s0 in range(0, self.ntotal, rows):
            yield self.ids[s0:s0 + rows], self.x[s0:s0 + rows]

    def search(self, queries: np.ndarray, kc: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 (q, kc) float32, row ids (q, kc) int64) of the ``kc`` nearest rows; -1/inf pad."""
        import torch

        q_all = np.ascontiguousarray(queries, np.float32)
        sq_out = np.full((len(q_all), kc), np.inf, np.float32)
        id_out = np.full((len(q_all), kc), -1, np.int64)
        keep = min(kc, self.ntotal)
        if not len(q_all) or keep == 0:
            return sq_out, id_out
        wide = min(self.ntotal, 2 * keep + 8)
        itemsize = self.xm.element_size()
        block = max(1, min(TORCH_MAX_QUERY_BLOCK,
                           self.block_bytes // max(itemsize * self.ntotal, 4 * wide * self.d)))
        # Queries go to the device and results come back once per TORCH_QUERY_SPAN rows, not per
        # block: each host<->device copy waits for the device to drain.
        span = max(block, TORCH_QUERY_SPAN // block * block)
        with tf32_matmul(), torch.no_grad():
            for s0 in range(0, len(q_all), span):
                q_span = torch.from_numpy(q_all[s0:s0 + span]).to(self.device)
                best_parts, id_parts = [], []
                for b in range(0, len(q_span), block):
                    q = q_span[b:b + block]
                    qm = q if self.shift is None else ((q - self.shift) * self.scale).half()
                    approx = torch.addmm(self.sq_norms[None, :], qm, self.xm.T, beta=1.0, alpha=-2.0)
                    cand = approx.topk(wide, dim=1, largest=False, sorted=False).indices
                    del approx
                    exact = (self.x[cand] - q[:, None, :]).square_().sum(dim=2)
                    best, pos = exact.topk(keep, dim=1, largest=False, sorted=True)
                    best_parts.append(best)
                    id_parts.append(self.ids[cand.gather(1, pos)])
                s1 = s0 + len(q_span)
                sq_out[s0:s1, :keep] = torch.cat(best_parts).cpu().numpy()
                id_out[s0:s1, :keep] = torch.cat(id_parts).cpu().numpy()
        return sq_out, id_out


# --------------------------------------------------------------------------- index files and the cache

_CACHE: dict[str, tuple[str, object]] = {}
_CACHE_LOCK = threading.Lock()


def _local_dir(fingerprint: str) -> str:
    """A local directory for index files of a remote workspace (faiss needs files to mmap)."""
    path = os.path.join(_cache_base(), fingerprint[:16])
    os.makedirs(path, exist_ok=True)
    return path


def _local_file(ws: Workspace, rel: str, fingerprint: str) -> str:
    """A local path holding workspace file ``rel`` (the file itself for a local workspace)."""
    url = ws.path(rel)
    if not storage.is_remote(url):
        if not os.path.exists(url):
            raise StreamPruneError(f"index: {url} is missing; re-run with --force")
        return url
    local = os.path.join(_local_dir(fingerprint), os.path.basename(rel))
    version = json.dumps(storage.stat(url, ws.storage_options), sort_keys=True)
    tag = local + ".version"
    if not (os.path.exists(local) and os.path.exists(tag) and Path(tag).read_text() == version):
        fs = storage.get_fs(url, ws.storage_options)
        tmp = f"{local}.tmp-{os.getpid()}"
        storage.retry(lambda: fs.get_file(url, tmp), url, storage_options=ws.storage_options)
        os.replace(tmp, local)
        with open(tag, "w") as f:
            f.write(version)
    return local


_NO_ROOM_WARNED: set[str] = set()
_IN_USE: dict[str, tuple[str, int]] = {}  # workspace's copies -> (the copy this process reads, its shared lock)
_IN_USE_LOCK = threading.Lock()


def _cache_base() -> str:
    return os.environ.get("STREAMPRUNE_CACHE") or os.path.join(tempfile.gettempdir(), "streamprune-cache")


def embed_version(embed_marker: dict, arr) -> str:
    """Identity of an embed run's arrays for local copies: its ``run`` id (commit time for markers
    written before it existed), with the array's shape and dtype."""
    run = embed_marker.get("run") or [embed_marker.get("finished"), embed_marker.get("timings", {}).get("wall_s")]
    return stage_fingerprint([embed_marker.get("fingerprint"), run, list(arr.shape), str(arr.dtype)])


def local_embeddings(ws: Workspace, emb: zarr.Array, embed_marker: dict) -> zarr.Array:
    """Embeddings to read rows from at random: ``emb`` itself in a local workspace; for an ``s3://``
    one, a copy on this host's disk, made once per host and embed run.

    The exact re-rank of every search chunk reads candidates from all over the rows (as do the
    GCN's streamed tasks, the neighbours of their rows), so each chunk would fetch the whole of a
    remote embeddings.zarr again (N rows per chunk, N²/chunk over the stage).
    The copy is fetched once (N rows) and read from local disk after that.  It lives in the local
    cache (``$STREAMPRUNE_CACHE``) under the workspace and the embed run's identity (the ``run`` id
    of its marker; commit time for markers written before it existed).  The processes of a host
    share it: one copies under a file lock, and each holds a shared lock on it while it may read it.
    A host keeps one copy per workspace: making a new one removes the workspace's older copies that
    no process holds.  Where the local disk lacks room for it (plus ``LOCAL_COPY_HEADROOM``) the
    remote array is read, with one warning per process.
    """
    if not storage.is_remote(ws.path("embeddings.zarr")):
        return emb
    version = embed_version(embed_marker, emb)
    home = os.path.join(_cache_base(), "embeddings", stage_fingerprint(ws.url)[:16])
    base = _hold_copy(home, os.path.join(home, version[:16]))
    path = os.path.join(base, "embeddings.zarr")

    def copy() -> None:
        shutil.rmtree(path, ignore_errors=True)  # a copy cut short by a kill
        out = zarr.create_array(zarr.storage.LocalStore(path), shape=emb.shape, chunks=emb.chunks,
                                dtype=emb.dtype, fill_value=0, compressors=None)
        slab = _slab_rows(emb)
        for s in range(0, emb.shape[0], slab):
            out[s:s + slab] = emb[s:s + slab]

    if not _copy_once(base, emb, ws.path("embeddings.zarr"), version, copy):
        return emb
    return zarr.open_array(zarr.storage.LocalStore(path), mode="r")


def local_rows(ws: Workspace, arr, rel: str, version: str | None, group: str | None = None):
    """Workspace array ``rel`` to gather rows from at random: ``arr`` itself in a local workspace;
    for an ``s3://`` one, a plain copy on this host's disk opened as a read-only ``np.memmap``
    (each gather then reads only the pages of its rows), made once per host and ``version``.

    As :func:`local_embeddings` (shared under a file lock, one held copy per ``group`` and host,
    older unheld copies removed, remote reads with one warning without room), for the other arrays
    the GCN's streamed tasks gather neighbour rows of: labels, validity, the kNN prior and each
    layer's activations (``group`` puts a score's layers together, so that the copy of one layer
    replaces that of the layer before).  ``version`` None (an array without an identity): no copy.
    """
    if version is None or not storage.is_remote(ws.path(rel)):
        return arr
    home = _rows_home(ws, group or rel)
    version = stage_fingerprint([version, rel, list(arr.shape), str(arr.dtype)])
    base = _hold_copy(home, os.path.join(home, version[:16]))
    path = os.path.join(base, "rows.npy")

    def copy() -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=tuple(arr.shape))
        unit = int((getattr(arr, "shards", None) or arr.chunks)[0])  # whole shards, or chunks, per read
        row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
        step = unit * max(1, SLAB_BYTES // max(1, row_bytes * unit))
        for s in range(0, arr.shape[0], step):
            out[s:s + step] = arr[s:s + step]
        out.flush()
        del out

    if not _copy_once(base, arr, ws.path(rel), version, copy):
        return arr
    return np.load(path, mmap_mode="r")


def _rows_home(ws: Workspace, group: str) -> str:
    """The cache directory of :func:`local_rows`' copies of one array (or group of arrays) of a workspace."""
    return os.path.join(_cache_base(), "arrays", stage_fingerprint([ws.url, group])[:16])


def drop_copies(ws: Workspace, group: str) -> None:
    """Let go of this process's copy in :func:`local_rows`' ``group`` and remove the group's copies that
    no process holds (after a stage whose arrays they copied has removed them)."""
    home = _rows_home(ws, group)
    with _IN_USE_LOCK:
        held = _IN_USE.pop(home, None)
        if held is not None:
            os.close(held[1])
    if os.path.isdir(home):
        _evict_copies(home, keep="")


def _copy_once(base: str, arr, what: str, version: str, copy) -> bool:
    """Run ``copy()`` into copy directory ``base`` unless a finished copy is there (one process of
    the host at a time); False, with one warning per process, when the local disk lacks room."""
    done = os.path.join(base, "done")
    with _locked(os.path.join(base, "copy.lock")):
        if os.path.exists(done):
            return True
        need = int(np.prod(arr.shape)) * arr.dtype.itemsize
        free = shutil.disk_usage(base).free
        if free < need + LOCAL_COPY_HEADROOM:
            if version not in _NO_ROOM_WARNED:
                _NO_ROOM_WARNED.add(version)
                log.warning("no room for a local copy of %s (%.1f GiB, %.1f GiB free in %s); its rows are "
                            "read remotely, the whole array once per task", what, need / 2**30, free / 2**30, base)
            return False
        with disk_errors(f"copying {what} to {base}"):
            copy()
            Path(done).touch()
    return True


def _hold_copy(home: str, base: str) -> str:
    """Hold a shared lock on copy directory ``base`` for this process (dropping its hold on another
    copy of the same workspace); returns ``base``, created if missing.  Taking a new hold removes
    the workspace's other copies that no process holds (:func:`_evict_copies`)."""
    import fcntl

    with _IN_USE_LOCK:
        held = _IN_USE.get(home)
        if held is not None and held[0] == base and os.path.isdir(base):
            return base
        if held is not None:
            os.close(held[1])  # this process now reads another copy of the workspace
            del _IN_USE[home]
        for _ in range(10):  # a directory removed between our open and our lock is made again
            os.makedirs(base, exist_ok=True)
            try:
                fd = os.open(os.path.join(base, "use.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:  # a file system without locks: copies are never removed from under a reader
                pass
            if os.path.isdir(base) and os.path.exists(os.path.join(base, "use.lock")):
                _IN_USE[home] = (base, fd)
                _evict_copies(home, keep=base)
                return base
            os.close(fd)
        raise StreamPruneError(f"could not hold the local copy in {base}")


def _evict_copies(home: str, keep: str) -> None:
    """Remove the copies of the workspace in ``home`` other than ``keep`` that no process holds."""
    import fcntl

    for entry in os.listdir(home):
        other = os.path.join(home, entry)
        if other == keep or not os.path.isdir(other):
            continue
        try:
            fd = os.open(os.path.join(other, "use.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no process reads it
        except OSError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(other, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on a local file (the processes of one host), where the file system has locks."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: each process may copy, into the same place
            pass
        yield
    finally:
        os.close(fd)


def _upload(ws: Workspace, local: str, rel: str) -> None:
    """Publish a local file as workspace file ``rel`` (atomic rename locally, one upload remotely)."""
    storage.upload_file(local, ws.path(rel), ws.storage_options)


def write_index(ws: Workspace, index, rel: str) -> None:
    """Write an in-memory index to workspace file ``rel`` atomically, straight from faiss to a file.

    No in-memory serialization: that would hold two more copies of the index (165 MB each for
    2M rows of PQ64).  A remote workspace gets the file through a local temporary file.
    """
    faiss = _faiss()
    url = ws.path(rel)
    remote = storage.is_remote(url)
    tmpdir = tempfile.mkdtemp(prefix="streamprune-index-") if remote else os.path.dirname(url)
    os.makedirs(tmpdir, exist_ok=True)
    tmp = os.path.join(tmpdir, f".tmp-{os.getpid()}-{threading.get_ident()}-{os.path.basename(rel)}")
    try:
        with disk_errors(f"index: writing {url}"):
            faiss.write_index(index, tmp)
        _upload(ws, tmp, rel)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if remote:
            shutil.rmtree(tmpdir, ignore_errors=True)


def read_index(ws: Workspace, rel: str, fingerprint: str, ondisk: bool = False):
    """Load a workspace index file (inverted lists memory-mapped for on-disk indexes)."""
    faiss = _faiss()
    # IVF-PQ's precomputed tables (nlist x m x 256 floats per process) are skipped: search computes
    # the distance tables per probed list instead, at about the same speed here.
    flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    if ondisk:
        ivfdata = rel.rsplit(".", 1)[0] + ".ivfdata"
        _local_file(ws, ivfdata, fingerprint)  # beside the index file, where ONDISK_SAME_DIR looks
        return faiss.read_index(_local_file(ws, rel, fingerprint), flags | faiss.IO_FLAG_ONDISK_SAME_DIR)
    url = ws.path(rel)
    if not storage.is_remote(url):
        return faiss.read_index(_local_file(ws, rel, fingerprint), flags)
    return faiss.deserialize_index(np.frombuffer(storage.read_bytes(url, ws.storage_options), np.uint8), flags)


def cached_index(ws: Workspace, name: str, fingerprint: str, ondisk: bool, params: dict):
    """The searchable index of graph ``name``, loaded once per process (per file version).

    The accepted exception to "no global state": a worker process keeps the index it loaded
    for the next chunk.  Keyed by path, stage fingerprint and the file's version tag.
    """
    rel = f"index/{name}.faissindex"
    key = ws.path(rel)
    tag = f"{fingerprint}:{storage.stat(key, ws.storage_options)['etag']}:{sorted(params.items())}"
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == tag:
            return hit[1]
        _CACHE.pop(key, None)
        index = read_index(ws, rel, fingerprint, ondisk)
        set_search_params(index, params)
        if use_gpu() and not ondisk:
            index = _to_gpu(index)
        _CACHE[key] = (tag, index)
        return index


def clear_cache() -> None:
    """Forget every index loaded by this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _to_gpu(index):
    faiss = _faiss()
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(index, co)
    except (RuntimeError, AttributeError) as exc:
        log.warning("index: cannot move the index to the GPU (%s); searching on CPU", exc)
        return index


# --------------------------------------------------------------------------- the stage


@dataclass
class _Plan:
    name: str
    factory: str
    nlist: int
    m: int
    code_size: int
    n: int
    d: int
    n_index: int
    k: int
    refine: int
    ondisk: bool
    ondisk_threshold: int
    chunk_rows: int
    gpu: bool
    engine: str = "faiss"  # faiss | torch (exact search on ``device``, no faiss index)
    device: str | None = None


def _workspace(ws: str | Workspace, storage_options: dict | None) -> Workspace:
    return ws if isinstance(ws, Workspace) else Workspace(ws, storage_options)


@releases_leases
def build_index(ws: str | Workspace, *, graph: str = "both", k: int = 20, factory: str = "auto",
                nprobe: int | None = None, refine: int | None = None, chunk_rows: int | None = None,
                scheduler: str | None = "local", force: bool = False, recall_queries: int = 1000,
                ondisk_threshold: int | None = None, storage_options: dict | None = None,
                seed: int = 0) -> dict:
    """Build the ``seeds`` and/or ``all`` index and write graph/<name>.zarr; returns markers by name.

    ``refine``: None = 4 for PQ indexes, 0 otherwise; R >= 1 re-ranks R·k candidates exactly.
    ``nprobe``: None = tuned to reach ``TARGET_RECALL`` on a sample.  ``ondisk_threshold``: indexed
    rows above which IVF lists are merged on disk (None = codes + ids over 4 GiB).
    """
    ws = _workspace(ws, storage_options)
    names = {"both": GRAPHS, "seeds": ("seeds",), "all": ("all",)}.get(graph)
    if names is None:
        raise StreamPruneError(f"--graph must be one of both, seeds, all; got {graph!r}")

    for label, value, lo in (("k", k, 1), ("nprobe", nprobe, 1), ("refine", refine, 0),
                             ("chunk-rows", chunk_rows, 1), ("recall-queries", recall_queries, 0),
                             ("ondisk-threshold", ondisk_threshold, 1)):
        check_optional_whole(value, f"--{label}", lo)
    return {name: _build_graph(ws, name, k=k, factory=factory, nprobe=nprobe, refine=refine,
                               chunk_rows=chunk_rows, scheduler=scheduler, force=force,
                               recall_queries=recall_queries, ondisk_threshold=ondisk_threshold, seed=seed)
            for name in names}


def _build_graph(ws: Workspace, name: str, *, k: int, factory: str, nprobe: int | None, refine: int | None,
                 chunk_rows: int | None, scheduler: str | None, force: bool, recall_queries: int,
                 ondisk_threshold: int | None, seed: int) -> dict:
    key = f"index-{name}"
    bound_heap(INDEX_MMAP_THRESHOLD)
    emb, valid_arr, embed_marker = open_embeddings(ws, key)
    inputs = {"embed": embed_marker["fingerprint"]}
    if name == "seeds":
        inputs["subset"] = ws.require("subset", key)["fingerprint"]
    config = {"graph": name, "k": int(k), "factory": factory, "nprobe": nprobe, "refine": refine,
              "chunk_rows": chunk_rows, "recall_queries": int(recall_queries),
              "ondisk_threshold": ondisk_threshold, "seed": int(seed)}

    def plan_graph() -> tuple[_Plan, np.ndarray]:
        mask = candidate_mask(ws, name, valid_arr[:])
        n_index = int(np.count_nonzero(mask))
        if n_index == 0:
            raise StreamPruneError(f"{key}: no valid {'seed ' if name == 'seeds' else ''}rows to index")
        device = torch_search_device()
        engine = choose_engine(factory, emb.shape[0], n_index, emb.shape[1], _free_bytes(device))
        return _plan(name, emb.shape[0], emb.shape[1], n_index, k, factory, refine, ondisk_threshold, chunk_rows,
                     emb.chunks[0], engine=engine, device=device if engine == "torch" else None,
                     row_bytes=emb.shape[1] * emb.dtype.itemsize), mask

    # The plan refuses what cannot be built (the factory, its lists on disk) before begin()
    # replaces an earlier run's marker; a finished run of this config and inputs is skipped below.
    done = ws.marker(key, check_version=not force)
    planned = None
    if not (done and done.get("fingerprint") == stage_fingerprint({"stage": "index", "config": config,
                                                                    "inputs": inputs})):
        planned = plan_graph()
    run = ws.begin("index", config, inputs, force=force, key=key)
    if run.already_done:
        return run.previous | {"skipped": True}
    plan, mask = planned or plan_graph()  # begin() drops a marker of another version under --force
    n, d, n_index = plan.n, plan.d, plan.n_index
    log.info("%s: %s over %d rows of width %d (refine %d, %s, engine %s)", key, plan.factory, n_index, d,
             plan.refine, "on disk" if plan.ondisk else "in memory", plan.engine)
    timings: dict = {}
    if plan.engine == "faiss" and plan.refine:  # every phase then reads this host's copy of remote embeddings
        t0 = time.time()
        emb = local_embeddings(ws, emb, embed_marker)
        timings["local_copy_s"] = round(time.time() - t0, 3)
    trained = _train_phase(ws, run, plan, emb, mask, seed, timings)
    _add_phase(ws, run, plan, emb, mask, scheduler, timings)
    torch_index = _LazyTorchIndex(emb, mask, plan, timings)  # the torch engine's rows, loaded once for both phases
    tuned = _tune_phase(ws, run, plan, emb, mask, nprobe, recall_queries, seed, timings, torch_index)
    params = {"nprobe": tuned["nprobe"]} if plan.nlist else {}
    _search_phase(ws, run, plan, params, scheduler, timings, torch_index)
    del torch_index
    recall = _recall(ws, plan)
    clear_cache()
    trim_heap()
    info = {**{k_: v for k_, v in asdict(plan).items() if k_ not in ("name",)},
            "nprobe": tuned["nprobe"], "nprobe_table": tuned["table"], "recall_at_k": recall,
            "recall_queries": tuned["n_queries"], "n_train": int(trained.get("n_train", 0)),
            "train_streamed": bool(trained.get("streamed", False)), "timings": timings}
    with ws.exclusive():  # both graphs' parameters share the file
        all_params = ws.read_json("index", "params.json") or {}
        all_params[name] = info
        ws.write_json(all_params, "index", "params.json")
    return run.commit(
        outputs={"graph": f"graph/{name}.zarr", "index": f"index/{name}.faissindex" if plan.engine == "faiss" else None,
                 "params": "index/params.json"},
        counts={"n": n, "d": d, "n_index": n_index, "k": k, "engine": plan.engine, "factory": plan.factory,
                "nlist": plan.nlist,
                "m": plan.m, "nprobe": tuned["nprobe"], "refine": plan.refine, "ondisk": plan.ondisk,
                "recall_at_k": recall, "recall_queries": tuned["n_queries"]},
        timings=timings)


def _plan(name: str, n: int, d: int, n_index: int, k: int, factory: str, refine: int | None,
          ondisk_threshold: int | None, chunk_rows: int | None, emb_chunk_rows: int, engine: str = "faiss",
          device: str | None = None, row_bytes: int | None = None) -> _Plan:
    if engine == "torch":  # exact: no index, no re-rank from zarr (TorchExactIndex re-ranks on the device)
        return _Plan(name=name, factory="Flat", nlist=0, m=0, code_size=4 * d, n=n, d=d, n_index=n_index, k=int(k),
                     refine=0, ondisk=False, ondisk_threshold=int(ondisk_threshold or ondisk_rows(4 * d)),
                     chunk_rows=int(chunk_rows or default_chunk_rows(emb_chunk_rows, k + 1)), gpu=False,
                     engine="torch", device=device)
    emb_bytes = n * (row_bytes or 4 * d)
    if refine is None and emb_bytes > RERANK_MAX_BYTES:
        refine = 0
        log.warning("index-%s: no exact re-rank: each search chunk would read all %.1f GiB of embeddings.zarr "
                    "again; %s (pass --refine 4 to re-rank all the same)", name, emb_bytes / 2**30,
                    "wider PQ codes instead" if factory == "auto" else "the index's distances are kept")
    if factory == "auto":
        factory = auto_params(n_index, d, refine=(DEFAULT_REFINE if refine is None else refine) > 0)["factory"]
    desc = describe_index(make_index(d, factory))
    if refine is None:
        refine = DEFAULT_REFINE if "PQ" in factory.upper() else 0
    chunk_rows = chunk_rows or default_chunk_rows(emb_chunk_rows, k * max(1, refine) + 1)
    threshold = ondisk_threshold if ondisk_threshold is not None else ondisk_rows(desc["code_size"])
    ondisk = n_index > threshold
    if ondisk and not desc["nlist"]:
        raise StreamPruneError(f"index-{name}: {n_index} rows exceed the on-disk threshold ({threshold}) but "
                               f"factory {factory!r} has no inverted lists to put on disk; use an IVF factory "
                               "or raise --ondisk-threshold")
    if ondisk and re.search(r"fs(r)?(_\d+)?(,|$)", factory):
        raise StreamPruneError(f"index-{name}: {n_index} rows exceed the on-disk threshold ({threshold}) but "
                               f"factory {factory!r} (fast-scan) keeps its lists in memory; use a PQ factory "
                               "without 'fs' or raise --ondisk-threshold")
    if desc["nlist"] > n_index:  # k-means trains each list's centroid on a row of its own
        raise StreamPruneError(f"index-{name}: factory {factory!r} has {desc['nlist']} inverted lists but only "
                               f"{n_index} rows are indexed; use at most {n_index} lists or --factory auto")
    return _Plan(name=name, factory=factory, nlist=desc["nlist"], m=desc["m"], code_size=desc["code_size"],
                 n=n, d=d, n_index=n_index, k=int(k), refine=int(refine), ondisk=ondisk,
                 ondisk_threshold=int(threshold), chunk_rows=int(chunk_rows), gpu=use_gpu())


def _phase_record(run: StageRun, chunk: str, plan: _Plan) -> dict | None:
    """The record of a finished phase, unless an interrupted run wrote it with another engine."""
    rec = run.chunk_done(chunk)
    return rec if rec is not None and rec.get("engine", "faiss") == plan.engine else None


def _train_phase(ws: Workspace, run: StageRun, plan: _Plan, emb, mask, seed: int, timings: dict) -> dict:
    """Train the index (or find it trained); returns the phase record (``n_train``, ``streamed``)."""
    rec = _phase_record(run, "trained", plan)
    if rec is not None:
        timings["train_s"] = rec["train_s"]
        return rec
    if plan.engine == "torch":
        timings["train_s"] = 0.0
        rec = {"train_s": 0.0, "n_train": 0, "streamed": False, "engine": plan.engine}
        run.mark_chunk("trained", rec)
        return rec
    t0 = time.time()
    index = make_index(plan.d, plan.factory)
    n_train, streamed = 0, False
    if not index.is_trained:
        ppc = 256 if plan.gpu else POINTS_PER_CENTROID
        rows = sample_rows(mask, train_size(plan.n_index, plan.nlist, plan.d, ppc), seed)
        n_train = len(rows)
        streamed = train_index(index, emb, rows, seed=seed + 1234, gpu=plan.gpu)
    _check_width(index, plan.d, plan.name)
    write_index(ws, index, f"index/{plan.name}.trained")
    del index
    trim_heap()
    timings["train_s"] = round(time.time() - t0, 3)
    rec = {"train_s": timings["train_s"], "n_train": n_train, "streamed": streamed, "engine": plan.engine}
    run.mark_chunk("trained", rec)
    return rec


def _check_width(index, d: int, name: str) -> None:
    if index.d != d:
        raise StreamPruneError(f"index-{name}: the index has width {index.d} but embeddings.zarr has "
                               f"width {d}; re-run `streamprune index --force`")


def _add_phase(ws: Workspace, run: StageRun, plan: _Plan, emb, mask, scheduler, timings: dict) -> None:
    rec = _phase_record(run, "built", plan)
    if rec is not None:
        timings["add_s"] = rec["add_s"]
    elif plan.engine == "torch":  # the vectors are loaded onto the device by the search phase
        timings["add_s"] = 0.0
        run.mark_chunk("built", {"add_s": 0.0, "engine": plan.engine})
    else:
        t0 = time.time()
        trained = read_index(ws, f"index/{plan.name}.trained", run.fingerprint)
        _check_width(trained, plan.d, plan.name)
        if not plan.ondisk:
            with _progress(plan.n, f"index {plan.name} (add)") as bar:
                for rows, x in iter_blocks(emb, mask, bar):
                    trained.add_with_ids(x, rows)
            write_index(ws, trained, f"index/{plan.name}.faissindex")
        else:
            _add_ondisk(ws, run, plan, trained, mask, scheduler)
        del trained
        trim_heap()
        timings["add_s"] = round(time.time() - t0, 3)
        run.mark_chunk("built", {"add_s": timings["add_s"], "engine": plan.engine})
    if plan.ondisk:  # the merged shard indexes: a resumed merge needs them until the phase is recorded
        storage.remove(ws.path(f"index/{plan.name}.shards"), ws.storage_options, recursive=True)


def _shard_ranges(plan: _Plan) -> list[tuple[int, int]]:
    """Row ranges of the on-disk shards: whole graph chunks, at most ~threshold (and 2^24) rows each."""
    per = max(plan.chunk_rows, min(plan.ondisk_threshold, 1 << 24) // plan.chunk_rows * plan.chunk_rows)
    return [(s, min(plan.n, s + per)) for s in range(0, plan.n, per)]


def _add_ondisk(ws: Workspace, run: StageRun, plan: _Plan, trained, mask, scheduler) -> None:
    from faiss.contrib.ondisk import merge_ondisk

    fp = run.fingerprint
    ranges = _shard_ranges(plan)
    shard_rel = [f"index/{plan.name}.shards/{i:05d}.faissindex" for i in range(len(ranges))]
    done = run.done_chunks()
    todo = [i for i in range(len(ranges)) if f"shard-{i}" not in done]

    def _record(j: int, result: dict) -> None:
        run.mark_chunk(f"shard-{todo[j]}", result)

    map_tasks(_add_shard_task, [(ws, plan.name, fp, ranges[i][0], mask[ranges[i][0]:ranges[i][1]], shard_rel[i])
                                for i in todo],
              scheduler=scheduler, desc=f"index {plan.name} (add)", unit="row",
              weights=[ranges[i][1] - ranges[i][0] for i in todo], on_result=_record)
    locals_ = [_local_file(ws, rel, fp) for rel in shard_rel]
    index_url = ws.path(f"index/{plan.name}.faissindex")
    out_dir = os.path.dirname(index_url) if not storage.is_remote(index_url) else _local_dir(fp)
    os.makedirs(out_dir, exist_ok=True)
    ivfdata = os.path.join(out_dir, f"{plan.name}.ivfdata")
    if os.path.exists(ivfdata):
        os.unlink(ivfdata)
    merge_ondisk(trained, locals_, ivfdata)
    if storage.is_remote(index_url):  # the next _local_file calls download them again, once
        _upload(ws, ivfdata, f"index/{plan.name}.ivfdata")
    write_index(ws, trained, f"index/{plan.name}.faissindex")


def _add_shard_task(ws: Workspace, name: str, fingerprint: str, start: int, mask: np.ndarray, rel: str) -> dict:
    """Add rows [start, start + len(mask)) where ``mask`` to a copy of the trained index; write it."""
    bound_heap(INDEX_MMAP_THRESHOLD)
    emb, _, _ = open_embeddings(ws, f"index-{name}")
    index = read_index(ws, f"index/{name}.trained", fingerprint)
    _check_width(index, emb.shape[1], name)
    n_added = 0
    for rows, x in iter_blocks(emb, mask, start=start):
        index.add_with_ids(x, rows)
        n_added += len(rows)
    write_index(ws, index, rel)
    return {"n_added": n_added}


class _LazyTorchIndex:
    """The torch engine's :class:`TorchExactIndex`, loaded on first use (a resumed stage whose
    search is done never loads it) and shared by the recall check and the search."""

    def __init__(self, emb, mask, plan: _Plan, timings: dict):
        self.emb, self.mask, self.plan, self.timings = emb, mask, plan, timings
        self.index = None

    def get(self) -> TorchExactIndex:
        if self.index is None:
            t0 = time.time()
            self.index = TorchExactIndex(self.emb, self.mask, self.plan.device or "cuda")
            self.timings["load_s"] = round(time.time() - t0, 3)
        return self.index


def _tune_phase(ws: Workspace, run: StageRun, plan: _Plan, emb, mask, nprobe: int | None, recall_queries: int,
                seed: int, timings: dict, torch_index: _LazyTorchIndex | None = None) -> dict:
    rec = _phase_record(run, "tuned", plan)
    if rec is not None:
        timings.update(rec["timings"])
        return rec
    t0 = time.time()
    valid = mask if plan.name == "all" else open_embeddings(ws, f"index-{plan.name}")[1][:]  # the queries
    must_tune = plan.nlist > 0 and nprobe is None
    n_tune = min(TUNE_QUERIES, recall_queries) if must_tune else 0
    rows = sample_rows(valid, n_tune + recall_queries, seed + 7)
    n_tune = min(n_tune, len(rows) // 2)
    rng = np.random.default_rng(seed + 8)
    perm = rng.permutation(len(rows))
    tune_rows = np.sort(rows[perm[:n_tune]])
    recall_rows = np.sort(rows[perm[n_tune:]])
    table: dict = {}
    chosen = nprobe or (DEFAULT_NPROBE if plan.nlist else None)
    if len(rows):
        both = np.concatenate([tune_rows, recall_rows])
        q = torch_index.get().vectors(both) if plan.engine == "torch" else None
        if q is None:  # (the torch engine holds every query row of the all-rows graph)
            order = np.argsort(both, kind="stable")
            q = np.empty((len(both), plan.d), np.float32)
            q[order] = gather_rows(emb, both[order])
        if plan.engine == "torch":  # float64 on the engine's device, over the rows it already holds
            gt_ids, gt_dist = exact_knn(q, both, torch_index.get().blocks(), plan.k, device=plan.device or "cuda")
        else:
            with _progress(plan.n, f"index {plan.name} (exact search, {len(both)} queries)") as bar:
                gt_ids, gt_dist = exact_knn(q, both, iter_blocks(emb, mask, bar), plan.k)
        timings["groundtruth_s"] = round(time.time() - t0, 3)
        buf = _npz_bytes(rows=recall_rows, ids=gt_ids[n_tune:], dist=gt_dist[n_tune:])
        storage.write_bytes_atomic(ws.path(f"index/{plan.name}.groundtruth.npz"), buf, ws.storage_options)
        if must_tune and n_tune:
            t1 = time.time()
            index = cached_index(ws, plan.name, run.fingerprint, plan.ondisk, {})
            chosen = None
            for p in [p for p in NPROBE_CANDIDATES if p <= plan.nlist] or [plan.nlist]:
                set_search_params(index, {"nprobe": p})
                ids, _ = search_rows(index, q[:n_tune], tune_rows, plan.k, plan.refine, emb)
                table[str(p)] = round(recall_at_k(ids, gt_ids[:n_tune]), 4)
                if chosen is not None and table[str(p)] - table[str(chosen)] < NPROBE_PLATEAU:
                    break  # twice the probes find no more neighbours (PQ without a re-rank): keep the cheaper
                chosen = p
                if table[str(p)] >= TARGET_RECALL:
                    break
            del index
            clear_cache()
            trim_heap()  # else the search phase's own copy of the index lands on top of this one's pages
            timings["tune_s"] = round(time.time() - t1, 3)
    timings["tune_total_s"] = round(time.time() - t0, 3)
    rec = {"nprobe": chosen, "table": table, "n_queries": int(len(recall_rows)), "timings": dict(timings),
           "engine": plan.engine}
    run.mark_chunk("tuned", rec)
    return rec


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _search_phase(ws: Workspace, run: StageRun, plan: _Plan, params: dict, scheduler, timings: dict,
                  torch_index: _LazyTorchIndex | None = None) -> None:
    t0 = time.time()
    url = ws.path("graph", f"{plan.name}.zarr")
    n, k, cr = plan.n, plan.k, plan.chunk_rows
    layout = _phase_record(run, "graph-layout", plan)
    if layout is not None and not storage.exists(storage.join(url, "zarr.json"), ws.storage_options):
        log.warning("%s: %s is gone; searching again", run.key, url)
        layout = None
    if layout is None:  # new, begun by another engine, or removed: start over
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="w")
        group.create_array("neighbors", shape=(n, k), chunks=(cr, k), dtype="int64", fill_value=-1,
                            compressors=graph_codec())
        group.create_array("distances", shape=(n, k), chunks=(cr, k), dtype="float32", fill_value=np.inf,
                            compressors=graph_codec())
        group.attrs.update({"graph": plan.name, "k": k, "metric": "euclidean", "factory": plan.factory,
                            "self_excluded": True, "engine": plan.engine})
        # Search records name their layout: those of a layout this one wiped are never trusted.
        layout = {"n": n, "k": k, "chunk_rows": cr, "engine": plan.engine, "id": uuid.uuid4().hex[:12]}
        run.mark_chunk("graph-layout", layout)

    def chunk_id(i: int) -> str:
        return f"search-{layout.get('id', '')}-{i}"

    done = run.done_chunks()
    starts = [s for s in range(0, n, cr) if chunk_id(s // cr) not in done]

    def _record(i: int, result: dict) -> None:
        run.mark_chunk(chunk_id(starts[i] // cr), result)

    weights = [min(cr, n - s) for s in starts]
    desc = f"index {plan.name} (search)"
    if plan.engine == "torch":
        # One in-process index on the device, searched by TORCH_SEARCH_THREADS chunks at a time: a
        # chunk's zarr read, neighbour selection and write (~45 ms per 4096 rows of 512-d on the CPU
        # box, against ~9 ms of search on an H200) overlap the others' searches.  Each chunk still
        # owns its zarr chunks.
        if starts:
            index = torch_index.get()
            map_tasks(_search_chunk, [(ws, plan.name, index, s, min(n, s + cr), k, 0) for s in starts],
                      scheduler="threads", threads=TORCH_SEARCH_THREADS, desc=desc, unit="row", weights=weights,
                      on_result=_record)
            del index
    else:
        map_tasks(_search_task, [(ws, plan.name, run.fingerprint, plan.ondisk, params, s, min(n, s + cr), k,
                                  plan.refine) for s in starts],
                  scheduler=scheduler, desc=desc, unit="row", weights=weights, on_result=_record)
    timings["search_s"] = round(time.time() - t0, 3)


def graph_codec():
    """The graph arrays' compressor: Blosc LZ4 with byte shuffle.  zarr's default (Zstd) took 10.8 ms
    to write a 4096-row chunk of a k = 20 graph on the CPU box, against 4.3 ms for this codec, and
    its output was larger (21 MB against 18 MB for 164k rows of a real graph; 38 MB raw)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _search_task(ws: Workspace, name: str, fingerprint: str, ondisk: bool, params: dict, start: int, stop: int,
                 k: int, refine: int) -> dict:
    """Search rows [start, stop) with the faiss index of ``name`` and write their chunk of graph/<name>.zarr."""
    bound_heap(INDEX_MMAP_THRESHOLD)
    return _search_chunk(ws, name, cached_index(ws, name, fingerprint, ondisk, params), start, stop, k, refine)


def _search_chunk(ws: Workspace, name: str, index, start: int, stop: int, k: int, refine: int) -> dict:
    """Search rows [start, stop) with ``index`` (faiss or :class:`TorchExactIndex`) and write their graph chunk."""
    emb, valid_arr, embed_marker = open_embeddings(ws, f"index-{name}")
    _check_width(index, emb.shape[1], name)
    if refine:
        emb = local_embeddings(ws, emb, embed_marker)
    valid = valid_arr[start:stop]
    rows = np.flatnonzero(valid).astype(np.int64) + start
    nbr = np.full((stop - start, k), -1, np.int64)
    dist = np.full((stop - start, k), np.inf, np.float32)
    if len(rows):
        x = emb[start:stop][valid].astype(np.float32, copy=False)
        nbr[valid], dist[valid] = search_rows(index, x, rows, k, refine, emb)
    group = zarr.open_group(storage.zarr_store(ws.path("graph", f"{name}.zarr"), ws.storage_options), mode="r+")
    group["neighbors"][start:stop] = nbr
    group["distances"][start:stop] = dist
    return {"n": stop - start, "n_valid": int(len(rows))}


def _recall(ws: Workspace, plan: _Plan) -> float | None:
    url = ws.path(f"index/{plan.name}.groundtruth.npz")
    if not storage.exists(url, ws.storage_options):
        return None
    gt = np.load(io.BytesIO(storage.read_bytes(url, ws.storage_options)))
    if not len(gt["rows"]):
        return None
    nbr, _ = read_graph(ws, plan.name, require=False)
    found = nbr.get_orthogonal_selection((gt["rows"],))
    return round(recall_at_k(found, gt["ids"]), 4)


def read_graph(ws: str | Workspace, name: str, require: bool = True,
               storage_options: dict | None = None) -> tuple[zarr.Array, zarr.Array]:
    """The (neighbors, distances) arrays of graph/<name>.zarr."""
    ws = _workspace(ws, storage_options)
    if name not in GRAPHS:
        raise StreamPruneError(f"graph must be one of {', '.join(GRAPHS)}; got {name!r}")
    if require and ws.marker(f"index-{name}") is None:
        raise StreamPruneError(f"graph '{name}' has not been built in {ws.url}; run `streamprune index` first")
    url = ws.path("graph", f"{name}.zarr")
    try:
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="r")
        return group["neighbors"], group["distances"]
    except (FileNotFoundError, KeyError):
        raise StreamPruneError(f"graph {url} is missing or incomplete; re-run `streamprune index --force`") from None
