"""Benchmark: extrapolation fidelity and pruned accuracy on augmented digits, clean and noisy.

For each dataset (digits with 0 % and 10 % flipped labels), data seed and subset fraction:
trains on the subset and on all rows (full-data DU, the ground truth; trained once per dataset
and shared by its subset fractions), embeds, builds the graphs, extrapolates DU with every
method, and reports Pearson/Spearman against full-data DU on non-seed rows, retained-set recall,
tail Spearman, the oracle gap of kNN's k and the cost of each path.  At the fractions named by
``--curve-fractions`` it then trains fresh models on pruned sets (30/50/70 % pruning, i.e. keep
0.7/0.5/0.3) chosen by hard and hard-clean over every score source, random, and all rows, and
reports test accuracy, error-set Jaccard and agreement against the full-data selection.
The closing tables give mean ± std over the data seeds.

    python scripts/bench_extrapolation.py --seeds 0,1,2 --fractions 0.1,0.2 --curve-fractions 0.2 \\
        --root /tmp/bench-extrap --out results.json

Re-using ``--root`` re-uses finished stages and cached training runs: adding a method or a seed
only computes what is new.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")

def shared(full_runs: int) -> list[str]:
    """Artifacts that do not depend on the subset, copied from the first fraction's workspace (markers last)."""
    from streamprune.scoring import score_array_path, score_key
    from streamprune.workspace import train_key

    runs = range(full_runs)
    return (["catalog", "streamprune.json", "errors.jsonl"] + [train_key(True, r) for r in runs]
            + [score_array_path("du", True, r) for r in runs] + ["_stages/catalog.json"]
            + [f"_stages/{train_key(True, r)}.json" for r in runs]
            + [f"_stages/{score_key('du', True, r)}.json" for r in runs])


def dataset(root: str, noise: float, data_seed: int) -> dict:
    from streamprune.demo import make_demo

    data = os.path.join(root, f"data-n{noise}-s{data_seed}")
    info_path = os.path.join(data, "bench-info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return json.load(f)
    info = make_demo(data, noise=noise, seed=data_seed)
    with open(info_path, "w") as f:
        json.dump(info, f)
    return info


def share_full_scores(src_ws: str, dst_ws: str, full_runs: int) -> None:
    """Give a workspace another's catalog and full-data scores (same shards, same config) where it lacks them."""
    if not os.path.exists(os.path.join(src_ws, "_stages", "score-du-full.json")):
        return
    for rel in shared(full_runs):
        src, dst = os.path.join(src_ws, rel), os.path.join(dst_ws, rel)
        if not os.path.exists(src) or os.path.exists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)


def one_setting(root: str, noise: float, data_seed: int, fraction: float, curve: bool, args,
                share_from: str | None) -> dict:
    from streamprune.evaluate import evaluate
    from streamprune.pipeline import RunConfig, run_pipeline

    info = dataset(root, noise, data_seed)
    ws = os.path.join(root, f"ws-n{noise}-s{data_seed}-f{fraction}")
    if share_from:
        share_full_scores(share_from, ws, args.full_runs)
    cfg = RunConfig.load(None, {
        **({"catalog": {"max_member_bytes": args.max_member_bytes}} if args.max_member_bytes else {}),
        "subset": {"fraction": fraction, "seed": data_seed},
        "score": {"scores": ["du"], "epochs": args.epochs, "model": "cnn", "full": True, "seed": data_seed,
                  "full_runs": args.full_runs},
        "index": {"k": 20},
        "extrapolate": {"methods": args.methods.split(","), "gcn_epochs": args.gcn_epochs},
        "prune": {"source": "label-aware", "strategy": "hard", "keep_fraction": 0.7, "name": "bench"},
    }, scheduler="threads")
    t0 = time.time()
    run_pipeline([info["train_pattern"]], ws, cfg, echo=lambda *a: None)
    keeps = [float(k) for k in args.keeps.split(",")] if curve else None
    ev = evaluate(ws, "du", pruning_curve_keeps=keeps, epochs=args.curve_epochs, test_shards=info["test"],
                  seeds=args.train_seeds, strategies=("hard", "hard-clean"),
                  curve_sources=args.curve_sources.split(",") if args.curve_sources else None)
    return {"noise": noise, "data_seed": data_seed, "fraction": fraction, "wall_s": round(time.time() - t0, 1),
            "ws": ws, "evaluation": ev}


