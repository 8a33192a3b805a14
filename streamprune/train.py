"""Subset training with recorded dynamics, resumable per epoch.

Flow of the ``train`` stage (marker ``_stages/train.json``, or ``train-full`` with ``full``):

1. **cache** — the rows to train on are read by byte range from the shards and decoded once into
   ``train[-full]/cache.zarr`` (inputs as stored: uint8 images or float32 vectors; labels; a valid
   mask), one dask task per chunk of rows, each owning its zarr chunks.  scripts/bench_train.py
   measures the trade: on a CPU the decode is a few percent of one epoch, but a GPU trains
   ResNet-18 at 32 px more than twice as fast as one core decodes PNGs, so re-decoding every
   epoch would make the data path the bottleneck.  The trainer always reads the cache (one
   decode instead of K, and ranged reads of the subset happen once).
2. **train** — K epochs of SGD+cosine (or AdamW), CUDA+AMP (bf16) and channels_last when
   available, deterministic for a seed on CPU.  The cache is held in memory when it fits
   ``memory_budget``; otherwise batches are streamed with a block shuffle (random chunk order,
   shuffled within a window of chunks).  On CUDA the cache goes to GPU memory instead when it
   fits ``GPU_CACHE_FRACTION`` of the free GPU memory (copied chunk by chunk: host memory stays
   one chunk), so batches are gathered, scaled and augmented on the GPU.
3. **dynamics** — after every epoch an eval pass (default; ``dynamics="train"`` records the
   training pass instead) writes logits, true-class probability, correctness and loss of every
   subset row to ``dynamics.zarr`` (epoch slabs: each epoch owns its chunks).  Then, every
   ``checkpoint_seconds`` and after the last epoch, a checkpoint is written (after that epoch's
   dynamics); a killed run resumes after the last checkpoint and reproduces the same dynamics.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm.auto import tqdm

from streamprune import storage
from streamprune.adversarial import parse_attack, pgd
from streamprune.compute import OneBehind, map_tasks
from streamprune.decode import DecodeConfig, decode_rows
from streamprune.decode_tasks import cache_rows
from streamprune.errors import StreamPruneError, check_optional_whole, check_seed, check_whole
from streamprune.leases import releases_leases
from streamprune.models import build_from_spec, build_model, check_model_name, check_model_options, model_spec
from streamprune.shards import Catalog, ErrorPolicy
from streamprune.workspace import StageRun, Workspace, train_key

log = logging.getLogger(__name__)

GPU_CACHE_FRACTION = 0.25  # of free GPU memory the decoded training cache may take when training on CUDA


@dataclass
class TrainConfig:
    """Options of subset training (see docs/guide.md, `streamprune score`)."""

    model: str = "cnn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum, cosine) | adamw (cosine)
    lr: float | None = None  # default 0.05 for sgd, 1e-3 for adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: str = "none"  # none | crop | crop-flip (images only)
    dynamics: str = "eval"  # eval | train
    labels: str = "supervised"  # supervised | pseudo:K
    adversarial: str | None = None  # e.g. linf:8/255 or l2:0.5
    pgd_steps: int = 5
    pgd_step_size: float | None = None
    num_classes: int | None = None
    device: str = "auto"  # auto | cpu | cuda
    chunk_rows: int = 2048
    memory_budget: int = 2 << 30  # bytes of decoded cache held in memory before streaming
    checkpoint_seconds: float = 30.0  # a checkpoint after the first epoch ending this long after the last (and the last epoch)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise StreamPruneError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        if self.augment not in ("none", "crop", "crop-flip"):
            raise StreamPruneError(f"--augment must be none, crop or crop-flip, not {self.augment!r}")
        if self.dynamics not in ("eval", "train"):
            raise StreamPruneError(f"--dynamics must be eval or train, not {self.dynamics!r}")
        check_whole(self.epochs, "--epochs")
        check_whole(self.batch_size, "--batch-size")
        check_seed(self.seed, "--seed", signed=True)
        check_model_name(self.model)
        check_model_options(self.model, self.model_kwargs)
        check_optional_whole(self.num_classes, "--num-classes", 2)
        check_device(self.device)
        if self.lr is not None and not (_is_number(self.lr) and 0 < self.lr < math.inf):
            raise StreamPruneError(f"--lr must be a number > 0, not {self.lr!r}")
        if not (_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise StreamPruneError(f"--weight-decay must be a number >= 0, not {self.weight_decay!r}")
        if not (_is_number(self.checkpoint_seconds) and self.checkpoint_seconds >= 0):
            raise StreamPruneError("--checkpoint-every must be >= 0 seconds")
        if not (isinstance(self.labels, str) and (self.labels == "supervised" or _pseudo_k(self.labels))):
            raise StreamPruneError(f"--labels must be 'supervised' or 'pseudo:K', not {self.labels!r}")
        if self.num_classes is not None and self.labels != "supervised" and self.num_classes != _pseudo_k(self.labels):
            raise StreamPruneError(f"--num-classes {self.num_classes} disagrees with --labels {self.labels}: "
                                   "pseudo-labels have K classes")
        # validates the attack and, when there is one, --pgd-steps and --pgd-step-size
        parse_attack(self.adversarial, steps=self.pgd_steps, step_size=self.pgd_step_size)

    def fingerprint_dict(self) -> dict:
        """The options that identify a run's results: all but the memory budget and the checkpoint
        interval, which are resource settings (a streamed cache shuffles more coarsely, so its dynamics
        differ: the marker's ``timings.in_memory`` says which path ran)."""
        d = asdict(self)
        d.pop("memory_budget")
        d.pop("checkpoint_seconds")
        return d


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and not math.isnan(value)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffle: ``seed * 100003 + epoch`` modulo 2^64, the value torch takes for it
    (torch reads a negative seed as its two's complement; a large one would overflow)."""
    return (int(seed) * 100003 + int(epoch)) % 2**64


def _pseudo_k(labels: str) -> int | None:
    if labels.startswith("pseudo:"):
        try:
            k = int(labels.split(":", 1)[1])
        except ValueError:
            return None
        return k if k >= 2 else None
    return None


def check_label_source(cfg: TrainConfig, decode: DecodeConfig) -> None:
    """Refuse supervised training with ``--label-key none``: no labels would be decoded to train on."""
    if not _pseudo_k(cfg.labels) and decode.label_key == "none":
        raise StreamPruneError("--label-key none decodes no labels: supervised training needs them "
                               "(give --label-key, or train on --labels pseudo:K)")


def check_device(name) -> torch.device | None:
    """The device ``name`` names (None for 'auto'); a name torch cannot read (a typo such as 'gpu')
    is refused in one line, before any work is done."""
    if name == "auto":
        return None
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise StreamPruneError(f"--device must be auto, cpu or cuda (cuda:N), not {name!r}") from None


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    device = check_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError("--device cuda requested but CUDA is not available")
    return device


# cache ---------------------------------------------------------------------------------------
def build_cache(ws: Workspace, run: StageRun, key: str, rows: np.ndarray, decode: DecodeConfig, on_error: str,
                scheduler: str | None, chunk_rows: int, num_classes: int | None) -> dict:
    """Decode ``rows`` into ``<key>/cache.zarr``, one task per chunk of rows (resumable)."""
    cat = Catalog(ws)
    m = len(rows)
    probe_handler = ErrorPolicy(on_error, stage=key)
    shape = None
    for start in range(0, m, 64):  # the first decodable sample fixes the input shape and dtype
        xs, _, valid = decode_rows(cat, rows[start:start + 64], decode, probe_handler, None, num_classes)
        if valid.any():
            shape, dtype = tuple(xs.shape[1:]), xs.dtype
            break
    if shape is None:
        raise StreamPruneError(f"{key}: no decodable sample among {m} rows")
    url = ws.path(key, "cache.zarr")
    info = run.layout("cache-layout", url, "cache-")
    if info is None or tuple(info["shape"]) != shape:
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="w")
        group.create_array("x", shape=(m, *shape), chunks=(chunk_rows, *shape), dtype=dtype, fill_value=0,
                           compressors=None)
        group.create_array("labels", shape=(m,), chunks=(chunk_rows,), dtype="int64", fill_value=-1)
        group.create_array("valid", shape=(m,), chunks=(chunk_rows,), dtype="bool", fill_value=False)
        group.attrs.update({"input_shape": list(shape), "dtype": str(np.dtype(dtype))})
        run.mark_chunk("cache-layout", {"shape": list(shape), "dtype": str(np.dtype(dtype))})
    done = run.done_chunks()
    starts = [s for s in range(0, m, chunk_rows) if f"cache-{s // chunk_rows}" not in done]
    decode_d = decode.to_dict()

    def _record(i: int, result: dict) -> None:
        s = starts[i]
        run.mark_chunk(f"cache-{s // chunk_rows}", {"n": result["n"], "n_valid": result["n_valid"]},
                       errors=result["errors"])

    map_tasks(cache_rows, [(ws, key, rows[s:s + chunk_rows], s, decode_d, on_error, shape, num_classes)
                            for s in starts], scheduler=scheduler, desc=f"decode {key}", unit="row",
              weights=[min(chunk_rows, m - s) for s in starts], on_result=_record)
    return {"input_shape": list(shape), "dtype": str(np.dtype(dtype))}


# data ------------------------------------------------------------------------------------------
class SubsetData:
    """The decoded cache as batches: in (GPU or host) memory when it fits, else block-shuffled from zarr."""

    def __init__(self, ws: Workspace, key: str, memory_budget: int, device: torch.device | None = None):
        self.group = zarr.open_group(storage.zarr_store(ws.path(key, "cache.zarr"), ws.storage_options), mode="r")
        self.x_arr = self.group["x"]
        self.m = self.x_arr.shape[0]
        self.shape = tuple(self.x_arr.shape[1:])
        self.is_image = len(self.shape) == 3
        self.valid = self.group["valid"][:]
        self.labels = self.group["labels"][:]
        self.chunk = self.x_arr.chunks[0]
        nbytes = self.m * int(np.prod(self.shape)) * self.x_arr.dtype.itemsize
        self.on_gpu = device is not None and device.type == "cuda" and fits_gpu(nbytes, device)
        self.in_memory = self.on_gpu or nbytes <= memory_budget
        if self.on_gpu:
            self.x = torch.empty((self.m, *self.shape), dtype=torch.from_numpy(np.zeros(0, self.x_arr.dtype)).dtype,
                                 device=device)
            for s in range(0, self.m, self.chunk):
                self.x[s:s + self.chunk].copy_(torch.from_numpy(self.x_arr[s:s + self.chunk]))
        else:
            self.x = torch.from_numpy(self.x_arr[:]) if self.in_memory else None

    def _load(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x[idx if torch.is_tensor(idx) else torch.from_numpy(idx).to(self.x.device)]
        return torch.from_numpy(self.x_arr.get_orthogonal_selection((idx,)) if len(idx) else
                                np.zeros((0, *self.shape), self.x_arr.dtype))

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """Model input: images scaled to [0, 1], vectors as float32."""
        return x.float().div_(255.0) if self.is_image else x.float()

    def train_order(self, gen: torch.Generator) -> Iterator[np.ndarray]:
        """Positions of valid rows, shuffled: a full permutation, or block-shuffled when streaming."""
        valid_pos = np.flatnonzero(self.valid)
        if self.in_memory:
            yield valid_pos[torch.randperm(len(valid_pos), generator=gen).numpy()]
            return
        n_chunks = math.ceil(self.m / self.chunk)
        order = torch.randperm(n_chunks, generator=gen).numpy()
        window = 4
        for w in range(0, n_chunks, window):
            pos = np.concatenate([np.arange(c * self.chunk, min(self.m, (c + 1) * self.chunk)) for c in order[w:w + window]])
            pos = pos[self.valid[pos]]
            yield pos[torch.randperm(len(pos), generator=gen).numpy()]

    def batches(self, order: Iterator[np.ndarray], batch_size: int,
                ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(positions, the same positions as a tensor on the cache's device, uint8/float inputs) batches
        following ``order``.

        A GPU cache gets each block of positions copied to the device once: indexing device tensors
        with host indices copies them per batch, and each such copy waits for the GPU to drain,
        which leaves the GPU idle while the host queues the next step.

        Streamed blocks carry their last partial batch over into the next block, so every batch but
        the last is full: an epoch takes the ceil(rows / batch_size) steps that the cosine schedule
        of :func:`make_optimizer` counts.
        """
        if self.in_memory:
            for block in order:
                block_t = torch.from_numpy(block).to(self.x.device)
                for b in range(0, len(block), batch_size):
                    idx_t = block_t[b:b + batch_size]
                    yield block[b:b + batch_size], idx_t, self._load(idx_t)
            return
        idx, x = np.zeros(0, np.int64), self._load(np.zeros(0, np.int64))
        for block in order:
            srt = np.sort(block)
            idx = np.concatenate([idx, block])
            x = torch.cat([x, self._load(srt)[torch.from_numpy(np.searchsorted(srt, block))]])
            n_full = len(idx) - len(idx) % batch_size
            for b in range(0, n_full, batch_size):
                yield idx[b:b + batch_size], torch.from_numpy(idx[b:b + batch_size]), x[b:b + batch_size]
            idx, x = idx[n_full:], x[n_full:]
        if len(idx):
            yield idx, torch.from_numpy(idx), x


def fits_gpu(nbytes: int, device: torch.device, fraction: float = GPU_CACHE_FRACTION) -> bool:
    """Whether ``nbytes`` fit in ``fraction`` of the free memory of CUDA ``device``."""
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def autotune(device: torch.device, rows: int, full: int) -> None:
    """Let cuDNN time its kernels for full batches of ``full`` rows only (CUDA; a no-op elsewhere).

    The autotuner times every convolution once per new input shape (the bare ResNet-18 kernel
    spent ~4.5 s warming up per batch size on an H200).  Training's last batch of an epoch, a
    chunk's tail and a batch with invalid rows filtered out each bring a new shape; with scattered
    invalid rows nearly every eval batch would be one.  Odd shapes get cuDNN's heuristic choice
    instead.  Measured on the H200 at 100k rows (no invalid rows): subset training 25.1 -> 24.0 s.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = rows == full


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop with padding (1/8 of the size) and optional horizontal flip, per sample.

    The random draws come from the host generator ``gen`` (one stream on every device) and reach
    the device in one pinned, non-blocking copy; the flip is folded into the crop's column index.
    So a batch on the GPU costs no host-device synchronisation: a pageable copy or a boolean mask
    waits for the GPU to drain, and with two of each per step the host could not queue the next
    step while the GPU ran this one (the H200 was busy ~35 % of each ResNet-18 step).
    """
    if mode == "none" or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    across = torch.arange(w)
    if mode == "crop-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        across = torch.where(flip[:, None], across.flip(0)[None], across[None])
    index = torch.cat([dy[:, None] + torch.arange(h)[None], dx[:, None] + across], 1)
    if x.device.type == "cuda":
        index = index.pin_memory().to(x.device, non_blocking=True)
    rows, cols = index[:, :h], index[:, h:]
    padded = F.pad(x, (pad, pad, pad, pad))
    return padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# training ----------------------------------------------------------------------------------------
@dataclass
class _Dyn:
    logits: np.ndarray
    loss: np.ndarray


def _dyn_group(ws: Workspace, key: str, m: int, c: int, epochs: int, create: bool) -> zarr.Group:
    url = ws.path(key, "dynamics.zarr")
    store = storage.zarr_store(url, ws.storage_options)
    if not create:
        return zarr.open_group(store, mode="r+")
    g = zarr.open_group(store, mode="w")
    cm = max(1, min(m, (8 << 20) // max(1, 4 * c)))
    g.create_array("logits", shape=(epochs, m, c), chunks=(1, cm, c), dtype="float32", fill_value=np.nan)
    g.create_array("true_prob", shape=(epochs, m), chunks=(1, min(m, 1 << 20)), dtype="float32", fill_value=np.nan)
    g.create_array("correct", shape=(epochs, m), chunks=(1, min(m, 1 << 20)), dtype="bool", fill_value=False)
    g.create_array("loss", shape=(epochs, m), chunks=(1, min(m, 1 << 20)), dtype="float32", fill_value=np.nan)
    return g


def _write_epoch(g: zarr.Group, epoch: int, dyn: _Dyn, labels: np.ndarray, valid: np.ndarray) -> None:
    logits = dyn.logits
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    safe = np.where(valid, labels, 0)
    tp = np.where(valid, p[np.arange(len(labels)), safe], np.nan).astype(np.float32)
    correct = valid & (logits.argmax(axis=1) == labels)
    g["logits"][epoch] = np.where(valid[:, None], logits, np.nan).astype(np.float32)
    g["true_prob"][epoch] = tp
    g["correct"][epoch] = correct
    g["loss"][epoch] = np.where(valid, dyn.loss, np.nan).astype(np.float32)


def _eval_pass(model, data: SubsetData, labels_t: torch.Tensor, num_classes: int, device, attack, gen, amp: bool,
               batch_size: int = 1024) -> _Dyn:
    logits = np.full((data.m, num_classes), np.nan, np.float32)
    loss = np.full(data.m, np.nan, np.float32)
    parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []  # copied to the host once, not per batch

    def flush() -> None:
        if parts:
            rows = np.concatenate([p[0] for p in parts])
            logits[rows] = torch.cat([p[1] for p in parts]).cpu().numpy()
            loss[rows] = torch.cat([p[2] for p in parts]).cpu().numpy()
            parts.clear()

    model.eval()
    order = iter([np.arange(data.m)]) if data.in_memory else iter(
        [np.arange(s, min(data.m, s + data.chunk)) for s in range(0, data.m, data.chunk)])
    for idx, idx_t, xb in data.batches(order, batch_size):
        keep = data.valid[idx]
        if not keep.any():
            continue
        if not keep.all():  # invalid rows are rare: only then a (synchronising) host mask
            idx, keep_t = idx[keep], torch.from_numpy(keep).to(xb.device)
            xb, idx_t = xb[keep_t], idx_t[keep_t.to(idx_t.device)]
        xb = data.to_float(xb).to(device, non_blocking=True)
        yb = labels_t[idx_t.to(labels_t.device)].to(device, non_blocking=True)
        autotune(device, len(xb), batch_size)
        if attack is not None:
            xb = pgd(model, xb, yb, attack, generator=gen)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(_layout(xb, device)).float()
        parts.append((idx, out, F.cross_entropy(out, yb, reduction="none")))
        if len(parts) * batch_size >= 1 << 16:
            flush()
    flush()
    return _Dyn(logits, loss)


def _layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


RECALIBRATE_ROWS = 4096  # training inputs that BatchNorm's statistics are recomputed over after each epoch
RECALIBRATE_BYTES = 128 << 20  # and at most this much of them, as stored (uint8 images: 3 KiB a 32-px row)


class RecentInputs:
    """The inputs of an epoch's last training batches, as the model took them (augmented, attacked),
    at most ``rows`` rows and ``nbytes`` bytes: what :func:`recalibrate_bn` reads."""

    def __init__(self, rows: int = RECALIBRATE_ROWS, nbytes: int = RECALIBRATE_BYTES):
        self.rows, self.nbytes = rows, nbytes
        self.batches: collections.deque[torch.Tensor] = collections.deque()
        self._rows = self._bytes = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.untyped_storage().nbytes() > x.nelement() * x.element_size():
            x = x.clone()  # a streamed batch is a view of its whole block of chunks: keep only its rows
        self.batches.append(x)
        self._rows += len(x)
        self._bytes += x.nelement() * x.element_size()
        while len(self.batches) > 1 and (self._rows > self.rows or self._bytes > self.nbytes):
            old = self.batches.popleft()
            self._rows -= len(old)
            self._bytes -= old.nelement() * old.element_size()


def recalibrate_bn(model: torch.nn.Module, batches, to_input: Callable[[torch.Tensor], torch.Tensor],
                   device: torch.device, amp: bool) -> int:
    """Recompute every BatchNorm layer's running statistics over ``batches`` with the current weights
    (an equal-weight average over the batches, as in "precise BN"); returns the layers recomputed.

    Training updates the running statistics as a moving average over the last ~10 steps, taken
    while the weights moved.  With few steps per epoch (a small subset) they lag the weights so far
    that the eval-mode model, which uses them, is near chance: ResNet-18 on 818 rows at 64 px
    (7 steps an epoch, lr 0.05) gave eval losses of 1,529 / 3,855 / 510 after epochs 1-3 and
    accuracy 0.13 / 0.13 / 0.26 while it fitted its training batches; recomputed, 0.90 / 0.47 / 0.07
    and 0.76 / 0.75 / 1.0.  The eval pass, the saved model and hence the embeddings use them.
    Training is unchanged: in train mode BatchNorm normalises by the batch's own statistics.
    Other layers stay in eval mode (dropout draws nothing from the random streams).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats]
    if not layers or not batches:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for x in batches:
                model(_layout(to_input(x).to(device, non_blocking=True), device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


PROFILE_ENV = "STREAMPRUNE_PROFILE_STEPS"


class _StepProfiler:
    """With ``STREAMPRUNE_PROFILE_STEPS=N``: torch.profiler over N training steps of this run, after
    ``skip`` warm-up steps (ending early at the end of that epoch), written to ``<key>/profile.txt``:
    wall and device kernel time per step, the device's busy fraction, and the ops by self device and
    host time.

    A diagnostic for GPU efficiency (is the device waiting on the host, and for what?); off by
    default, and it changes no result.
    """

    def __init__(self, ws: Workspace, key: str, device: torch.device, skip: int = 10):
        self.n = max(0, int(os.environ.get(PROFILE_ENV, "0") or 0))
        self.ws, self.key, self.device, self.skip = ws, key, device, skip
        self.step, self.prof, self.t0 = 0, None, 0.0

    def tick(self) -> None:
        """Called before each training step."""
        if not self.n:
            return
        if self.step == self.skip:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            # Kineto leaves CUPTI attached after a trace unless TEARDOWN_CUPTI=1 (in some torch
            # versions), which slows every later kernel launch of the run being measured; a user's
            # own setting wins.  (Not measured here: the third GPU run's profiled training was
            # slower than the unprofiled one of the run before, on another machine.)
            os.environ.setdefault("TEARDOWN_CUPTI", "1")
            sync_device(self.device)
            self.prof, self.t0 = profile(activities=acts), time.perf_counter()
            self.prof.__enter__()
        elif self.step == self.skip + self.n:
            self.close()
        self.step += 1

    def close(self) -> None:
        """Stop and write (also when the epoch ended before N steps)."""
        if self.prof is None:
            return
        sync_device(self.device)
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        steps = max(1, self.step - self.skip)
        ka = self.prof.key_averages()
        head = profile_head(ka, wall, steps)
        tables = [ka.table(sort_by="self_cpu_time_total", row_limit=25)]
        if self.device.type == "cuda":
            tables.insert(0, ka.table(sort_by="self_device_time_total", row_limit=25))
        storage.write_bytes_atomic(self.ws.path(self.key, "profile.txt"), "\n\n".join([head, *tables]).encode(),
                                   self.ws.storage_options)
        log.info("%s profile: %s", self.key, head)
        self.prof, self.n = None, 0


def device_seconds(events) -> float:
    """Kernel seconds on the device in profiler ``events``, counted once: the kernels themselves
    (device events), not also the host ops that launched them (whose self device time is the same
    kernels again), and not user annotations; the rule of torch's own table total."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e6


def profile_head(events, wall: float, steps: int) -> str:
    """One line on ``steps`` profiled steps: wall, device kernel and host op time per step, and the
    device's busy fraction.  Host ops are the self CPU time of every profiled op in every thread
    (a background writer's too, and time blocked in a synchronising call), so they can overstate
    the training thread's own dispatch time."""
    kernel = device_seconds(events)
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    return (f"{steps} steps: {wall / steps * 1e3:.2f} ms per step (wall), device kernels "
            f"{kernel / steps * 1e3:.2f} ms per step ({kernel / max(wall, 1e-9):.0%} busy), host ops "
            f"{host / steps * 1e3:.2f} ms per step")


def sync_device(device: torch.device) -> None:
    """Wait for CUDA work queued on ``device`` (nothing to wait for elsewhere): for wall-clock timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ckpt_name(epoch: int) -> str:
    return f"ckpt-{epoch:04d}.pt"


def _host_copy(obj):
    """``obj`` with every tensor copied to host memory (a snapshot that training cannot change)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class _CheckpointWriter:
    """Epoch checkpoints (and each epoch's dynamics before its checkpoint) written by a background
    thread, one epoch at a time.

    The caller hands over a host snapshot (:func:`_host_copy`); serialising it (~90 MB for
    ResNet-18 with SGD momentum: 0.35–0.5 s per epoch on the CPU box) and the atomic write then
    overlap the next epoch.  A new checkpoint waits for the previous write, older checkpoints are
    removed after it, and :meth:`close` waits for the last one and re-raises a failed write (a full
    disk) in the training thread.  A run killed mid-write keeps the previous checkpoint (the write
    is atomic) and resumes from it: the epochs after it are trained again, deterministically.
    """

    def __init__(self, ckpt_dir: str, storage_options: dict):
        self.ckpt_dir, self.storage_options = ckpt_dir, storage_options
        self.background = OneBehind("streamprune-ckpt")

    def save(self, epoch: int, snapshot: dict | None, before: Callable[[], None] | None = None) -> None:
        """Write ``snapshot`` as epoch ``epoch``'s checkpoint (None: no checkpoint), after
        ``before()`` (the epoch's dynamics: a checkpoint on disk means its epoch's dynamics are too)."""
        self.background.submit(self._write, epoch, snapshot, before)

    def _write(self, epoch: int, snapshot: dict | None, before: Callable[[], None] | None = None) -> None:
        if before is not None:
            before()
        if snapshot is None:
            return
        _save(storage.join(self.ckpt_dir, _ckpt_name(epoch)), snapshot, self.storage_options)
        for old in ckpts_before(self.ckpt_dir, epoch, self.storage_options):
            storage.remove(storage.join(self.ckpt_dir, old), self.storage_options)

    def close(self) -> None:
        self.background.close()


def _save(url: str, obj: dict, storage_options: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(url, buf.getvalue(), storage_options)


def load_torch(url: str, storage_options: dict | None = None) -> dict:
    """A checkpoint the workspace holds (a model, a resume point), on the CPU; a damaged one is one line."""
    data = storage.read_bytes(url, storage_options)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds (zip, pickle, EOF) for damaged files
        first = (str(exc).splitlines() or [""])[0].split(". ")[0]  # torch adds sentences of advice
        raise StreamPruneError(f"{url} is damaged or not a checkpoint ({type(exc).__name__}: {first}); remove it "
                               "(and re-run the stage that wrote it, with --force) or use a new workspace") from None


@releases_leases
def train(workspace: str | Workspace, cfg: TrainConfig, decode: DecodeConfig, *, full: bool = False,
          replica: int = 0, on_error: str = "fail", scheduler: str | None = "local", force: bool = False,
          storage_options: dict | None = None) -> dict:
    """Train on the subset (or on all rows with ``full``) and record per-epoch dynamics.

    ``replica`` N ≥ 1 (with ``full``) is another full-data run with training seed ``cfg.seed + N``
    on ``train-full``'s decoded cache: the references' own run-to-run spread, for ``evaluate``.
    """
    from streamprune.subset import subset_rows

    check_label_source(cfg, decode)
    pseudo_k = _pseudo_k(cfg.labels)
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    key = train_key(full, replica)
    cat_m = ws.require("catalog", key)
    inputs = {"catalog": cat_m["fingerprint"]}
    if not full:
        inputs["subset"] = ws.require("subset", key)["fingerprint"]
    if replica:
        inputs["train-full"] = ws.require("train-full", key)["fingerprint"]
        cfg = replace(cfg, seed=cfg.seed + replica)
    config = {"train": cfg.fingerprint_dict(), "decode": decode.to_dict(), "on_error": on_error}
    run = ws.begin("train", config, inputs, force=force, key=key, check=lambda: resolve_device(cfg.device))
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    rows = np.arange(cat_m["counts"]["n_samples"], dtype=np.int64) if full else subset_rows(ws)
    if len(rows) == 0:
        raise StreamPruneError(f"{key}: no rows to train on")
    if pseudo_k and decode.label_key != "none":
        decode = DecodeConfig(**{**decode.to_dict(), "label_key": "none"})
    cache_key = "train-full" if replica else key
    if not replica:
        build_cache(ws, run, key, rows, decode, on_error, scheduler, cfg.chunk_rows,
                    None if pseudo_k else cfg.num_classes)
    t_cache = time.time() - t0

    device = resolve_device(cfg.device)
    data = SubsetData(ws, cache_key, cfg.memory_budget, device=device)
    labels = data.labels.copy()
    extra: dict = {}
    if pseudo_k and replica:  # the same pseudo-labels as the run it replicates
        labels = load_labels(ws, "train-full")
        data.labels = labels
        extra["pseudo_k"] = pseudo_k
    elif pseudo_k:
        from streamprune.pseudo import kmeans

        vecs = data.to_float(torch.from_numpy(data.x_arr[:])).reshape(data.m, -1).numpy()
        plabels, centroids = kmeans(vecs[data.valid], pseudo_k, seed=cfg.seed)
        labels = np.full(data.m, -1, np.int64)
        labels[data.valid] = plabels
        _save(ws.path(key, "pseudo.pt"), {"centroids": torch.from_numpy(centroids), "k": pseudo_k}, ws.storage_options)
        data.labels = labels
        extra["pseudo_k"] = pseudo_k
    num_classes = pseudo_k or cfg.num_classes or int(labels[data.valid].max()) + 1
    if num_classes < 2:
        raise StreamPruneError(f"{key}: found only {num_classes} class among the labels; need at least 2")
    with _deterministic_on(device):
        result = _fit(ws, run, key, cfg, data, labels, num_classes, device)
    n_valid = int(data.valid.sum())
    return run.commit(
        outputs={"cache": f"{cache_key}/cache.zarr", "dynamics": f"{key}/dynamics.zarr", "model": f"{key}/model.pt"},
        counts={"n_rows": len(rows), "n_valid": n_valid, "epochs": cfg.epochs, "num_classes": num_classes,
                "sample_epochs": n_valid * cfg.epochs, **extra},
        timings={"cache_s": round(t_cache, 3), "train_s": round(result["train_s"], 3),
                 "samples_per_s": round(n_valid * cfg.epochs / max(result["train_s"], 1e-9), 1),
                 # the training steps and the per-epoch eval passes (dynamics="eval") of the epochs this
                 # invocation ran (epochs_run: fewer after a resume), each waited for on the device
                 "steps_s": result["steps_s"], "eval_s": result["eval_s"], "epochs_run": result["epochs_run"],
                 "device": result["device"], "in_memory": data.in_memory, "gpu_cache": data.on_gpu})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, n_train: int):
    """SGD (Nesterov) or AdamW with a cosine schedule over all steps of the run.

    On CUDA the fused implementation (one kernel launch for every parameter's update, against
    about ten multi-tensor launches and their host dispatch for the default): a step of ResNet-18
    at 32 px is ~10 ms on an H100/H200 and the host's dispatch was its bound.  Elsewhere the
    default, as before (bitwise-reproducible CPU runs)."""
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    fused = {"fused": True} if _on_cuda(model) else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=True, **fused)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, **fused)
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict, fused: bool) -> None:
    """Load a checkpoint's optimizer state with this run's implementation (fused on CUDA, the
    default elsewhere), whatever wrote it.  The saved groups say which before loading: torch moves
    AdamW's ``step`` counters to the parameters' device only for a fused (or capturable) group, and
    a fused step over counters left on the host fails.

    Each per-parameter state tensor then takes its parameter's strides.  Loading keeps the saved
    layout, and a CPU run's contiguous momentum loaded for a channels_last model on CUDA would
    otherwise reach the fused kernels, which walk parameter and state as flat memory: the update
    would add each element's momentum to another element."""
    groups = [{**g, "fused": True if fused else None, "foreach": None} for g in saved["param_groups"]]
    opt.load_state_dict({**saved, "param_groups": groups})
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def fit_and_predict(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, cfg: TrainConfig, num_classes: int,
                    seed: int) -> np.ndarray:
    """Train a fresh model on in-memory (x, y) and return its test-set logits (evaluation runs)."""
    device = resolve_device(cfg.device)
    amp = device.type == "cuda"
    torch.manual_seed(seed)
    is_image = x.dim() == 4
    scale = (lambda t: t.float().div_(255.0)) if x.dtype == torch.uint8 else (lambda t: t.float())
    model = build_model(cfg.model, tuple(x.shape[1:]), num_classes, **cfg.model_kwargs).to(device)
    opt, sched = make_optimizer(model, cfg, len(x))
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        recent = RecentInputs()
        for b in range(0, len(x), cfg.batch_size):
            idx = perm[b:b + cfg.batch_size]
            xb = augment_batch(scale(x[idx]), cfg.augment if is_image else "none", gen).to(device)
            recent.add(xb)
            autotune(device, len(idx), cfg.batch_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(_layout(xb, device))
            loss = F.cross_entropy(out.float(), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    recalibrate_bn(model, recent.batches, lambda t: t, device, amp)
    model.eval()
    outs = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for b in range(0, len(x_test), 1024):
            autotune(device, len(x_test[b:b + 1024]), 1024)
            outs.append(model(_layout(scale(x_test[b:b + 1024]).to(device), device)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, num_classes), np.float32)


@contextlib.contextmanager
def _deterministic_on(device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms for a CPU run (a resumed run equals an uninterrupted one,
    bit for bit), then the caller's setting again: the switch is process-wide."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _rng_state(device: torch.device) -> dict:
    """The random streams a checkpoint carries: the host generator (dropout on the CPU, and the
    seeds of everything drawn there) and, on a CUDA device, its generator (dropout there)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`_rng_state` saved; a checkpoint of a CPU run (no CUDA stream) resumed on
    a GPU keeps the stream the run's seed set."""
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _fit(ws: Workspace, run: StageRun, key: str, cfg: TrainConfig, data: SubsetData, labels: np.ndarray,
         num_classes: int, device: torch.device) -> dict:
    amp = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.shape, num_classes, **cfg.model_kwargs).to(device)
    if device.type == "cuda" and data.is_image:
        model = model.to(memory_format=torch.channels_last)
    opt, sched = make_optimizer(model, cfg, int(data.valid.sum()))
    attack = parse_attack(cfg.adversarial, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size,
                          clamp=(0.0, 1.0) if data.is_image else None)
    labels_t = torch.from_numpy(np.where(labels < 0, 0, labels))
    if data.on_gpu:
        labels_t = labels_t.to(device)
    ckpt_dir = storage.join(ws.path("_stages", key, run.fingerprint[:16]), "ckpt")

    start_epoch = 0
    ckpts = sorted(n for n in storage.listdir(ckpt_dir, ws.storage_options) if n.startswith("ckpt-"))
    if ckpts:
        state = load_torch(storage.join(ckpt_dir, ckpts[-1]), ws.storage_options)
        model.load_state_dict(state["model"])
        load_optimizer_state(opt, state["opt"], _on_cuda(model))
        sched.load_state_dict(state["sched"])
        _set_rng_state(state, device)
        start_epoch = state["epoch"] + 1
        g = _dyn_group(ws, key, data.m, num_classes, cfg.epochs, create=False)
        log.info("%s: resuming after epoch %d", key, start_epoch - 1)
    else:
        g = _dyn_group(ws, key, data.m, num_classes, cfg.epochs, create=True)

    t0 = time.time()
    bar = tqdm(total=cfg.epochs, initial=start_epoch, desc=f"{key} epochs", unit="epoch",
               disable=os.environ.get("STREAMPRUNE_PROGRESS", "1") == "0")
    writer = _CheckpointWriter(ckpt_dir, ws.storage_options)
    profiler = _StepProfiler(ws, key, device)
    # training steps, and eval passes with BatchNorm's recomputed statistics, summed over this run's epochs
    parts_s = {"steps_s": 0.0, "eval_s": 0.0}
    last_ckpt = time.time()
    n_rows = int(data.valid.sum())  # an epoch's rows
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.time()
            gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
            model.train()
            train_logits = np.full((data.m, num_classes), np.nan, np.float32) if cfg.dynamics == "train" else None
            train_loss = np.full(data.m, np.nan, np.float32) if cfg.dynamics == "train" else None
            seen = 0
            recent = RecentInputs()
            for idx, idx_t, xb in data.batches(data.train_order(gen), cfg.batch_size):
                profiler.tick()
                stored = augment_batch(xb, cfg.augment, gen)
                xb = data.to_float(stored).to(device, non_blocking=True)
                yb = labels_t[idx_t.to(labels_t.device)].to(device, non_blocking=True)
                autotune(device, len(idx), cfg.batch_size)
                if attack is not None:
                    xb = pgd(model, xb, yb, attack, generator=gen)
                if n_rows - seen <= recent.rows:  # the epoch's last rows; uint8 images as stored (a quarter of float32)
                    recent.add(stored if attack is None else xb)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(_layout(xb, device))
                loss_each = F.cross_entropy(out.float(), yb, reduction="none")
                opt.zero_grad(set_to_none=True)
                loss_each.mean().backward()
                opt.step()
                sched.step()
                seen += len(idx)
                if train_logits is not None:
                    train_logits[idx] = out.detach().float().cpu().numpy()
                    train_loss[idx] = loss_each.detach().cpu().numpy()
            profiler.close()
            sync_device(device)  # once per epoch: the split of the epoch's time below
            t_steps = time.time()
            parts_s["steps_s"] += t_steps - t_epoch
            recalibrate_bn(model, recent.batches, data.to_float if attack is None else (lambda t: t), device, amp)
            del recent
            if cfg.dynamics == "train":
                dyn = _Dyn(train_logits, train_loss)
            else:
                dyn = _eval_pass(model, data, labels_t, num_classes, device, attack, gen, amp)
                parts_s["eval_s"] += time.time() - t_steps  # its outputs are on the host: nothing queued
            # The epoch's dynamics, then (when due) its checkpoint, written while the next epoch trains.
            # Checkpoints are timed, not per epoch: a snapshot copies ~90 MB off the GPU, and
            # serialising and writing it (0.35-0.5 s on the CPU box) runs in a thread that shares the
            # interpreter with this loop, against ~0.8 s of training per epoch at 20k rows on an
            # H200; a resumed run re-trains the epochs after the last checkpoint.
            due = epoch == cfg.epochs - 1 or time.time() - last_ckpt >= cfg.checkpoint_seconds
            snapshot = _host_copy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                   **_rng_state(device), "epoch": epoch}) if due else None
            writer.save(epoch, snapshot, before=lambda epoch=epoch, dyn=dyn: _write_epoch(g, epoch, dyn, labels, data.valid))
            if due:
                last_ckpt = time.time()
            bar.update(1)
            bar.set_postfix(loss=f"{np.nanmean(dyn.loss):.3f}", acc=f"{float((dyn.logits.argmax(1) == labels)[data.valid].mean()):.3f}")
    except BaseException:
        try:
            writer.close()  # the checkpoints written so far are on disk: the resume starts from them
        except Exception as exc:  # noqa: BLE001 - the training error is the one to report
            log.warning("%s: a checkpoint write failed too: %s", key, exc)
        raise
    writer.close()  # the last checkpoint is on disk (or its error raised) before the model
    bar.close()
    train_s = time.time() - t0
    _save(ws.path(key, "model.pt"), {"spec": model_spec(model), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                                     "input_shape": list(data.shape), "num_classes": num_classes,
                                     "is_image": data.is_image}, ws.storage_options)
    storage.write_bytes_atomic(ws.path(key, "labels.npy"), _npy(labels), ws.storage_options)
    return {"train_s": train_s, "device": str(device), "epochs_run": cfg.epochs - start_epoch,
            **{k: round(v, 3) for k, v in parts_s.items()}}


def ckpts_before(ckpt_dir: str, epoch: int, storage_options: dict) -> list[str]:
    """Checkpoints older than ``epoch`` (only the latest is kept)."""
    return [n for n in storage.listdir(ckpt_dir, storage_options)
            if n.startswith("ckpt-") and n.endswith(".pt") and int(n[5:9]) < epoch]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def load_model(ws: Workspace, key: str = "train") -> tuple[torch.nn.Module, dict]:
    """The trained model of stage ``key`` (eval mode, CPU) and its metadata."""
    ws.require(key, "load model")
    state = load_torch(ws.path(key, "model.pt"), ws.storage_options)
    model = build_from_spec(state["spec"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state


def load_labels(ws: Workspace, key: str = "train") -> np.ndarray:
    """Labels used for training (true or pseudo), aligned with the trained rows; -1 = invalid."""
    return np.load(io.BytesIO(storage.read_bytes(ws.path(key, "labels.npy"), ws.storage_options)))
