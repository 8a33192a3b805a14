"""Neighbour sampling over the fixed-degree kNN table ``graph/<name>.zarr``, and row gathers from zarr.

pyg-lib / torch-sparse (which ``NeighborLoader`` needs) cannot be installed beside this torch, and
the kNN table has a fixed out-degree, so sampling is a few vectorised numpy operations on rows
of the table: no per-node Python loop anywhere.

Normalisation (see docs/gcn.md).  Row ``i`` aggregates over itself and its valid neighbours with
row-normalised ("mean") weights of ``A_hat = D^-1 (A + I)``::

    w_ij = exp(-(t_ij - min_j t_ij))      t = d ("exp") or t = sqrt(d) ("sqrt")
    a_ii = 1 / (1 + sum_j w_ij),  a_ij = w_ij / (1 + sum_j w_ij)

``D`` comes from row ``i``'s own table entries only, so the weights of a row are the same in a
training minibatch, in chunked layer-wise inference and in a whole-graph forward.  A sampled
minibatch that keeps ``f`` of a row's ``v`` valid neighbours scales their weights by ``v / f``
(Horvitz-Thompson: the expected aggregate equals the full one); with full fan-out it is exact.

A :class:`Subgraph` orders its nodes by hop (seeds first, then every node first reached at hop
1, 2, ...), so the nodes within ``h`` hops are a prefix and the adjacency of layer ``l`` of an
``L``-layer model is a row/column prefix of one CSR matrix: rows = nodes within ``L - l`` hops
(whose layer-``l`` outputs are needed), columns = nodes within ``L - l + 1`` hops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from streamprune.errors import StreamPruneError, whole
from streamprune.extrapolate.knn import knn_weights

WEIGHTS = ("exp", "sqrt")

# A table lookup: global row ids (n,) -> (neighbour ids (n, k), self weight (n,), neighbour weights (n, k)).
TableFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------- pure math
def edge_weights(rows: np.ndarray, neighbors: np.ndarray, distances: np.ndarray, nbr_valid: np.ndarray,
                 kind: str = "exp") -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised weights (self (n,), neighbours (n, k)) of ``D^-1 (A + I)``; 0 = no edge.

    An entry is an edge when its id is >= 0, is not the row itself, its distance is finite and
    the neighbour row is valid (``nbr_valid``).  Weights are ``exp(-(t - t_min))`` per row, so the
    nearest neighbour weighs 1 like the self-loop and nothing underflows at large distances.
    """
    if kind not in WEIGHTS:
        raise StreamPruneError(f"edge weight must be one of {', '.join(WEIGHTS)}, got {kind!r}")
    neighbors = np.asarray(neighbors)
    d = np.asarray(distances, np.float64)
    mask = (neighbors >= 0) & (neighbors != np.asarray(rows)[:, None]) & np.isfinite(d) & np.asarray(nbr_valid, bool)
    t = np.sqrt(np.maximum(d, 0.0)) if kind == "sqrt" else d
    w = knn_weights(np.where(mask, t, np.inf)).astype(np.float64)  # exp(-(t - t_min)), 0 off the mask
    denom = 1.0 + w.sum(axis=1)
    return (1.0 / denom).astype(np.float32), (w / denom[:, None]).astype(np.float32)


