"""Benchmark the index stage and kNN extrapolation on synthetic clustered embeddings.

    python scripts/bench_index.py                       # N = 1,000,000 x 128, plus N/4 for the RSS check
    python scripts/bench_index.py --n 100000 --no-small

Measures, on N rows of 128-d clustered vectors (1000 Gaussian blobs on random 16-d patches):

* build (train + add) and search throughput of ``build_index(graph="all")`` with auto params
  and its default re-rank, and the peak RSS of its search phase (process tree, sampled);
* the same at N/4: the search phase's peak RSS should not grow with N (target within 10 %);
* the search stage (sync, no re-rank) against a bare ``index.search`` over the same queries held
  in memory, same index and threads (target ratio <= 1.2);
* recall@10 of the written graph against exact search (target >= 0.95);
* Pearson between kNN-extrapolated scores (a smooth synthetic score, 20 % seeds) from the ANN
  seeds graph and from exact neighbours, on a sample of non-seed rows (target >= 0.99).

Each measurement runs in a child process so that peak RSS and timings are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --------------------------------------------------------------------------- data


def write_dataset(path: str, n: int, d: int = 128, seed: int = 0, chunk: int = 4096, fraction: float = 0.2) -> None:
    """embeddings.zarr (+ markers), a 20 % subset, and smooth seed scores, streamed chunk by chunk."""
    import zarr

    from streamprune import storage
    from streamprune.workspace import Workspace

    ws = Workspace(path)
    rng = np.random.default_rng(seed)
    n_clusters, intrinsic = 1000, 16
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
    bases = (rng.standard_normal((n_clusters, intrinsic, d)) / np.sqrt(intrinsic)).astype(np.float32)
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="w")
    emb = group.create_array("emb", shape=(n, d), chunks=(chunk, d), dtype="float32")
    group.create_array("labels", shape=(n,), chunks=(chunk,), dtype="int64", fill_value=-1)
    valid = group.create_array("valid", shape=(n,), chunks=(chunk,), dtype="bool")
    step = chunk * 16
    for s in range(0, n, step):
        m = min(step, n - s)
        c = rng.integers(0, n_clusters, m)
        z = rng.standard_normal((m, intrinsic)).astype(np.float32)
        x = centers[c] + 0.1 * rng.standard_normal((m, d)).astype(np.float32)
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(n_clusters + 1))
        for k in range(n_clusters):
            idx = order[bounds[k]:bounds[k + 1]]
            if len(idx):
                x[idx] += z[idx] @ bases[k]
        emb[s:s + m] = x
        valid[s:s + m] = np.ones(m, bool)
    ws.begin("embed", {"bench": n}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    subset = np.flatnonzero(np.random.default_rng(seed + 1).random(n) < fraction)
    rows = zarr.create_array(storage.zarr_store(ws.path("subset", "rows.zarr")), shape=(len(subset),),
                             chunks=(1 << 20,), dtype="int64")
    rows[:] = subset
    ws.begin("subset", {"bench": n}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(subset)})
    values = smooth_score(emb, subset, d, seed)
    scores = zarr.create_array(storage.zarr_store(ws.path("scores", "du.zarr")), shape=(len(subset),),
                               chunks=(1 << 20,), dtype="float32")
    scores[:] = values
    ws.begin("score", {"bench": n}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": len(subset)})


def smooth_score(emb, rows: np.ndarray, d: int, seed: int) -> np.ndarray:
    """A smooth function of the embedding plus a little per-sample noise."""
    from streamprune.index import gather_rows

    rng = np.random.default_rng(seed + 2)
    w1, w2 = rng.standard_normal((2, d)) / np.sqrt(d)
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), 1 << 16):
        x = gather_rows(emb, rows[s:s + (1 << 16)])
        out[s:s + len(x)] = np.sin(x @ w1 / 3) + 0.5 * np.tanh(x @ w2 / 3) + 0.1 * rng.standard_normal(len(x))
    return out


# --------------------------------------------------------------------------- child runs


def run_child(code: str, env: dict | None = None) -> dict:
    """Run python ``code`` (prints one JSON line last) and sample its process tree's peak RSS."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "STREAMPRUNE_PROGRESS": "0", **(env or {})})
    peak = {"all": 0}
    parent = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            except psutil.Error:
                rss = 0
            peak["all"] = max(peak["all"], rss)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{code}\n{out}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak["all"] / 2**20)
    return result


