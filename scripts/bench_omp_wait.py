"""Benchmark: CPU training under OpenMP's default wait policy, ``OMP_WAIT_POLICY=PASSIVE`` and bounded spins.

PyTorch's CPU build runs its intra-op threads on GNU OpenMP, whose threads spin at the end of every
parallel region until the others arrive.  When something else keeps the cores busy (another job on
the box), a spinning thread burns the time slice its descheduled partner needs, and every small
operator waits for the scheduler; with ``PASSIVE`` the threads sleep instead, which costs a wake-up
per region on an idle machine.  streamprune leaves the policy to the user (docs/guide.md,
"Training on a shared CPU machine"); this script measures both sides.

It trains the same subset with the product's trainer (``streamprune score``, in a fresh process
each time) under each of ``--policies``:

* ``default``: OpenMP's own default;
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE``;
* ``spin:N``: ``GOMP_SPINCOUNT=N`` (spin N iterations, then sleep);

once on an idle machine and once beside ``--busy`` processes that spin on every core, for a small
MLP on 48-d vectors and the small CNN on 32-px images.  It prints each run's training samples/s and
eval-pass seconds, and each policy's ratio to the first, per model and load, all measured in one run.

    python scripts/bench_omp_wait.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")


def _spin() -> None:
    while True:
        pass


def _workspace(root: str, kind: str, n: int) -> tuple[str, list[str]]:
    """A catalogued workspace with every row in the subset, and the score options for ``kind``."""
    from shardgen import write_shards

    from streamprune.shards import catalog
    from streamprune.subset import subset

    per = 500
    data = os.path.join(root, f"data-{kind}")
    if kind == "vector":
        shards = write_shards(data, max(1, n // per), per, kind="npy", dim=48, classes=10)
        opts = ["--model", "mlp", "--input", "vector"]
    else:
        shards = write_shards(data, max(1, n // per), per, kind="png", dim=32, classes=10)
        opts = ["--model", "cnn"]
    ws = os.path.join(root, f"ws-{kind}")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=1.0, seed=0, scheduler="sync")
    return ws, opts


def _train(base_ws: str, opts: list[str], epochs: int, policy: str, root: str, tag: str) -> dict:
    """One ``score`` run on a fresh copy of ``base_ws``; its train marker's timings."""
    ws = os.path.join(root, f"run-{tag}")
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base_ws, ws)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spin:"):  # a bounded spin before sleeping (GNU OpenMP's own knob)
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    args = ["score", "-w", ws, "--score", "du", "--epochs", str(epochs), "--window", str(min(epochs, 3)),
            "--scheduler", "sync", *opts]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamprune.cli", *args], env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(ws, "_stages", "train.json")) as f:
        timings = json.load(f)["timings"]
    shutil.rmtree(ws, ignore_errors=True)
    return {"samples_per_s": timings["samples_per_s"], "steps_s": timings["steps_s"], "eval_s": timings["eval_s"],
            "process_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vector-rows", type=int, default=4000)
    ap.add_argument("--image-rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes for the busy runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell, interleaved; the best is kept")
    ap.add_argument("--policies", default="default,passive",
                    help="comma-separated: default, passive, spin:N (GOMP_SPINCOUNT=N); ratios are against the first")
    ap.add_argument("--loads", default="idle,busy", help="comma-separated: idle, busy")
    args = ap.parse_args()
    policies = args.policies.split(",")
    for policy in policies:
        if policy not in ("default", "passive") and not (policy.startswith("spin:") and policy[5:].isdigit()):
            ap.error(f"--policies: {policy!r} is not default, passive or spin:N")

    import torch

    root = tempfile.mkdtemp(prefix="bench-omp-")
    try:
        bases = {kind: _workspace(root, kind, n) for kind, n in (("vector", args.vector_rows),
                                                                   ("image", args.image_rows))}
        rows = []
        for load in args.loads.split(","):
            spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.busy if load == "busy" else 0)]
            for p in spinners:
                p.start()
            try:
                for kind, (ws, opts) in bases.items():
                    best: dict[str, dict] = {}
                    for rep in range(args.repeats):
                        for policy in policies:
                            r = _train(ws, opts, args.epochs, policy, root, f"{kind}-{load}-{policy}-{rep}")
                            if policy not in best or r["samples_per_s"] > best[policy]["samples_per_s"]:
                                best[policy] = r
                    for policy, r in best.items():
                        rows.append({"model": opts[1], "load": load, "policy": policy, **r})
                    for policy in policies[1:]:
                        rows.append({"model": opts[1], "load": load, "policy": f"{policy} / {policies[0]}",
                                     "samples_per_s": round(best[policy]["samples_per_s"]
                                                            / best[policies[0]]["samples_per_s"], 3)})
            finally:
                for p in spinners:
                    p.terminate()
                    p.join()
        print(f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, busy processes {args.busy}, "
              f"epochs {args.epochs}, rows: vector {args.vector_rows}, image {args.image_rows}")
        print(f"{'model':6} {'load':5} {'policy':26} {'samples/s':>10} {'steps s':>8} {'eval s':>7} {'process s':>9}")
        for r in rows:
            print(f"{r['model']:6} {r['load']:5} {r['policy']:26} {r['samples_per_s']:>10} "
                  f"{r.get('steps_s', ''):>8} {r.get('eval_s', ''):>7} {r.get('process_s', ''):>9}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
