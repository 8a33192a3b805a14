"""The chunked embedding pass: every sample to ``embeddings.zarr``, in parallel and resumable.

Built as four pieces (after clip-retrieval's ``clip_inference``):

* **reader** — :func:`streamprune.decode_tasks.decode_range` (over :func:`streamprune.decode.decode_rows`)
  reads a chunk's rows by byte range (catalog offsets) and decodes them, so any chunk can be
  recomputed alone;
* **mapper** — :class:`Encoder` turns decoded inputs into vectors (the subset-trained model's
  penultimate layer, the sample's own ``.npy`` features, or a user factory);
* **writer** — :func:`write_chunk` stores a chunk's rows of ``emb``, ``labels`` and ``valid``;
* **runner** — :func:`embed` plans one task per chunk of ``chunk_rows`` rows (the zarr chunk
  size, so each task owns whole chunks), runs them with dask and records finished chunks.

``chunk_rows`` defaults to :func:`default_chunk_rows`: at least ~1 MB of output and 4096 rows per
task, fewer when a ``memory_limit`` per worker says a task's working set would not fit.  A task
killed with its worker is re-run by dask (a retry rewrites whole chunks, so it cannot corrupt
them); a full disk stops the stage with one line and leaves the failed chunk unrecorded.

Batches always start at chunk boundaries and have a fixed size, and torch runs with a fixed
thread count, so float32 embeddings on CPU are bitwise identical whatever the number of workers
and across a kill and resume.  On CUDA the encoder runs in bf16 autocast with channels_last
images, batches of at least ``GPU_MIN_BATCH`` rows, and uint8 images are scaled on the GPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import zarr

from streamprune import storage
from streamprune.compute import OneBehind, chunk_rows_for, disk_errors, map_tasks, parse_memory
from streamprune.decode import DecodeConfig, decode_rows
from streamprune.decode_tasks import decode_range
from streamprune.errors import SampleError, StreamPruneError, check_whole
from streamprune.leases import releases_leases
from streamprune.shards import Catalog, ErrorPolicy
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)

MIN_CHUNK_ROWS = 64  # a memory limit never shrinks a task below this

_ENCODERS: dict[tuple, "Encoder"] = {}  # one loaded model per worker process and configuration
GPU_MIN_BATCH = 1024  # rows per forward pass on CUDA (small batches leave the GPU idle)


class Encoder:
    """Maps decoded inputs (uint8 images or float vectors) to embedding vectors."""

    def __init__(self, ws: Workspace, kind: str, normalize: bool, device: str, threads: int | None,
                 input_shape: tuple[int, ...]):
        from streamprune.train import load_model, resolve_device

        self.kind = kind
        self.normalize = normalize
        self.device = resolve_device(device)
        self.threads = threads
        self.model = None
        self.seconds = {"queue_s": 0.0, "wait_s": 0.0}
        if kind == "subset":
            self.model, meta = load_model(ws, "train")
            if tuple(meta["input_shape"]) != tuple(input_shape):
                raise StreamPruneError(f"embed: samples decode to shape {tuple(input_shape)} but the subset model "
                                       f"was trained on {tuple(meta['input_shape'])}")
        elif kind != "features":
            from streamprune.models import build_model

            with torch.random.fork_rng(devices=[]):  # one network in every worker process, whatever its RNG state
                torch.manual_seed(0)
                self.model = build_model(kind, input_shape, num_classes=2)
            self.model.eval()
        if self.model is not None:
            self.model.to(self.device)
            if self.device.type == "cuda" and len(input_shape) == 3:
                self.model.to(memory_format=torch.channels_last)

    def __call__(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Embeddings (n, D) float32 of inputs (n, ...); on CUDA copied back once per call, not per batch."""
        return self.submit(x, batch_size).result()

    def submit(self, x: np.ndarray, batch_size: int) -> "Pending":
        """Start encoding ``x``; :meth:`Pending.result` gives the embeddings.

        On CUDA the chunk goes to the device in one pinned copy, its forwards and the copy of the
        outputs back into pinned host memory are queued, and nothing waits for the device: the
        caller can take the next chunk while the GPU runs this one.  Elsewhere the embeddings are
        computed here.
        """
        if self.kind == "features":
            return Pending(x.reshape(len(x), -1).astype(np.float32), normalize=self.normalize)
        if self.threads:  # None: leave the calling process's thread count alone
            torch.set_num_threads(self.threads)
        from streamprune.train import autotune

        cuda = self.device.type == "cuda"
        if cuda:
            batch_size = max(batch_size, GPU_MIN_BATCH)
        t0 = time.perf_counter()
        parts = []
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            xt = torch.from_numpy(np.ascontiguousarray(x))
            if cuda:  # copy as stored (uint8: a quarter of float32), convert on the GPU
                xt = xt.pin_memory().to(self.device, non_blocking=True)
            else:  # the CPU, or another accelerator (computed here, as before the CUDA queueing)
                xt = xt.to(self.device)
            for b in range(0, len(x), batch_size):
                xb = xt[b:b + batch_size]
                xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
                if cuda and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                autotune(self.device, len(xb), batch_size)
                parts.append(self.model.embed(xb).float())
        out = torch.cat(parts) if parts else torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        if not cuda:
            self.seconds["queue_s"] += time.perf_counter() - t0
            return Pending(out.cpu().numpy(), normalize=self.normalize)
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        # Host time queuing the copies and forwards, against time blocked on the device for the
        # outputs (Pending.result): which of the two bounds the encoder.
        self.seconds["queue_s"] += time.perf_counter() - t0
        return Pending(host, done, self.normalize, self.seconds)

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim) if self.model is not None else -1


