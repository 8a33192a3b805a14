"""Benchmark: the streaming trainer against the same model trained on an in-memory tensor.

Reports, in one run on one machine:
* ``ratio_in_memory``  — our trainer (decoded cache held in memory) samples/s / bare loop samples/s;
* ``ratio_streamed``   — our trainer with the cache streamed from zarr (block shuffle) / bare loop;
* ``decode_vs_epoch``  — seconds to read + decode the subset from the tars once, against one
  training epoch over the cache: what re-reading the tars every epoch would add.

Both trainers record training-pass dynamics (``dynamics="train"``) so the comparison is about the
data path, not the extra eval pass.

    python scripts/bench_train.py --n 8000 --size 32 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")


def bare_loop(x: torch.Tensor, y: torch.Tensor, model_name: str, epochs: int, batch: int, seed: int) -> float:
    """samples/s of a plain in-memory training loop with the same model and optimiser."""
    from streamprune.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, tuple(x.shape[1:]), int(y.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    xf = x.float() / 255.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(x), generator=g)
        model.train()
        for b in range(0, len(x), batch):
            idx = perm[b:b + batch]
            out = model(xf[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return len(x) * epochs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", default="cnn")
    args = ap.parse_args()

    from shardgen import write_shards

    from streamprune.decode import DecodeConfig, decode_rows
    from streamprune.shards import Catalog, ErrorPolicy, catalog
    from streamprune.subset import subset
    from streamprune.train import SubsetData, TrainConfig, train
    from streamprune.workspace import Workspace

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    per = 1000
    shards = write_shards(os.path.join(tmp, "data"), max(1, args.n // per), per, dim=args.size)
    ws = os.path.join(tmp, "ws")
    catalog(shards, ws, scheduler="threads")
    subset(ws, fraction=1.0, seed=0)
    cat = Catalog(Workspace(ws))
    rows = np.arange(cat.n_samples)

    t0 = time.perf_counter()
    xs, ys, _ = decode_rows(cat, rows, DecodeConfig(), ErrorPolicy(), None)
    decode_s = time.perf_counter() - t0

    # Untimed warm-up steps of the bare loop on the first rows: the process's first training steps
    # (thread pools, kernel selection) cost seconds, which would otherwise land on whichever loop
    # runs first (the in-memory trainer) and understate its ratio.
    warm = slice(0, 4 * args.batch)
    bare_loop(torch.from_numpy(xs[warm]), torch.from_numpy(ys[warm]), args.model, 1, args.batch, 0)

    results = {}
    for label, budget in (("in_memory", 8 << 30), ("streamed", 0)):
        cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch, dynamics="train",
                          memory_budget=budget, chunk_rows=1024)
        marker = os.path.join(ws, "_stages", "train.json")
        if os.path.exists(marker):
            os.unlink(marker)  # memory_budget is not part of the fingerprint: force a fresh run
        m = train(ws, cfg, DecodeConfig(), scheduler="sync")
        results[label] = m["timings"]["samples_per_s"]
        assert m["timings"]["in_memory"] == (budget > 0)
    data = SubsetData(Workspace(ws), "train", 8 << 30)
    x, y = data.x, torch.from_numpy(data.labels)
    bare = bare_loop(x, y, args.model, args.epochs, args.batch, 0)
    epoch_s = cat.n_samples / results["in_memory"]
    out = {
        "n": int(cat.n_samples), "image": f"{args.size}x{args.size}", "model": args.model, "epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
        "bare_samples_per_s": round(bare, 1),
        "ours_in_memory_samples_per_s": results["in_memory"],
        "ours_streamed_samples_per_s": results["streamed"],
        "ratio_in_memory": round(results["in_memory"] / bare, 3),
        "ratio_streamed": round(results["streamed"] / bare, 3),
        "decode_subset_from_tars_s": round(decode_s, 2),
        "one_epoch_over_cache_s": round(epoch_s, 2),
        "decode_vs_epoch": round(decode_s / epoch_s, 2),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
