"""Evaluation against full-data scores: fidelity, selection quality, pruning curves, cost.

Pure metrics (no I/O) come first and are tested on hand-computed cases; :func:`evaluate` gathers
the workspace's arrays, trains fresh models on pruned sets (cached per run in ``eval/runs/`` so
adding a seed or a keep fraction re-uses what exists) and writes ``eval/<score>.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time

import numpy as np
from tqdm.auto import tqdm

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.workspace import Workspace, fingerprint

log = logging.getLogger(__name__)


# pure metrics ----------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over rows where both are finite (NaN when undefined)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over rows where both are finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return pearson(_ranks(a[ok]), _ranks(b[ok]))


def retained_recall(kept: np.ndarray, kept_ref: np.ndarray) -> float:
    """|kept ∩ kept_ref| / |kept_ref|: how much of the reference selection a method keeps."""
    kept, kept_ref = np.asarray(kept, bool), np.asarray(kept_ref, bool)
    return float((kept & kept_ref).sum() / max(1, kept_ref.sum()))


def tail_spearman(pred: np.ndarray, ref: np.ndarray, tail: float = 0.1) -> dict:
    """Spearman of pred vs ref within the top and the bottom ``tail`` fraction of ref."""
    ok = np.isfinite(pred) & np.isfinite(ref)
    if not ok.any():
        return {"top": float("nan"), "bottom": float("nan")}
    p, r = pred[ok], ref[ok]
    lo, hi = np.quantile(r, [tail, 1 - tail])
    return {"top": spearman(p[r >= hi], r[r >= hi]), "bottom": spearman(p[r <= lo], r[r <= lo])}


def error_jaccard(pred_a: np.ndarray, pred_b: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index of the misclassified test samples of two models (1.0 when both are perfect)."""
    ea, eb = pred_a != truth, pred_b != truth
    union = (ea | eb).sum()
    return 1.0 if union == 0 else float((ea & eb).sum() / union)


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of test samples on which two models predict the same class."""
    return float((np.asarray(pred_a) == np.asarray(pred_b)).mean())


def per_class_accuracy(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Test accuracy of each class (NaN for a class absent from the test set)."""
    return [float((pred[truth == c] == c).mean()) if (truth == c).any() else float("nan") for c in range(num_classes)]


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (0 for one value) of a list of accuracies."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


# workspace gathering -----------------------------------------------------------------------------
_REPLICA = re.compile(r"full_r(\d+)")  # the column suffix of a replica full-data run (score --full-runs)


