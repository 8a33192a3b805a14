"""Benchmark GCN inference: peak RSS and rows/s, layer-wise (previous layer in memory vs streamed) and
one whole-graph forward; and the host-side subgraph build (the seeds' 3-hop closure and the whole graph).

For each N a synthetic workspace is built (random embeddings, a random fixed-degree graph with k
neighbours per row, a small seed subset with random scores), the model is trained once (a short
run, killed as soon as its checkpoint is recorded: the benchmark measures inference), and then
inference runs in a fresh subprocess per path, which reports its peak RSS (VmHWM) and the
per-layer rows/s recorded in the stage marker.  A random graph is the worst case for locality:
every chunk's neighbours are spread over the whole previous layer.

    .venv/bin/python scripts/bench_gcn.py --sizes 200000 800000 --out bench_gcn.json
    .venv/bin/python scripts/bench_gcn.py --sizes 200000 --paths memory whole --closure 0.18
    .venv/bin/python scripts/bench_gcn.py --sizes 1000000 --dim 512 --k 20 --seeds 200000 --setup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import zarr

from streamprune.workspace import Workspace

CHILD = r"""
import json, resource, sys, time
import torch_geometric.nn  # noqa: F401  (import cost is not inference)
from streamprune.extrapolate.gcn import extrapolate_gcn

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
args = json.loads(sys.argv[1])
base = hwm()
t = time.time()
m = extrapolate_gcn(args.pop("ws"), "du", **args)
print(json.dumps({"wall_s": time.time() - t, "base_rss": base, "peak_rss": hwm(), "timings": m["timings"],
                  "counts": {k: v for k, v in m["counts"].items() if k != "history"}}))
