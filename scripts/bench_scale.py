"""Whole-pipeline scaling benchmark: every stage at N and 10N rows, one process per stage.

    python scripts/bench_scale.py                          # N = 200,000 and 10N = 2,000,000 rows
    python scripts/bench_scale.py --n 5000 --dir /tmp/bs   # quick check
    nohup python scripts/bench_scale.py --out /tmp/bench_scale_out.txt > /tmp/bench_scale.log 2>&1 &

Writes synthetic WebDataset shards of 128-d float32 feature vectors (``.npy``, 10 Gaussian class
clusters plus noise and 5 % flipped labels, ``.cls`` labels; 10k samples per shard, written in
parallel), then runs ``streamprune.pipeline.run_pipeline`` stage by stage: catalog → subset (10 %)
→ score (du, MLP, 5 epochs) → embed → index (auto IVF-PQ, seeds graph) → extrapolate (knn) →
prune (hard, keep 0.7, reshard to a local directory).

Each stage runs in its own child process (``run_pipeline(..., until=stage)``: the stages before it
are skipped by their markers), and the parent reads the child's own peak RSS with ``os.wait4``
(``ru_maxrss`` of exactly that process, not the cumulative maximum over all children). Reported
per stage and scale: the stage's wall time (from run_pipeline's timings; the process wall,
including imports and marker checks, in parentheses), its CPU seconds (user + sys of the stage
process minus those of the skipped re-run: robust to a busy machine), rows/s over all N rows,
peak RSS, then the
ratios RSS(10N)/RSS(N) (target <= 1.2 except for stages that hold documented per-row arrays) and
time(10N)/time(N) against the N·log N reference 10·log(10N)/log(N).  Each stage's child is run a
second time once the stage is done (everything skipped): its peak RSS is that stage's *floor*
(imports + marker checks), and RSS − floor is what the stage's own work holds.  Before the catalog
stage the shards are evicted from the page cache (``--warm-shards`` keeps them), so that it reads
from disk at both scales.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DIM, CLASSES = 128, 10
STAGES = ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune")
# Stages whose RSS may grow with N by design: per-row arrays of a few bytes, or (score) the decoded
# subset held in memory up to TrainConfig.memory_budget (fraction × N × D × 4 B: 100 MB at 2M rows).
EXPECTED_GROWTH = {
    "score": "decoded subset in memory (fraction x N x 512 B, capped by memory_budget = 2 GiB)",
    "extrapolate": "per-row arrays: knn score/source (5 B/row); label-aware disagreement + sorted copy (~9 B/row)",
    "prune": "per-row scores, valid flags and selection (~10 B/row)",
}


# --------------------------------------------------------------------------- synthetic shards


def _npy_header() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(DIM, np.float32))
    return buf.getvalue()[:-DIM * 4]


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header block for a regular file (names here are short ASCII)."""
    hdr = bytearray(512)
    hdr[0:len(name)] = name.encode()
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = f"{size:011o}\0".encode()
    hdr[136:148] = b"00000000000\0"
    hdr[148:156] = b" " * 8
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = f"{sum(hdr):06o}\0 ".encode()
    return bytes(hdr)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def class_centers(seed: int) -> np.ndarray:
    """Class means: random directions scaled so that a linear model reaches ~90 % accuracy."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True) * 2.5


def write_shard(args: tuple[str, int, int, int]) -> int:
    """One tar of ``count`` samples (keys v{first+i:010d}); returns bytes written."""
    path, first, count, seed = args
    rng = np.random.default_rng([seed, first])
    centers = class_centers(seed)
    y = rng.integers(0, CLASSES, count)
    # A per-sample difficulty: most points near their class mean, some far out (hard / ambiguous).
    spread = rng.choice([0.8, 1.0, 1.6], size=count, p=[0.5, 0.35, 0.15]).astype(np.float32)
    x = centers[y] + spread[:, None] * rng.standard_normal((count, DIM)).astype(np.float32)
    flip = rng.random(count) < 0.05
    noisy = np.where(flip, (y + rng.integers(1, CLASSES, count)) % CLASSES, y)
    head = _npy_header()
    parts = []
    for i in range(count):
        key = f"v{first + i:010d}"
        npy = head + x[i].tobytes()
        cls = str(int(noisy[i])).encode()
        parts += [_tar_header(f"{key}.npy", len(npy)), npy, _pad(len(npy)),
                  _tar_header(f"{key}.cls", len(cls)), cls, _pad(len(cls))]
    parts.append(b"\0" * 1024)
    data = b"".join(parts)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def make_shards(directory: str, n: int, per_shard: int, seed: int, procs: int) -> list[str]:
    """Write ceil(n / per_shard) shards under ``directory`` (skipped when already complete)."""
    os.makedirs(directory, exist_ok=True)
    jobs, paths = [], []
    for s, first in enumerate(range(0, n, per_shard)):
        path = os.path.join(directory, f"vec-{s:06d}.tar")
        paths.append(path)
        if not os.path.exists(path):
            jobs.append((path, first, min(per_shard, n - first), seed))
    if jobs:
        with Pool(procs) as pool:
            list(pool.imap_unordered(write_shard, jobs))
    return paths


# --------------------------------------------------------------------------- stage children


CHILD = """
import json, sys, time
t0 = time.time()
from streamprune.pipeline import RunConfig, run_pipeline
cfg = RunConfig(scheduler={scheduler!r})
for stage, opts in json.loads({stages!r}).items():
    cfg.stages[stage].update(opts)