class Pending:
    """An encoder's output for one chunk, finished (an array) or queued on the device (a pinned host
    tensor and the event after its copy)."""

    def __init__(self, out, event=None, normalize: bool = False, seconds: dict | None = None):
        self._out, self._event, self._normalize, self._seconds = out, event, normalize, seconds
        self._array: np.ndarray | None = None

    def result(self) -> np.ndarray:
        """The (n, D) float32 embeddings, waiting for the device if needed (without holding the GIL)."""
        if self._array is None:
            out = self._out
            if self._event is not None:
                t0 = time.perf_counter()
                self._event.synchronize()
                if self._seconds is not None:
                    self._seconds["wait_s"] += time.perf_counter() - t0
                out = out.numpy()
            if self._normalize and len(out):
                out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
            self._array, self._out = out, None
        return self._array


def _encoder(ws: Workspace, fp: str, kind: str, normalize: bool, device: str, threads: int,
             input_shape: tuple) -> Encoder:
    key = (ws.url, fp, kind, normalize, device, threads, tuple(input_shape))
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = Encoder(ws, kind, normalize, device, threads, input_shape)
    return _ENCODERS[key]


def write_chunk(group: zarr.Group, r0: int, emb: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> None:
    """Writer: one chunk's rows of emb/labels/valid (the caller owns these chunks)."""
    group["emb"][r0:r0 + len(labels)] = emb
    group["labels"][r0:r0 + len(labels)] = labels
    group["valid"][r0:r0 + len(labels)] = valid


def _embed_task(ws: Workspace, fp: str, r0: int, r1: int, spec: dict) -> dict:
    decoded = decode_range(ws, r0, r1, spec)
    enc = _encoder(ws, fp, spec["encoder"], spec["normalize"], spec["device"], spec["threads"],
                   tuple(spec["input_shape"]))
    return encode_and_write(ws, enc, decoded, spec)


def encode_and_write(ws: Workspace, enc: Encoder, decoded: dict, spec: dict) -> dict:
    """Mapper + writer of one chunk decoded by :func:`~streamprune.decode_tasks.decode_range`."""
    return write_encoded(ws, encode_chunk(ws, enc, decoded, spec), spec)


def encode_chunk(ws: Workspace, enc: Encoder, decoded: dict, spec: dict) -> dict:
    """Mapper of one decoded chunk: embeddings, the NaN check, pseudo-labels (nothing written)."""
    return finish_chunk(ws, start_chunk(enc, decoded, spec), spec)


def start_chunk(enc: Encoder, decoded: dict, spec: dict) -> dict:
    """Queue the encoding of a decoded chunk (see :meth:`Encoder.submit`); :func:`finish_chunk` ends it."""
    x, valid = decoded["x"], decoded["valid"]
    t0 = time.perf_counter()
    if valid.all():  # the usual chunk: no gather of the inputs, no scatter of the outputs (~12 MB each)
        pending = enc.submit(x, spec["batch_size"]) if len(valid) else None
    else:
        pending = enc.submit(x[valid], spec["batch_size"]) if valid.any() else None
    return {**decoded, "pending": pending, "start_s": time.perf_counter() - t0}


def finish_chunk(ws: Workspace, started: dict, spec: dict) -> dict:
    """The embeddings of a chunk from :func:`start_chunk`, checked for NaN, with pseudo-labels."""
    r0, x, labels, valid = started["r0"], started["x"], started["labels"], started["valid"]
    handler = ErrorPolicy(spec["on_error"], stage="embed")
    handler.records = list(started["errors"])  # the reader's reports come first
    rows = np.arange(r0, r0 + len(labels), dtype=np.int64)
    t0 = time.perf_counter()
    pending = started["pending"]
    if valid.all():
        emb = pending.result() if pending is not None else np.zeros((0, spec["dim"]), np.float32)
    else:
        emb = np.zeros((len(rows), spec["dim"]), np.float32)
        if pending is not None:
            emb[valid] = pending.result()
    t_encode = started["start_s"] + time.perf_counter() - t0
    with np.errstate(over="ignore"):  # checked as stored: float16 overflows to inf beyond 65504 (reported below)
        emb = emb.astype(spec["dtype"], copy=False)
    bad = valid & ~np.isfinite(emb).all(axis=1)
    cat = Catalog(ws) if bad.any() else None  # only to name the shard and key of a bad row
    for i in np.flatnonzero(bad):
        shard = cat.urls[int(cat.shard_of([rows[i]])[0])]
        what = "embedding contains NaN/inf" + (" as float16" if spec["dtype"] == "float16" else "")
        handler.handle(SampleError(what, shard, str(cat.keys([rows[i]])[0]), reason="nan"))
    valid &= ~bad
    if not valid.all():
        emb[~valid] = 0
        labels = np.where(valid, labels, -1)
    if spec["pseudo"] is not None:
        from streamprune.pseudo import assign

        centroids = np.asarray(spec["pseudo"], np.float32)
        flat = x.reshape(len(x), -1).astype(np.float32)
        if x.dtype == np.uint8:  # as training clustered them: images scaled to [0, 1]
            flat /= 255.0
        labels = np.where(valid, assign(flat, centroids), -1) if len(flat) else labels
    return {"r0": r0, "emb": emb, "labels": labels, "valid": valid, "errors": handler.records,
            "encode_s": t_encode}


def write_encoded(ws: Workspace, encoded: dict, spec: dict) -> dict:
    """Writer of one encoded chunk (:func:`encode_chunk`) into embeddings.zarr; the chunk's record."""
    r0, emb, labels, valid = encoded["r0"], encoded["emb"], encoded["labels"], encoded["valid"]
    r1 = r0 + len(labels)
    url = ws.path("embeddings.zarr")
    t0 = time.perf_counter()
    with disk_errors(f"embed: rows {r0}-{r1}"):
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="r+")
        write_chunk(group, r0, emb, labels, valid)
    return {"n": len(labels), "n_valid": int(valid.sum()), "errors": encoded["errors"],
            "encode_s": encoded["encode_s"], "write_s": time.perf_counter() - t0}


