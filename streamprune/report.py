"""`streamprune report`: PNG plots and a markdown summary of a workspace."""

from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.evaluate import evaluation_outdated, format_evaluation, score_sources
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Write a figure to ``path`` and close it; a full disk's error names the file."""
    try:
        with storage.naming(path):
            fig.savefig(path, dpi=110)
    finally:
        _plt().close(fig)


def plot_histograms(arrays: dict[str, np.ndarray], path: str, score: str) -> None:
    """Score distributions: seed vs each extrapolation (and full-data when known)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    bins = np.linspace(np.quantile(finite, 0.001), np.quantile(finite, 0.999), 60)
    seed = arrays.get("seed")
    for name, arr in arrays.items():
        vals = arr[np.isfinite(arr)]
        if name not in ("seed", "full") and seed is not None:
            vals = arr[np.isfinite(arr) & ~np.isfinite(seed)]  # extrapolated rows only
        if len(vals) == 0:  # a method that predicted no row: nothing to draw (its NaN figures say so)
            continue
        ax.hist(vals, bins=bins, density=True, histtype="step", linewidth=1.6,
                label=f"{name} ({len(vals)} rows)")
    ax.set_xlabel(score)
    ax.set_ylabel("density")
    ax.set_title(f"{score}: measured seed scores vs extrapolated rows")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_scatter(arrays: dict[str, np.ndarray], path: str, score: str, max_points: int = 4000) -> None:
    """Extrapolated vs full-data scores on non-seed rows, one panel per method."""
    plt = _plt()
    methods = [m for m in arrays if m not in ("seed", "full")]
    full, seed = arrays["full"], arrays.get("seed")
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    rng = np.random.default_rng(0)
    from streamprune.evaluate import pearson

    for ax, m in zip(axes[0], methods):
        ok = np.isfinite(arrays[m]) & np.isfinite(full) & (~np.isfinite(seed) if seed is not None else True)
        idx = np.flatnonzero(ok)
        if len(idx) > max_points:
            idx = rng.choice(idx, max_points, replace=False)
        ax.scatter(full[idx], arrays[m][idx], s=3, alpha=0.4)
        ax.set_xlabel(f"full-data {score}")
        ax.set_ylabel(f"{m} {score}")
        ax.set_title(f"{m}: Pearson {pearson(arrays[m][ok], full[ok]):.3f}")
    fig.tight_layout()
    _save(fig, path)


def plot_pruning_curve(pc: dict, path: str) -> None:
    """Test accuracy vs keep fraction per selection, with std error bars over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keeps = pc["keeps"]
    for label, by_keep in pc["runs"].items():
        ks = [k for k in keeps if str(k) in by_keep]
        mean = [by_keep[str(k)]["accuracy"]["mean"] for k in ks]
        std = [by_keep[str(k)]["accuracy"]["std"] for k in ks]
        style = dict(linestyle="--", color="black") if label == "random" else {}
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=label, **style)
    ax.set_xlabel("keep fraction")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"pruning curve ({pc['seeds']} seed(s), {pc['epochs']} epochs)")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_kept_per_class(per_class: dict[str, list[float]], path: str) -> None:
    """Fraction of each class kept by each selection."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = list(per_class)
    n_classes = max(len(v) for v in per_class.values())
    width = 0.8 / max(1, len(labels))
    for i, name in enumerate(labels):
        ax.bar(np.arange(n_classes) + i * width, per_class[name], width=width, label=name)
    ax.set_xlabel("class")
    ax.set_ylabel("fraction kept")
    ax.set_xticks(np.arange(n_classes) + 0.4 - width / 2, [str(c) for c in range(n_classes)])
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)  # outside: bars fill the axes
    fig.tight_layout()
    _save(fig, path)


def _prune_stats(ws: Workspace) -> dict[str, dict]:
    out = {}
    for name in storage.listdir(ws.path("prune"), ws.storage_options):
        stats = ws.read_json("prune", name, "stats.json")
        if stats:
            out[name] = stats
    return out


def _write_report(ws: Workspace, local_dir: str, score: str) -> list[str]:
    """The plots and report.md in ``local_dir``; returns their file names."""
    markers = ws.markers()  # one read: the columns, and whether the evaluation and pruned sets are current
    arrays = score_sources(ws, score, who="report", markers=markers)
    if not arrays:
        raise StreamPruneError(f"report: no {score} scores in {ws.url}; run `streamprune score` first")
    files, md = [], [f"# streamprune report: {score}", "", f"Workspace: `{ws.url}`", ""]
    plot_histograms(arrays, os.path.join(local_dir, "scores_hist.png"), score)
    files.append("scores_hist.png")
    md += ["## Score distributions", "", "Measured seed scores against the extrapolated rows: an extrapolator that "
           "averages neighbours narrows the distribution (over-smoothing).", "", "![](scores_hist.png)", ""]
    evaluation = ws.read_json("eval", f"{score}.json")
    if "full" in arrays and any(m not in ("seed", "full") for m in arrays):
        plot_scatter(arrays, os.path.join(local_dir, "scatter.png"), score)
        files.append("scatter.png")
        md += ["## Extrapolated vs full-data scores (non-seed rows)", "", "![](scatter.png)", ""]
    if evaluation:
        changed = evaluation_outdated(evaluation, markers)
        md += ["## Evaluation", ""]
        if changed:  # shown, but flagged: the figures describe results that have since been replaced
            line = (f"these figures are out of date: {', '.join(changed)} changed since `evaluate` ran; re-run "
                    f"`streamprune evaluate -w {ws.url} --score {score}` (with the same options)")
            log.warning("report: %s", line)
            md += [f"**Out of date:** {line}.", ""]
        md += ["```", format_evaluation(evaluation), "```", ""]
        pc = evaluation.get("pruning_curve")
        if pc:
            plot_pruning_curve(pc, os.path.join(local_dir, "pruning_curve.png"))
            files.append("pruning_curve.png")
            md += ["## Pruning curve", "", "![](pruning_curve.png)", ""]
            per_class = {k: v[str(pc["keeps"][0])]["kept_per_class"] for k, v in pc["runs"].items()
                         if "kept_per_class" in v.get(str(pc["keeps"][0]), {})}
            if per_class:
                plot_kept_per_class(per_class, os.path.join(local_dir, "kept_per_class.png"))
                files.append("kept_per_class.png")
                md += [f"## Kept fraction per class (keep {pc['keeps'][0]})", "", "![](kept_per_class.png)", ""]
    stats = _prune_stats(ws)
    if stats:
        md += ["## Pruned sets", ""]
        for name, st in stats.items():
            stale = ws.outdated_line(f"prune-{name}", markers)  # None for a set without a marker too
            md += [f"### {name}", ""] + ([f"**Out of date:** {stale}.", ""] if stale else [])
            md += ["```json", json.dumps(st, indent=1, default=str)[:3000], "```", ""]
    path = os.path.join(local_dir, "report.md")
    with storage.naming(path), open(path, "w") as f:
        f.write("\n".join(md))
    files.append("report.md")
    return files


def report(workspace: str | Workspace, output: str | None = None, score: str = "du",
           storage_options: dict | None = None) -> dict:
    """Write PNG plots and report.md to ``output`` (default WS/report); returns their paths."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    ws.require("catalog", "report")
    out_dir = output or ws.path("report")
    if storage.is_remote(out_dir):  # written locally, then uploaded; the local copies go either way
        with tempfile.TemporaryDirectory(prefix="streamprune-report-") as local_dir:
            files = _write_report(ws, local_dir, score)
            for name in files:
                storage.upload_file(os.path.join(local_dir, name), storage.join(out_dir, name), ws.storage_options)
    else:
        made = not os.path.isdir(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        try:
            files = _write_report(ws, out_dir, score)
        except BaseException:
            if made and not os.listdir(out_dir):  # a refused report (no scores yet) leaves no empty folder
                os.rmdir(out_dir)
            raise
    return {"dir": out_dir, "files": [storage.join(out_dir, f) for f in files],
            "report": storage.join(out_dir, "report.md")}
