"""Dask tasks that read and decode samples and nothing else.

They live apart from :mod:`streamprune.train` and :mod:`streamprune.embed`, which import torch,
so that a worker running only these never imports it: ~2 s and ~190 MiB of resident memory per
worker process (16 of them on a 16-core machine), for tasks that never touch a model.
"""

from __future__ import annotations

import numpy as np
import zarr

from streamprune import storage
from streamprune.decode import DecodeConfig, decode_rows
from streamprune.shards import Catalog, ErrorPolicy
from streamprune.workspace import Workspace


def decode_range(ws: Workspace, r0: int, r1: int, spec: dict) -> dict:
    """Rows [r0, r1) decoded (embed's reader, when the caller encodes and writes the chunk)."""
    handler = ErrorPolicy(spec["on_error"], stage="embed")
    x, labels, valid = decode_rows(Catalog(ws), np.arange(r0, r1, dtype=np.int64), DecodeConfig(**spec["decode"]),
                                   handler, tuple(spec["input_shape"]))
    return {"r0": r0, "x": x, "labels": labels, "valid": valid, "errors": handler.records}


def cache_rows(ws: Workspace, key: str, rows: np.ndarray, i0: int, decode: dict, on_error: str,
               input_shape: tuple, num_classes: int | None) -> dict:
    """Decode ``rows`` into positions ``[i0, i0 + len(rows))`` of ``<key>/cache.zarr`` (the training cache)."""
    cat = Catalog(ws)
    handler = ErrorPolicy(on_error, stage=key)
    xs, labels, valid = decode_rows(cat, rows, DecodeConfig(**decode), handler, input_shape, num_classes)
    group = zarr.open_group(storage.zarr_store(ws.path(key, "cache.zarr"), ws.storage_options), mode="r+")
    group["x"][i0:i0 + len(rows)] = xs
    group["labels"][i0:i0 + len(rows)] = labels
    group["valid"][i0:i0 + len(rows)] = valid
    return {"n": len(rows), "n_valid": int(valid.sum()), "errors": handler.records}