BUILD = """
import json
from streamprune.index import build_index
m = build_index({ws!r}, graph={graph!r}, k={k}, scheduler={sched!r}, refine={refine!r})[{graph!r}]
print(json.dumps({{"counts": m["counts"], "timings": m["timings"], "fingerprint": m["fingerprint"]}}))
"""

SEARCH = """
import json, threading, time, numpy as np, psutil, faiss
from streamprune import storage
from streamprune.workspace import Workspace, StageRun
from streamprune.index import _Plan, _search_phase, read_index, set_search_params, open_embeddings, iter_blocks
ws = Workspace({ws!r})
m = ws.marker("index-all"); c = m["counts"]; params = {{"nprobe": c["nprobe"]}} if c["nprobe"] else {{}}
chunk_rows = json.loads(open(ws.path("index", "params.json")).read())["all"]["chunk_rows"]

def plan(refine):
    return _Plan(name="all", factory=c["factory"], nlist=c["nlist"], m=c["m"], code_size=0, n=c["n"], d=c["d"],
                 n_index=c["n_index"], k=c["k"], refine=refine, ondisk=c["ondisk"], ondisk_threshold=0,
                 chunk_rows=chunk_rows, gpu=False)

def search_stage(refine):
    key = f"bench-search-{{time.time_ns()}}"
    run = StageRun(ws, "index", key, m["fingerprint"], {{}}, {{}})
    t = time.time()
    _search_phase(ws, run, plan(refine), params, "sync", {{}})
    elapsed = time.time() - t
    storage.remove(ws.path("_stages", key), recursive=True)
    return elapsed

peak, stop = [0], [False]
def sample():
    me = psutil.Process()
    while not stop[0]:
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.05)
th = threading.Thread(target=sample, daemon=True); th.start()
refine_s = search_stage(c["refine"])  # what the stage runs by default: its memory is the one that counts
stop[0] = True; th.join()
stage_s = search_stage(0)
index = read_index(ws, "index/all.faissindex", m["fingerprint"])
set_search_params(index, params)
emb, valid, _ = open_embeddings(ws, "bench")
x = np.concatenate([b for _, b in iter_blocks(emb, valid[:])])
t = time.time()
for s in range(0, len(x), chunk_rows):
    index.search(x[s:s + chunk_rows], c["k"] + 1)
bare_s = time.time() - t
print(json.dumps({{"refine_s": refine_s, "search_rss_mb": peak[0] / 2**20, "stage_s": stage_s, "bare_s": bare_s,
                  "threads": faiss.omp_get_max_threads(), "chunk_rows": chunk_rows}}))
"""

PEARSON = """
import json, time, numpy as np, faiss
from streamprune.workspace import Workspace
from streamprune.index import build_index, open_embeddings, gather_rows, iter_blocks, candidate_mask, exact_knn
from streamprune.extrapolate.knn import extrapolate_knn, knn_predict, pearson
from streamprune.extrapolate.common import seed_scores, read_extrapolated
ws = Workspace({ws!r})
t = time.time()
mi = build_index(ws, graph="seeds", k={k}, scheduler={sched!r}, refine={refine!r})["seeds"]
index_s = time.time() - t
t = time.time()
mk = extrapolate_knn(ws, "du", k="auto")
knn_s = time.time() - t
kk = mk["counts"]["k"]
emb, valid, _ = open_embeddings(ws, "bench")
seeds = seed_scores(ws, "du")
rng = np.random.default_rng(5)
n = emb.shape[0]
cand = np.setdiff1d(rng.choice(n, min(n, 30000), replace=False), seeds.rows)[:{sample}]
rows = np.sort(cand)
q = gather_rows(emb, rows)
ids, dist = exact_knn(q, rows, iter_blocks(emb, candidate_mask(ws, "seeds", valid[:])), kk)
exact = knn_predict(seeds.lookup(ids), dist, kk)
score, _ = read_extrapolated(ws, "du", "knn")
ann = score.get_orthogonal_selection((rows,))
print(json.dumps({{"pearson_ann_exact": pearson(ann, exact), "k": kk, "validation": mk["counts"]["validation_pearson"],
                  "recall_seeds": mi["counts"]["recall_at_k"], "factory_seeds": mi["counts"]["factory"],
                  "seeds_index_s": index_s, "knn_s": knn_s, "n_sample": int(len(rows))}}))
"""


