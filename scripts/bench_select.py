"""Benchmark the memory of pruning's selection: bytes per row of every strategy at N and 4N.

    .venv/bin/python scripts/bench_select.py [--n 16777216] [--scale 4] [--classes 1000] [--keep 0.5]
        [--strategies hard,easy,random,ccs,balanced,hard-clean,influence-budget] [--json out.json]

For each scale the script makes the per-row inputs the prune stage holds (float32 scores with 1 %
NaN, int32 labels over ``--classes`` classes) and runs, per strategy, ``select.select`` and then
``prune.selection_stats`` (stats.json's quantiles and per-class counts).  ``hard-clean`` counts its
noise ranks in its selection: from float32 label disagreement (21 levels, as with k = 20 neighbours,
0.5 % NaN; an input, as prune reads its zarr array a chunk at a time), a 20 % subset and the seed
rows' float32 margins, it makes the seed mask and ``label_aware.noise_table`` inside the measurement.
It reports the peak of numpy's traced allocations (tracemalloc) above the inputs, in bytes per row,
for each of the two, and their wall time.  Chunked passes hold one chunk of ``select.CHUNK_ROWS``
rows and ccs/balanced at most ``max(GROUP_ROWS, N / 16)`` row ids, so the bytes per row fall with N
until N is large against those constants; ``--chunk-rows`` and ``--group-rows`` set them lower to
show large-N behaviour at a size this machine holds.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from streamprune import select as sel
from streamprune.extrapolate.label_aware import noise_table
from streamprune.prune import selection_stats

STRATEGIES = ("hard", "easy", "random", "ccs", "balanced", "hard-clean", "influence-budget")


def inputs(n: int, classes: int) -> dict:
    rng = np.random.default_rng(0)
    scores = rng.random(n, dtype=np.float32)
    scores[rng.random(n, dtype=np.float32) < 0.01] = np.nan
    labels = rng.integers(0, classes, n, dtype=np.int32)
    disagreement = (rng.integers(0, 21, n) / 20).astype(np.float32)
    disagreement[rng.random(n, dtype=np.float32) < 0.005] = np.nan
    seed_rows = np.flatnonzero(rng.random(n, dtype=np.float32) < 0.2)
    return {"scores": scores, "labels": labels, "disagreement": disagreement, "seed_rows": seed_rows,
            "margin": rng.normal(size=len(seed_rows)).astype(np.float32)}


def hard_clean(data: dict, k: int) -> np.ndarray:
    """The prune stage's hard-clean: the seed mask and the seed margins read, the noise table, the selection."""
    n = len(data["scores"])
    seed = np.zeros(n, bool)
    seed[data["seed_rows"]] = True
    noise = noise_table(data["disagreement"], seed, data["margin"].copy())
    del seed
    return sel.select("hard-clean", data["scores"], data["labels"], k, noise=noise, drop_count=n // 10)


def measure(strategy: str, data: dict, keep: float) -> dict:
    s, labels = data["scores"], data["labels"]
    n = len(s)
    k = int(keep * int((~np.isnan(s)).sum()))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    if strategy == "influence-budget":
        mask = sel.influence_budget(s, eps=float(np.nansum(s)) * (1 - keep))[0]
    elif strategy == "hard-clean":
        mask = hard_clean(data, k)
    else:
        mask = sel.select(strategy, s, labels, k)
    t_select = time.perf_counter() - t0
    select_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    selection_stats(s, labels, mask, np.zeros(1, np.int64), np.ones(1, np.int64), True)
    t_stats = time.perf_counter() - t0
    stats_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"select_b_per_row": round(select_peak / n, 2), "stats_b_per_row": round(stats_peak / n, 2),
            "select_s": round(t_select, 2), "stats_s": round(t_stats, 2), "kept": int(mask.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--chunk-rows", type=int, help=f"select.CHUNK_ROWS (default {sel.CHUNK_ROWS})")
    ap.add_argument("--group-rows", type=int, help=f"select.GROUP_ROWS (default {sel.GROUP_ROWS})")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.chunk_rows:
        sel.CHUNK_ROWS = args.chunk_rows
    if args.group_rows:
        sel.GROUP_ROWS = args.group_rows
    sizes = (args.n, args.n * args.scale) if args.scale > 1 else (args.n,)
    results: dict = {"chunk_rows": sel.CHUNK_ROWS, "group_rows": sel.GROUP_ROWS, "classes": args.classes,
                     "keep": args.keep, "rows": {}}
    for n in sizes:
        data = inputs(n, args.classes)
        results["rows"][n] = {name: measure(name, data, args.keep) for name in args.strategies.split(",")}
        del data
    print(f"peak traced bytes per row above the inputs (select + stats), CHUNK_ROWS {sel.CHUNK_ROWS}, "
          f"GROUP_ROWS {sel.GROUP_ROWS}")
    head = " | ".join(f"N={n:,}: select / stats B/row, s" for n in sizes)
    print(f"| strategy | {head} |" + (f" B/row ratio {args.scale}N/N |" if len(sizes) > 1 else ""))
    print("|---|" + "---|" * (len(sizes) + (len(sizes) > 1)))
    for name in args.strategies.split(","):
        cells = [results["rows"][n][name] for n in sizes]
        line = " | ".join(f"{c['select_b_per_row']} / {c['stats_b_per_row']}, {c['select_s'] + c['stats_s']:.1f} s"
                          for c in cells)
        peaks = [max(c["select_b_per_row"], c["stats_b_per_row"]) for c in cells]
        print(f"| {name} | {line} |" + (f" {peaks[-1] / peaks[0]:.2f} |" if len(sizes) > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
