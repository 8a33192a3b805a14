"""GCN score extrapolation: trained on seed rows with sampled neighbourhoods, inferred layer-wise.

Model: ``L`` x ``torch_geometric.nn.GCNConv`` (widths ``hidden + (1,)``), ReLU and dropout between
layers, over node features one-hot(label) ⊕ embedding (⊕ the kNN-extrapolated score, whose
correction the GCN then learns: ``prior="knn"``, the default) and the kNN graph ``graph/all.zarr``.

* Aggregation is one sparse CSR x dense product per layer: GCNConv gets a ``torch.sparse_csr``
  adjacency, so its ``message_and_aggregate`` calls ``torch.sparse.mm`` and no E x width message
  tensor is ever built.  The convs run with ``normalize=False`` over the precomputed row-local
  weights of :mod:`streamprune.extrapolate.sampler` (``D^-1 (A + I)``), which are identical in
  training minibatches, chunked inference and a whole-graph forward.
* Training: seed rows (valid, finite score) split 90/10 (seeded); batches of seed nodes with
  their sampled ``L``-hop neighbourhood; MSE on standardised scores; Adam; the checkpoint with the
  best validation Pearson (full fan-out, eval mode) is kept in ``gcn/<score>/model.pt``.
* Inference: layer by layer over all rows, chunk by chunk.  Layer ``l`` of a chunk reads layer
  ``l - 1`` of the chunk's rows and their neighbours (from memory when the whole layer fits
  ``memory_limit``, else by sorted chunk-coalesced gathers from ``gcn/<score>/h{l-1}.zarr``) and
  writes its own rows, so memory is O(chunk x (k + 1) x width) whatever N.  Each (layer, chunk)
  is a map_tasks task with its own chunk record; a layer starts when the previous one is complete.
  The last layer de-standardises and writes ``extrapolated/<score>-gcn.zarr``.

See docs/gcn.md for the normalisation, the sampler, the memory bound and locality.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import zarr
from torch import nn

from streamprune import storage
from streamprune.compute import LOCAL_SCHEDULERS, client_for, map_tasks
from streamprune.errors import Rule, StreamPruneError, check_optional_whole, check_seed, whole
from streamprune.evaluate import pearson
from streamprune.extrapolate.common import (as_workspace, marker_key, output_path, register_method, score_fingerprint,
                                            seed_scores, write_chunks)
from streamprune.extrapolate.sampler import (WEIGHTS, Features, GraphTable, RowSource, Subgraph, parse_fanout,
                                             sample_subgraph, standardise_prior)
from streamprune.extrapolate.sampler import whole_graph as build_whole_graph
from streamprune.heap import bound_heap, trim_heap
from streamprune.index import tf32_matmul
from streamprune.leases import releases_leases
from streamprune.workspace import StageRun, Workspace

log = logging.getLogger(__name__)

IN_PROCESS = ("sync", "threads")
PRIORS = ("knn", "none")
TRAINING = ("auto", "sampled", "resident")
INFERENCE = ("auto", "chunked", "whole")
DEVICE_FRACTION = 0.5  # of free GPU memory that resident training or a whole-graph forward may take
_CHUNK_BUDGET = 256 << 20  # working-set target of one inference chunk (bytes) for the default chunk_rows


# --------------------------------------------------------------------------------------- model
def remove_generated_source(conv_class: type) -> None:
    """Remove the file torch_geometric wrote ``conv_class``'s ``propagate()`` into, once it is loaded.

    torch_geometric renders a message-passing class's ``propagate()`` from a template into a
    ``.py`` file in the temporary directory, imports it, and never removes it: one file per class
    in every process that builds a layer (each dask worker, each run), piling up in ``/tmp``.
    Nothing reads it again here (the model is not scripted); a traceback through it shows no
    source lines.
    """
    module = sys.modules.get(f"{conv_class.__module__}_{conv_class.__name__}_propagate")
    path = getattr(module, "__file__", None)
    if (path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir())
            and os.path.basename(path).startswith(f"{module.__name__}_")):
        try:
            os.remove(path)
        except OSError:  # removed already (another layer of this process) or not ours
            pass


def make_conv(in_dim: int, out_dim: int) -> nn.Module:
    """A GCNConv over precomputed normalised adjacencies, its rendered ``propagate()`` file removed."""
    from torch_geometric.nn import GCNConv

    conv = GCNConv(int(in_dim), int(out_dim), normalize=False, add_self_loops=False)
    remove_generated_source(GCNConv)
    return conv


class GCN(nn.Module):
    """``len(widths)`` GCNConv layers over precomputed CSR adjacencies; ReLU + dropout between."""

    def __init__(self, in_dim: int, widths: Sequence[int] = (512, 256, 1), dropout: float = 0.5,
                 residual: bool = False):
        super().__init__()
        dims = [int(in_dim), *map(int, widths)]
        self.convs = nn.ModuleList(make_conv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = float(dropout)
        self.residual = bool(residual)  # output += the last input column (the standardised kNN prior)

    @property
    def n_layers(self) -> int:
        """Number of graph convolutions."""
        return len(self.convs)

    def layer(self, i: int, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` (0-based) on source rows ``x`` and a (targets x sources) CSR adjacency."""
        return apply_conv(self.convs[i], x, adj, relu=i < self.n_layers - 1)

    def forward(self, x: torch.Tensor, adjs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Outputs of the first ``adjs[-1].shape[0]`` nodes; ``adjs[i]`` is layer i's adjacency."""
        base = x[:adjs[-1].shape[0], -1:] if self.residual else None
        return self._layers(x, adjs, 0, base)

    def forward_aggregated(self, ax: torch.Tensor, adjs: Sequence[torch.Tensor],
                           base: torch.Tensor | None) -> torch.Tensor:
        """``forward(x, adjs)`` from ``ax = adjs[0] @ x`` and ``base`` (the residual's prior column).

        The first layer's input has no parameters before it, so its aggregation can be computed
        once and reused by every step over the same graph (resident training): the step then runs
        the first layer as a dense ``(A X) W`` with no sparse product in its forward or backward.
        """
        h = after_aggregation(self.convs[0], ax, relu=self.n_layers > 1)
        if self.n_layers > 1 and self.dropout > 0:
            h = nn.functional.dropout(h, self.dropout, self.training)
        return self._layers(h, adjs[1:], 1, base)

    def _layers(self, x: torch.Tensor, adjs: Sequence[torch.Tensor], first: int,
                base: torch.Tensor | None) -> torch.Tensor:
        for i, adj in enumerate(adjs, first):
            x = self.layer(i, x[:adj.shape[1]], adj)
            if i < self.n_layers - 1 and self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, self.training)
        return x + base if base is not None else x


def apply_conv(conv: nn.Module, x: torch.Tensor, adj: torch.Tensor, relu: bool) -> torch.Tensor:
    """One GCNConv over a (targets x sources) CSR adjacency and source rows ``x``, then ReLU if asked.

    GCNConv computes ``A (X W)``: the dense matmul runs over every source row.  When that costs
    more than ``(A X) W`` (more sources than targets, as in every chunk and sampled minibatch),
    the same map is taken in that order with the conv's own weights and bias.
    """
    n_out, n_in = adj.shape
    nnz = adj.values().numel() if adj.layout == torch.sparse_csr else n_in
    a, b = conv.in_channels, conv.out_channels
    if n_out * a * b + nnz * a < n_in * a * b + nnz * b:
        return after_aggregation(conv, torch.sparse.mm(adj, x), relu)
    h = conv(x, adj)
    return torch.relu(h) if relu else h


