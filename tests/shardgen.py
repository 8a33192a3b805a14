"""Tiny WebDataset shard sets for tests."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from streamprune.tario import write_tar


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def make_samples(n: int, start: int = 0, kind: str = "png", classes: int = 4, dim: int = 8, seed: int = 0,
                 prefix: str = "s") -> list[tuple[str, dict[str, bytes]]]:
    """n samples with keys prefix{start+i:07d}; png images or npy vectors plus .cls labels."""
    rng = np.random.default_rng(seed + start)
    out = []
    for i in range(start, start + n):
        label = int(i % classes)
        if kind == "png":
            img = rng.integers(0, 255, size=(dim, dim), dtype=np.uint8)
            payload = {"png": png_bytes(img)}
        else:
            vec = rng.normal(size=dim).astype(np.float32)
            vec[label % dim] += 3.0
            payload = {"npy": npy_bytes(vec)}
        payload["cls"] = str(label).encode()
        payload["json"] = json.dumps({"i": i}).encode()
        out.append((f"{prefix}{i:07d}", payload))
    return out


def write_shards(directory: str, n_shards: int, per_shard: int, kind: str = "png", seed: int = 0,
                 name: str = "shard", first: int = 0, **kw) -> list[str]:
    """Write n_shards tars of per_shard samples; keys are globally unique and sequential."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(first, first + n_shards):
        path = os.path.join(directory, f"{name}-{s:06d}.tar")
        write_tar(path, make_samples(per_shard, start=s * per_shard, kind=kind, seed=seed, **kw))
        paths.append(path)
    return paths
