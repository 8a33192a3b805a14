"""Benchmark: extrapolation fidelity and pruned accuracy on augmented digits, clean and noisy.

For each dataset (digits with 0 % and 10 % flipped labels), data seed and subset fraction:
trains on the subset and on all rows (full-data DU, the ground truth), embeds, builds the graphs,
extrapolates DU with knn, gcn and label-aware, and reports Pearson/Spearman against full-data DU
on non-seed rows; then trains fresh models on pruned sets (30/50/70 % pruning, i.e. keep
0.7/0.5/0.3) chosen by hard (label-aware DU), hard-clean (label-aware DU), full-data DU and random,
plus all rows, and reports test accuracy.

    python scripts/bench_extrapolation.py --seeds 0,1,2 --fractions 0.1,0.2 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")


def one_setting(root: str, noise: float, data_seed: int, fraction: float, args) -> dict:
    from streamprune.demo import make_demo
    from streamprune.evaluate import evaluate
    from streamprune.pipeline import RunConfig, run_pipeline

    data = os.path.join(root, f"data-n{noise}-s{data_seed}")
    info_path = os.path.join(data, "bench-info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    else:
        info = make_demo(data, noise=noise, seed=data_seed)
        with open(info_path, "w") as f:
            json.dump(info, f)
    ws = os.path.join(root, f"ws-n{noise}-s{data_seed}-f{fraction}")
    cfg = RunConfig.load(None, {
        "subset": {"fraction": fraction, "seed": data_seed},
        "score": {"scores": ["du"], "epochs": args.epochs, "model": "cnn", "full": True, "seed": data_seed},
        "index": {"k": 20},
        "extrapolate": {"methods": args.methods.split(","), "gcn_epochs": args.gcn_epochs},
        "prune": {"source": "label-aware", "strategy": "hard", "keep_fraction": 0.7, "name": "bench"},
    }, scheduler="threads")
    t0 = time.time()
    run_pipeline([info["train_pattern"]], ws, cfg, echo=lambda *a: None)
    keeps = [float(k) for k in args.keeps.split(",")]
    ev = evaluate(ws, "du", pruning_curve_keeps=keeps, epochs=args.curve_epochs, test_shards=info["test"],
                  seeds=args.train_seeds, strategies=("hard", "hard-clean"))
    out = {"noise": noise, "data_seed": data_seed, "fraction": fraction, "wall_s": round(time.time() - t0, 1),
           "fidelity": ev["fidelity"], "pruning": {}}
    for label, by_keep in ev["pruning_curve"]["runs"].items():
        out["pruning"][label] = {k: round(v["accuracy"]["mean"], 4) for k, v in by_keep.items()}
    out["pruning"]["all rows"] = round(ev["pruning_curve"]["all_rows"]["accuracy"]["mean"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0", help="data seeds (dataset noise draw, subset, training)")
    ap.add_argument("--fractions", default="0.2")
    ap.add_argument("--noise", default="0.0,0.1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--curve-epochs", type=int, default=15)
    ap.add_argument("--gcn-epochs", type=int, default=25)
    ap.add_argument("--keeps", default="0.7,0.5,0.3")
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--methods", default="knn,gcn,label-aware")
    ap.add_argument("--out", default=None)
    ap.add_argument("--root", default=None, help="work directory; re-using one re-uses finished stages and runs")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-extrap-")
    os.makedirs(root, exist_ok=True)
    results = []
    for noise in [float(x) for x in args.noise.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            for fraction in [float(x) for x in args.fractions.split(",")]:
                r = one_setting(root, noise, seed, fraction, args)
                results.append(r)
                fid = {m: round(v.get("pearson_nonseed", v.get("pearson_seed_rows", float("nan"))), 3)
                       for m, v in r["fidelity"].items()}
                print(json.dumps({"noise": noise, "seed": seed, "fraction": fraction, "pearson": fid,
                                  "pruned_acc": r["pruning"], "wall_s": r["wall_s"]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