def choose_neighbours(nbr_w: np.ndarray, fanout: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Scaled weights of ``fanout`` neighbours drawn per row without replacement (0 = not drawn).

    Rows with ``v`` edges keep ``min(v, fanout)`` of them, chosen uniformly, with weights scaled by
    ``v / kept`` so that the expected aggregate equals the full one.
    """
    has = nbr_w > 0
    k = nbr_w.shape[1]
    if fanout is None or fanout >= k:
        return nbr_w
    if fanout <= 0:
        return np.zeros_like(nbr_w)
    if rng is None:
        raise ValueError("sampling fewer neighbours than the table holds needs a random generator")
    keys = rng.random(nbr_w.shape)
    keys[~has] = 2.0
    pick = np.argpartition(keys, fanout - 1, axis=1)[:, :fanout]
    take = np.zeros_like(has)
    np.put_along_axis(take, pick, True, axis=1)
    take &= has
    n_has = has.sum(axis=1)
    n_take = take.sum(axis=1)
    scale = np.where(n_take > 0, n_has / np.maximum(n_take, 1), 0.0)
    return np.where(take, nbr_w * scale[:, None], 0.0).astype(nbr_w.dtype)


DENSE_RELABEL_ROWS = 1 << 22
"""A subgraph of a graph of at most ``max(DENSE_RELABEL_ROWS, 64 x seeds)`` rows relabels through a
dense (rows,) table instead of sorted arrays: at 2M rows the 3-hop closure of 360k seeds (k = 10)
took 49.6 s with sorted arrays (searchsorted and np.unique over 20M ids) and 3.6 s with the table."""


class _Relabel:
    """Global row id -> local id, in order of first appearance (vectorised, no dict)."""

    def __init__(self, first: np.ndarray):
        first = np.asarray(first, np.int64)
        if len(np.unique(first)) != len(first):
            raise ValueError("seed rows of a subgraph must be unique")
        self.nodes = [first]
        self.n = len(first)
        order = np.argsort(first, kind="stable")
        self.sorted_ids = first[order]
        self.sorted_local = order.astype(np.int64)

    @staticmethod
    def make(first: np.ndarray, n_rows: int | None) -> "_Relabel | _DenseRelabel":
        """The dense relabel for bounded ids (see DENSE_RELABEL_ROWS), else the sorted one."""
        if n_rows is not None and n_rows <= max(DENSE_RELABEL_ROWS, 64 * len(first)):
            return _DenseRelabel(first, n_rows)
        return _Relabel(first)

    def add(self, ids: np.ndarray) -> int:
        """Append the ids not seen yet (in sorted order); returns how many were new."""
        u = np.unique(ids)
        pos = np.searchsorted(self.sorted_ids, u)
        seen = (pos < len(self.sorted_ids)) & (self.sorted_ids[np.minimum(pos, len(self.sorted_ids) - 1)] == u)
        new = u[~seen]
        if len(new):
            self.nodes.append(new)
            ids_all = np.concatenate([self.sorted_ids, new])
            local_all = np.concatenate([self.sorted_local, np.arange(self.n, self.n + len(new), dtype=np.int64)])
            order = np.argsort(ids_all, kind="stable")
            self.sorted_ids, self.sorted_local = ids_all[order], local_all[order]
            self.n += len(new)
        return len(new)

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Local ids of ids already added."""
        return self.sorted_local[np.searchsorted(self.sorted_ids, ids)]


class _DenseRelabel:
    """:class:`_Relabel` for ids in ``[0, n_rows)``: a (n_rows,) table of local ids (-1 = not seen).

    The same nodes in the same order; memory 4 bytes per graph row (8 beyond 2^31 nodes) plus a
    byte per row while adding.
    """

    def __init__(self, first: np.ndarray, n_rows: int):
        first = np.asarray(first, np.int64)
        self.table = np.full(n_rows, -1, np.int32 if n_rows < 2**31 else np.int64)
        self.table[first] = np.arange(len(first))
        if np.count_nonzero(self.table >= 0) != len(first):
            raise ValueError("seed rows of a subgraph must be unique")
        self.nodes = [first]
        self.n = len(first)

    def add(self, ids: np.ndarray) -> int:
        """Append the ids not seen yet (in sorted order); returns how many were new."""
        mark = np.zeros(len(self.table), bool)
        mark[ids] = True
        mark &= self.table < 0
        new = np.flatnonzero(mark)
        if len(new):
            self.nodes.append(new)
            self.table[new] = np.arange(self.n, self.n + len(new))
            self.n += len(new)
        return len(new)

    def local(self, ids: np.ndarray) -> np.ndarray:
        """Local ids of ids already added."""
        return self.table[ids].astype(np.int64, copy=False)


@dataclass
class Subgraph:
    """Nodes in hop order (global ids), hop prefix sizes and one CSR adjacency (local ids)."""

    nodes: np.ndarray  # (n,) int64 global row ids; nodes[:prefix[h]] are within h hops
    prefix: np.ndarray  # (L + 1,) int64
    crow: np.ndarray  # (prefix[L - 1] + 1,) int64
    col: np.ndarray  # (nnz,) int64 local source ids
    val: np.ndarray  # (nnz,) float32

    @property
    def n_layers(self) -> int:
        """Number of hops (= GCN layers) the subgraph was built for."""
        return len(self.prefix) - 1

    def shape(self, layer: int) -> tuple[int, int]:
        """(targets, sources) of the adjacency of ``layer`` (1-based)."""
        L = self.n_layers
        return int(self.prefix[L - layer]), int(self.prefix[L - layer + 1])

    def edges(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """CSR arrays (crow, col, val) and shape of the adjacency of ``layer``."""
        n_out, n_in = self.shape(layer)
        nnz = int(self.crow[n_out])
        return self.crow[:n_out + 1], self.col[:nnz], self.val[:nnz], (n_out, n_in)

    def adjacency(self, layer: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The adjacency of ``layer`` as a torch sparse CSR tensor (targets x sources)."""
        crow, col, val, shape = self.edges(layer)
        return csr_tensor(crow, col, val, shape, device)


def csr_tensor(crow: np.ndarray, col: np.ndarray, val: np.ndarray, shape: tuple[int, int],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """A torch sparse CSR tensor from numpy arrays."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(torch.from_numpy(np.ascontiguousarray(crow, np.int64)),
                                       torch.from_numpy(np.ascontiguousarray(col, np.int64)),
                                       torch.from_numpy(np.ascontiguousarray(val, np.float32)),
                                       size=shape, check_invariants=False).to(device)


_MISSING = np.iinfo(np.int64).max  # sorts after every local id


def _csr_rows(first: int, kept_ids: np.ndarray, keep: np.ndarray, self_w: np.ndarray, nbr_w: np.ndarray) -> tuple:
    """(entries per row, column ids, weights) of consecutive target rows ``first, first + 1, ...``:
    each row is itself, then its kept neighbours (``kept_ids``, local ids of ``keep``'s entries),
    sorted by id within the row.  Targets are numbered in order, so the rows are in CSR order: a
    sort of k + 1 entries per row instead of a global sort of all edges."""
    cols = np.full((len(keep), keep.shape[1] + 1), _MISSING, np.int64)
    cols[:, 0] = np.arange(first, first + len(keep), dtype=np.int64)
    cols[:, 1:][keep] = kept_ids
    vals = np.zeros(cols.shape, np.float32)
    vals[:, 0] = self_w
    vals[:, 1:][keep] = np.asarray(nbr_w, np.float32)[keep]
    order = np.argsort(cols, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    present = cols != _MISSING
    return present.sum(axis=1), cols[present], vals[present]


def sample_subgraph(seeds: np.ndarray, table: TableFn, fanouts: Sequence[int | None],
                    rng: np.random.Generator | None = None) -> Subgraph:
    """The ``len(fanouts)``-hop sampled neighbourhood of ``seeds`` (unique global row ids).

    ``table(rows)`` returns the neighbour ids and normalised weights of those rows
    (:func:`edge_weights`); ``fanouts[h]`` neighbours are drawn per node at hop ``h`` (None = all).
    """
    relabel = _Relabel.make(seeds, getattr(table, "n", None))
    prefix = [relabel.n]
    counts_l, cols_l, vals_l = [], [], []
    start = 0
    for fanout in fanouts:
        frontier = np.concatenate(relabel.nodes)[start:] if len(relabel.nodes) > 1 else relabel.nodes[0][start:]
        nbrs, self_w, nbr_w = table(frontier)
        w = choose_neighbours(np.asarray(nbr_w, np.float32), fanout, rng)
        keep = w > 0
        relabel.add(nbrs[keep])
        counts, cols, vals = _csr_rows(start, relabel.local(nbrs[keep]), keep, self_w, w)
        counts_l.append(counts)
        cols_l.append(cols)
        vals_l.append(vals)
        start += len(frontier)
        prefix.append(relabel.n)
    nodes = np.concatenate(relabel.nodes)
    counts = np.concatenate(counts_l) if counts_l else np.zeros(0, np.int64)
    crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cols = np.concatenate(cols_l) if cols_l else np.zeros(0, np.int64)
    vals = np.concatenate(vals_l) if vals_l else np.zeros(0, np.float32)
    return Subgraph(nodes, np.asarray(prefix, np.int64), crow, cols, vals.astype(np.float32, copy=False))


def whole_graph(table: "GraphTable", n_layers: int, block: int = 1 << 16) -> Subgraph:
    """``sample_subgraph(arange(n), table, (None,) * n_layers)``, built block by block of rows.

    With every row a seed, local ids are the row ids and no hop adds a node, so the subgraph is
    one CSR of the graph's own rows: built from contiguous row spans (no gather, no relabelling),
    with temporary memory of one block instead of several (n, k + 1) arrays.  The same arrays
    (tested).
    """
    n = table.n
    counts = np.zeros(n, np.int64)
    cols_l, vals_l = [], []
    for r0 in range(0, n, block):
        nbrs, self_w, nbr_w = table.span(r0, min(n, r0 + block))
        keep = np.asarray(nbr_w, np.float32) > 0
        counts[r0:r0 + len(nbrs)], cols, vals = _csr_rows(r0, nbrs[keep], keep, self_w, nbr_w)
        cols_l.append(cols)
        vals_l.append(vals)
    crow = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Subgraph(np.arange(n, dtype=np.int64), np.full(n_layers + 1, n, np.int64), crow,
                    np.concatenate(cols_l) if cols_l else np.zeros(0, np.int64),
                    np.concatenate(vals_l) if vals_l else np.zeros(0, np.float32))


def parse_fanout(fanout: int | Sequence[int | None] | None, n_layers: int, k: int) -> tuple[int, ...]:
    """Per-hop fan-out (hop 0 = the seeds' neighbours); None or values >= k mean all k."""
    if fanout is None:
        return (k,) * n_layers
    fanout = (fanout,) * n_layers if np.ndim(fanout) == 0 else tuple(fanout)
    if len(fanout) != n_layers:
        raise StreamPruneError(f"fanout needs one value per layer ({n_layers}), got {len(fanout)}")
    for f in fanout:
        if f is not None and not whole(1)(f):
            raise StreamPruneError(f"fanout values must be whole numbers >= 1, not {f!r}")
    return tuple(k if f is None or f > k else int(f) for f in fanout)


# ------------------------------------------------------------------------------------- zarr I/O
GATHER_BYTES = 64 << 20  # zarr chunk bytes one gather step may have in flight


def gather_rows(arr, rows: np.ndarray, out: np.ndarray | None = None, max_bytes: int = GATHER_BYTES) -> np.ndarray:
    """``arr[rows]`` for a zarr (or numpy) array, reading each touched zarr chunk once.

    Sorted unique ``rows`` are read in groups of whole zarr chunks of at most ``max_bytes``
    (each group one orthogonal selection: zarr fetches its chunks concurrently), written into
    ``out`` when given.  Memory: the result plus one group, whatever the array's size.  Unsorted
    or repeated ``rows`` are gathered as sorted unique rows, then scattered back.
    """
    rows = np.asarray(rows, np.int64)
    shape = (len(rows),) + tuple(arr.shape[1:])
    if out is None:
        out = np.empty(shape, arr.dtype)
    if isinstance(arr, np.ndarray):
        np.take(arr, rows, axis=0, out=out)
        return out
    if len(rows) == 0:
        return out
    if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
        uniq, inv = np.unique(rows, return_inverse=True)
        out[...] = gather_rows(arr, uniq, max_bytes=max_bytes)[inv.reshape(-1)]
        return out
    chunk = int(arr.chunks[0])
    chunk_bytes = chunk * int(np.prod(arr.chunks[1:], dtype=np.int64)) * arr.dtype.itemsize
    per_group = max(1, max_bytes // max(chunk_bytes, 1))
    group = (rows // chunk) // per_group
    cuts = np.flatnonzero(np.diff(group)) + 1
    tail = (slice(None),) * (len(arr.shape) - 1)
    for i0, i1 in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
        out[i0:i1] = arr.get_orthogonal_selection((rows[i0:i1],) + tail)
    return out


class RowSource:
    """Rows of a zarr array, held in memory when it fits ``memory_limit`` bytes, else gathered (a
    numpy array is in memory already; an ``np.memmap``, a local copy on disk, is gathered from)."""

    def __init__(self, arr, memory_limit: int = 0, dtype=None):
        self.arr = arr
        self.dtype = np.dtype(dtype or arr.dtype)
        nbytes = int(np.prod(arr.shape)) * self.dtype.itemsize
        self.in_memory = (isinstance(arr, np.ndarray) and not isinstance(arr, np.memmap)) or nbytes <= memory_limit
        self.data = np.asarray(arr[...] if not isinstance(arr, np.ndarray) else arr, self.dtype) if self.in_memory else None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the whole array."""
        return tuple(self.arr.shape)

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), into ``out`` when given."""
        if self.data is not None:
            return gather_rows(self.data, rows, out)
        if out is not None and np.dtype(self.arr.dtype) == self.dtype:
            return gather_rows(self.arr, rows, out)
        got = gather_rows(self.arr, rows).astype(self.dtype, copy=False)
        if out is None:
            return got
        out[...] = got
        return out

    def span(self, r0: int, r1: int) -> np.ndarray:
        """Contiguous rows ``[r0, r1)``."""
        if self.data is not None:
            return self.data[r0:r1]
        return np.asarray(self.arr[r0:r1], self.dtype)


class GraphTable:
    """The first ``k`` columns of ``graph/<name>.zarr`` turned into normalised edge weights.

    ``valid`` (N,) bool is held in memory (one byte per row); neighbour ids and distances are
    held when ``N * k * 12`` bytes fit ``memory_limit``, else gathered from zarr per call.
    """

    def __init__(self, group, k: int, valid: RowSource, kind: str = "exp", memory_limit: int = 0):
        kmax = group["neighbors"].shape[1]
        if not 0 < k <= kmax:
            raise StreamPruneError(f"k={k} but the graph holds {kmax} neighbours per row")
        self.k, self.kind, self.valid = k, kind, valid
        n = group["neighbors"].shape[0]
        fits = n * k * 12 <= memory_limit
        if fits:
            self.neighbors = RowSource(np.asarray(group["neighbors"][:, :k], np.int64))
            self.distances = RowSource(np.asarray(group["distances"][:, :k], np.float32))
        else:
            self.neighbors = RowSource(group["neighbors"], 0, np.int64)
            self.distances = RowSource(group["distances"], 0, np.float32)

    @property
    def n(self) -> int:
        """Rows of the graph."""
        return self.neighbors.shape[0]

    def _weights(self, rows: np.ndarray, nbrs: np.ndarray, dist: np.ndarray) -> tuple:
        nbrs, dist = nbrs[:, :self.k], dist[:, :self.k]
        bad = (nbrs >= self.n) | (nbrs < -1)
        if bad.any():
            raise StreamPruneError(f"graph row {int(rows[np.flatnonzero(bad.any(axis=1))[0]])} holds a neighbour id "
                                   f"outside [0, {self.n})")
        nv = np.zeros(nbrs.shape, bool)
        has = nbrs >= 0
        nv[has] = self.valid.take(nbrs[has])
        self_w, nbr_w = edge_weights(rows, nbrs, dist, nv, self.kind)
        return nbrs, self_w, nbr_w

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neighbour ids, self weights and neighbour weights of ``rows`` (any order)."""
        rows = np.asarray(rows, np.int64)
        return self._weights(rows, self.neighbors.take(rows), self.distances.take(rows))

    def span(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same for the contiguous rows ``[r0, r1)`` (one slice read)."""
        rows = np.arange(r0, r1, dtype=np.int64)
        return self._weights(rows, self.neighbors.span(r0, r1), self.distances.span(r0, r1))


def standardise_prior(values: np.ndarray, valid: np.ndarray | bool, scale: tuple[float, float]) -> np.ndarray:
    """``(values - mean) / std`` as float32, 0 where NaN or not ``valid``."""
    mean, std = scale
    z = (np.asarray(values, np.float64) - mean) / std
    return np.where(np.isfinite(z) & np.asarray(valid, bool), z, 0.0).astype(np.float32)


class Features:
    """Node features one-hot(label) ⊕ embedding [⊕ standardised prior], built on the fly for any rows.

    Unknown labels (-1) give a zero one-hot; invalid rows give all-zero features (they have no
    in-edges, so they never reach a valid row's output).  With a ``prior`` (the kNN-extrapolated
    score of every row, see :mod:`streamprune.extrapolate.gcn`) one more column holds
    ``(prior - mean) / std`` (0 where the prior is NaN), see :func:`standardise_prior`.
    """

    def __init__(self, emb: RowSource, labels: RowSource, valid: RowSource, num_classes: int,
                 prior: RowSource | None = None, prior_scale: tuple[float, float] = (0.0, 1.0)):
        self.emb, self.labels, self.valid, self.num_classes = emb, labels, valid, num_classes
        self.prior, self.prior_scale = prior, prior_scale

    @property
    def dim(self) -> int:
        """Feature width: classes + embedding dimension (+ 1 with a prior)."""
        return self.num_classes + self.emb.shape[1] + (self.prior is not None)

    def _build(self, emb: np.ndarray, labels: np.ndarray, valid: np.ndarray, prior: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((len(emb), self.dim), np.float32)
        c, d = self.num_classes, self.emb.shape[1]
        out[:, :c] = 0.0
        out[:, c:c + d] = emb
        if self.prior is not None:
            out[:, c + d] = standardise_prior(prior, valid, self.prior_scale)
        lab = np.asarray(labels, np.int64)
        hot = (lab >= 0) & (lab < self.num_classes)
        out[np.flatnonzero(hot), lab[hot]] = 1.0
        out[~np.asarray(valid, bool)] = 0.0
        return out

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Features of ``rows`` (any order), into ``out`` when given."""
        prior = self.prior.take(rows) if self.prior is not None else None
        return self._build(self.emb.take(rows), self.labels.take(rows), self.valid.take(rows), prior, out)

    def span(self, r0: int, r1: int) -> np.ndarray:
        """Features of rows ``[r0, r1)``."""
        prior = self.prior.span(r0, r1) if self.prior is not None else None
        return self._build(self.emb.span(r0, r1), self.labels.span(r0, r1), self.valid.span(r0, r1), prior)