def _ms(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f}±{v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def summary(results: list[dict]) -> str:
    """Mean ± std over data seeds of every figure, one block per (noise, fraction)."""
    lines = []
    groups: dict = {}
    for r in results:
        groups.setdefault((r["noise"], r["fraction"]), []).append(r["evaluation"])
    for (noise, fraction), evs in sorted(groups.items()):
        lines.append(f"\n## noise {noise:.0%}, subset {fraction:.0%} ({len(evs)} seeds)")
        methods = [m for m in evs[0]["fidelity"] if m != "seed"]
        lines.append(f"{'method':<13}{'pearson':>14}{'spearman':>14}{'recall@0.3':>14}{'recall@0.7':>14}"
                     f"{'top-10% sp':>14}{'speedup':>14}")
        refs = [e["reference"] for e in evs if "reference" in e]
        seed_p = [e["fidelity"]["seed"]["pearson_seed_rows"] for e in evs if "seed" in e["fidelity"]]
        lines.append(f"{'seed rows':<13}{_ms(seed_p):>14}")
        for m in methods:
            f = [e["fidelity"][m] for e in evs]
            sq = [e["selection_quality"][m] for e in evs]
            cost = [e["cost"]["methods"].get(m, {}).get("speedup") for e in evs]
            lines.append(f"{m:<13}{_ms([x['pearson_nonseed'] for x in f]):>14}"
                         f"{_ms([x['spearman_nonseed'] for x in f]):>14}"
                         f"{_ms([x['retained_recall']['0.3'] for x in sq]):>14}"
                         f"{_ms([x['retained_recall']['0.7'] for x in sq]):>14}"
                         f"{_ms([x['tail_spearman']['top'] for x in sq]):>14}{_ms(cost):>14}")
        if refs:
            lines.append(f"reference: {refs[0]['runs']} full-data runs; pairwise Pearson on non-seed rows "
                         f"{_ms([r['retest_pearson']['mean'] for r in refs])}, Spearman "
                         f"{_ms([r['retest_spearman']['mean'] for r in refs])}; ceiling against one run "
                         f"{_ms([r['ceiling_one_run'] for r in refs])}")
            lines.append(f"{'method':<13}{'vs each run':>14}{'/ run-vs-run':>14}{'vs mean':>14}{'sp vs mean':>14}")
            for m in methods:
                f = [e["fidelity"][m] for e in evs]
                lines.append(f"{m:<13}{_ms([x['pearson_nonseed_vs_runs'] for x in f]):>14}"
                             f"{_ms([x['vs_runs_over_retest'] for x in f]):>14}"
                             f"{_ms([x['pearson_nonseed_vs_mean'] for x in f]):>14}"
                             f"{_ms([x['spearman_nonseed_vs_mean'] for x in f]):>14}")
        ks = [e.get("oracle", {}).get("knn_k", {}) for e in evs]
        if all(k.get("oracle") is not None for k in ks):
            lines.append("knn k (seeds -> oracle, gap): " + ", ".join(
                f"{k['chosen']}->{k['oracle']} ({k['gap']:.3f})" for k in ks))
        pcs = [e["pruning_curve"] for e in evs if e.get("pruning_curve")]
        if not pcs:
            continue
        keeps = pcs[0]["keeps"]
        lines.append(f"{'pruned test accuracy':<26}" + "".join(f"{'keep ' + str(k):>16}" for k in keeps))
        lines.append(f"{'all rows':<26}{_ms([p['all_rows']['accuracy']['mean'] for p in pcs]):>16}")
        for label in pcs[0]["runs"]:
            cells = [_ms([p["runs"].get(label, {}).get(str(k), {}).get("accuracy", {}).get("mean", np.nan)
                          for p in pcs]) for k in keeps]
            lines.append(f"{label:<26}" + "".join(f"{c:>16}" for c in cells))
        lines.append(f"{'error-set Jaccard vs full':<26}")
        for label in pcs[0]["selection"]:
            cells = [_ms([p["selection"].get(label, {}).get(str(k), {}).get("error_jaccard", {}).get("mean", np.nan)
                          for p in pcs]) for k in keeps]
            lines.append(f"{label:<26}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0", help="data seeds (dataset noise draw, subset, training)")
    ap.add_argument("--fractions", default="0.2")
    ap.add_argument("--curve-fractions", default=None, help="fractions that get a pruning curve (default: all)")
    ap.add_argument("--noise", default="0.0,0.1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--curve-epochs", type=int, default=15)
    ap.add_argument("--gcn-epochs", type=int, default=25)
    ap.add_argument("--keeps", default="0.7,0.5,0.3")
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--full-runs", type=int, default=1,
                    help="full-data runs per dataset (training seeds s, s+1, ...): fidelity also against their "
                         "mean, and how well they agree with each other")
    ap.add_argument("--methods", default="knn,gcn,label-aware,propagate,kernel")
    ap.add_argument("--out", default=None)
    ap.add_argument("--curve-sources", default=None, help="score sources of the curve (default: all present)")
    ap.add_argument("--fidelity-first", action="store_true",
                    help="run every setting without curves first, then again with them")
    ap.add_argument("--max-member-bytes", type=int, default=None,
                    help="catalog member size limit (default: the product's); set it to a work directory's "
                         "old value to re-use that directory")
    ap.add_argument("--root", default=None, help="work directory; re-using one re-uses finished stages and runs")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="bench-extrap-")
    os.makedirs(root, exist_ok=True)
    fractions = [float(x) for x in args.fractions.split(",")]
    curve_fr = fractions if args.curve_fractions is None else [float(x) for x in args.curve_fractions.split(",") if x]
    results = []
    seeds = [int(x) for x in args.seeds.split(",")]
    noises = [float(x) for x in args.noise.split(",")]
    # fidelity of every setting first (cheap), then the pruning curves (many training runs)
    passes = [False, True] if args.fidelity_first else [None]
    for curve_pass in passes:
        results = []
        for seed in seeds:
            for noise in noises:
                first = None
                for fraction in fractions:
                    curve = fraction in curve_fr and curve_pass is not False
                    r = one_setting(root, noise, seed, fraction, curve, args, first)
                    first = first or r["ws"]
                    results.append(r)
                    ev = r["evaluation"]
                    fid = {m: round(v.get("pearson_nonseed", v.get("pearson_seed_rows", float("nan"))), 3)
                           for m, v in ev["fidelity"].items()}
                    acc = {label: {k: round(v["accuracy"]["mean"], 4) for k, v in by_keep.items()}
                           for label, by_keep in ev.get("pruning_curve", {}).get("runs", {}).items()}
                    print(json.dumps({"noise": noise, "seed": seed, "fraction": fraction, "pearson": fid,
                                      "pruned_acc": acc, "wall_s": r["wall_s"]}), flush=True)
                    if args.out:
                        with open(args.out, "w") as f:
                            json.dump(results, f, indent=1)
        print(summary(results), flush=True)


if __name__ == "__main__":
    main()