def bench_build(ws: str, n: int, k: int, sched: str, refine: int | None = None) -> dict:
    r = run_child(BUILD.format(ws=ws, graph="all", k=k, sched=sched, refine=refine))
    t = r["timings"]
    r["build_rows_s"] = n / max(1e-9, t["train_s"] + t["add_s"])
    r["search_rows_s"] = n / max(1e-9, t["search_s"])
    r.update(run_child(SEARCH.format(ws=ws)))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--scheduler", default="local", help="scheduler of the build_index runs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-small", action="store_true", help="skip the N/4 run (RSS comparison)")
    ap.add_argument("--pearson-sample", type=int, default=10_000)
    ap.add_argument("--refine", type=int, default=None, help="the graphs' --refine (default: the stage's auto)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_index_")
    rows = []

    def report(name: str, value, target: str = "") -> None:
        rows.append((name, value, target))
        print(f"{name:<48}{value!s:>22}  {target}", flush=True)

    sizes = [args.n] if args.no_small else [args.n // 4, args.n]
    results = {}
    for n in sizes:
        ws = os.path.join(work, f"n{n}")
        if not os.path.exists(os.path.join(ws, "_stages", "score-du.json")):
            t = time.time()
            write_dataset(ws, n)
            print(f"[data] {n} rows written in {time.time() - t:.0f} s", flush=True)
        results[n] = r = bench_build(ws, n, args.k, args.scheduler, args.refine)
        c, t = r["counts"], r["timings"]
        report(f"N={n}: factory", c["factory"])
        report(f"N={n}: nprobe / refine", f"{c['nprobe']} / {c['refine']}")
        report(f"N={n}: train / add / search s", f"{t['train_s']:.0f} / {t['add_s']:.0f} / {t['search_s']:.0f}")
        report(f"N={n}: build rows/s (train+add)", f"{r['build_rows_s']:.0f}")
        report(f"N={n}: search rows/s (stage, {args.scheduler})", f"{r['search_rows_s']:.0f}")
        report(f"N={n}: recall@{args.k} (graph vs exact)", c["recall_at_k"], ">= 0.95")
        report(f"N={n}: peak RSS build_index (process tree), MiB", r["peak_rss_mb"])
        report(f"N={n}: search stage (sync, refine {c['refine']}) s", f"{r['refine_s']:.1f}")
        report(f"N={n}: peak RSS search stage (sync), MiB", f"{r['search_rss_mb']:.0f}")
        report(f"N={n}: search stage (sync, no refine) s", f"{r['stage_s']:.1f}")
        report(f"N={n}: bare index.search, same queries, {r['threads']} thr s", f"{r['bare_s']:.1f}")
        report(f"N={n}: stage / bare", f"{r['stage_s'] / r['bare_s']:.3f}", "<= 1.2")
    if len(sizes) == 2:
        a, b = results[sizes[0]]["search_rss_mb"], results[sizes[1]]["search_rss_mb"]
        report(f"search-stage RSS N={sizes[1]} / N={sizes[0]}", f"{b / max(a, 1):.3f}", "<= 1.10")

    ws = os.path.join(work, f"n{args.n}")
    r = run_child(PEARSON.format(ws=ws, k=100, sched=args.scheduler, sample=args.pearson_sample, refine=args.refine))
    report("seeds index factory / recall@100", f"{r['factory_seeds']} / {r['recall_seeds']}")
    report("kNN k (auto) / validation Pearson", f"{r['k']} / {r['validation'][str(r['k'])]:.3f}")
    report("seeds index + graph s / knn extrapolation s", f"{r['seeds_index_s']:.0f} / {r['knn_s']:.0f}")
    report(f"Pearson kNN(ANN graph) vs kNN(exact), {r['n_sample']} rows", f"{r['pearson_ann_exact']:.4f}", ">= 0.99")
    with open(os.path.join(work, "bench_index.json"), "w") as f:
        json.dump({"rows": rows, "results": {str(k): v for k, v in results.items()}}, f, indent=1, default=str)
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