"""


def build(path: str, n: int, dim: int, k: int, classes: int, seeds: int, seed: int = 0, block: int = 1 << 16) -> None:
    """Write a synthetic workspace with N rows, block by block."""
    rng = np.random.default_rng(seed)
    ws = Workspace(path)
    g = zarr.open_group(os.path.join(path, "embeddings.zarr"), mode="w")
    emb = g.create_array("emb", shape=(n, dim), chunks=(block, dim), dtype="float32")
    lab = g.create_array("labels", shape=(n,), chunks=(block,), dtype="int64")
    val = g.create_array("valid", shape=(n,), chunks=(block,), dtype="bool")
    gg = zarr.open_group(os.path.join(path, "graph", "all.zarr"), mode="w")
    nb = gg.create_array("neighbors", shape=(n, k), chunks=(block, k), dtype="int64")
    di = gg.create_array("distances", shape=(n, k), chunks=(block, k), dtype="float32")
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        m = r1 - r0
        emb[r0:r1] = rng.normal(size=(m, dim)).astype(np.float32)
        lab[r0:r1] = rng.integers(0, classes, m)
        val[r0:r1] = rng.random(m) > 0.001
        rows = np.arange(r0, r1)[:, None]
        nb[r0:r1] = (rows + rng.integers(1, n, (m, k))) % n  # random, never the row itself
        di[r0:r1] = np.sort(rng.uniform(0.5, 2.0, (m, k)).astype(np.float32), axis=1)
    ws.begin("embed", {"bench": n}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    ws.begin("index", {"bench": n}, {}, key="index-all").commit({"graph": "graph/all.zarr"}, {"n": n})
    rows = np.sort(rng.choice(n, seeds, replace=False)).astype(np.int64)
    # graph/seeds.zarr (the kNN prior's input): k random seed rows per row, never the row itself
    sg = zarr.open_group(os.path.join(path, "graph", "seeds.zarr"), mode="w")
    snb = sg.create_array("neighbors", shape=(n, k), chunks=(block, k), dtype="int64")
    sdi = sg.create_array("distances", shape=(n, k), chunks=(block, k), dtype="float32")
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        pick = rng.integers(0, seeds, (r1 - r0, k))
        own = rows[pick] == np.arange(r0, r1)[:, None]
        snb[r0:r1] = rows[np.where(own, (pick + 1) % seeds, pick)]
        sdi[r0:r1] = np.sort(rng.uniform(0.5, 2.0, (r1 - r0, k)).astype(np.float32), axis=1)
    ws.begin("index", {"bench": n}, {}, key="index-seeds").commit({"graph": "graph/seeds.zarr"}, {"n": n})
    zarr.create_array(os.path.join(path, "subset", "rows.zarr"), data=rows, chunks=(1 << 20,))
    ws.begin("subset", {"bench": n}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": seeds})
    zarr.create_array(os.path.join(path, "scores", "du.zarr"), data=rng.normal(size=seeds).astype(np.float32),
                      chunks=(1 << 20,))
    ws.begin("score", {"score": "du"}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": seeds})


def train_only(path: str, args: dict) -> float:
    """Run the stage until its model checkpoint is recorded, then SIGKILL it (before any inference chunk)."""
    env = {**os.environ, "STREAMPRUNE_TASK_DELAY": "600", "STREAMPRUNE_PROGRESS": "0"}
    code = ("import json, sys; from streamprune.extrapolate.gcn import extrapolate_gcn; "
            "a = json.loads(sys.argv[1]); extrapolate_gcn(a.pop('ws'), 'du', **a)")
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps({"ws": path, **args})], env=env,
                            start_new_session=True)
    stages = os.path.join(path, "_stages", "extrapolate-du-gcn")
    try:
        while not any("train.json" in fs for _, _, fs in os.walk(stages)):
            if proc.poll() is not None:
                raise SystemExit(f"training run exited with {proc.returncode}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.time() - t


def infer(path: str, args: dict) -> dict:
    """Run (resume) the stage in a fresh process: inference only; returns its report."""
    env = {**os.environ, "STREAMPRUNE_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"ws": path, **args})], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def closure_times(path: str, k: int, fraction: float, seed: int = 0) -> dict:
    """Seconds to build the full-fan-out 3-hop subgraph of a random ``fraction`` of rows, and of all rows."""
    from streamprune.extrapolate.sampler import GraphTable, RowSource, sample_subgraph

    emb_g = zarr.open_group(os.path.join(path, "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 40, bool)
    table = GraphTable(zarr.open_group(os.path.join(path, "graph", "all.zarr"), mode="r"), k, valid, "exp", 1 << 40)
    n = table.n
    out = {}
    for name, seeds in (("seeds", np.sort(np.random.default_rng(seed).choice(n, int(fraction * n), replace=False))),
                        ("all", np.arange(n))):
        t = time.time()
        sub = sample_subgraph(seeds, table, (None,) * 3)
        out[name] = {"s": round(time.time() - t, 2), "seeds": len(seeds), "nodes": len(sub.nodes), "edges": len(sub.col)}
    return out


def setup_times(path: str, k: int, score: str = "du", block: int = 4096) -> dict:
    """The GCN stage's host-side setup at this N, each against what it replaced, in this process:
    the kNN prior by the seeds graph's own chunks (with the dense seed-score table) against blocks
    of ``block`` rows (the inference chunk) with the binary search; one graph chunk's seed-score
    lookup, dense against binary search; the whole graph's CSR by row blocks against the general
    sampler; all rows' features to the CPU "device" assembled there against assembled on the host."""
    import torch

    from streamprune.extrapolate import common
    from streamprune.extrapolate.gcn import device_features, take_dense, write_prior
    from streamprune.extrapolate.knn import _predict_chunk, validation_table
    from streamprune.extrapolate.sampler import Features, GraphTable, RowSource, sample_subgraph, whole_graph
    from streamprune.index import read_graph

    ws = Workspace(path)
    out: dict = {}
    n = zarr.open_group(os.path.join(path, "embeddings.zarr"), mode="r")["emb"].shape[0]

    def timed(fn):  # unrounded: the ratios below divide them (a 1 ms rounding is most of a small lookup)
        t = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t

    # the prior: now, then as before (4,096-row blocks, binary search), and the values compared
    run = ws.begin("extrapolate", {"bench-setup": n}, {}, force=True, key="bench-prior")
    _, now = timed(lambda: write_prior(ws, run, score, n))
    new = zarr.open_array(os.path.join(path, "gcn", score, "prior.zarr"), mode="r")[:]
    dense_bytes = common.DENSE_LOOKUP_BYTES
    common.DENSE_LOOKUP_BYTES = 0
    common._SEEDS.clear()
    try:
        kk = validation_table(ws, score)[0]
        old, before = timed(lambda: np.concatenate([_predict_chunk(ws, r0, min(n, r0 + block), score, "seeds", kk)
                                                    for r0 in range(0, n, block)]))
        nbr = read_graph(ws, "seeds")[0]
        ids = nbr[:min(n, nbr.chunks[0])]
        seeds = common.seed_scores(ws, score)
        _, search_s = timed(lambda: seeds.lookup(ids))
    finally:
        common.DENSE_LOOKUP_BYTES = dense_bytes
        common._SEEDS.clear()
    seeds = common.seed_scores(ws, score)
    seeds.lookup(ids[:1])  # builds the table
    _, dense_s = timed(lambda: seeds.lookup(ids))
    out["prior"] = {"graph_chunks_s": round(now, 3), "blocks_of_%d_s" % block: round(before, 3),
                    "ratio": round(before / max(now, 1e-9), 1),
                    "same_values": bool(np.array_equal(new, old, equal_nan=True))}
    out["lookup"] = {"ids": list(ids.shape), "dense_ms": round(dense_s * 1e3, 1), "search_ms": round(search_s * 1e3, 1),
                     "ratio": round(search_s / max(dense_s, 1e-9), 1)}
    # the whole graph's CSR
    emb_g = zarr.open_group(os.path.join(path, "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 40, bool)
    table = GraphTable(zarr.open_group(os.path.join(path, "graph", "all.zarr"), mode="r"), k, valid, "exp", 1 << 40)
    a, sampler_s = timed(lambda: sample_subgraph(np.arange(n), table, (None,) * 3))
    b, blocks_s = timed(lambda: whole_graph(table, 3))
    out["whole_graph"] = {"row_blocks_s": round(blocks_s, 3), "sampler_s": round(sampler_s, 3),
                          "ratio": round(sampler_s / max(blocks_s, 1e-9), 2),
                          "same_arrays": all(np.array_equal(getattr(a, f), getattr(b, f))
                                             for f in ("nodes", "prefix", "crow", "col", "val"))}
    del a, b
    # all rows' features to the CPU "device": assembled there, against built on the host and copied
    feats = Features(RowSource(emb_g["emb"], 0, np.float32), RowSource(emb_g["labels"], 0, np.int64), valid, 10,
                     RowSource(zarr.open_array(os.path.join(path, "gcn", score, "prior.zarr"), mode="r"), 0, np.float32),
                     (0.0, 1.0))
    rows = np.arange(n, dtype=np.int64)

    def host_built() -> torch.Tensor:
        x = torch.empty((n, feats.dim), dtype=torch.float32)
        for s0 in range(0, n, 1 << 16):
            x[s0:s0 + (1 << 16)] = torch.from_numpy(take_dense(feats, rows[s0:s0 + (1 << 16)]))
        return x

    x1, device_s = timed(lambda: device_features(feats, rows, "cpu"))
    x2, host_s = timed(host_built)
    out["features"] = {"rows": n, "dim": feats.dim, "assembled_on_device_s": round(device_s, 3),
                       "built_on_host_s": round(host_s, 3),
                       "ratio": round(host_s / max(device_s, 1e-9), 2), "same_values": bool(torch.equal(x1, x2))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000, 800_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    p.add_argument("--seeds", type=int, default=2000, help="seed rows (training is not what is measured)")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--memory-limit", type=float, default=4.0, help="GiB for the in-memory path")
    p.add_argument("--prior", default="knn", choices=["knn", "none"])
    p.add_argument("--paths", nargs="+", default=["memory", "streamed"], choices=["memory", "streamed", "whole"],
                   help="layer-wise with the previous layer in memory or streamed, or one whole-graph forward")
    p.add_argument("--closure", type=float, default=None,
                   help="also time the subgraph build of this fraction of rows as seeds (3 hops, all neighbours) "
                        "and of all rows")
    p.add_argument("--setup", action="store_true",
                   help="time the stage's host-side setup against what it replaced (setup_times), then skip the rest")
    p.add_argument("--scheduler", default="sync")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (training and in-process inference)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_gcn_")
    common = {"k": a.k, "hidden": a.hidden, "epochs": 1, "batch_size": 128, "fanout": [2, 2, 2],
              "chunk_rows": a.chunk_rows, "scheduler": a.scheduler, "device": a.device, "prior": a.prior}
    results = []
    try:
        for n in a.sizes:
            base = os.path.join(work, f"n{n}")
            t = time.time()
            build(base, n, a.dim, a.k, a.classes, a.seeds)
            build_s = time.time() - t
            if a.closure:
                row = {"n": n, "closure": closure_times(base, a.k, a.closure)}
                results.append(row)
                print(json.dumps(row), flush=True)
            if a.setup:
                row = {"n": n, "setup": setup_times(base, a.k)}
                results.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(base)
                continue
            train_s = train_only(base, {**common, "memory_limit": 0, "inference": "chunked"})
            for path in a.paths:
                ws = base + "-" + path
                shutil.copytree(base, ws)
                limit = int(a.memory_limit * (1 << 30)) if path == "memory" else 0
                rep = infer(ws, {**common, "memory_limit": limit,
                                 "inference": "whole" if path == "whole" else "chunked"})
                layers = {name: v for name, v in rep["timings"].items()
                          if name.startswith("layer") or name == "whole_graph"}
                infer_s = sum(v["s"] for v in layers.values())
                row = {"n": n, "path": path, "rows_per_s": round(n / infer_s, 1), "infer_s": round(infer_s, 2),
                       "layers": layers, "peak_rss_gib": round(rep["peak_rss"] / 2**30, 3),
                       "base_rss_gib": round(rep["base_rss"] / 2**30, 3),
                       "inference_rss_gib": round((rep["peak_rss"] - rep["base_rss"]) / 2**30, 3),
                       "build_s": round(build_s, 1), "train_s": round(train_s, 1)}
                results.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(ws)
            shutil.rmtree(base)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if any("path" in r for r in results):
        print(f"\n{'N':>9} {'path':>9} {'rows/s':>9} {'infer s':>8} {'peak RSS GiB':>13} {'above import':>13}")
    for r in results:
        if "closure" in r or "setup" in r:
            continue
        print(f"{r['n']:>9} {r['path']:>9} {r['rows_per_s']:>9.0f} {r['infer_s']:>8.1f} {r['peak_rss_gib']:>13.3f} "
              f"{r['inference_rss_gib']:>13.3f}")
    for r in results:
        if "setup" in r:
            for name, v in r["setup"].items():
                print(f"N={r['n']} {name}: {v}")
    for path in a.paths:
        rs = [r for r in results if r.get("path") == path]
        if len(rs) >= 2:
            print(f"{path}: peak RSS ratio {rs[-1]['n']}/{rs[0]['n']} rows = {rs[-1]['peak_rss_gib'] / rs[0]['peak_rss_gib']:.3f}")
    for r in results:
        if "closure" in r:
            for name, c in r["closure"].items():
                print(f"subgraph build, N={r['n']}, {name}: {c['s']:.2f} s ({c['seeds']} seeds -> {c['nodes']} nodes, "
                      f"{c['edges']} edges)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