def task_row_bytes(input_bytes: int, raw_bytes: int, dim: int) -> int:
    """Working-set bytes per row of an embed task: encoded sample, decoded input twice, ~4 float32 rows."""
    return int(raw_bytes) + 2 * int(input_bytes) + 16 * int(dim)


def default_chunk_rows(dim: int, itemsize: int, row_bytes: int = 0, memory_limit: int | None = None) -> int:
    """Rows per embed task: a power of two with >= ~1 MB of output and >= 4096 rows, shrunk to a memory limit."""
    rows = max(4096, 1 << math.ceil(math.log2(max(1, (1 << 20) // max(1, dim * itemsize)))))
    if memory_limit:
        rows = chunk_rows_for(memory_limit, max(1, row_bytes), floor=min(MIN_CHUNK_ROWS, rows), cap=rows)
    return rows


def _probe(cat: Catalog, decode: DecodeConfig, on_error: str, n: int) -> tuple[tuple, np.dtype]:
    handler = ErrorPolicy(on_error, stage="embed")
    for start in range(0, n, 64):
        x, _, valid = decode_rows(cat, np.arange(start, min(n, start + 64)), decode, handler, None)
        if valid.any():
            return tuple(x.shape[1:]), x.dtype
    raise StreamPruneError("embed: no decodable sample in the catalog")


@releases_leases
def embed(workspace: str | Workspace, *, encoder: str = "subset", dtype: str = "float32", batch_size: int = 256,
          chunk_rows: int | None = None, normalize: bool = False, decode: DecodeConfig | None = None,
          device: str = "auto", threads: int = 1, on_error: str = "fail", scheduler: str | None = "local",
          force: bool = False, storage_options: dict | None = None, memory_limit: str | int | None = None,
          encode: str = "auto") -> dict:
    """Embed every catalogued sample into ``embeddings.zarr`` (N, D) with labels and a valid mask.

    ``memory_limit`` (per worker, e.g. "4GiB") caps the local cluster's workers and, when
    ``chunk_rows`` is not given, shrinks the default chunk so that a task fits it.  ``encode``:
    where the model runs: "workers" (each task decodes, encodes and writes its chunk), "client"
    (tasks decode; this process encodes and writes each chunk as it arrives) or "auto" (client
    for a model on CUDA with local tasks, see :func:`encode_in_client`).
    """
    if encode not in ENCODE:
        raise StreamPruneError(f"embed: encode must be one of {', '.join(ENCODE)}, not {encode!r}")
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    with disk_errors("embed"):
        return _embed(ws, encoder=encoder, dtype=dtype, batch_size=batch_size, chunk_rows=chunk_rows,
                      normalize=normalize, decode=decode, device=device, threads=threads, on_error=on_error,
                      scheduler=scheduler, force=force, memory_limit=parse_memory(memory_limit), encode=encode)


def check_embed_options(*, encoder: str, dtype: str, batch_size: int, chunk_rows: int | None, threads: int | None,
                        name: Callable[[str], str] = lambda flag: f"--{flag}") -> None:
    """Refuse embed's options before anything runs; ``name`` spells an option's name for the message
    (a flag here, a configuration key for ``run``)."""
    if dtype not in ("float16", "float32"):
        raise StreamPruneError(f"{name('dtype')} must be float16 or float32, not {dtype!r}")
    from streamprune.models import check_model_name

    for flag, value, optional, least in (("batch-size", batch_size, False, 1), ("chunk-rows", chunk_rows, True, 1),
                                         ("threads", threads, True, 0)):  # --threads 0: torch's own count
        if not (value is None and optional):
            check_whole(value, name(flag), least)
    check_model_name(encoder, what="encoder", others=("subset", "features"))


def _embed(ws: Workspace, *, encoder: str, dtype: str, batch_size: int, chunk_rows: int | None, normalize: bool,
           decode: DecodeConfig | None, device: str, threads: int, on_error: str, scheduler: str | None,
           force: bool, memory_limit: int | None, encode: str = "auto") -> dict:
    check_embed_options(encoder=encoder, dtype=dtype, batch_size=batch_size, chunk_rows=chunk_rows, threads=threads)
    batch_size, chunk_rows = int(batch_size), None if chunk_rows is None else int(chunk_rows)  # numpy ints too
    ErrorPolicy(on_error)
    cat_m = ws.require("catalog", "embed")
    inputs = {"catalog": cat_m["fingerprint"]}
    pseudo = None
    if encoder == "subset":
        train_m = ws.require("train", "embed")
        inputs["train"] = train_m["fingerprint"]
        if decode is None:
            decode = DecodeConfig(**train_m["config"]["decode"])
        if train_m["counts"].get("pseudo_k"):
            pseudo = _load_pseudo(ws)
    decode = decode or DecodeConfig()
    # Pseudo-labels replace the samples' labels: read none, as training did (a sample without one is valid).
    read = replace(decode, label_key="none") if pseudo is not None else decode
    n = int(cat_m["counts"]["n_samples"])
    cat = Catalog(ws)
    input_shape, in_dtype = _probe(cat, read, on_error, n)
    probe_enc = Encoder(ws, encoder, normalize, device, threads, input_shape)
    dim = probe_enc.dim if probe_enc.dim > 0 else int(np.prod(input_shape))
    if encoder == "features" and len(input_shape) != 1:
        raise StreamPruneError("embed --encoder features needs samples with an .npy vector (use --input vector)")
    config = {"encoder": encoder, "dtype": dtype, "normalize": normalize, "decode": decode.to_dict(),
              "chunk_rows": chunk_rows, "batch_size": batch_size, "threads": threads, "on_error": on_error}
    if chunk_rows is None:
        input_bytes = int(np.prod(input_shape)) * np.dtype(in_dtype).itemsize
        raw_bytes = int(cat.shards["size"].sum()) // max(1, n)
        row_bytes = task_row_bytes(input_bytes, raw_bytes, dim)
        config["chunk_rows"] = _kept_chunk_rows(ws, config) or default_chunk_rows(
            dim, np.dtype(dtype).itemsize, row_bytes, memory_limit)
        if memory_limit and config["chunk_rows"] * row_bytes > memory_limit:
            log.warning("embed: %d rows of ~%d bytes per task exceed --memory-limit %d bytes",
                        config["chunk_rows"], row_bytes, memory_limit)
    chunk_rows = int(config["chunk_rows"])
    run = ws.begin("embed", config, inputs, force=force)
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    url = ws.path("embeddings.zarr")
    layout = run.layout("layout", url)
    if layout is None:
        group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="w")
        group.create_array("emb", shape=(n, dim), chunks=(chunk_rows, dim), dtype=dtype, fill_value=0,
                           compressors=None)
        group.create_array("labels", shape=(n,), chunks=(chunk_rows,), dtype="int64", fill_value=-1)
        group.create_array("valid", shape=(n,), chunks=(chunk_rows,), dtype="bool", fill_value=False)
        group.attrs.update({"encoder": encoder, "dim": dim, "input_shape": list(input_shape)})
        run.mark_chunk("layout", {"dim": dim})
    done = run.done_chunks()
    todo = [c for c in range(math.ceil(n / chunk_rows)) if str(c) not in done]
    spec = {"on_error": on_error, "decode": read.to_dict(), "input_shape": list(input_shape), "encoder": encoder,
            "normalize": normalize, "device": device, "threads": threads, "dim": dim, "batch_size": batch_size,
            "dtype": dtype, "pseudo": pseudo}

    busy = {"encode_s": 0.0, "write_s": 0.0, "client_s": 0.0}  # summed over chunks (over workers: CPU seconds)

    def _record(i: int, result: dict) -> None:
        busy["encode_s"] += result.get("encode_s", 0.0)
        busy["write_s"] += result.get("write_s", 0.0)
        run.mark_chunk(todo[i], {"n": result["n"], "n_valid": result["n_valid"]}, errors=result["errors"])

    bounds = [(c * chunk_rows, min(n, (c + 1) * chunk_rows)) for c in todo]
    weights = [r1 - r0 for r0, r1 in bounds]
    in_client = encode_in_client(encode, probe_enc, scheduler)
    if in_client:
        # Workers decode; this process encodes each chunk as it arrives, on its one GPU, and writes it.
        client_enc = probe_enc
        client_enc.threads = None  # this process's torch thread count is not the task's to set

        # This thread queues each chunk's encoding (on CUDA: copies and forwards, nothing waited
        # for); a background thread waits for its outputs, checks them, writes the chunk (~20 ms
        # for 4096 x 512 float32 on the CPU box) and records it, while this one takes the next
        # chunk.  A chunk is recorded only after its write, so a run killed in between re-does it.
        writer = OneBehind("streamprune-embed-write")

        def _finish_write_record(i: int, started: dict) -> None:
            encoded = finish_chunk(ws, started, spec)
            with disk_errors("embed"):
                _record(i, write_encoded(ws, encoded, spec))

        def _encode_record(i: int, decoded: dict) -> None:
            t0 = time.perf_counter()
            started = start_chunk(client_enc, decoded, spec)
            busy["client_s"] += time.perf_counter() - t0
            writer.submit(_finish_write_record, i, started)  # waits for the previous chunk's write

        # Two chunks per worker in flight: decoded chunks wait for this process on the workers, so
        # without a bound an encoder slower than the decoders would hold all N rows there (host
        # RSS at 1M rows was +39 % over 100k on the GPU host, the other stages -11 to +6 %).
        try:
            map_tasks(decode_range, [(ws, r0, r1, spec) for r0, r1 in bounds], scheduler=scheduler, desc="embed",
                      unit="row", memory_limit=memory_limit, weights=weights, on_result=_encode_record,
                      inflight_per_worker=2)
        except BaseException:
            writer.close(quiet=True)  # the pending write finishes (and is recorded) or fails quietly
            raise
        writer.close()
    else:
        map_tasks(_embed_task, [(ws, run.fingerprint, r0, r1, spec) for r0, r1 in bounds], scheduler=scheduler,
                  desc="embed", unit="row", memory_limit=memory_limit, weights=weights, on_result=_record)
    group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="r")
    n_valid = sum(int(group["valid"][s:s + chunk_rows].sum()) for s in range(0, n, chunk_rows))
    wall = time.time() - t0
    return run.commit(outputs={"embeddings": "embeddings.zarr"},
                      counts={"n": n, "n_valid": n_valid, "dim": dim},
                      timings={"embed_s": round(wall, 3), "rows_per_s": round(n / max(wall, 1e-9), 1),
                               "path": "client" if in_client else "workers",
                               **{k: round(v, 3) for k, v in busy.items() if v},
                               **({f"encode_{k}": round(v, 3) for k, v in probe_enc.seconds.items()}
                                  if in_client else {})})


ENCODE = ("auto", "workers", "client")


def encode_in_client(mode: str, enc: Encoder, scheduler: str | None) -> bool:
    """Whether the calling process encodes the chunks its workers decode (see :func:`embed`'s ``encode``).

    ``auto``: when the encoder is a model on CUDA and the tasks run on this machine (a local
    cluster or in-process threads): one process and one CUDA context drive the GPU in batches of
    ``GPU_MIN_BATCH`` while every core decodes, instead of one context per worker process taking
    turns on the device.
    """
    if mode != "auto":
        return mode == "client" and enc.model is not None
    return enc.model is not None and enc.device.type == "cuda" and scheduler in (None, "local", "processes",
                                                                                   "threads", "sync")


def _kept_chunk_rows(ws: Workspace, config: dict) -> int | None:
    """The chunk size of a finished embed with the same options: a resource knob never invalidates it."""
    old = ws.marker("embed")
    if not old:
        return None
    same = {k: v for k, v in old.get("config", {}).items() if k != "chunk_rows"} == \
        {k: v for k, v in config.items() if k != "chunk_rows"}
    return int(old["config"]["chunk_rows"]) if same and old["config"].get("chunk_rows") else None


def _load_pseudo(ws: Workspace) -> list:
    from streamprune.train import load_torch

    return load_torch(ws.path("train", "pseudo.pt"), ws.storage_options)["centroids"].numpy().tolist()


def open_embeddings(ws: Workspace) -> zarr.Group:
    """The embeddings group (emb, labels, valid), read-only."""
    ws.require("embed", "read embeddings")
    return zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