def _sources_and_runs(ws: Workspace, score: str, who: str = "evaluate", markers: dict[str, dict] | None = None,
                      ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """One read of the workspace's score columns, split into :func:`score_sources` and :func:`reference_runs`
    (``markers``: the workspace's markers when the caller has read them already)."""
    from streamprune.export import score_columns

    sources, runs = {}, {}
    for col, arr in score_columns(ws, markers, who).items():
        if not col.startswith(score + "_"):
            continue
        name = col[len(score) + 1:]
        replica = _REPLICA.fullmatch(name)
        if replica:
            runs[int(replica.group(1))] = arr
        else:
            sources[name.replace("_", "-")] = arr
    if "full" in sources:
        runs[0] = sources["full"]
    return sources, [runs[r] for r in sorted(runs)]


def score_sources(ws: Workspace, score: str, who: str = "evaluate",
                  markers: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Dense (N,) arrays by source: 'seed' (NaN off the subset), 'full', and each extrapolation
    (``who``: the command that stale columns' warnings name)."""
    return _sources_and_runs(ws, score, who, markers)[0]


def reference_runs(ws: Workspace, score: str) -> list[np.ndarray]:
    """Full-data scores of every full-data run, run 0 (``<score>_full``) first, then its replicas."""
    return _sources_and_runs(ws, score)[1]


def _ratio(a: float, b: float) -> float:
    """a / b, NaN unless b > 0 (full-data runs that do not agree make no yardstick)."""
    return a / b if b > 0 else float("nan")


def reference_agreement(runs: list[np.ndarray], rows: np.ndarray) -> dict:
    """How well R ≥ 2 full-data runs agree with each other on ``rows`` (bool mask): pairwise Pearson and
    Spearman (mean, min, max), and the Pearson a perfect predictor of their expected score would reach
    against one run, √(mean pairwise Pearson), if runs differ by independent noise of equal spread."""
    pairs = [(a, b) for a in range(len(runs)) for b in range(a + 1, len(runs))]
    out = {"runs": len(runs), "n_rows": int(rows.sum())}
    for name, fn in (("pearson", pearson), ("spearman", spearman)):
        vals = [fn(runs[a][rows], runs[b][rows]) for a, b in pairs]
        out[f"retest_{name}"] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
    out["ceiling_one_run"] = float(np.sqrt(max(out["retest_pearson"]["mean"], 0.0)))
    return out


def _marker_s(ws: Workspace, key: str) -> float | None:
    m = ws.marker(key)
    return float(m["timings"]["wall_s"]) if m else None


def _path_stages(ws: Workspace, score: str, method: str) -> dict[str, list[str]]:
    """The markers of one extrapolation path beyond training, scoring and embedding, by part:
    the graphs the method reads (knn: the one it was run on; gcn with the kNN prior: both) and,
    for label-aware, the label-disagreement stage it runs first."""
    config = (ws.marker(f"extrapolate-{score}-{method}") or {}).get("config", {})
    if method == "knn":
        graphs = [config.get("graph", "seeds")]
    elif method == "kernel":
        graphs = ["seeds"]
    elif method == "gcn" and config.get("prior", "knn") == "knn":
        graphs = ["all", "seeds"]
    else:
        graphs = ["all"]
    out = {"index": [f"index-{g}" for g in graphs]}
    if method == "label-aware":
        out["disagreement"] = ["score-label_disagreement"]
    return out


def cost_table(ws: Workspace, score: str, methods: list[str]) -> dict:
    """Measured wall time of each extrapolation path vs full-data scoring, and the speedup."""
    full = [_marker_s(ws, "train-full"), _marker_s(ws, f"score-{score}-full")]
    full_s = sum(x for x in full if x is not None) if full[0] is not None else None
    base = {"train": _marker_s(ws, "train"), "score": _marker_s(ws, f"score-{score}"), "embed": _marker_s(ws, "embed")}
    rows = {}
    for method in methods:
        parts = dict(base)
        for part, keys in _path_stages(ws, score, method).items():
            walls = [w for w in (_marker_s(ws, key) for key in keys) if w is not None]
            parts[part] = sum(walls) if walls else None
        parts["extrapolate"] = _marker_s(ws, f"extrapolate-{score}-{method}")
        known = {k: v for k, v in parts.items() if v is not None}
        total = sum(known.values())
        rows[method] = {"parts_s": known, "total_s": round(total, 3),
                        "speedup": round(full_s / total, 3) if full_s and total else None}
    return {"full_s": full_s, "methods": rows}


def oracle_gap(chosen: float, table_chosen: dict, table_oracle: dict) -> dict:
    """The parameter chosen on held-out seeds vs the one the full-data scores would pick, and the gap."""
    finite = {c: v for c, v in table_oracle.items() if np.isfinite(v)}
    if not finite:
        return {"chosen": chosen, "oracle": None, "gap": None, "oracle_table": table_oracle,
                "seed_table": table_chosen}
    oracle = max(finite, key=lambda c: (finite[c], -float(c)))
    at_chosen = table_oracle.get(chosen, float("nan"))
    return {"chosen": chosen, "pearson_at_chosen": at_chosen, "oracle": oracle, "pearson_at_oracle": finite[oracle],
            "gap": float(finite[oracle] - at_chosen) if np.isfinite(at_chosen) else None,
            "oracle_table": table_oracle, "seed_table": table_chosen}


def knn_k_oracle(ws: Workspace, score: str, full: np.ndarray, non_seed: np.ndarray, chunk_rows: int = 1 << 16) -> dict:
    """kNN's k as chosen on seeds (from its marker) against the k that maximises Pearson with full-data scores.

    Reads the seeds graph chunk by chunk; holds one (N,) prediction per candidate k.
    """
    from streamprune.extrapolate.common import marker_key, seed_scores
    from streamprune.extrapolate.knn import _open_graph, k_candidates, knn_predict

    marker = ws.marker(marker_key(score, "knn"))
    if marker is None:
        return {}
    graph = marker["config"].get("graph", "seeds")
    nbr_arr, dist_arr = _open_graph(ws, graph)
    ks = k_candidates(nbr_arr.shape[1])
    seeds = seed_scores(ws, score)
    n = nbr_arr.shape[0]
    preds = {k: np.full(n, np.nan, np.float32) for k in ks}
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        nbr, dist = nbr_arr[start:stop], dist_arr[start:stop]
        vals = seeds.lookup(nbr)
        for k in ks:
            preds[k][start:stop] = knn_predict(vals[:, :k], dist[:, :k], k)
    table = {k: pearson(preds[k][non_seed], full[non_seed]) for k in ks}
    seed_table = {int(c): v for c, v in marker["counts"].get("validation_pearson", {}).items()}
    return oracle_gap(int(marker["counts"]["k"]), seed_table, table)


def _rows_data(ws: Workspace):
    """Decoded inputs and labels of all rows: the full-training cache, or a cache built for evaluation."""
    from streamprune.train import SubsetData

    key = "train-full" if ws.marker("train-full") is not None else "cache-all"
    if key == "cache-all" and ws.marker("cache-all") is None:
        raise StreamPruneError("evaluate --pruning-curve needs decoded inputs of all rows: run "
                               "`streamprune score --full` first")
    return SubsetData(ws, key, memory_budget=1 << 62)


def _test_data(test_shards: list[str], decode, storage_options: dict, input_shape: tuple[int, ...]):
    """Inputs and labels of the test shards, each input in the training rows' ``input_shape`` (a test sample of
    another shape, e.g. of another dataset, is refused in one line naming its shard and key)."""
    from streamprune.decode import decode_input, decode_label, fit_input
    from streamprune.errors import SampleError
    from streamprune.shards import ErrorPolicy, iter_samples

    xs, ys = [], []
    for url in storage.expand_shards(test_shards, storage_options):
        for s in iter_samples(url, ErrorPolicy("fail"), storage_options):
            try:
                xs.append(fit_input(decode_input(s, decode, url), input_shape, url, s.key, "the training rows'",
                                    hint=False))
            except SampleError as err:
                raise StreamPruneError(f"evaluate --test: {err}") from None
            ys.append(decode_label(s, decode, url))
    if not xs:
        raise StreamPruneError("evaluate: the test shards hold no samples")
    return np.stack(xs), np.asarray(ys, np.int64)


def pruning_curve(ws: Workspace, score: str, keeps: list[float], epochs: int, test_shards: list[str], *,
                  seeds: int = 1, strategies: tuple[str, ...] = ("hard",), sources: list[str] | None = None) -> dict:
    """Test accuracy of fresh models trained on each pruned set (cached runs, mean ± std over seeds)."""
    import torch

    from streamprune.decode import DecodeConfig
    from streamprune.scores import get_score
    from streamprune.select import keep_count_from, select
    from streamprune.train import TrainConfig, fit_and_predict

    train_m = ws.require("train", "evaluate")
    cfg_d = dict(train_m["config"]["train"], epochs=epochs)
    cfg_d.pop("memory_budget", None)
    cfg = TrainConfig(**cfg_d)
    decode = DecodeConfig(**train_m["config"]["decode"])
    data = _rows_data(ws)
    labels = data.labels
    valid = data.valid & (labels >= 0)
    num_classes = int(labels[valid].max()) + 1
    x_test, y_test = _test_data(test_shards, decode, ws.storage_options, data.shape)
    x_test_t = torch.from_numpy(x_test)
    arrays = score_sources(ws, score)
    sources = sources or [s for s in ("full", "knn", "gcn", "label-aware", "propagate", "kernel") if s in arrays]
    higher = get_score(score).higher_is_harder
    results: dict = {"keeps": keeps, "seeds": seeds, "epochs": epochs, "runs": {}, "selection": {}}
    preds: dict = {}
    # Every (source x strategy, random) x keep x seed, plus the all-rows runs: minutes of training
    # that would otherwise pass in silence.  Sources with too few scored rows are taken off below.
    bar = tqdm(total=(len(keeps) * (len(strategies) * len(sources) + 1) + 1) * seeds, desc="pruning curve",
               unit="model", disable=os.environ.get("STREAMPRUNE_PROGRESS", "1") == "0")

    def run(label: str, mask: np.ndarray, seed: int, keep: float) -> dict:
        key = fingerprint({"label": label, "rows": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(),
                           "cfg": cfg_d, "seed": seed, "test": hashlib.sha256(x_test.tobytes()).hexdigest()})[:24]
        cached = ws.read_json("eval", "runs", f"{key}.json")
        if cached is None:
            idx = np.flatnonzero(mask)
            logits = fit_and_predict(data.x[torch.from_numpy(idx)], torch.from_numpy(labels[idx]), x_test_t, cfg,
                                     num_classes, seed)
            pred = logits.argmax(1)
            cached = {"label": label, "keep": keep, "seed": seed, "n_train": int(mask.sum()),
                      "accuracy": float((pred == y_test).mean()), "pred": pred.tolist()}
            ws.write_json(cached, "eval", "runs", f"{key}.json")
        bar.update(1)
        return cached

    for keep in keeps:
        n_keep = keep_count_from(int(valid.sum()), keep_fraction=keep)
        masks = {}
        for strategy in strategies:
            for src in sources:
                s = np.where(valid, arrays[src], np.nan)
                if np.isfinite(s).sum() < n_keep:
                    bar.total -= seeds
                    continue
                opts = {}
                if strategy == "hard-clean":
                    from streamprune.prune import _noise_for_hard_clean, seed_margin_marker

                    noise, drop, _ = _noise_for_hard_clean(ws, s, "auto", seed_margin_marker(ws))
                    opts = {"noise": noise, "drop_count": drop}
                masks[f"{src}/{strategy}"] = select(strategy, s, labels, n_keep, seed=0, higher_is_harder=higher,
                                                    **opts)
        masks["random"] = None
        for label, mask in masks.items():
            accs = []
            for seed in range(seeds):
                m = mask if mask is not None else select("random", None, labels, n_keep, seed=seed, eligible=valid)
                r = run(label, m, seed, keep)
                accs.append(r["accuracy"])
                preds[(label, keep, seed)] = np.asarray(r["pred"])
            entry = {"accuracy": mean_std(accs), "n_train": int(n_keep)}
            if mask is not None:
                entry["kept_per_class"] = [float(mask[valid & (labels == c)].mean()) for c in range(num_classes)]
            results["runs"].setdefault(label, {})[str(keep)] = entry
        # selection quality and behaviour preservation against the full-score selection
        for strategy in strategies:
            ref = masks.get(f"full/{strategy}")
            if ref is None:
                continue
            for label, mask in masks.items():
                if mask is None or label == f"full/{strategy}" or not label.endswith("/" + strategy):
                    continue
                jac = [error_jaccard(preds[(label, keep, s)], preds[(f"full/{strategy}", keep, s)], y_test)
                       for s in range(seeds)]
                agr = [agreement(preds[(label, keep, s)], preds[(f"full/{strategy}", keep, s)]) for s in range(seeds)]
                results["selection"].setdefault(label, {})[str(keep)] = {
                    "retained_recall": retained_recall(mask, ref), "error_jaccard": mean_std(jac),
                    "agreement": mean_std(agr)}
    all_accs = [run("all rows", valid, seed, 1.0)["accuracy"] for seed in range(seeds)]
    bar.close()
    results["all_rows"] = {"accuracy": mean_std(all_accs), "n_train": int(valid.sum())}
    results["per_class_accuracy"] = {
        label: per_class_accuracy(preds[(label, keeps[-1], 0)], y_test, num_classes)
        for label in results["runs"] if (label, keeps[-1], 0) in preds}
    return results


def evaluate(workspace: str | Workspace, score: str = "du", *, pruning_curve_keeps: list[float] | None = None,
             epochs: int = 10, test_shards: list[str] | None = None, seeds: int = 1,
             strategies: tuple[str, ...] = ("hard",), curve_sources: list[str] | None = None,
             storage_options: dict | None = None) -> dict:
    """Fidelity, selection quality and cost of every extrapolation; optional pruning curve.

    ``curve_sources`` limits the score sources trained on for the curve (default: every one present).
    """
    strategies = _check_arguments(pruning_curve_keeps, epochs, test_shards, seeds, strategies)
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    ws.require("catalog", "evaluate")
    t0 = time.time()
    if pruning_curve_keeps and "hard-clean" in strategies:
        from streamprune.prune import seed_margin_marker

        seed_margin_marker(ws)  # computes the seeds' AUM on first use: before the record of what was read
    markers = ws.markers()  # one read: the columns, and the record of what they were made from
    arrays, runs = _sources_and_runs(ws, score, markers=markers)
    if "full" not in arrays:
        raise StreamPruneError(f"evaluate: no full-data scores for {score}; run "
                               f"`streamprune score --full --score {score}` first")
    full = arrays["full"]
    seed_mask = np.isfinite(arrays["seed"]) if "seed" in arrays else np.zeros(len(full), bool)
    valid = np.isfinite(full)
    out: dict = {"score": score, "n": int(len(full)), "n_seed": int(seed_mask.sum()), "fidelity": {},
                 "selection_quality": {}}
    if "seed" in arrays:
        out["fidelity"]["seed"] = {"pearson_seed_rows": pearson(arrays["seed"][seed_mask], full[seed_mask]),
                                   "spearman_seed_rows": spearman(arrays["seed"][seed_mask], full[seed_mask])}
    methods = [m for m in arrays if m not in ("seed", "full")]
    from streamprune.scores import get_score
    from streamprune.select import keep_count_from, select

    higher = get_score(score).higher_is_harder
    if len(runs) > 1:
        ref_rows = valid & ~seed_mask & np.all([np.isfinite(r) for r in runs], axis=0)
        ref_mean = np.mean(runs, axis=0)
        out["reference"] = reference_agreement(runs, ref_rows)
        if "seed" in arrays:
            out["fidelity"]["seed"]["pearson_seed_rows_vs_mean"] = pearson(arrays["seed"][seed_mask],
                                                                           ref_mean[seed_mask])
    for m in methods:
        pred = arrays[m]
        non_seed = valid & ~seed_mask
        out["fidelity"][m] = {
            "pearson_nonseed": pearson(pred[non_seed], full[non_seed]),
            "spearman_nonseed": spearman(pred[non_seed], full[non_seed]),
            "pearson_all": pearson(pred[valid], full[valid]), "spearman_all": spearman(pred[valid], full[valid]),
            "n_nonseed": int(non_seed.sum())}
        if len(runs) > 1:
            ok = ref_rows & np.isfinite(pred)
            vs_runs = float(np.mean([pearson(pred[ok], r[ok]) for r in runs]))
            out["fidelity"][m].update({
                "pearson_nonseed_vs_runs": vs_runs,
                # 1.0: the method agrees with a full-data run as well as another full-data run does
                "vs_runs_over_retest": _ratio(vs_runs, out["reference"]["retest_pearson"]["mean"]),
                "pearson_nonseed_vs_mean": pearson(pred[ok], ref_mean[ok]),
                "spearman_nonseed_vs_mean": spearman(pred[ok], ref_mean[ok])})
        sq = {"tail_spearman": tail_spearman(pred[valid], full[valid]), "retained_recall": {}}
        both = valid & np.isfinite(pred)
        for keep in (0.3, 0.5, 0.7, 0.9):
            try:
                k = keep_count_from(int(both.sum()), keep_fraction=keep)
            except ValueError:  # too few predicted rows to keep any (a method that predicted none)
                sq["retained_recall"][str(keep)] = float("nan")
                continue
            a = select("hard", np.where(both, pred, np.nan), None, k, higher_is_harder=higher)
            b = select("hard", np.where(both, full, np.nan), None, k, higher_is_harder=higher)
            sq["retained_recall"][str(keep)] = retained_recall(a, b)
        out["selection_quality"][m] = sq
    out["cost"] = cost_table(ws, score, methods)
    if "knn" in methods:
        out["oracle"] = {"knn_k": knn_k_oracle(ws, score, full, valid & ~seed_mask)}
    if pruning_curve_keeps:
        out["pruning_curve"] = pruning_curve(ws, score, pruning_curve_keeps, epochs, test_shards, seeds=seeds,
                                             strategies=strategies, sources=curve_sources)
    out["wall_s"] = round(time.time() - t0, 3)
    out["inputs"] = evaluation_inputs(markers, score)  # so that `report` can tell when these figures went stale
    ws.write_json(out, "eval", f"{score}.json")
    return out


def _read_by_evaluation(key: str, score: str) -> bool:
    """Whether an evaluation of ``score`` reads the marker ``key``: the subset, the seed and full-data
    scores of ``score`` and its extrapolations, and what hard-clean ranks by (label disagreement, AUM)."""
    return (key in ("subset", f"score-{score}", "score-label_disagreement", "score-aum")
            or key.startswith((f"score-{score}-full", f"extrapolate-{score}-")))


def evaluation_inputs(markers: dict[str, dict], score: str) -> dict[str, str]:
    """Fingerprints of the markers an evaluation of ``score`` reads: subset, scores and extrapolations."""
    return {k: m["fingerprint"] for k, m in sorted(markers.items()) if _read_by_evaluation(k, score)}


def evaluation_outdated(evaluation: dict, markers: dict[str, dict]) -> list[str]:
    """The markers re-run, removed or added since ``evaluation`` was written (empty: current; an
    evaluation from before the record was kept cannot tell, and is taken as current)."""
    recorded = evaluation.get("inputs")
    if recorded is None:
        return []
    score = evaluation["score"]
    recorded = {k: v for k, v in recorded.items() if _read_by_evaluation(k, score)}  # older records kept every score's
    now = evaluation_inputs(markers, score)
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


def _check_arguments(keeps: list[float] | None, epochs: int, test_shards: list[str] | None, seeds: int,
                     strategies: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`evaluate`'s arguments checked before any work; returns the canonical strategy names."""
    from streamprune.select import canonical, check_keep_fraction

    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise StreamPruneError(f"evaluate: --seeds must be at least 1, not {seeds!r}")
    names = []
    for strategy in strategies:
        try:
            name = canonical(strategy)
        except ValueError as exc:
            raise StreamPruneError(f"evaluate: {exc}") from None
        if name == "influence-budget":  # keeps what its eps allows, not a keep fraction
            raise StreamPruneError("evaluate: strategy influence-budget has no keep fraction; it cannot be on a "
                                   "pruning curve")
        names.append(name)
    if keeps:
        for keep in keeps:
            try:
                check_keep_fraction(keep)
            except ValueError as exc:
                raise StreamPruneError(f"evaluate --pruning-curve: {exc}") from None
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise StreamPruneError(f"evaluate: --epochs must be at least 1, not {epochs!r}")
        if not test_shards:
            raise StreamPruneError("evaluate --pruning-curve needs --test SHARDS (held-out test shards)")
    return tuple(dict.fromkeys(names))


def format_evaluation(out: dict) -> str:
    """Human-readable evaluation tables."""
    lines = [f"evaluation of {out['score']}: {out['n']} rows, {out['n_seed']} seed rows"]
    ref = out.get("reference")
    extra = f"{'vs mean of ' + str(ref['runs']):>16}{'/ run-vs-run':>14}" if ref else ""
    lines.append(f"{'method':<14}{'pearson':>10}{'spearman':>10}{extra}  (non-seed rows vs full-data scores)")
    for m, f in out["fidelity"].items():
        if m == "seed":
            vs_mean = f"{f['pearson_seed_rows_vs_mean']:>16.3f}" if ref else ""
            lines.append(f"{'seed':<14}{f['pearson_seed_rows']:>10.3f}{f['spearman_seed_rows']:>10.3f}{vs_mean}"
                         "  (seed rows)")
        else:
            vs_mean = f"{f['pearson_nonseed_vs_mean']:>16.3f}{f['vs_runs_over_retest']:>14.2f}" if ref else ""
            lines.append(f"{m:<14}{f['pearson_nonseed']:>10.3f}{f['spearman_nonseed']:>10.3f}{vs_mean}")
    if ref:
        rp, rs = ref["retest_pearson"], ref["retest_spearman"]
        lines.append(f"reference: {ref['runs']} full-data runs agree with each other at Pearson {rp['mean']:.3f} "
                     f"({rp['min']:.3f}-{rp['max']:.3f}), Spearman {rs['mean']:.3f} on non-seed rows; a perfect "
                     f"predictor would reach ~{ref['ceiling_one_run']:.3f} against one run; '/ run-vs-run' is a "
                     f"method's mean Pearson against each run over the runs' agreement with each other")
    cost = out.get("cost", {})
    if cost.get("full_s"):
        lines.append(f"cost: full-data scoring {cost['full_s']:.1f}s")
        for m, c in cost["methods"].items():
            sp = f"{c['speedup']:.2f}x" if c["speedup"] else "-"
            lines.append(f"  {m:<12} {c['total_s']:8.1f}s  speedup {sp}")
    k_or = out.get("oracle", {}).get("knn_k")
    if k_or and k_or.get("oracle") is not None:
        gap = f"{k_or['gap']:.3f}" if k_or["gap"] is not None else "-"
        lines.append(f"knn k chosen on seeds: {k_or['chosen']} (Pearson {k_or['pearson_at_chosen']:.3f}); "
                     f"oracle k from full-data scores: {k_or['oracle']} (Pearson {k_or['pearson_at_oracle']:.3f}); "
                     f"gap {gap}")
    pc = out.get("pruning_curve")
    if pc:
        spread = pc["seeds"] > 1  # one seed has no spread to show

        def acc(a: dict) -> str:
            return f"{a['mean']:.4f}" + (f"±{a['std']:.4f}" if spread else "")
        lines.append(f"pruned test accuracy (mean ± std over {pc['seeds']} seeds)" if spread
                     else "pruned test accuracy (1 seed: no spread; more --seeds give a standard deviation)")
        rows = [(label, [acc(by_keep[str(k)]["accuracy"]) if by_keep.get(str(k), {}).get("accuracy") else "-"
                         for k in pc["keeps"]]) for label, by_keep in pc["runs"].items()]
        if "all_rows" in pc:  # one value: under the first keep column, not under the labels
            rows.insert(0, ("all rows (no pruning)", [acc(pc["all_rows"]["accuracy"])]))
        head = [f"keep {k}" for k in pc["keeps"]]
        label_w = max(len(text) for text in ["selection", *(label for label, _ in rows)]) + 2
        cell_w = max(len(text) for text in head + [c for _, cells in rows for c in cells]) + 2
        lines.append(f"{'selection':<{label_w}}" + "".join(f"{h:>{cell_w}}" for h in head))
        for label, cells in rows:
            lines.append(f"{label:<{label_w}}" + "".join(f"{c:>{cell_w}}" for c in cells))
    return "\n".join(lines)