out = run_pipeline(json.loads({shards!r}), {ws!r}, cfg, until={until!r}, echo=lambda *a, **k: None)
json.dump({{"timings": out["timings"], "process_s": time.time() - t0}}, open({result!r}, "w"))
"""

IMPORTS = """
import streamprune.pipeline, streamprune.shards, streamprune.train, streamprune.embed, streamprune.index
import streamprune.extrapolate, streamprune.prune, torch, faiss, zarr, dask
"""


def run_child(code: str, log_path: str) -> tuple[int, float, int, float]:
    """Run ``python -c code``; returns (exit status, wall s, peak RSS bytes, CPU s) of that process."""
    env = {**os.environ, "STREAMPRUNE_PROGRESS": "0", "PYTHONPATH": ROOT}
    t0 = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return proc.returncode, time.time() - t0, usage.ru_maxrss * 1024, cpu  # ru_maxrss is KiB on Linux


def stage_options(args: argparse.Namespace, reshard: str) -> dict:
    """Every stage option, pinned: today's pipeline defaults overridden by the benchmark's choices.

    Pinning the defaults keeps a workspace valid (its stage markers matching) while the package's
    defaults change between runs of a long benchmark, so ``--reuse`` can resume it.
    """
    from streamprune.pipeline import DEFAULTS

    opts = json.loads(json.dumps(DEFAULTS))
    opts["catalog"]["max_member_bytes"] = 1 << 30
    overrides = {
        "subset": {"fraction": args.fraction, "seed": 0},
        "score": {"scores": ["du"], "model": "mlp", "epochs": args.epochs, "window": args.window,
                  "input": "vector", "num_classes": CLASSES, "device": "cpu", "cache_memory": args.cache_memory},
        "embed": {"dtype": "float32"},
        "index": {"k": args.k, "factory": "auto"},
        "extrapolate": {"methods": args.methods.split(",")},
        "prune": {"source": "knn", "strategy": "hard", "keep_fraction": args.keep, "reshard": reshard},
    }
    for stage, values in overrides.items():
        opts[stage].update(values)
    return opts


def row_line(stage: str, r: dict) -> str:
    """One line of the per-stage table."""
    if "failed" in r:
        return f"{stage:<12} FAILED (exit {r['failed']})"
    floor = f"{r['floor_rss_mib']:>10.0f}" if r.get("floor_rss_mib") is not None else f"{'?':>10}"
    cpu = f"{r['cpu_s']:>8.1f}" if r.get("cpu_s") is not None else f"{'?':>8}"
    return (f"{stage:<12} {r['wall_s']:>9.1f} ({r['process_s']:>7.1f}) {cpu} {r['rows_per_s'] or 0:>11,} "
            f"{r['peak_rss_mib']:>10.0f} {floor}")


def drop_cached(paths: list[str]) -> None:
    """Evict ``paths`` from the page cache (clean pages; no privileges needed), so that the catalog
    stage reads its shards from disk at every scale: freshly generated N-row shards would otherwise
    be cached and 10N-row ones, larger or written long before, not."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_scale(args: argparse.Namespace, n: int, report) -> dict:
    """Generate shards of n rows and run every stage in its own process; returns per-stage figures.

    Each measured stage's figures are also kept in ``row-<stage>.json``; with ``--reuse`` a stage
    that is already done keeps its stored figures (only its floor is measured again), so a run
    stopped part-way resumes at the first stage not done.
    """
    root = os.path.join(args.dir, f"n{n}")
    shard_dir, ws, reshard = os.path.join(root, "shards"), os.path.join(root, "ws"), os.path.join(root, "reshard")
    if not args.reuse:
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(reshard, ignore_errors=True)
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith(("row-", "result-")):
                os.unlink(os.path.join(root, name))
    t0 = time.time()
    shards = make_shards(shard_dir, n, args.per_shard, args.seed, args.procs)
    gen_s = time.time() - t0
    size = sum(os.path.getsize(p) for p in shards)
    report(f"\nN = {n:,}: {len(shards)} shards, {size / 2**30:.2f} GiB, generated in {gen_s:.0f}s")
    os.makedirs(root, exist_ok=True)
    log_path = os.path.join(root, "stages.log")
    stages = json.dumps(stage_options(args, reshard))
    rows: dict[str, dict] = {}
    for until in STAGES[:STAGES.index(args.last_stage) + 1]:
        if until == "catalog" and not args.warm_shards:
            drop_cached(shards)
        result = os.path.join(root, f"result-{until}.json")
        stored = os.path.join(root, f"row-{until}.json")
        code = CHILD.format(scheduler=args.scheduler, stages=stages, shards=json.dumps(shards), ws=ws,
                            until=until, result=result)
        rc, wall, rss, cpu = run_child(code, log_path)
        if rc != 0:
            rows[until] = {"failed": rc}
            report(row_line(until, rows[until]) + f"; see {log_path}")
            break
        with open(result) as f:
            out = json.load(f)
        # this stage's entries (score = train + score; extrapolate = "extrapolate du-knn")
        mine = [t for t in out["timings"] if t["stage"].split()[0].split("-")[0] in _names(until)]
        stage_s = sum(t["wall_s"] for t in mine)
        skipped = all(t["skipped"] for t in mine)
        note = ""
        if skipped and os.path.exists(stored):
            with open(stored) as f:
                r = json.load(f)
            floor, floor_cpu = rss, cpu  # this run was the skipped one
            note = "  (stored figures; stage was done)"
        else:
            r = {"wall_s": round(stage_s, 2), "process_s": round(out["process_s"], 2), "process_cpu_s": round(cpu, 1),
                 "rows_per_s": round(n / stage_s) if stage_s > 0 else None,
                 "peak_rss_mib": round(rss / 2**20, 1), "skipped": skipped}
            # the same process once more, now that the stage is done: imports + marker checks only
            rc_floor, _, floor, floor_cpu = run_child(code, log_path)
            if rc_floor != 0:
                floor = floor_cpu = None
            if skipped:
                note = "  (skipped: already done, no stored figures)"
        r["floor_rss_mib"] = round(floor / 2**20, 1) if floor is not None else None
        # the stage's own CPU (all threads), imports and marker checks excluded
        r["cpu_s"] = round(max(0.0, r["process_cpu_s"] - floor_cpu), 1) if floor_cpu is not None else None
        rows[until] = r
        if not r["skipped"]:
            with open(stored, "w") as f:
                json.dump(r, f)
        report(row_line(until, r) + note)
    index = {}
    try:
        with open(os.path.join(ws, "index", "params.json")) as f:
            params = json.load(f)
        for graph, p in params.items():
            index[graph] = {k: p.get(k) for k in ("factory", "n_index", "n_train", "nprobe", "refine", "chunk_rows",
                                                  "recall_at_k", "timings")}
            report(f"index {graph}: {index[graph]}")
    except (OSError, KeyError, ValueError):
        pass
    return {"n": n, "shards": len(shards), "bytes": size, "gen_s": round(gen_s, 1), "stages": rows, "index": index}


