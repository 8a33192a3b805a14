"""Demo dataset: scikit-learn's bundled handwritten digits as WebDataset shards with label noise.

Each 8x8 digit of the training split is written once as is and ``augment`` times shifted by up
to one pixel with intensity noise, so the demo has ~5.7k training samples.  A known fraction of
training labels is flipped (``.json`` records the clean label), which gives pruning something to
find.  The test split (clean labels) is written to its own shards for evaluation.
"""

from __future__ import annotations

import filecmp
import io
import json
import os

import numpy as np
from PIL import Image

from streamprune.tario import write_tar


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8), mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dy, dx = rng.integers(-1, 2, size=2)
    out = np.roll(np.roll(img, dy, axis=0), dx, axis=1)
    out = out * rng.uniform(0.8, 1.2) + rng.normal(0, 12, size=img.shape)
    return np.clip(out, 0, 255)


def _write_tar(path: str, samples: list) -> None:
    """``write_tar``, leaving an existing file with the same bytes untouched: a local shard's mtime is
    part of the catalog's fingerprint, so rewriting it would make a re-run demo start over, not resume."""
    new = f"{path}.new"
    write_tar(new, samples)
    if os.path.exists(path) and filecmp.cmp(path, new, shallow=False):
        os.remove(new)
    else:
        os.replace(new, path)


def make_demo(out_dir: str, *, n_shards: int = 10, augment: int = 3, noise: float = 0.1,
              test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write train/test shards under ``out_dir``; returns paths and counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.float64)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    train = []
    for i in train_idx:
        for a in range(augment + 1):
            img = images[i] if a == 0 else _augment(images[i], rng)
            train.append((int(i), a, img))
    clean = np.array([labels[i] for i, _, _ in train])
    noisy = clean.copy()
    flip = rng.random(len(train)) < noise
    noisy[flip] = (clean[flip] + rng.integers(1, 10, size=int(flip.sum()))) % 10

    os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "test"), exist_ok=True)
    per_shard = int(np.ceil(len(train) / n_shards))
    samples = []
    for j, (i, a, img) in enumerate(train):
        meta = {"clean_label": int(clean[j]), "noisy": bool(flip[j]), "source": i, "augment": a}
        samples.append((f"d{i:04d}_{a}", {"png": _png(img), "cls": str(int(noisy[j])).encode(),
                                          "json": json.dumps(meta).encode()}))
    shards = []
    for s in range(n_shards):
        path = os.path.join(out_dir, "train", f"digits-{s:06d}.tar")
        _write_tar(path, samples[s * per_shard:(s + 1) * per_shard])
        shards.append(path)
    test_path = os.path.join(out_dir, "test", "digits-test-000000.tar")
    _write_tar(test_path, [(f"t{i:04d}", {"png": _png(images[i]), "cls": str(int(labels[i])).encode()})
                          for i in test_idx])
    return {"train_pattern": os.path.join(out_dir, "train", f"digits-{{000000..{n_shards - 1:06d}}}.tar"),
            "train": shards, "test": [test_path], "n_train": len(train), "n_test": len(test_idx),
            "n_noisy": int(flip.sum())}