def after_aggregation(conv: nn.Module, ax: torch.Tensor, relu: bool) -> torch.Tensor:
    """A GCNConv's map from its aggregated input ``A X``: ``(A X) W + b``, then ReLU if asked."""
    h = conv.lin(ax)
    if conv.bias is not None:
        h = h + conv.bias
    return torch.relu(h) if relu else h


def split_seeds(n: int, seed: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a seeded ``1 - val_fraction`` / ``val_fraction`` split of ``n`` items."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction))) if n >= 2 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def subgraph_forward(model: GCN, sub: Subgraph, features: Features, device: torch.device) -> torch.Tensor:
    """Model outputs (n_seeds,) of a sampled subgraph, features gathered for its nodes."""
    x = torch.from_numpy(features.take(sub.nodes)).to(device)
    adjs = [sub.adjacency(i + 1, device) for i in range(model.n_layers)]
    return model(x, adjs)[:, 0]


def device_features(features: Features, rows: np.ndarray, device: torch.device | str,
                    block: int = 1 << 16) -> torch.Tensor:
    """Features of ``rows`` as one device tensor, gathered ``block`` rows at a time (host memory O(block)).

    Each block's embeddings are read (as one zarr slice when the rows are a run, see
    :func:`take_dense`) and copied straight into their columns of the device tensor; the one-hot
    labels, the prior column and the zeroed invalid rows are set there from per-row arrays
    (:func:`put_features`), so no block of the full feature width is built on the host.  Rows out
    of order (a closure lists its seeds first, then each hop's new rows) are read in sorted order
    and scattered to their places on the device."""
    device = torch.device(device)
    x = torch.empty((len(rows), features.dim), dtype=torch.float32, device=device)
    rows = np.asarray(rows, np.int64)
    order = None if len(rows) < 2 or (np.diff(rows) > 0).all() else np.argsort(rows, kind="stable")
    for s in range(0, len(rows), block):
        if order is None:
            put_features(x[s:s + block], features, *dense_parts(features, rows[s:s + block]))
        else:
            at = order[s:s + block]
            part = torch.empty((len(at), features.dim), dtype=torch.float32, device=device)
            put_features(part, features, *dense_parts(features, rows[at]))
            x[torch.from_numpy(at).to(device)] = part
    return x


def put_features(x: torch.Tensor, features: Features, emb: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                 prior: np.ndarray | None) -> None:
    """Fill ``x`` (rows x ``features.dim``, on any device) as :meth:`Features.take` builds them on
    the host: one-hot(label) ⊕ embedding [⊕ standardised prior], invalid rows all zero."""
    c, d = features.num_classes, features.emb.shape[1]
    dev = x.device
    x[:, :c] = 0.0
    x[:, c:c + d].copy_(torch.from_numpy(np.ascontiguousarray(emb, np.float32)))
    if features.prior is not None:
        x[:, c + d].copy_(torch.from_numpy(standardise_prior(prior, valid, features.prior_scale)))
    lab = np.asarray(labels, np.int64)
    hot = np.flatnonzero((lab >= 0) & (lab < c))
    if len(hot):
        x[torch.from_numpy(hot).to(dev), torch.from_numpy(lab[hot]).to(dev)] = 1.0
    bad = np.flatnonzero(~np.asarray(valid, bool))
    if len(bad):
        x[torch.from_numpy(bad).to(dev)] = 0.0


def dense_parts(features: Features, rows: np.ndarray) -> tuple:
    """(embeddings, labels, valid, prior) of ``rows``: read as one contiguous span when ``rows`` are
    increasing and fill at least half of it (a zarr slice reads faster than the orthogonal
    selection behind ``take``), else gathered."""
    sources = (features.emb, features.labels, features.valid, features.prior)
    if len(rows) > 1 and (np.diff(rows) > 0).all():
        a, b = int(rows[0]), int(rows[-1]) + 1
        if b - a <= 2 * len(rows):
            pick = None if b - a == len(rows) else rows - a
            return tuple(None if src is None else src.span(a, b) if pick is None else src.span(a, b)[pick]
                         for src in sources)
    return tuple(None if src is None else src.take(rows) for src in sources)


def take_dense(features: Features, rows: np.ndarray) -> np.ndarray:
    """``features.take(rows)``, read as one contiguous span when ``rows`` are increasing and fill at
    least half of it (:func:`dense_parts`): device_features to the CPU for 262,144 x 512 float32
    rows took 0.72-0.79 s against 1.80-2.16 s with the gather on the CPU box (all rows, and 80 %
    of them: 0.85 against 1.48-1.61 s), and the whole graph's rows (GPU inference) or a closure
    covering most of it (resident training) are such runs."""
    return features._build(*dense_parts(features, rows))


def first_aggregation(x: torch.Tensor, adjs: Sequence[torch.Tensor], residual: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(adjs[0] @ x, the residual's prior column of the output rows)``: the inputs of
    :meth:`GCN.forward_aggregated`, computed once per graph."""
    with torch.no_grad():
        ax = torch.sparse.mm(adjs[0], x[:adjs[0].shape[1]])
        base = x[:adjs[-1].shape[0], -1:].clone() if residual else None
    return ax, base


def predict_in_memory(model: GCN, features: Features, table: GraphTable, device: torch.device | str = "cpu",
                      timings: dict | None = None) -> np.ndarray:
    """Standardised predictions of every row from one whole-graph forward (small graphs; the GPU path).

    Runs on ``device`` whatever device ``model`` is on (a copy is moved there; ``model`` stays put).
    ``timings``, if given, gets the seconds of the graph build (``graph_s``: host CSR and its copy
    to the device), of the features' read and copy (``features_s``) and of the forward (``forward_s``).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    sub = build_whole_graph(table, model.n_layers)
    if any(p.device != device for p in model.parameters()):
        model = copy.deepcopy(model).to(device)
    model.eval()
    from streamprune.train import sync_device

    with torch.no_grad(), tf32_matmul():
        adjs = [sub.adjacency(1, device)] * model.n_layers  # every layer's is the same n x n matrix
        sync_device(device)
        t1 = time.perf_counter()
        x = device_features(features, sub.nodes, device)
        del sub
        sync_device(device)
        t2 = time.perf_counter()
        # The same computation as whole-graph training's forward (the first aggregation, then
        # forward_aggregated), so a resumed run writes what an unbroken one would have.
        ax, base = first_aggregation(x, adjs, model.residual)
        del x
        out = model.forward_aggregated(ax, adjs, base)[:, 0]
        sync_device(device)
        t3 = time.perf_counter()
        out = out.cpu().numpy()
    if timings is not None:
        timings.update(graph_s=round(t1 - t0, 3), features_s=round(t2 - t1, 3), forward_s=round(t3 - t2, 4))
    return out  # sub.nodes is arange(n): outputs are in row order


@dataclass
class TrainResult:
    """A trained model, its standardisation and per-epoch history."""

    model: GCN
    mean: float
    std: float
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_pearson: float = float("nan")
    n_train: int = 0
    n_val: int = 0
    training: str = "sampled"
    step_batch: int = 0  # seeds per optimizer step (batch_size, or more in resident training: RESIDENT_STEPS)
    step_lr: float = 0.0
    timings: dict = field(default_factory=dict)  # resident training: graph_s, features_s (and forward_s)
    pred: np.ndarray | None = None  # whole-graph training: every row's standardised prediction


def _predict_seeds(model: GCN, rows: np.ndarray, features: Features, table: GraphTable, batch_size: int,
                   device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for b in range(0, len(rows), batch_size):
            sub = sample_subgraph(rows[b:b + batch_size], table, (None,) * model.n_layers)
            out.append(subgraph_forward(model, sub, features, device).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def resident_bytes(n_nodes: int, nnz: int, in_dim: int, widths: Sequence[int]) -> int:
    """Device bytes of resident training: features, activations with gradients and dropout masks, CSR."""
    return int(4 * n_nodes * (in_dim + 3 * sum(widths)) + 12 * nnz * len(widths))


RESIDENT_STEPS = 32
"""Most optimizer steps per epoch in resident training.

Each resident step is a forward and backward over the seeds' whole closure, whatever the batch, so
from ``RESIDENT_STEPS * batch_size`` training seeds on the batch grows to ``n_train / RESIDENT_STEPS``
(learning rate scaled by the square root of the growth) instead of the step count growing with the
seeds: at 1M rows (180k training seeds, a closure of ~all rows) batches of 128 would be 35k steps
of ~50 ms each.  Below that size resident training takes exactly the sampled steps.
"""

PATIENCE = 10  # GCN training stops after this many epochs without a validation gain of MIN_GAIN
MIN_GAIN = 1e-3


OPTIONS = {"k": Rule(whole(1), "a whole number >= 1"), "epochs": Rule(whole(1), "a whole number >= 1"),
           "patience": Rule(whole(0), "a whole number of epochs >= 0 (0: no early stop)"),
           "prior": Rule(lambda v: v in PRIORS, f"one of {', '.join(PRIORS)}")}
"""Rules of the options that ``run`` passes from its configuration (``gcn_k``, ``gcn_epochs``, ...)."""


def check_patience(patience) -> None:
    """``patience`` is a whole number of epochs >= 0 (0: no early stop), else one clear error."""
    OPTIONS["patience"].check(patience, "--patience")


def choose_training(mode: str, full_fanout: bool, device: torch.device, need: Callable[[], int]) -> str:
    """``"resident"`` or ``"sampled"`` for ``mode`` (auto: resident on CUDA when it fits, full fan-out only).

    ``need()`` gives the device bytes of resident training (:func:`resident_bytes`); it is called
    only when ``auto`` has to decide by size, against half the free device memory (the closure's
    features are gathered to the device in blocks, so host memory is not the bound).

    Resident training keeps the features and adjacency of the seeds' whole ``L``-hop closure on
    the device and runs one forward over it per step, with the loss on the step's batch of seeds:
    the same minibatch SGD as sampled training with full fan-out, without re-sampling on the CPU
    at every step.  On a GPU that forward costs milliseconds while the sampler costs ~0.1 s per
    batch; on a CPU the forward is the cost and a batch's own neighbourhood is cheaper.
    """
    if mode not in TRAINING:
        raise StreamPruneError(f"GCN training must be one of {', '.join(TRAINING)}, got {mode!r}")
    if mode == "resident":
        if not full_fanout:
            raise StreamPruneError("resident GCN training uses every neighbour: drop --fanout or use sampled training")
        return "resident"
    if mode == "sampled" or device.type != "cuda" or not full_fanout:
        return "sampled"
    from streamprune.train import fits_gpu

    return "resident" if fits_gpu(need(), device, DEVICE_FRACTION) else "sampled"


def fit_gcn(features: Features, table: GraphTable, seed_rows: np.ndarray, seed_scores: np.ndarray, *,
            widths: Sequence[int] = (512, 256, 1), dropout: float = 0.5, epochs: int = 25, batch_size: int = 128,
            lr: float = 1e-3, fanout: Sequence[int | None] | None = None, seed: int = 0,
            device: torch.device | str = "cpu", training: str = "sampled",
            resident_steps: int | None = RESIDENT_STEPS, patience: int = PATIENCE,
            whole_graph: bool = False) -> TrainResult:
    """Train a GCN on seed rows (unique, valid, finite scores); keep the best validation-Pearson weights.

    Training stops early after ``patience`` epochs in a row without a validation Pearson at least
    :data:`MIN_GAIN` above its value at the last such gain (0: all ``epochs``); see docs/gcn.md.

    ``training``: "sampled" (each batch samples its neighbourhood), "resident" (the seeds'
    closure stays on the device, see :func:`choose_training`) or "auto".  Resident training takes
    at most ``resident_steps`` steps per epoch (:data:`RESIDENT_STEPS`; None: no bound).

    ``whole_graph`` (when the caller will predict every row with one whole-graph forward on this
    device): resident training runs over the whole graph instead of the seeds' closure, and the
    result carries every row's standardised prediction (``pred``) from the kept weights, so the
    graph and the features are built and read once for both.  A seed row's output depends only on
    its ``L``-hop closure, so the steps are those of closure training (up to summation order and
    dropout masks drawn over more rows).
    """
    from streamprune.train import sync_device

    check_patience(patience)
    device = torch.device(device)
    seed_rows = np.asarray(seed_rows, np.int64)
    y_all = np.asarray(seed_scores, np.float64)
    tr, va = split_seeds(len(seed_rows), seed)
    mean = float(y_all[tr].mean())
    std = float(y_all[tr].std()) or 1.0
    y = torch.from_numpy(((y_all - mean) / std).astype(np.float32))
    if features.prior is not None:  # the prior column lives on the target's standardised scale
        features.prior_scale = (mean, std)
    torch.manual_seed(seed)
    model = GCN(features.dim, widths, dropout, residual=features.prior is not None).to(device)
    fanouts = tuple(fanout) if fanout is not None else (None,) * model.n_layers
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed + 1)
    res = TrainResult(model, mean, std, n_train=len(tr), n_val=len(va))
    resident = None
    closure: list[Subgraph] = []  # the seeds' full-fan-out closure (or the whole graph), built at most once

    def _closure() -> Subgraph:
        if not closure:
            t0 = time.perf_counter()
            closure.append(build_whole_graph(table, model.n_layers) if whole_graph
                           else sample_subgraph(seed_rows, table, (None,) * model.n_layers))
            res.timings["graph_s"] = round(time.perf_counter() - t0, 3)
        return closure[0]

    def _need() -> int:
        if whole_graph:  # every row, k + 1 entries per row: no need to build it to know its size
            return resident_bytes(table.n, table.n * (table.k + 1), features.dim, widths)
        return resident_bytes(len(_closure().nodes), len(_closure().col), features.dim, widths)

    res.training = choose_training(training, all(f is None or f >= table.k for f in fanouts), device, _need)
    step_batch, step_lr = batch_size, lr
    at = None  # where each seed's output is among the resident outputs (None: the seeds come first, in order)
    if res.training == "resident":
        sub = _closure()
        t0 = time.perf_counter()
        x_all = device_features(features, sub.nodes, device)
        sync_device(device)
        res.timings["features_s"] = round(time.perf_counter() - t0, 3)
        if whole_graph:  # every layer's adjacency is the same n x n matrix: one copy on the device
            adjs_all = [sub.adjacency(1, device)] * model.n_layers
            at = torch.from_numpy(seed_rows).to(device)  # nodes are the rows in order
        else:
            adjs_all = [sub.adjacency(i + 1, device) for i in range(model.n_layers)]
        t0 = time.perf_counter()
        ax_all, base_all = first_aggregation(x_all, adjs_all, model.residual)  # once (GCN.forward_aggregated)
        sync_device(device)
        res.timings["aggregate_s"] = round(time.perf_counter() - t0, 4)
        del x_all, sub
        # outputs of every seed row, in order (of every row when at is set)
        resident = lambda: model.forward_aggregated(ax_all, adjs_all, base_all)[:, 0]  # noqa: E731
        if resident_steps and len(tr) > resident_steps * batch_size:
            step_batch = math.ceil(len(tr) / resident_steps)
            step_lr = lr * math.sqrt(step_batch / batch_size)
            for group in opt.param_groups:
                group["lr"] = step_lr
            log.info("gcn: resident training, %d seeds per step (lr %.2g) for %d steps per epoch",
                     step_batch, step_lr, resident_steps)
    res.step_batch, res.step_lr = step_batch, step_lr
    y_dev = y.to(device) if resident is not None else None
    closure.clear()

    def _seeds(out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The outputs of the seeds at ``positions`` (indices into seed_rows) among resident outputs."""
        return out[positions if at is None else at[positions]]

    def _val() -> float:
        if resident is not None:
            model.eval()
            with torch.no_grad():
                return pearson(_seeds(resident(), torch.from_numpy(va).to(device)).cpu().numpy(), y_all[va])
        return pearson(_predict_seeds(model, seed_rows[va], features, table, batch_size, device), y_all[va])

    with tf32_matmul():  # TF32 GEMMs on CUDA
        best, best_state = _val(), copy.deepcopy(model.state_dict())
        best = best if np.isfinite(best) else -np.inf
        res.history.append({"epoch": 0, "train_loss": None, "val_pearson": _finite(best)})
        gained, since_gain = best, 0  # the Pearson of the last gain of MIN_GAIN, and epochs since
        for epoch in range(1, epochs + 1):
            t0 = time.time()
            since_gain += 1
            model.train()
            order = tr[rng.permutation(len(tr))]
            # Resident steps index device tensors with positions copied once per epoch: a host-to-
            # device copy per step would wait for the GPU to drain before the step could be queued.
            order_t = torch.from_numpy(order).to(device) if resident is not None else None
            total, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
            for b in range(0, len(order), step_batch):
                idx = order[b:b + step_batch]
                if resident is not None:
                    idx_t = order_t[b:b + step_batch]
                    pred, target = _seeds(resident(), idx_t), y_dev[idx_t]
                else:
                    sub = sample_subgraph(seed_rows[idx], table, fanouts, rng)
                    pred, target = subgraph_forward(model, sub, features, device), y[idx].to(device)
                loss = nn.functional.mse_loss(pred, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
                count += len(idx)
            total = float(total)
            val = _val()
            res.history.append({"epoch": epoch, "train_loss": round(total / max(count, 1), 6),
                                "val_pearson": _finite(val), "seconds": round(time.time() - t0, 3)})
            log.info("gcn epoch %d: train loss %.4f, val pearson %.4f", epoch, total / max(count, 1), val)
            if np.isfinite(val) and val > best:
                best, best_state, res.best_epoch = val, copy.deepcopy(model.state_dict()), epoch
            if np.isfinite(val) and val >= gained + MIN_GAIN:
                gained, since_gain = val, 0
            if patience and since_gain >= patience:
                log.info("gcn: no validation gain of %.3g for %d epochs; stopping after epoch %d",
                         MIN_GAIN, patience, epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    res.best_val_pearson = _finite(best)
    if resident is not None and at is not None:
        with torch.no_grad(), tf32_matmul():
            t0 = time.perf_counter()
            out = resident()
            sync_device(device)
            res.timings["forward_s"] = round(time.perf_counter() - t0, 4)
            res.pred = out.cpu().numpy()
    return res


def _finite(x: float) -> float | None:
    return round(float(x), 6) if np.isfinite(x) else None


# --------------------------------------------------------------------------------- workspace I/O
def _inputs(ws: Workspace, key: str) -> tuple:
    """(embeddings group, graph/all.zarr arrays, N), checked for shape agreement."""
    from streamprune.index import open_embeddings, read_graph

    emb, _, _ = open_embeddings(ws, key)
    emb_g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    if "labels" not in emb_g:
        raise StreamPruneError(f"{key}: {ws.path('embeddings.zarr')} has no 'labels' array; re-run `streamprune embed`")
    nbrs, dists = read_graph(ws, "all")
    n = emb.shape[0]
    for arr, what in ((emb_g["labels"], "embeddings.zarr/labels"), (nbrs, "graph/all.zarr/neighbors"),
                      (dists, "graph/all.zarr/distances")):
        if arr.shape[0] != n:
            raise StreamPruneError(f"{key}: {what} has {arr.shape[0]} rows but embeddings.zarr/emb has {n}")
    if nbrs.ndim != 2 or nbrs.shape != dists.shape:
        raise StreamPruneError(f"{key}: graph/all.zarr neighbors {nbrs.shape} and distances {dists.shape} differ")
    return emb_g, {"neighbors": nbrs, "distances": dists}, n


def _num_classes(labels, chunk: int = 1 << 20) -> int:
    top = -1
    for r0 in range(0, labels.shape[0], chunk):
        part = np.asarray(labels[r0:r0 + chunk])
        if len(part):
            top = max(top, int(part.max()))
    return top + 1


def default_chunk_rows(in_dim: int, widths: Sequence[int], k: int) -> int:
    """Rows per inference chunk: a power of two keeping chunk x (k + 1) x width x 4 near 256 MiB."""
    width = max(in_dim, *widths)
    rows = _CHUNK_BUDGET // (4 * (k + 1) * max(width, 1))
    return int(min(1 << 16, max(256, 1 << max(0, int(rows).bit_length() - 1))))


def activation_chunk_rows(n: int, chunk_rows: int, k: int, width: int, overhead_s: float = 2e-4,
                          bandwidth: float = 1e9) -> int:
    """Rows per zarr chunk of an activation array, minimising the expected gather time of one task.

    A task gathers about ``u = chunk_rows * k`` random rows.  With ``c`` rows per zarr chunk it
    touches ``(n / c) * (1 - exp(-u c / n))`` chunks, each costing a fixed ``overhead_s`` plus
    its bytes over ``bandwidth``.  Candidates are powers of two dividing ``chunk_rows`` (so every
    task owns whole chunks), from 8 rows up.  Small graphs get big chunks (read everything
    once), huge graphs small ones (read little more than the needed rows); chunks smaller than a
    task are grouped into one zarr shard per task, so files stay one per task.
    """
    n, chunk_rows = max(int(n), 1), max(int(chunk_rows), 1)
    u = min(chunk_rows * max(k, 1), n)
    candidates = [c for c in (1 << i for i in range(3, chunk_rows.bit_length())) if chunk_rows % c == 0]
    best, best_cost = chunk_rows, math.inf
    for c in candidates + [chunk_rows]:
        touched = (n / c) * -math.expm1(-u * c / n)
        cost = touched * (overhead_s + c * 4 * width / bandwidth)
        if cost < best_cost * 0.999:
            best, best_cost = c, cost
    return min(best, n)


# ---------------------------------------------------------------------------------- inference
@dataclass
class _LayerJob:
    """What one (layer, chunk) task needs; picklable for distributed schedulers."""

    ws_url: str
    storage_options: dict
    score: str
    layer: int  # 1-based
    n_layers: int
    k: int
    kind: str
    num_classes: int
    in_dim: int
    out_dim: int
    state: dict  # this layer's GCNConv parameters as numpy arrays
    mean: float = 0.0
    std: float = 1.0
    device: str = "cpu"
    sources: dict | None = None  # in-memory row sources shared by in-process tasks; None = open per task
    prior: dict | None = None  # {"mean", "std"} of the kNN prior column (layer-1 input, residual output)


def _prior_path(score: str) -> str:
    return f"gcn/{score}/prior.zarr"


def node_features(ws: Workspace, score: str, emb_g, valid: RowSource, num_classes: int, memory_limit: int,
                  prior_scale: tuple[float, float] | None, random_access: bool = False) -> Features:
    """Layer-1 inputs: embeddings and labels (and the kNN prior when ``prior_scale`` is given), held in
    memory when all N rows of them fit ``memory_limit``, else gathered from zarr.

    ``random_access``: the caller gathers rows from all over (sampled training, streamed layer
    tasks); embeddings not held in memory are then read from this host's copy of an ``s3://``
    workspace's (:func:`streamprune.index.local_embeddings`), not fetched again for each gather.
    """
    from streamprune.index import embed_version, local_embeddings, local_rows

    emb, labels = emb_g["emb"], emb_g["labels"]
    prior = _open_array(ws, _prior_path(score)) if prior_scale is not None else None
    n, d = emb.shape
    lim = memory_limit if n * (4 * d + 8 + 4 * (prior_scale is not None)) <= memory_limit else 0
    if random_access and not lim:
        marker = ws.require("embed", "extrapolate-gcn")
        emb = local_embeddings(ws, emb, marker)
        labels = local_rows(ws, labels, "embeddings.zarr/labels", embed_version(marker, labels))
        if prior is not None:
            prior = local_rows(ws, prior, _prior_path(score), prior.attrs.get("id"))
    return Features(RowSource(emb, lim, np.float32), RowSource(labels, lim, np.int64), valid, num_classes,
                    RowSource(prior, lim, np.float32) if prior is not None else None, prior_scale or (0.0, 1.0))


def write_prior(ws: Workspace, run: StageRun, score: str, n: int) -> dict:
    """Write every row's kNN-extrapolated score to ``gcn/<score>/prior.zarr``; returns {"k", "pearson_by_k"}.

    A seed row's prior comes from the *other* seeds (``graph/seeds.zarr`` never lists a row
    itself), so seed rows in training see the same kind of input as the rows being predicted.
    k is chosen like ``extrapolate --method knn`` does, by leave-one-out Pearson on seed rows.
    Streamed chunk by chunk (one float per row); recomputed whole on resume unless recorded.
    """
    from streamprune.extrapolate.knn import knn_predict, validation_table
    from streamprune.index import read_graph

    done = run.chunk_done("prior")
    if done is not None:
        return done
    k, table, _ = validation_table(ws, score)
    # By the seeds graph's own chunks: a block smaller than them decompresses each graph chunk again
    # per block (with GCN chunks of 4,096 rows and graph chunks of 65,536, the prior of 1M rows took
    # 13.6 s on the CPU box, against 2.2 s: scripts/bench_gcn.py --setup).
    nbr_arr, dist_arr = read_graph(ws, "seeds")
    gc = int(nbr_arr.chunks[0])
    arr = zarr.create_array(storage.zarr_store(ws.path(_prior_path(score)), ws.storage_options), shape=(n,),
                            chunks=(max(1, min(n, gc)),), dtype="float32", fill_value=np.nan, overwrite=True,
                            attributes={"id": uuid.uuid4().hex})  # names this write for hosts' local copies
    seeds = seed_scores(ws, score)
    for r0 in range(0, n, gc):
        r1 = min(n, r0 + gc)
        arr[r0:r1] = knn_predict(seeds.lookup(nbr_arr[r0:r1, :k]), dist_arr[r0:r1, :k], k)
    info = {"k": int(k), "pearson_by_k": {str(c): _finite(v) for c, v in table.items()}}
    run.mark_chunk("prior", info)
    return info


_ACT_GROUP = "gcn/{score}/activations"  # the layers' local copies share one place: each replaces the one before


def _act_path(score: str, layer: int) -> str:
    return f"gcn/{score}/h{layer}.zarr"


def _open_array(ws: Workspace, rel: str, mode: str = "r"):
    return zarr.open_array(storage.zarr_store(ws.path(rel), ws.storage_options), mode=mode)


def valid_source(ws: Workspace, emb_g, memory_limit: int) -> RowSource:
    """Every row's validity, gathered at the neighbours of each chunk or batch: held in memory when it
    fits ``memory_limit``, else read from this host's copy of a remote workspace's."""
    from streamprune.index import embed_version, local_rows

    valid = emb_g["valid"]
    if valid.nbytes > memory_limit:
        valid = local_rows(ws, valid, "embeddings.zarr/valid", embed_version(ws.require("embed", "extrapolate-gcn"),
                                                                             valid))
    return RowSource(valid, memory_limit, bool)


def layer_sources(ws: Workspace, score: str, layer: int, k: int, kind: str, num_classes: int,
                  memory_limit: int, prior: dict | None = None) -> dict:
    """Row sources of a layer: ``prev`` (layer input rows), ``table`` (graph rows) and ``valid``.

    The previous layer (node features for layer 1) is read into memory when it fits
    ``memory_limit`` bytes, else gathered from zarr per chunk; graph rows are read as spans.
    """
    from streamprune.index import local_rows

    emb_g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    graph_g = zarr.open_group(storage.zarr_store(ws.path("graph/all.zarr"), ws.storage_options), mode="r")
    valid = valid_source(ws, emb_g, memory_limit)
    src: dict = {"valid": valid, "table": GraphTable(graph_g, k, valid, kind, 0)}
    if layer == 1:
        src["prev"] = node_features(ws, score, emb_g, valid, num_classes, memory_limit,
                                    prior and (prior["mean"], prior["std"]), random_access=True)
        src["in_memory"] = src["prev"].emb.in_memory
    else:
        act = _open_array(ws, _act_path(score, layer - 1))
        if act.nbytes > memory_limit:
            act = local_rows(ws, act, _act_path(score, layer - 1), act.attrs.get("id"),
                             group=_ACT_GROUP.format(score=score))
        src["prev"] = RowSource(act, memory_limit, np.float32)
        src["in_memory"] = src["prev"].in_memory
    return src


def _compute_layer(job: _LayerJob, r0: int, r1: int) -> np.ndarray:
    """Layer ``job.layer`` (eval mode) of rows [r0, r1) from the previous layer of them and their neighbours."""
    ws = Workspace(job.ws_url, job.storage_options)
    src = job.sources or layer_sources(ws, job.score, job.layer, job.k, job.kind, job.num_classes, 0, job.prior)
    if not src["in_memory"]:
        bound_heap(GCN_MMAP_THRESHOLD)
    span = src["table"].span(r0, r1)
    sub = sample_subgraph(np.arange(r0, r1, dtype=np.int64), lambda _rows: span, (None,))
    n_t = r1 - r0
    prev = src["prev"]
    # Source rows: the chunk's own rows, then its other neighbours (sorted, unique), gathered in place.
    x = np.empty((len(sub.nodes), job.in_dim), np.float32)
    x[:n_t] = prev.span(r0, r1)
    prev.take(sub.nodes[n_t:], out=x[n_t:])
    device = torch.device(job.device)
    conv = make_conv(job.in_dim, job.out_dim)
    conv.load_state_dict({name: torch.from_numpy(v) for name, v in job.state.items()})
    conv = conv.to(device).eval()
    with torch.no_grad():
        out = apply_conv(conv, torch.from_numpy(x).to(device), sub.adjacency(1, device),
                         relu=job.layer < job.n_layers)
    return out.cpu().numpy()


GCN_MMAP_THRESHOLD = 256 << 10
"""Streamed inference tasks serve buffers above 256 KiB with mmap (:func:`~streamprune.heap.bound_heap`).

Chunk tasks allocate and free hundreds of MB each, partly in zarr's decoder threads; with glibc's
dynamic threshold the resident size crept up with the number of tasks run (so with N), breaking
the O(chunk) bound.  The price: ~40 % longer streamed tasks in scripts/bench_gcn.py (fresh
zero-filled pages).  Set by streamed inference tasks only (the in-memory path holds O(N) anyway).
"""


def _layer_task(job: _LayerJob, r0: int, r1: int) -> dict:
    """Compute a hidden layer for rows [r0, r1) and write them to ``gcn/<score>/h{layer}.zarr``."""
    t0 = time.time()
    out = _compute_layer(job, r0, r1)
    ws = Workspace(job.ws_url, job.storage_options)
    _open_array(ws, _act_path(job.score, job.layer), "r+")[r0:r1] = out
    del out
    trim_heap()
    return {"rows": r1 - r0, "s": round(time.time() - t0, 3)}


def _in_process(scheduler: str | None) -> bool:
    """Whether the stage's tasks run in this process (``local`` runs them on threads here)."""
    return scheduler == "local" or scheduler in IN_PROCESS


def use_whole_graph(mode: str, device: torch.device, in_process: bool, n: int, k: int, in_dim: int,
                    widths: Sequence[int]) -> bool:
    """Whether inference is one whole-graph forward (see :func:`extrapolate_gcn`'s ``inference``).

    ``auto``: on CUDA, with in-process tasks, when features, activations and the CSR adjacencies of
    all ``n`` rows (:func:`resident_bytes`, which also counts gradients: a margin) take at most half
    the free device memory.  At 1M rows of 512-d embeddings that is ~11 GB.
    """
    if mode != "auto":
        return mode == "whole"
    if device.type != "cuda" or not in_process:
        return False
    from streamprune.train import fits_gpu

    return fits_gpu(resident_bytes(n, n * (k + 1), in_dim, widths), device, DEVICE_FRACTION)


def _slice_predictions(ws: Workspace, start: int, stop: int, pred: np.ndarray) -> np.ndarray:
    """Rows [start, stop) of whole-graph predictions (common.write_chunks predict)."""
    return pred[start:stop]


def _predict_last(ws: Workspace, start: int, stop: int, job: _LayerJob) -> np.ndarray:
    """De-standardised outputs of the last layer for rows [start, stop) (common.write_chunks predict)."""
    out = _compute_layer(job, start, stop)[:, 0]
    if job.prior is not None:  # residual: the model predicts a correction of the kNN prior
        out = out + standardise_prior(_open_array(ws, _prior_path(job.score))[start:stop], True,
                                      (job.prior["mean"], job.prior["std"]))
    trim_heap()
    return (out.astype(np.float64) * job.std + job.mean).astype(np.float32)


# ------------------------------------------------------------------------------------- stage
def _save_bytes(ws: Workspace, rel: str, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(ws.path(rel), buf.getvalue(), ws.storage_options)


def load_checkpoint(ws: str | Workspace, score: str = "du") -> tuple[GCN, dict]:
    """The trained GCN of ``score`` (eval mode, CPU) and its checkpoint dict (mean, std, history)."""
    ws = as_workspace(ws)
    url = ws.path(f"gcn/{score}/model.pt")
    if not storage.exists(url, ws.storage_options):
        raise StreamPruneError(f"no trained GCN for score '{score}' in {ws.url}")
    from streamprune.train import load_torch

    ckpt = load_torch(url, ws.storage_options)
    model = GCN(ckpt["in_dim"], ckpt["widths"], ckpt["dropout"], residual=bool(ckpt.get("prior")))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def _check_params(k: int, hidden: Sequence[int], dropout: float, epochs: int, batch_size: int, lr: float,
                  weight: str, chunk_rows: int | None) -> None:
    OPTIONS["k"].check(k, "--k")
    OPTIONS["epochs"].check(epochs, "--epochs")
    if not hidden or any(int(h) < 1 for h in hidden):
        raise StreamPruneError(f"hidden widths must be positive integers, got {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise StreamPruneError(f"dropout must be in [0, 1), got {dropout}")
    if batch_size < 1:
        raise StreamPruneError(f"batch size must be >= 1, not {batch_size!r}")
    if not lr > 0:
        raise StreamPruneError(f"learning rate must be > 0, got {lr}")
    if weight not in WEIGHTS:
        raise StreamPruneError(f"edge weight must be one of {', '.join(WEIGHTS)}, got {weight!r}")
    check_optional_whole(chunk_rows, "--chunk-rows")


@releases_leases
def extrapolate_gcn(ws: str | Workspace, score: str = "du", *, k: int = 10, hidden: Sequence[int] = (512, 256),
                    dropout: float = 0.5, epochs: int = 25, batch_size: int = 128, lr: float = 1e-3,
                    fanout: int | Sequence[int | None] | None = None, weight: str = "exp", seed: int = 0,
                    chunk_rows: int | None = None, memory_limit: int = 2 << 30, scheduler: str | None = "sync",
                    force: bool = False, storage_options: dict | None = None, device: str = "auto",
                    prior: str = "knn", training: str = "auto", inference: str = "auto",
                    resident_steps: int | None = RESIDENT_STEPS, patience: int = PATIENCE) -> dict:
    """Train a GCN on the seed scores and predict ``score`` for every row into extrapolated/<score>-gcn.zarr.

    ``prior="knn"`` (default) adds every row's kNN-extrapolated score as an input column and
    makes the GCN predict a correction of it (residual output); ``"none"`` is the plain model
    over one-hot(label) ⊕ embedding.  ``training``: see :func:`choose_training` (auto = resident on
    CUDA when the seeds' closure fits, else sampled).  ``inference``: "chunked" (layer by layer,
    chunk by chunk: memory O(chunk)), "whole" (one whole-graph forward on ``device``) or "auto"
    (whole on CUDA when the graph fits half the free device memory and the tasks run in this
    process, else chunked); see :func:`use_whole_graph`.
    """
    ws = as_workspace(ws, storage_options)
    key = marker_key(score, "gcn")
    _check_params(k, hidden, dropout, epochs, batch_size, lr, weight, chunk_rows)
    check_patience(patience)
    check_seed(seed, "--gcn-seed")
    OPTIONS["prior"].check(prior, "--prior")
    if training not in TRAINING:
        raise StreamPruneError(f"--training must be one of {', '.join(TRAINING)}, got {training!r}")
    if inference not in INFERENCE:
        raise StreamPruneError(f"GCN inference must be one of {', '.join(INFERENCE)}, got {inference!r}")
    inputs = {"embed": ws.require("embed", key)["fingerprint"], "index-all": ws.require("index-all", key)["fingerprint"],
              "score": score_fingerprint(ws, score, key)}
    if prior == "knn":
        inputs["index-seeds"] = ws.require("index-seeds", key)["fingerprint"]
    emb_g, graph, n = _inputs(ws, key)
    if k > graph["neighbors"].shape[1]:
        raise StreamPruneError(f"{key}: k={k} but graph/all.zarr holds {graph['neighbors'].shape[1]} neighbours per "
                               f"row; rebuild it with `streamprune index --k {k} --force`")
    widths = tuple(int(h) for h in hidden) + (1,)
    fanouts = parse_fanout(fanout, len(widths), k)
    num_classes = _num_classes(emb_g["labels"])
    in_dim = num_classes + emb_g["emb"].shape[1] + (prior != "none")
    chunk_rows = int(chunk_rows or default_chunk_rows(in_dim, widths, k))
    config = {"method": "gcn", "score": score, "k": k, "hidden": list(widths[:-1]), "dropout": float(dropout),
              "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "fanout": list(fanouts),
              "weight": weight, "seed": int(seed), "chunk_rows": chunk_rows, "prior": prior,
              "training": training, "resident_steps": resident_steps,
              # only when on: 0 is training before the option existed, so older results still match
              **({"patience": int(patience)} if patience else {})}
    from streamprune.train import resolve_device

    run = ws.begin("extrapolate", config, inputs, force=force, key=key, check=lambda: resolve_device(device))
    if run.already_done:
        _remove_activations(ws, score, len(widths))
        return run.previous | {"skipped": True}
    dev = resolve_device(device)
    timings: dict = {}
    ckpt_rel = f"gcn/{score}/model.pt"
    seeds = seed_scores(ws, score)
    if len(seeds.rows) and (seeds.rows[0] < 0 or seeds.rows[-1] >= n):
        raise StreamPruneError(f"{key}: subset rows reach {int(seeds.rows[-1])} but embeddings.zarr has {n} rows")
    res = None
    if run.chunk_done("train") is not None:
        model, ckpt = load_checkpoint(ws, score)
    else:
        t0 = time.time()
        valid = valid_source(ws, emb_g, memory_limit)
        use = np.isfinite(seeds.values) & valid.take(seeds.rows)
        if use.sum() < 10:
            raise StreamPruneError(f"{key}: only {int(use.sum())} seed rows have a valid embedding and a finite "
                                   f"score; at least 10 are needed to train a GCN")
        prior_info = write_prior(ws, run, score, n) if prior == "knn" else None
        # Whole-graph training when inference will be one whole-graph forward and training resolves to
        # resident for the whole graph (else fit_gcn chooses by the seeds' closure, as without it).
        # It reads the features once, in row order, block by block to the device: a host copy of all
        # N rows (2 GB at 1M rows of 512-d) would only add to the process's memory.
        whole_training = use_whole_graph(inference, dev, _in_process(scheduler), n, k, in_dim, widths) and \
            choose_training(training, all(f is None or f >= k for f in fanouts), dev,
                            lambda: resident_bytes(n, n * (k + 1), in_dim, widths)) == "resident"
        # the prior's scale is the target's, set by fit_gcn from the training split
        features = node_features(ws, score, emb_g, valid, num_classes, 0 if whole_training else memory_limit,
                                 (0.0, 1.0) if prior_info else None, random_access=not whole_training)
        table = GraphTable(graph, k, valid, weight, memory_limit)
        res = fit_gcn(features, table, seeds.rows[use], seeds.values[use], widths=widths, dropout=dropout,
                      epochs=epochs, batch_size=batch_size, lr=lr, fanout=fanouts, seed=seed, device=dev,
                      training=training, resident_steps=resident_steps, patience=patience,
                      whole_graph=whole_training)
        model = res.model.cpu()
        ckpt = {"state_dict": model.state_dict(), "in_dim": in_dim, "widths": list(widths), "dropout": dropout,
                "num_classes": num_classes, "mean": res.mean, "std": res.std, "history": res.history,
                "best_epoch": res.best_epoch, "best_val_pearson": res.best_val_pearson, "n_train": res.n_train,
                "n_val": res.n_val, "fingerprint": run.fingerprint, "device": str(dev), "training": res.training,
                "step_batch": res.step_batch, "step_lr": res.step_lr,
                "features_in_memory": features.emb.in_memory,
                "prior": prior_info and {"k": prior_info["k"], "mean": res.mean, "std": res.std}}
        _save_bytes(ws, ckpt_rel, ckpt)
        run.mark_chunk("train", {"best_epoch": res.best_epoch, "best_val_pearson": res.best_val_pearson,
                                 "train_s": round(time.time() - t0, 3)})
        timings["train_s"] = round(time.time() - t0, 3)
        if res.timings:  # resident training: building its graph and features on the device
            timings["resident"] = res.timings
    layer_timings, counts = _infer(ws, run, model, ckpt, score=score, n=n, k=k, kind=weight, num_classes=num_classes,
                                   chunk_rows=chunk_rows, memory_limit=memory_limit, scheduler=scheduler, device=dev,
                                   inference=inference, trained=res if res is not None and res.pred is not None
                                   else None)
    timings.update(layer_timings)
    counts.update({"n_train": ckpt["n_train"], "n_val": ckpt["n_val"], "best_epoch": ckpt["best_epoch"],
                   "training": ckpt.get("training", "sampled"), "step_batch": ckpt.get("step_batch"),
                   "inference": "whole" if "whole_graph" in layer_timings else "chunked",
                   "best_val_pearson": ckpt["best_val_pearson"], "history": ckpt["history"],
                   "epochs_run": len(ckpt["history"]) - 1})  # fewer than the epochs: stopped early (patience)
    marker = run.commit(outputs={"extrapolated": output_path(score, "gcn"), "model": ckpt_rel}, counts=counts,
                        timings=timings)
    _remove_activations(ws, score, len(widths), scheduler)
    return marker


def _infer(ws: Workspace, run: StageRun, model: GCN, ckpt: dict, *, score: str, n: int, k: int, kind: str,
           num_classes: int, chunk_rows: int, memory_limit: int, scheduler: str | None,
           device: torch.device, inference: str = "auto", trained: TrainResult | None = None) -> tuple[dict, dict]:
    """Layer-wise chunked inference, resumable per (layer, chunk); returns (per-layer timings, output counts).

    With a whole-graph forward (:func:`use_whole_graph`) the predictions of every row come from one
    forward on the device and are written chunk by chunk; a resumed run writes the chunks still
    missing from a new forward (the same computation of the same inputs).  ``trained``: this run's
    whole-graph training, whose ``pred`` is that forward already (used whatever the free device
    memory says after training).
    """
    starts = list(range(0, n, chunk_rows))
    # One machine: layer inputs are held in memory (below memory_limit) and shared by threads, which
    # beats streaming them to worker processes; a remote cluster gets streamed, picklable tasks.
    if scheduler == "local":
        scheduler = "threads"
    in_process = _in_process(scheduler)
    done = run.done_chunks()
    # Whole-graph training's forward is used whatever the device's free memory says now: torch's
    # cache still holds training's memory, which would make a graph that fitted look too big.
    if trained is not None or use_whole_graph(inference, device, in_process, n, k, model.convs[0].in_channels,
                                              [c.out_channels for c in model.convs]):
        t0 = time.time()
        if trained is not None:  # whole-graph training's forward of the kept weights: nothing to read again
            pred, parts = trained.pred, {"graph_s": 0.0, "features_s": 0.0,  # the forward with its first aggregation
                                         "forward_s": round(trained.timings.get("forward_s", 0.0)
                                                            + trained.timings.get("aggregate_s", 0.0), 4)}
        else:
            # Features are read once, in row order, 65,536 rows at a time (device_features): streamed
            # from zarr, so host memory holds a block, not N rows; the validity column (a byte per
            # row) and the graph's rows (read whole by the subgraph build) are read into memory.
            emb_g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
            graph_g = zarr.open_group(storage.zarr_store(ws.path("graph/all.zarr"), ws.storage_options), mode="r")
            valid = RowSource(emb_g["valid"], n + 1, bool)
            prior = ckpt.get("prior")
            features = node_features(ws, score, emb_g, valid, num_classes, 0,
                                     prior and (prior["mean"], prior["std"]))
            parts: dict = {}
            pred = predict_in_memory(model, features, GraphTable(graph_g, k, valid, kind, 0), device,
                                     timings=parts)
            del features
        pred = (pred.astype(np.float64) * float(ckpt["std"]) + float(ckpt["mean"])).astype(np.float32)
        predict_s = time.time() - t0
        counts = write_chunks(ws, run, score, "gcn", n, _slice_predictions, (pred,), chunk_rows=chunk_rows,
                              scheduler="sync")
        wall = time.time() - t0
        # predict_s: graph build, features and forward; kernel_s: the forward alone (the bare kernel's work)
        return {"whole_graph": {"s": round(wall, 3), "predict_s": round(predict_s, 3),
                                "graph_s": parts["graph_s"], "features_s": parts["features_s"],
                                "kernel_s": parts["forward_s"], "rows_per_s": round(n / max(wall, 1e-9), 1),
                                "device": str(device), "from_training": trained is not None}}, counts
    timings: dict = {}
    counts: dict = {}
    n_layers = model.n_layers
    for layer in range(1, n_layers + 1):
        last = layer == n_layers
        ids = [f"rows-{i}" if last else f"h{layer}-{i}" for i in range(len(starts))]
        todo = [i for i, cid in enumerate(ids) if cid not in done]
        conv = model.convs[layer - 1]
        t0 = time.time()
        sources = None
        if todo:
            if not last and len(todo) == len(starts):
                _create_activations(ws, score, layer, n, conv.out_channels, chunk_rows, k)
            sources = (layer_sources(ws, score, layer, k, kind, num_classes, memory_limit, ckpt.get("prior"))
                       if in_process else None)
        job = _LayerJob(ws.url, ws.storage_options, score, layer, n_layers, k, kind, num_classes,
                        conv.in_channels, conv.out_channels,
                        {name: v.detach().cpu().numpy() for name, v in conv.state_dict().items()},
                        mean=float(ckpt["mean"]), std=float(ckpt["std"]),
                        device=str(device) if in_process else "cpu", sources=sources, prior=ckpt.get("prior"))
        if last:
            counts = write_chunks(ws, run, score, "gcn", n, _predict_last, (job,), chunk_rows=chunk_rows,
                                  scheduler=scheduler)
        elif todo:
            args = [(job, starts[i], min(n, starts[i] + chunk_rows)) for i in todo]
            map_tasks(_layer_task, args, scheduler=scheduler, desc=f"gcn layer {layer}/{n_layers}", unit="row",
                      weights=[a[2] - a[1] for a in args],
                      on_result=lambda j, res, ids=ids, todo=todo: run.mark_chunk(ids[todo[j]], res))
        if todo:
            wall = time.time() - t0
            rows = sum(min(n, starts[i] + chunk_rows) - starts[i] for i in todo)
            timings[f"layer{layer}"] = {"s": round(wall, 3), "rows_per_s": round(rows / max(wall, 1e-9), 1),
                                        "in_memory": bool(sources and sources.get("in_memory"))}
        del sources, job
        if layer >= 2:  # layer-1 activations are no longer needed once this layer is complete
            storage.remove(ws.path(_act_path(score, layer - 1)), ws.storage_options, recursive=True)
    return timings, counts


def _create_activations(ws: Workspace, score: str, layer: int, n: int, width: int, chunk_rows: int, k: int) -> None:
    # Activations are transient (deleted once the next layer is complete) and gathered at random:
    # stored uncompressed, in chunks sized by activation_chunk_rows (one shard per task when smaller).
    rows = activation_chunk_rows(n, chunk_rows, k, width)
    shards = {"shards": (chunk_rows, width)} if rows < min(chunk_rows, n) else {}
    zarr.create_array(storage.zarr_store(ws.path(_act_path(score, layer)), ws.storage_options), shape=(n, width),
                      chunks=(rows, width), dtype="float32", fill_value=0.0, compressors=None, overwrite=True,
                      attributes={"id": uuid.uuid4().hex}, **shards)  # the id names this write for local copies


def _remove_activations(ws: Workspace, score: str, n_layers: int, scheduler: str | None = None) -> None:
    """Remove the layers' activations and the local copies of them: this host's, and on a dask
    cluster (``scheduler`` an address) each worker's, whose process holds its copy until told to let go."""
    from streamprune.index import drop_copies

    for layer in range(1, n_layers + 1):
        storage.remove(ws.path(_act_path(score, layer)), ws.storage_options, recursive=True)
    group = _ACT_GROUP.format(score=score)
    if scheduler is not None and scheduler not in LOCAL_SCHEDULERS and storage.is_remote(ws.url):
        with client_for(scheduler) as client:
            client.run(drop_copies, ws, group)
    drop_copies(ws, group)


register_method("gcn", extrapolate_gcn, OPTIONS)