def _names(until: str) -> tuple[str, ...]:
    return ("train", "score") if until == "score" else (until,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="rows at scale 1 (10N is measured too)")
    ap.add_argument("--scales", default="1,10", help="comma-separated multiples of N")
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--window", type=int, default=3, help="DU window (<= epochs)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--methods", default="knn",
                    help="extrapolation methods (e.g. knn,label-aware: the index stage then also builds the "
                         "all-rows graph, an IVF-PQ index over every row from 50k rows)")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-memory", default=None,
                    help="score's in-memory cache budget (e.g. 16MiB: stream the subset at every scale)")
    ap.add_argument("--last-stage", default="prune", choices=STAGES, help="stop after this stage")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="processes writing shards")
    ap.add_argument("--dir", default="/tmp/bench_scale")
    ap.add_argument("--out", default=None, help="also append the report to this file")
    ap.add_argument("--reuse", action="store_true", help="keep an existing workspace (stages skip)")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--warm-shards", action="store_true",
                    help="leave the shards in the page cache before the catalog stage (default: evict them)")
    args = ap.parse_args()

    def report(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    os.makedirs(args.dir, exist_ok=True)
    report(f"bench_scale: N={args.n:,} scales={args.scales} scheduler={args.scheduler} cpus={os.cpu_count()} "
           f"fraction={args.fraction} epochs={args.epochs} k={args.k} keep={args.keep} methods={args.methods}")
    rc, _, base, _ = run_child(IMPORTS, os.path.join(args.dir, "imports.log"))
    report(f"import-only process peak RSS: {base / 2**20:.0f} MiB")
    report(f"{'stage':<12} {'wall s':>9} {'(proc s)':>9} {'CPU s':>8} {'rows/s':>11} {'RSS MiB':>10} {'floor MiB':>10}")
    results = {"import_rss_mib": round(base / 2**20, 1), "scales": {}}
    scales = [int(s) for s in args.scales.split(",")]
    for scale in scales:
        n = args.n * scale
        results["scales"][scale] = run_scale(args, n, report)
        if not args.keep_files:
            shutil.rmtree(os.path.join(args.dir, f"n{n}", "reshard"), ignore_errors=True)
    if len(scales) == 2:
        lo, hi = (results["scales"][s]["stages"] for s in scales)
        n_lo, n_hi = args.n * scales[0], args.n * scales[1]
        ref = (n_hi * math.log(n_hi)) / (n_lo * math.log(n_lo))
        report(f"\nratios {scales[1]}N / {scales[0]}N (time reference N log N: {ref:.2f}; "
               f"RSS target <= 1.2 unless noted)")
        report(f"{'stage':<12} {'time':>7} {'CPU':>7} {'RSS':>7} {'RSS-floor':>10}  note")
        ratios = {}
        for st in STAGES:
            a, b = lo.get(st, {}), hi.get(st, {})
            if "wall_s" not in a or "wall_s" not in b:
                continue
            t = b["wall_s"] / a["wall_s"] if a["wall_s"] else float("nan")
            c = b["cpu_s"] / a["cpu_s"] if a.get("cpu_s") and b.get("cpu_s") is not None else float("nan")
            m = b["peak_rss_mib"] / a["peak_rss_mib"]
            m_net = ((b["peak_rss_mib"] - b["floor_rss_mib"]) / max(a["peak_rss_mib"] - a["floor_rss_mib"], 1.0)
                     if a.get("floor_rss_mib") is not None and b.get("floor_rss_mib") is not None else float("nan"))
            flag = "" if m <= 1.2 else ("expected: " + EXPECTED_GROWTH[st] if st in EXPECTED_GROWTH else "GROWS")
            ix = [results["scales"][s_].get("index", {}) for s_ in scales]
            kinds = [{g: p.get("factory") for g, p in i.items()} for i in ix]
            if st == "index" and m > 1.2 and kinds[0] != kinds[1]:
                flag = f"index kinds differ: {kinds[0]} at N, {kinds[1]} at 10N: compare like with like"
            ratios[st] = {"time": round(t, 2), "cpu": round(c, 2), "rss": round(m, 3), "rss_above_floor": round(m_net, 3)}
            report(f"{st:<12} {t:>7.2f} {c:>7.2f} {m:>7.3f} {m_net:>10.3f}  {flag}")
        results["ratios"] = ratios
        results["time_reference"] = round(ref, 2)
    with open(os.path.join(args.dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(json.dumps(results))


if __name__ == "__main__":
    main()
