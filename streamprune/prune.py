"""The prune stage: select rows by score, write what training jobs consume, optionally re-write shards.

Outputs of ``prune(ws, ...)`` under ``WS/prune/<name>/`` (marker ``_stages/prune-<name>.json``):

* ``shards.txt`` — one original shard url per line, the shards that keep at least one sample;
* ``keys.parquet`` — one table, columns ``shard`` (int32, line index into shards.txt), ``key``
  (string) and ``row`` (int64 catalog row), sorted by row, written shard by shard in row groups of
  about ``row_group_rows`` rows.  One file instead of one per shard: a billion-row selection over a
  million shards would otherwise be a million small objects (slow to list, billed per request);
  keys compress well in a column, and the row groups' min/max statistics on ``shard`` let a loader
  read only the keys of the shard it is opening (see :class:`KeptKeys`);
* ``stats.json`` — counts (total, per class, per shard), score quantiles and thresholds, the
  strategy and its options, the realised keep fraction.

With ``reshard=OUT`` (local dir or ``s3://``) :func:`reshard` also writes ``OUT/pruned-NNNNNN.tar``
holding only the kept samples, their tar members copied byte for byte, and ``OUT/shards.txt``
(marker ``_stages/reshard-<name>.json``), after ``OUT/streamprune-reshard.json`` naming the
workspace and prune set that own OUT (another set's OUT is refused without ``force``).  The output
is planned up front from the per-row sizes (catalog ``end - offset``); one dask task writes one
output shard under a temporary name (local) or as one upload that only becomes visible when
complete (S3), then its chunk record is written: a killed run resumes with the shards it had not
finished and no partial tar is ever visible under a final name.

Memory: the selection holds per-row arrays (score 4 B, valid flag 1 B, label 4 B, keep mask 1 B)
plus the temporaries of the strategy (see :mod:`streamprune.select`); key lists are streamed shard
by shard.  Resharding holds the kept row ids (8 B per kept row) and one read block per task.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from streamprune import select as sel
from streamprune import storage
from streamprune.compute import map_tasks
from streamprune.errors import StreamPruneError, check_seed, finite
from streamprune.heap import bound_heap
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace

if TYPE_CHECKING:
    from streamprune.extrapolate.label_aware import NoiseRanks

log = logging.getLogger(__name__)

SOURCES = {"knn": 1, "gcn": 2, "label-aware": 3, "propagate": 4, "kernel": 5}
ALL_SOURCES = (*SOURCES, "seed", "full")
DEFAULT_SHARD_SIZE = 1 << 30
READ_BLOCK = 2 << 20  # bytes read (and held, per running task) at a time while copying samples
REMOTE_BLOCK = 8 << 20  # readahead of a source shard on object storage: fewer, larger GETs
TAR_EOF = b"\0" * 1024  # two zero blocks: the tar end-of-archive marker
KEYS_SCHEMA = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("row", pa.int64())])
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
SELECT_MMAP_THRESHOLD = 4 << 20  # per-row arrays and chunk buffers from here are mmap-served (heap.bound_heap)


# inputs --------------------------------------------------------------------------------------
def load_scores(ws: Workspace, score: str, source: str) -> np.ndarray:
    """(N,) float32 scores of every catalog row from ``source`` (NaN = no score)."""
    n = ws.require("catalog", "prune")["counts"]["n_samples"]
    out = _load_scores(ws, score, source)[0]
    if len(out) != n:
        raise StreamPruneError(f"prune: {score} scores from {source} have {len(out)} rows but the catalog has {n}; "
                               "re-run the upstream stages for this catalog")
    return out


def _method_source(source) -> bool:
    """Whether ``source`` names an extrapolation's output: a built-in method's, or that of a method a
    plugin registered in this process (docs/extending.md), read from the same place."""
    if source in SOURCES:
        return True
    if not isinstance(source, str) or source in ALL_SOURCES:
        return False
    from streamprune.extrapolate.common import check_method

    try:  # registered, or a module streamprune.extrapolate.<source> that defines it (loaded on first use)
        check_method(source)
    except StreamPruneError:
        return False
    return True


def _unknown_source(source) -> StreamPruneError:
    from streamprune.extrapolate.common import methods

    known = [*ALL_SOURCES, *sorted(set(methods()) - set(ALL_SOURCES))]
    return StreamPruneError(f"prune: unknown score source {source!r}; choose one of {', '.join(known)}")


def score_marker_key(score: str, source: str) -> str:
    """Marker of the stage that produces ``score`` from ``source``."""
    if _method_source(source):
        return f"extrapolate-{score}-{source}"
    return f"score-{score}-full" if source == "full" else f"score-{score}"


def _load_scores(ws: Workspace, score: str, source: str) -> tuple[np.ndarray, dict]:
    """Scores and the marker they come from (zarr read directly: streamprune.scoring would import torch)."""
    if _method_source(source):
        path = f"extrapolated/{score}-{source}.zarr"
        marker = ws.marker(score_marker_key(score, source))
        if marker is None:
            raise StreamPruneError(f"prune: no {score} scores extrapolated with {source} in {ws.url} ({path}); run "
                                   f"`streamprune extrapolate -w {ws.url} --score {score} --method {source}` first")
        try:
            group = zarr.open_group(storage.zarr_store(ws.path(path), ws.storage_options), mode="r")
            arr = group["score"]
        except (FileNotFoundError, KeyError) as exc:
            raise StreamPruneError(f"prune: {ws.path(path)} has no score array ({exc}); re-run "
                                   f"`streamprune extrapolate --score {score} --method {source} --force`") from None
        return storage.read_1d(arr, np.float32, "prune"), marker
    if source == "seed":
        from streamprune.subset import subset_rows

        marker = _require(ws, f"score-{score}", f"streamprune score -w {ws.url} --score {score}")
        n = ws.require("catalog", "prune")["counts"]["n_samples"]
        rows = subset_rows(ws)
        vals = _read_score_array(ws, f"scores/{score}.zarr")
        if len(vals) != len(rows):
            raise StreamPruneError(f"prune: scores/{score}.zarr has {len(vals)} rows but the subset has "
                                   f"{len(rows)}; re-run `streamprune score --score {score}`")
        out = np.full(n, np.nan, np.float32)
        out[rows] = vals
        return out, marker
    if source == "full":
        marker = _require(ws, f"score-{score}-full", f"streamprune score -w {ws.url} --score {score} --full")
        return _read_score_array(ws, f"scores/{score}-full.zarr"), marker
    raise _unknown_source(source)


def _read_score_array(ws: Workspace, path: str) -> np.ndarray:
    """A seed or full-data score array (the layout of streamprune.scoring.score_array_path)."""
    try:
        arr = zarr.open_array(storage.zarr_store(ws.path(path), ws.storage_options), mode="r")
    except FileNotFoundError:
        raise StreamPruneError(f"prune: {ws.path(path)} is missing; re-run `streamprune score --force`") from None
    return storage.read_1d(arr, np.float32, "prune")


def _require(ws: Workspace, key: str, command: str) -> dict:
    marker = ws.marker(key)
    if marker is None:
        raise StreamPruneError(f"prune: stage {key} has not run in {ws.url}; run `{command}` first")
    return marker


def load_embed_columns(ws: Workspace) -> tuple[np.ndarray | None, np.ndarray | None, dict | None]:
    """``valid`` (bool) and ``labels`` (int32) from embeddings.zarr when the embed stage finished."""
    marker = ws.marker("embed")
    if marker is None:
        if ws.exists("embeddings.zarr"):
            raise StreamPruneError(f"prune: {ws.path('embeddings.zarr')} exists but the embed stage has not finished; "
                                   "finish `streamprune embed` (re-run it) first")
        return None, None, None
    g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    names = set(g.array_keys())
    valid = storage.read_1d(g["valid"], bool, "prune") if "valid" in names else None
    labels = storage.read_1d(g["labels"], np.int32, "prune") if "labels" in names else None
    return valid, labels, marker


def load_labels(ws: Workspace, n: int, embed_labels: np.ndarray | None = None) -> tuple[np.ndarray | None, str]:
    """(N,) int32 labels (-1 = unknown) and where they came from: embeddings, train-full or train (seed rows)."""
    if embed_labels is not None:
        return embed_labels, "embeddings.zarr"

    def npy(key: str) -> np.ndarray:  # as train.load_labels, without importing torch
        return np.load(io.BytesIO(storage.read_bytes(ws.path(key, "labels.npy"), ws.storage_options)))

    if ws.marker("train-full") is not None and ws.exists("train-full", "labels.npy"):
        lab = npy("train-full")
        if len(lab) == n:
            return lab.astype(np.int32), "train-full/labels.npy"
    if ws.marker("train") is not None and ws.exists("train", "labels.npy"):
        from streamprune.subset import subset_rows

        rows = subset_rows(ws)
        lab = npy("train")
        if len(lab) == len(rows):
            out = np.full(n, -1, np.int32)
            out[rows] = lab
            return out, "train/labels.npy (seed rows only)"
    return None, "none"


def higher_is_harder(score: str) -> bool:
    """Direction of a registered score (True for du/tdds/el2n/forgetting, False for aum/margin)."""
    from streamprune.scores import get_score

    try:
        return get_score(score).higher_is_harder
    except ValueError:
        log.info("score %s is not registered; assuming higher = harder", score)
        return True


# the stage -------------------------------------------------------------------------------------
def default_name(score: str, source: str, strategy: str, keep_fraction: float | None, keep_count: int | None,
                 eps: float | None = None) -> str:
    """e.g. 'du-knn-hard-0.7', 'du-knn-ccs-n5000', 'du-knn-influence-budget-eps2.5'."""
    if strategy == "influence-budget":
        keep = f"eps{eps:g}"
    else:
        keep = f"{keep_fraction:g}" if keep_fraction is not None else f"n{keep_count}"
    return f"{score}-{source}-{strategy}-{keep}"


def check_options(*, score: str, source: str, strategy: str, keep_fraction: float | None = None,
                  keep_count: int | None = None, name: str | None = None, reshard: str | None = None,
                  shard_size: int | str | None = None, max_count: int | None = None, seed: int = 0,
                  **strategy_opts: Any) -> dict:
    """:func:`prune`'s options checked before any work (``run`` checks them before its first stage).

    Returns the canonical ``strategy``, the score ``direction``, the view's ``name`` and the
    strategy ``opts`` (with their defaults) that the selection uses.
    """
    try:
        strategy = sel.canonical(strategy)
    except ValueError as exc:
        raise StreamPruneError(f"prune: {exc}") from None
    if source not in ALL_SOURCES and not _method_source(source):
        raise _unknown_source(source)
    try:
        check_seed(seed, "--seed")
    except StreamPruneError as exc:
        raise StreamPruneError(f"prune: {exc}") from None
    strategy_opts = dict(strategy_opts)
    direction = bool(strategy_opts.pop("higher_is_harder", higher_is_harder(score)))
    eps = strategy_opts.get("eps")
    if strategy == "influence-budget":
        if eps is None:
            raise StreamPruneError("prune: strategy influence-budget needs eps (budget on the summed norms removed)")
        if keep_fraction is not None or keep_count is not None:
            raise StreamPruneError("prune: influence-budget keeps what its eps allows; do not give a keep fraction "
                                   "or count")
        if not finite(eps) or eps < 0:
            raise StreamPruneError(f"prune: --eps must be a finite number >= 0, not {eps!r}")
    elif (keep_fraction is None) == (keep_count is None):
        raise StreamPruneError("prune: give exactly one of --keep-fraction and --keep-count")
    elif keep_fraction is not None:
        try:
            sel.check_keep_fraction(keep_fraction)
        except ValueError as exc:
            raise StreamPruneError(f"prune: {exc}") from None
    allowed = [o for o in sel.STRATEGY_OPTIONS[strategy] if o not in ("eligible", "noise", "drop_count")]
    if strategy == "hard-clean":
        allowed.append("noise_fraction")
        nf = strategy_opts.setdefault("noise_fraction", "auto")
        if nf != "auto" and not (isinstance(nf, (int, float)) and 0 <= nf < 1):
            raise StreamPruneError(f"prune: --noise-fraction must be 'auto' or a fraction in [0, 1), not {nf!r}")
    unknown = sorted(set(strategy_opts) - set(allowed))
    if unknown:
        raise StreamPruneError(f"prune: strategy {strategy} does not take {', '.join(unknown)} "
                               f"(options: {', '.join(allowed) or 'none'})")
    name = name or default_name(score, source, strategy, keep_fraction, keep_count, eps)
    _check_name(name)
    if reshard is None and (shard_size is not None or max_count is not None):
        raise StreamPruneError("prune: --shard-size and --max-count apply to --reshard OUT; give it too")
    reshard_size(shard_size, max_count, "prune")  # before the selection is committed
    return {"strategy": strategy, "direction": direction, "name": name, "opts": strategy_opts}


def reshard_size(shard_size: int | str | None, max_count: int | None, what: str) -> int:
    """Bytes per output shard (``DEFAULT_SHARD_SIZE`` when not given), once --shard-size and --max-count are valid."""
    from streamprune.compute import parse_memory

    try:
        size = parse_memory(shard_size, "--shard-size")
    except StreamPruneError as exc:
        raise StreamPruneError(f"{what}: {exc}") from None
    if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, (int, np.integer))
                                  or max_count < 1):
        raise StreamPruneError(f"{what}: --max-count must be >= 1, got {max_count!r}")
    return DEFAULT_SHARD_SIZE if size is None else size


@releases_leases
def prune(workspace: str | Workspace, *, score: str = "du", source: str = "knn", strategy: str = "hard",
          keep_fraction: float | None = None, keep_count: int | None = None, name: str | None = None, seed: int = 0,
          reshard: str | None = None, shard_size: int | str | None = None, max_count: int | None = None,
          scheduler: str | None = "local", force: bool = False, storage_options: dict | None = None,
          row_group_rows: int = 1 << 20, durable: bool = False, **strategy_opts: Any) -> dict:
    """Select the rows to keep and write ``prune/<name>/`` (shards.txt, keys.parquet, stats.json).

    ``strategy_opts`` go to the strategy (``beta``/``n_strata`` for ccs, ``eps`` for
    influence-budget, ``higher_is_harder`` to override the score's direction).  Returns the
    ``prune-<name>`` marker; with ``reshard`` the kept samples are also re-written as new tars
    (see :func:`reshard`), the returned ``outputs["reshard"]`` is ``OUT/shards.txt`` and
    ``"reshard"`` holds the reshard marker.  ``row_group_rows`` sets keys.parquet's row groups;
    ``durable`` fsyncs the re-written tars (see :func:`reshard`).
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    checked = check_options(score=score, source=source, strategy=strategy, keep_fraction=keep_fraction,
                            keep_count=keep_count, name=name, reshard=reshard, shard_size=shard_size,
                            max_count=max_count, seed=seed, **strategy_opts)
    strategy, direction, name, strategy_opts = (checked[k] for k in ("strategy", "direction", "name", "opts"))

    if reshard is not None:  # refuse another prune set's OUT before the selection's work, not after it
        out = storage.normalize(reshard)
        check_reshard_out(ws, out)
        _check_owner(out, storage.read_json(storage.join(out, OWNER_FILE), ws.storage_options), ws, name, force,
                     ws.storage_options)

    marker = _select_stage(ws, name=name, score=score, source=source, strategy=strategy, keep_fraction=keep_fraction,
                           keep_count=keep_count, seed=seed, direction=direction, opts=strategy_opts, force=force,
                           row_group_rows=row_group_rows)
    if reshard is None:
        return marker
    rm = _run_reshard(ws, name, reshard, shard_size=shard_size, max_count=max_count, scheduler=scheduler,
                      force=force, durable=durable)
    shards_url = storage.join(rm["config"]["out"], "shards.txt")
    return marker | {"outputs": {**marker["outputs"], "reshard": shards_url}, "reshard": rm}


def seed_margin_marker(ws: Workspace) -> dict | None:
    """The marker of the subset model's AUM (computed from its recorded logits if not yet; no training).

    None without a ``train`` stage (seed scores imported from elsewhere) or with a single class (no
    margin to measure): seeds then rank by disagreement alone.
    """
    tm = ws.marker("train")
    if tm is None or int(tm.get("counts", {}).get("num_classes") or 0) < 2:
        return None
    from streamprune.scoring import compute_scores

    return compute_scores(ws, ["aum"])[0]


def _noise_for_hard_clean(ws: Workspace, scores: np.ndarray, noise_fraction, margin_marker: dict | None
                          ) -> tuple[NoiseRanks, int, dict]:
    """Noise ranks per row (:func:`~streamprune.extrapolate.label_aware.noise_table`: seed rows and other
    rows ranked apart) and how many eligible rows to drop as likely mislabelled.  ``margin_marker``
    is :func:`seed_margin_marker`'s result (None: seeds rank by disagreement alone).

    ``auto`` estimates the count from the data: eligible rows whose exp(-d)-weighted neighbour
    majority carries another label.  A number is a fraction of the eligible rows.  The disagreement
    is read from its zarr array one chunk at a time, never whole.
    """
    from streamprune.extrapolate.common import seed_scores
    from streamprune.extrapolate.label_aware import disagreement_array, noise_estimate, noise_table
    from streamprune.subset import subset_rows

    eligible = ~np.isnan(scores)
    n_eligible = int(eligible.sum())
    if noise_fraction == "auto":  # a count only: estimated before the ranks exist
        k = int(ws.marker("score-label_disagreement")["config"]["k"])
        drop = int(np.count_nonzero(noise_estimate(ws, k=k) & eligible))
    else:
        drop = int(round(float(noise_fraction) * n_eligible))
    del eligible
    dis = disagreement_array(ws)
    seed = np.zeros(dis.shape[0], bool)
    margin = None
    if ws.marker("subset") is not None:
        seed[subset_rows(ws)] = True
        if margin_marker is not None:  # the seed rows' AUM, in row order (not kept in seed_scores' cache)
            margin = seed_scores(ws, "aum", cache=False).values
    noise = noise_table(dis, seed, margin)
    info = {"noise_fraction": noise_fraction, "noise_estimate": round(drop / max(1, n_eligible), 6),
            "drop_target": drop, "seed_rows_ranked_apart": int(seed.sum()),
            "seed_signal": "disagreement+aum" if margin is not None else "disagreement"}
    return noise, drop, info


def check_reshard_out(ws: Workspace, out: str) -> None:
    """Refuse a reshard OUT that is the workspace or lies inside it: its shards.txt would replace a prune
    set's own (OUT = WS/prune/<name>), and a stage's --force would remove the new shards with its results."""
    root, where = ws.url.rstrip("/"), out.rstrip("/")
    if where == root:
        raise StreamPruneError("reshard: the output location must not be the workspace itself")
    if where.startswith(root + "/"):
        raise StreamPruneError(f"reshard: the output location {out} is inside the workspace {ws.url}; "
                               "write the new shards outside it")


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise StreamPruneError(f"prune: name {name!r} must be letters, digits and . _ + = - (no '/' or '..')")


def _select_stage(ws: Workspace, *, name: str, score: str, source: str, strategy: str, keep_fraction: float | None,
                  keep_count: int | None, seed: int, direction: bool, opts: dict, force: bool,
                  row_group_rows: int) -> dict:
    from streamprune.shards import Catalog

    bound_heap(SELECT_MMAP_THRESHOLD)  # freed (N,) arrays and graph chunks go back to the OS, not to a creeping heap
    cat_m = ws.require("catalog", "prune")
    scores, score_marker = (None, None)
    if strategy != "random" or ws.marker(score_marker_key(score, source)) is not None:
        scores, score_marker = _load_scores(ws, score, source)
    else:
        log.info("prune: no %s scores from %s; random selection among all valid rows", score, source)
    valid, embed_labels, embed_marker = load_embed_columns(ws)
    ws.check_current({"scores": score_marker and score_marker["fingerprint"],
                      "embed": embed_marker and embed_marker["fingerprint"]}, "prune")
    n = int(cat_m["counts"]["n_samples"])
    for what, arr in (("scores", scores), ("embeddings valid", valid), ("embeddings labels", embed_labels)):
        if arr is not None and len(arr) != n:
            raise StreamPruneError(f"prune: {what} have {len(arr)} rows but the catalog has {n}; re-run the upstream "
                                   "stages for this catalog")
    config = {"name": name, "score": score, "source": source, "strategy": strategy,
              "keep_fraction": keep_fraction, "keep_count": keep_count, "seed": int(seed),
              "higher_is_harder": direction, "options": opts}
    inputs = {"catalog": cat_m["fingerprint"], "scores": score_marker["fingerprint"] if score_marker else None,
              "embed": embed_marker["fingerprint"] if embed_marker else None}
    margin_marker = None  # hard-clean: the subset model's AUM, which ranks the seed rows
    if strategy == "hard-clean":
        dm = ws.marker("score-label_disagreement")
        if dm is None or ws.outdated("score-label_disagreement") is not None:
            from streamprune.extrapolate.label_aware import compute_disagreement

            dm = compute_disagreement(ws, k=dm["config"]["k"] if dm else None)
        inputs["disagreement"] = dm["fingerprint"]
        margin_marker = seed_margin_marker(ws)
        inputs["seed_margin"] = margin_marker["fingerprint"] if margin_marker else None
    if scores is None:
        scores = np.zeros(n, np.float32)
    n_nan = int(np.isnan(scores).sum())
    n_invalid = 0
    if valid is not None:
        n_invalid = int((~valid).sum())
        scores[~valid] = np.nan  # an undecodable sample is never kept, whatever its score
    del valid
    eligible_count = int((~np.isnan(scores)).sum())

    def refused(exc: ValueError) -> StreamPruneError:
        return StreamPruneError(f"prune: {strategy}: {exc} ({n} rows: {n_invalid} invalid, {n_nan} without a score, "
                                f"{eligible_count} eligible)")

    k = None  # influence-budget keeps what its eps allows
    if strategy != "influence-budget":  # before begin: a refused count leaves a --force run's old results in place
        try:
            k = sel.keep_count_from(eligible_count, keep_fraction, keep_count)
            if strategy == "ccs":  # what is left after its drop of the hardest rows
                sel.ccs_keep_count(k, eligible_count, opts.get("beta", sel.CCS_BETA))
        except ValueError as exc:
            raise refused(exc) from None
    run = ws.begin("prune", config, inputs, force=force, key=f"prune-{name}")
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    noise_info: dict = {}

    labels, label_source = load_labels(ws, n, embed_labels)
    del embed_labels
    if strategy == "balanced":
        if labels is None:
            raise StreamPruneError("prune: strategy balanced needs labels, but the workspace has none (no labels in "
                                   "embeddings.zarr, train-full/labels.npy or train/labels.npy); run "
                                   "`streamprune embed` first")
        unknown = int(((labels < 0) & ~np.isnan(scores)).sum())
        if unknown:
            log.warning("prune: %d eligible rows have no label (from %s); balanced keeps them as a class of their own",
                        unknown, label_source)

    try:
        if strategy == "influence-budget":
            mask, _ = sel.influence_budget(scores, opts["eps"])
        elif strategy == "hard-clean":
            noise, drop_count, noise_info = _noise_for_hard_clean(ws, scores, opts["noise_fraction"], margin_marker)
            mask = sel.select(strategy, scores, labels, k, seed, higher_is_harder=direction, noise=noise,
                              drop_count=drop_count)
            del noise
            noise_info["dropped"] = int(min(drop_count, max(0, eligible_count - k)))
        else:
            mask = sel.select(strategy, scores, labels, k, seed, higher_is_harder=direction, **opts)
    except ValueError as exc:
        raise refused(exc) from None
    if (mask & np.isnan(scores)).any():  # strategies never keep NaN rows; refuse loudly if one ever did
        raise StreamPruneError("prune: internal error: the selection kept rows without a score")
    t_select = time.time() - t0

    cat = Catalog(ws)
    pdir = ws.path("prune", name)
    _remove_stale(pdir, 0, ws.storage_options, outputs=False)  # temp files of a killed run
    per_shard, urls = _write_keys(cat, mask, storage.join(pdir, "keys.parquet"), ws.storage_options, row_group_rows)
    storage.write_bytes_atomic(storage.join(pdir, "shards.txt"), "".join(u + "\n" for u in urls).encode(),
                               ws.storage_options)
    stats = selection_stats(scores, labels, mask, per_shard, cat.shards.n_samples.to_numpy(np.int64), direction)
    if score_marker is None:  # random over valid rows without a score array: no score statistics
        stats.update({"score_quantiles": {}, "kept_score_quantiles": {}, "kept_score_range": None})
    stats.update({"name": name, "score": score, "source": source, "strategy": strategy, "seed": int(seed),
                  "options": {**opts, "higher_is_harder": direction}, "keep_fraction": keep_fraction,
                  "keep_count": keep_count, "scores_used": score_marker is not None, "n_invalid": n_invalid,
                  "n_no_score": n_nan, "label_source": label_source, "shards": "shards.txt", "keys": "keys.parquet"})
    if noise_info:
        stats["hard_clean"] = noise_info
    storage.write_json_atomic(storage.join(pdir, "stats.json"), stats, ws.storage_options)
    return run.commit(
        outputs={"shards": f"prune/{name}/shards.txt", "keys": f"prune/{name}/keys.parquet",
                 "stats": f"prune/{name}/stats.json"},
        counts={"n_samples": n, "n_eligible": eligible_count, "n_kept": stats["n_kept"], "n_shards": len(urls),
                "keep_fraction": stats["realised_keep_fraction"], **{f"hard_clean_{k}": v for k, v in
                                                                     noise_info.items() if k != "noise_fraction"}},
        timings={"select_s": round(t_select, 3), "write_s": round(time.time() - t0 - t_select, 3)})


def selection_stats(scores: np.ndarray, labels: np.ndarray | None, mask: np.ndarray, per_shard_kept: np.ndarray,
                    per_shard_total: np.ndarray, direction: bool) -> dict:
    """stats.json content: counts total / per class / per shard, score quantiles and kept-score range."""
    eligible = ~np.isnan(scores)
    n_eligible = int(eligible.sum())
    n_kept = int(mask.sum())
    qs = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]

    def quantiles(v: np.ndarray) -> dict:  # v is a copy: partitioned in place, not copied again
        return {f"{q:g}": float(x) for q, x in zip(qs, np.quantile(v, qs, overwrite_input=True))} if v.size else {}

    score_quantiles = quantiles(scores[eligible])
    kept_scores = scores[mask]
    kept_range = [float(kept_scores.min()), float(kept_scores.max())] if kept_scores.size else None
    out: dict[str, Any] = {
        "n_rows": int(len(scores)), "n_eligible": n_eligible, "n_kept": n_kept,
        "realised_keep_fraction": n_kept / n_eligible if n_eligible else 0.0,
        "kept_fraction_of_all_rows": n_kept / len(scores) if len(scores) else 0.0,
        "higher_is_harder": direction,
        "score_quantiles": score_quantiles,
        "kept_score_quantiles": quantiles(kept_scores),
        "kept_score_range": kept_range,
    }
    del kept_scores
    if labels is not None:  # counted chunk by chunk: no sorted copy of the labels
        el, ec = sel.value_counts(labels, eligible)
        kl, kc = sel.value_counts(labels, mask)
        kept = dict(zip(kl.tolist(), kc.tolist()))
        out["per_class"] = {str(c): {"eligible": int(e), "kept": int(kept.get(c, 0))} for c, e in zip(el.tolist(), ec)}
    nz = per_shard_kept > 0
    out["per_shard"] = {"kept": per_shard_kept[nz].tolist(), "total": per_shard_total[nz].tolist(),
                        "note": "aligned with the lines of shards.txt"}
    out["n_shards_kept"] = int(nz.sum())
    out["n_shards_dropped"] = int((~nz).sum())
    return out


def _part_url(cat, shard: int) -> str:
    return cat.ws.path("catalog", "parts", f"{cat.shards.part.iloc[shard]}.parquet")


def _read_part(cat, shard: int, columns: list[str]) -> pd.DataFrame:
    """Columns of one catalog part, read without the catalog's cache (safe from several threads)."""
    return pd.read_parquet(io.BytesIO(storage.read_bytes(_part_url(cat, shard), cat.ws.storage_options)),
                           columns=columns)


def _prefetch(fn: Callable, items: Iterable, depth: int = 8) -> Iterator:
    """``fn(item)`` for each item, in order, computed ``depth`` ahead on threads."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=depth) as pool:
        window = []
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= depth:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()


def _write_keys(cat, mask: np.ndarray, url: str, storage_options: dict,
                row_group_rows: int) -> tuple[np.ndarray, list[str]]:
    """Stream keys of kept rows into one parquet table, shard by shard; per-shard counts and kept urls."""
    starts = cat.row_start
    ends = starts + cat.shards.n_samples.to_numpy(np.int64)
    per_shard = np.array([int(mask[a:b].sum()) for a, b in zip(starts, ends)], np.int64)
    todo = np.flatnonzero(per_shard)

    def keys_of(s: int) -> tuple[int, np.ndarray, np.ndarray]:
        local = np.flatnonzero(mask[starts[s]:ends[s]])
        return s, local + starts[s], _read_part(cat, int(s), ["key"]).key.to_numpy(object)[local]

    urls: list[str] = []
    buf: list[pa.Table] = []
    buffered = 0
    with atomic_output(url, storage_options) as f, \
            pq.ParquetWriter(f, KEYS_SCHEMA, compression="zstd", use_dictionary=["shard"]) as writer:
        for line, (s, rows, keys) in enumerate(_prefetch(keys_of, todo)):
            urls.append(str(cat.shards.url.iloc[s]))
            buf.append(pa.table({"shard": pa.array(np.full(len(rows), line, np.int32)),
                                 "key": pa.array(keys, pa.string()), "row": pa.array(rows)}, schema=KEYS_SCHEMA))
            buffered += len(rows)
            if buffered >= row_group_rows:
                writer.write_table(pa.concat_tables(buf), row_group_size=max(buffered, 1))
                buf, buffered = [], 0
        if buf:
            writer.write_table(pa.concat_tables(buf), row_group_size=max(buffered, 1))
    return per_shard, urls


# atomic output files -----------------------------------------------------------------------------
@contextmanager
def atomic_output(url: str, storage_options: dict | None = None, block_size: int = 16 << 20,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears under ``url`` only when complete; nothing appears on error or kill.

    Local: a ``.tmp-<random>-`` file in the same directory (a name no other writer uses), renamed
    into place; with ``durable`` it is fsynced first, so that it also survives a power loss.  S3:
    one PUT or a multipart upload, both invisible until completed (an aborted upload is discarded).
    """
    if not storage.is_remote(url):
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(url)}.partial")
        try:
            with storage.naming(url), open(tmp, "wb") as f:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, url)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs = storage.get_fs(url, storage_options)
    f = storage.retry(lambda: fs.open(url, "wb", block_size=block_size), url, storage_options=storage_options)
    try:
        yield f
    except BaseException:
        discard = getattr(f, "discard", None)
        if discard is not None:
            try:
                discard()
            except Exception:  # noqa: BLE001 - best effort; the upload was never completed
                log.warning("could not abort the upload of %s", url)
        f.closed = True  # never complete the upload of a partial object
        raise
    try:
        f.close()
    except Exception as exc:  # noqa: BLE001
        raise StreamPruneError(storage.describe_storage_error(exc, url)) from exc


# reshard ----------------------------------------------------------------------------------------
def kept_rows(ws: Workspace, name: str) -> np.ndarray:
    """Sorted catalog rows of a prune's kept samples (8 B per kept row, read row group by row group)."""
    url = ws.path("prune", name, "keys.parquet")
    with storage.open_read(url, ws.storage_options) as f:
        pf = pq.ParquetFile(f)
        parts = [pf.read_row_group(g, columns=["row"]).column("row").to_numpy() for g in range(pf.num_row_groups)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class ShardPlanner:
    """Greedy cut of the kept samples, fed source shard by source shard, into output shards (pure).

    An output shard closes before the sample that would take it over ``shard_size`` bytes or
    ``max_count`` samples (a sample larger than ``shard_size`` gets a shard of its own), and
    before a key it already holds from an earlier source shard: WebDataset groups members by key,
    so a key repeated inside one tar would merge two samples.  ``starts`` holds the index (into
    the kept rows) of each output shard's first sample.  Memory: the keys of one output shard.
    """

    def __init__(self, shard_size: int, max_count: int | None = None):
        self.shard_size = int(shard_size)
        self.max_count = max_count
        self.starts: list[int] = []
        self._used = 0
        self._count = 0
        self._seen: set = set()  # keys of the current output shard from earlier source shards
        self._cur: list = []  # keys of the current output shard from the source being fed

    def feed(self, first: int, sizes: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Add the kept samples of one source shard; ``first`` is the index of the first of them."""
        self._seen.update(self._cur)
        self._cur = []
        for j in range(len(sizes)):
            size = int(sizes[j])
            if self._count == 0 or self._used + size > self.shard_size \
                    or (self.max_count is not None and self._count >= self.max_count) \
                    or (keys is not None and self._seen and keys[j] in self._seen):
                self.starts.append(first + j)
                self._used, self._count, self._seen, self._cur = 0, 0, set(), []
            self._used += size
            self._count += 1
            if keys is not None:
                self._cur.append(keys[j])


def _plan(cat, rows: np.ndarray, shard_size: int, max_count: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per kept row its source shard; start index of every output shard."""
    src = cat.shard_of(rows)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(src)) + 1, [len(rows)]]).astype(np.int64)
    planner = ShardPlanner(shard_size, max_count)

    def load(j: int) -> tuple[int, np.ndarray, list]:
        a, b = int(bounds[j]), int(bounds[j + 1])
        s = int(src[a])
        offs, ends, keys = _part_rows(_part_url(cat, s), rows[a:b] - cat.row_start[s], cat.ws.storage_options)
        return a, np.asarray(ends, np.int64) - np.asarray(offs, np.int64), keys

    if len(rows):
        for a, sizes, keys in _prefetch(load, range(len(bounds) - 1), depth=4):
            planner.feed(a, sizes, keys)
    return src, np.asarray(planner.starts, np.int64)


@releases_leases
def reshard(workspace: str | Workspace, name: str, out: str, *, shard_size: int | str | None = None,
            max_count: int | None = None, scheduler: str | None = "local", force: bool = False,
            storage_options: dict | None = None, durable: bool = False) -> dict:
    """Write the kept samples of ``prune/<name>`` as new tars ``OUT/pruned-NNNNNN.tar`` plus ``OUT/shards.txt``.

    Members are copied byte for byte from the catalogued ranges of the source shards; one dask
    task per output shard; resumable per output shard.  Every tar appears under its final name
    only when complete (rename of a temporary file, or a completed upload).  ``durable`` (local
    output) also fsyncs each tar before its rename and OUT before shards.txt, so that the
    outputs survive a power loss or kernel crash, not only a killed process; it costs the time
    the disk needs to write them (see docs/prune.md).  It does not change the output bytes and
    is not part of the stage configuration.

    ``OUT/streamprune-reshard.json`` records the workspace, prune set and run fingerprint that
    own OUT; it is written before any tar.  OUT owned by another prune set, or holding
    ``pruned-*.tar`` files without that record, is refused unless ``force``.  A finished run is
    skipped only while OUT still carries its record and shards.txt; otherwise it writes again.
    """
    from streamprune.shards import Catalog

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    _check_name(name)
    size = reshard_size(shard_size, max_count, "reshard")
    out = storage.normalize(out)
    check_reshard_out(ws, out)
    pm = ws.require(f"prune-{name}", "reshard")
    cat_m = ws.require("catalog", "reshard")
    config = {"name": name, "out": out, "shard_size": size, "max_count": None if max_count is None else int(max_count)}
    run = ws.begin("prune", config, {"prune": pm["fingerprint"], "catalog": cat_m["fingerprint"]}, force=force,
                   key=f"reshard-{name}")
    so = ws.storage_options
    record = storage.read_json(storage.join(out, OWNER_FILE), so)
    mine = _owner_record(ws, name, run.fingerprint)
    gone = _outputs_not_intact(out, record, mine, so) if run.already_done else None
    if run.already_done and gone is None:
        return run.previous | {"skipped": True}
    _check_owner(out, record, ws, name, force, so)
    if gone is not None:
        log.warning("reshard %s: already done, but %s; writing the shards again", name, gone)
    t0 = time.time()
    cat = Catalog(ws)
    inside = [u for u in cat.shards.url if str(u).startswith(out.rstrip("/") + "/")]
    if inside:
        raise StreamPruneError(f"reshard: the output location {out} holds input shards ({inside[0]}); "
                               "write the new shards somewhere else")
    rows = kept_rows(ws, name)
    src, starts = _plan(cat, rows, size, config["max_count"])
    n_out = len(starts)
    t_plan = time.time() - t0
    # Readers take OUT/shards.txt as the list of complete outputs: hide it while outputs change.
    storage.remove(storage.join(out, "shards.txt"), so)
    if not _same_owner(record, mine):
        # Chunk records of an earlier run of ours describe tars another run may have replaced since.
        run.forget_chunks()
        storage.write_json_atomic(storage.join(out, OWNER_FILE), mine, so)
    _remove_stale(out, n_out, so)

    infos = _verified_chunks(run, out, n_out, so)
    stops = np.append(starts[1:], len(rows))
    args, weights, todo = [], [], []
    for i in range(n_out):
        if i in infos:
            continue
        a, b = int(starts[i]), int(stops[i])
        segments = []
        for s in np.unique(src[a:b]):
            sel_rows = rows[a:b][src[a:b] == s]
            segments.append((str(cat.shards.url.iloc[s]), _part_url(cat, s), sel_rows - int(cat.row_start[s]),
                             int(cat.shards["size"].iloc[s]), str(cat.shards.etag.iloc[s])))
        args.append((output_url(out, i), segments, so, durable))
        weights.append(b - a)
        todo.append(i)
    log.info("reshard %s: %d output shards, %d already written", name, n_out, n_out - len(todo))

    def finished(j: int, info: dict) -> None:
        run.mark_chunk(todo[j], info)  # the chunk record, after the tar is complete under its final name
        infos[todo[j]] = info

    map_tasks(write_output_shard, args, scheduler=scheduler, desc=f"reshard {name}", unit="sample", weights=weights,
              on_result=finished)
    n_bytes = int(sum(info.get("bytes", 0) for info in infos.values()))
    n_samples = int(sum(info.get("n_samples", 0) for info in infos.values()))
    if n_samples != len(rows):  # before shards.txt: readers take it as the list of complete outputs
        run.forget_chunks()  # the next run writes every shard again rather than trusting these records
        raise StreamPruneError(f"reshard: wrote {n_samples} samples but {len(rows)} were kept; re-run it to write "
                               "the output shards again")
    urls = [output_url(out, i) for i in range(n_out)]
    # A worker killed mid-task leaves its temporary file (or an unfinished upload); the task
    # already ran again elsewhere under another temporary name.
    _remove_stale(out, n_out, so)
    if durable and not storage.is_remote(out):
        _fsync_outputs(urls, out)
    storage.write_bytes_atomic(storage.join(out, "shards.txt"), "".join(u + "\n" for u in urls).encode(), so)
    ws.write_json({"out": out, "shards": storage.join(out, "shards.txt"), "n_shards": n_out, "n_samples": n_samples,
                   "bytes": n_bytes, "shard_size": size, "max_count": config["max_count"], "durable": bool(durable)},
                  "prune", name, "reshard.json")
    wall = time.time() - t0
    return run.commit(outputs={"reshard": f"prune/{name}/reshard.json"},
                      counts={"n_shards": n_out, "n_samples": n_samples, "bytes": n_bytes},
                      timings={"plan_s": round(t_plan, 3), "write_s": round(wall - t_plan, 3),
                               "bytes_per_s": round(n_bytes / max(wall - t_plan, 1e-9), 1)})


_run_reshard = reshard  # prune()'s ``reshard`` argument shadows the function there


def _owner_record(ws: Workspace, name: str, fp: str) -> dict:
    """What ``OUT/streamprune-reshard.json`` says: the workspace, prune set and reshard run writing OUT."""
    return {"workspace": ws.url, "name": name, "fingerprint": fp}


def _same_owner(record: Any, mine: dict) -> bool:
    return isinstance(record, dict) and all(record.get(k) == v for k, v in mine.items())


def _outputs_not_intact(out: str, record: Any, mine: dict, storage_options: dict) -> str | None:
    """Why the outputs of a finished reshard are no longer in OUT, or None when they are."""
    if record is None:
        return f"{out} has no {OWNER_FILE}"
    if not _same_owner(record, mine):
        return f"{out}/{OWNER_FILE} names another reshard run"
    if not storage.exists(storage.join(out, "shards.txt"), storage_options):
        return f"{out} has no shards.txt"
    return None


def _check_owner(out: str, record: Any, ws: Workspace, name: str, force: bool, storage_options: dict) -> None:
    """Refuse, unless ``force``, to write into OUT when its shards belong to another prune set or to no reshard."""
    if force:
        return
    if record is not None:
        owner = record if isinstance(record, dict) else {}
        if owner.get("workspace") != ws.url or owner.get("name") != name:
            raise StreamPruneError(f"reshard: {out} holds the re-written shards of prune set {owner.get('name')!r} "
                                   f"of workspace {owner.get('workspace')}; choose another --reshard location "
                                   "(or pass --force to replace them)")
    elif _output_sizes(out, storage_options):
        raise StreamPruneError(f"reshard: {out} already holds pruned-*.tar files that no reshard claims (no "
                               f"{OWNER_FILE}); choose another --reshard location (or pass --force to replace them)")


def _verified_chunks(run, out: str, n_out: int, storage_options: dict) -> dict[int, dict]:
    """Records of the output shards a previous run finished whose tar is still there with its recorded size.

    A record whose tar is missing or has another size (deleted since, or lost to a power loss
    in a run without ``durable``) is dropped: that shard is written again.
    """
    done = run.done_chunks()
    if not done:
        return {}
    sizes = _output_sizes(out, storage_options)
    infos = {}
    for i in range(n_out):
        if str(i) not in done:
            continue
        info = run.chunk_done(i) or {}
        got = sizes.get(output_url(out, i).rsplit("/", 1)[1])
        if got is not None and got == info.get("bytes"):
            infos[i] = info
        else:
            log.warning("reshard: %s is missing or has %s bytes instead of %s; writing it again",
                        output_url(out, i), got, info.get("bytes"))
    return infos


def _output_sizes(out: str, storage_options: dict) -> dict[str, int]:
    """Size of every ``pruned-*.tar`` directly in OUT (one listing)."""
    if not storage.is_remote(out):
        if not os.path.isdir(out):
            return {}
        with os.scandir(out) as it:
            return {e.name: e.stat().st_size for e in it if _OUTPUT_RE.fullmatch(e.name) and e.is_file()}
    fs = storage.get_fs(out, storage_options)
    entries = storage.none_if_missing(lambda: storage.retry(lambda: fs.ls(out, detail=True, refresh=True), out,
                                                            storage_options=storage_options))
    sizes = {}
    for e in entries or []:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if _OUTPUT_RE.fullmatch(name):
            sizes[name] = int(e.get("size") or 0)
    return sizes


def _fsync_outputs(urls: list[str], out: str) -> None:
    """fsync every output tar and OUT itself (cheap for tars a durable task already synced)."""
    for path in (*urls, out):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def output_url(out: str, i: int) -> str:
    """Url of output shard ``i``."""
    return storage.join(out, f"pruned-{i:06d}.tar")


_OUTPUT_RE = re.compile(r"pruned-(\d{6,})\.tar")
OWNER_FILE = "streamprune-reshard.json"  # OUT's owner record, written before any tar (see reshard)


def _remove_stale(out: str, n_out: int, storage_options: dict, outputs: bool = True) -> None:
    """Remove leftovers of earlier runs in OUT: shards past this plan, local temp files, S3 unfinished uploads."""
    for entry in storage.listdir(out, storage_options):
        m = _OUTPUT_RE.fullmatch(entry) if outputs else None
        stale_tmp = entry.startswith(".tmp-") and entry.endswith(".partial") and not storage.is_remote(out)
        if (m and int(m.group(1)) >= n_out) or stale_tmp:
            storage.remove(storage.join(out, entry), storage_options)
    if outputs and storage.protocol(out) == "s3":
        # A killed upload leaves invisible parts that are billed until aborted.
        bucket, _, prefix = out[len("s3://"):].partition("/")
        fs = storage.get_fs(out, storage_options)
        try:
            for upload in fs.list_multipart_uploads(bucket):
                key = upload.get("Key", "")
                if _OUTPUT_RE.fullmatch(key[len(prefix):].lstrip("/")) and key.startswith(prefix):
                    fs.abort_mpu(bucket, key, upload["UploadId"])
        except Exception as exc:  # noqa: BLE001 - housekeeping only
            log.warning("reshard: could not list or abort unfinished uploads under %s (%s)", out, type(exc).__name__)


def write_output_shard(url: str, segments: list[tuple], storage_options: dict | None, durable: bool = False) -> dict:
    """One output tar: the catalogued byte ranges of the given source rows, checked, copied, then the tar end.

    The kept samples of a source shard are read run by run (samples contiguous in the source:
    one read each) into one reused buffer of ``READ_BLOCK`` bytes; when it is full, the member
    headers of all its samples are checked at once (:func:`headers_ok`; :func:`check_members`
    finds and names any problem) and the buffer goes out with one write.  A sample larger than
    the buffer has its headers read one by one and its bytes copied in the kernel
    (``os.copy_file_range``, local to local) or ``READ_BLOCK`` bytes at a time.  ``durable``
    fsyncs the tar before it is renamed into place (see :func:`reshard`).
    """
    n = 0
    written = 0
    with atomic_output(url, storage_options, durable=durable) as dst:
        sink = _Sink(dst, storage.is_remote(url))
        for src_url, part_url, local, size, etag in segments:
            now = storage.stat(src_url, storage_options)
            if now["size"] != size or now["etag"] != etag:
                raise StreamPruneError(f"reshard: shard {src_url} changed since `streamprune catalog` "
                                       f"(size/etag {size}/{etag} -> {now['size']}/{now['etag']}); re-run catalog")
            offs, ends, keys = _part_rows(part_url, local, storage_options)
            with _Source(src_url, size, storage_options) as src:
                batch = _Batch(src, sink, offs, ends, keys)
                for a, b in _pieces(offs, ends, READ_BLOCK):
                    if not batch.add(a, b):  # one sample larger than the buffer: never held in memory whole
                        start, stop = int(offs[a]), int(ends[a])
                        check_members(iter_headers(src.read_at, start, stop, size), start, stop, offs[a:b],
                                      ends[a:b], keys[a:b], src_url)
                        src.copy_to(sink, start, stop - start)
                batch.flush()
            written += int((ends - offs).sum())
            n += len(offs)
        sink.write(TAR_EOF)
    return {"url": url, "n_samples": n, "bytes": written + len(TAR_EOF)}


_BUFFERS = threading.local()


def _buffer() -> bytearray:
    """This thread's copy buffer (``READ_BLOCK`` bytes), allocated once: a worker's memory stays flat."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) != READ_BLOCK:
        buf = _BUFFERS.buf = bytearray(READ_BLOCK)
    return buf


class _Batch:
    """Runs of kept samples of one source shard gathered in the copy buffer, checked and written together."""

    def __init__(self, src: "_Source", sink: "_Sink", offs: np.ndarray, ends: np.ndarray, keys: np.ndarray):
        self.src, self.sink, self.offs, self.ends, self.keys = src, sink, offs, ends, keys
        self.prefixes = key_prefixes(keys)  # once per source shard, for all its batches
        self.buf = _buffer()
        self.fill = 0
        self.runs: list[tuple[int, int, int]] = []  # (buffer position, first sample, end sample)

    def add(self, a: int, b: int) -> bool:
        """Read samples [a, b) (contiguous in the source) into the buffer; False when they cannot fit at all."""
        start, stop = int(self.offs[a]), int(self.ends[b - 1])
        if stop - start > len(self.buf):
            self.flush()
            return False
        if self.fill + stop - start > len(self.buf):
            self.flush()
        self.src.read_into(self.buf, self.fill, start, stop - start)
        self.runs.append((self.fill, a, b))
        self.fill += stop - start
        return True

    def flush(self) -> None:
        """Check the headers of every sample in the buffer, then write the buffer out."""
        if not self.fill:
            return
        offs, ends, keys = self.offs, self.ends, self.keys
        first, last = self.runs[0][1], self.runs[-1][2]  # the runs hold samples first..last-1, in order
        ok = False
        if self.prefixes is not None:
            shift = np.repeat(np.array([pos - offs[a] for pos, a, _ in self.runs], np.int64),
                              [b - a for _, a, b in self.runs])
            prefix, plen = self.prefixes
            ok = headers_ok(np.frombuffer(self.buf, np.uint8, self.fill), offs[first:last] + shift,
                            (prefix[first:last], plen[first:last]))
        with memoryview(self.buf) as view:
            if not ok:  # find the problem and name it, or accept what the fast check does not cover
                for pos, a, b in self.runs:
                    start, stop = int(offs[a]), int(ends[b - 1])
                    check_members(_buffer_members(view[pos:pos + stop - start], start), start, stop, offs[a:b],
                                  ends[a:b], keys[a:b], self.src.url)
            self.sink.write(view[:self.fill])
        self.fill = 0
        self.runs = []


def _part_rows(part_url: str, local: np.ndarray, storage_options: dict | None) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """offset, end (int64) and key (object) of the given rows of one catalog part."""
    offs, ends, keys = _part_columns(part_url, storage_options)
    local = np.asarray(local, np.int64)
    return offs[local], ends[local], keys[local]


_PARTS: OrderedDict = OrderedDict()  # the last few catalog parts read in this process (their names are content hashes)
_PARTS_LOCK = threading.Lock()
_PARTS_KEPT = 4


def _part_columns(part_url: str, storage_options: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """offset, end (int64) and key (object) columns of a catalog part, through a small per-process cache.

    Consecutive output shards read the same source shard, and the planner read it just before:
    a part file is named by the hash of its shard's url, size and etag, so a cached copy is valid.
    """
    with _PARTS_LOCK:
        hit = _PARTS.get(part_url)
        if hit is not None:
            _PARTS.move_to_end(part_url)
            return hit
    data = pa.BufferReader(storage.read_bytes(part_url, storage_options))
    table = pq.ParquetFile(data).read(columns=["key", "offset", "end"], use_threads=False)
    cols = (table.column("offset").to_numpy().astype(np.int64, copy=False),
            table.column("end").to_numpy().astype(np.int64, copy=False),
            table.column("key").to_numpy(zero_copy_only=False))
    with _PARTS_LOCK:
        _PARTS[part_url] = cols
        while len(_PARTS) > _PARTS_KEPT:
            _PARTS.popitem(last=False)
    return cols


_SIZE_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # 11 octal digits
_SUM_WEIGHTS = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # 6 octal digits
_NOT_REGULAR = np.ones(256, bool)
_NOT_REGULAR[[ord("0"), 0, ord("7")]] = False  # typeflags of regular files
_SEPARATOR = np.zeros(256, bool)
_SEPARATOR[[ord("/"), ord("\\")]] = True
_NUL_SPACE = np.frombuffer(b"\0 ", np.uint16)[0]  # the end of a "dddddd\0 " checksum field, read as one uint16


def key_prefixes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The tar name prefixes ``key + "."`` of plain relative WebDataset keys, as a (keys, width) byte matrix.

    Returns (matrix, lengths), or None when a key is not plain: empty, over 98 bytes, absolute,
    with '..', '\\' or NUL, or with a '.' or nothing in its last part (the complete check then runs).
    """
    n = len(keys)
    if n == 0:
        return np.zeros((0, 1), np.uint8), np.zeros(0, np.int64)
    try:
        enc = [k.encode("utf-8", "surrogateescape") for k in keys]
    except (AttributeError, UnicodeEncodeError):
        return None
    lens = np.fromiter(map(len, enc), np.int64, n)
    if lens.min() == 0 or lens.max() > 98:
        return None
    width = int(lens.max()) + 1
    prefix = np.array(enc, f"S{width}").view(np.uint8).reshape(n, width)
    cols = np.arange(width)
    last_slash = np.where(prefix == 47, cols, -1).max(1)
    dots = prefix == 46
    bad = (prefix == 92) | ((prefix == 0) & (cols < lens[:, None])) | (dots & (cols > last_slash[:, None]))
    bad[:, :-1] |= dots[:, :-1] & dots[:, 1:]
    if bad.any() or (prefix[:, 0] == 47).any() or (last_slash == lens - 1).any():
        return None
    prefix[np.arange(n), lens] = 46  # the '.' before the extension
    return prefix, lens + 1


def headers_ok(block: np.ndarray, starts: np.ndarray, keys: np.ndarray | tuple) -> bool:
    """Whether ``block`` (uint8) holds exactly the samples starting at ``starts``, with plain, safe headers.

    The samples tile the block (sample ``i`` spans ``starts[i]`` up to the next start, the last
    one to the end).  True when every member header is a plain ustar/GNU header of a regular file
    (size as 11 octal digits, checksum as 6 digits + NUL + space, no ustar prefix) with a correct
    checksum, the members of each sample tile it exactly, and every member name is
    ``<key>.<ext>`` of its sample's key with no '/' or '\\' in ``ext``, for plain keys (see
    :func:`key_prefixes`; ``keys`` may be its result).  That implies everything
    :func:`check_members` checks; False means "not shown here" (pax or long-name headers, or a
    real problem): the caller runs :func:`check_members`.  Vectorised: one pass per member
    position within a sample, whatever the number of samples.
    """
    prefixes = keys if isinstance(keys, tuple) else key_prefixes(keys)
    n_samples = len(starts)
    if prefixes is None or len(prefixes[0]) != n_samples:
        return False
    if n_samples == 0:
        return len(block) == 0
    prefix, plen = prefixes
    starts = np.asarray(starts, np.int64)
    stops = np.append(starts[1:], len(block))
    if starts[0] != 0 or (stops <= starts).any() or len(block) % 512 or (starts % 512).any():
        return False
    blocks = block.reshape(-1, 512)  # tar headers lie on 512-byte boundaries: gather whole rows

    # walk the members: all samples' first headers, then all second headers, ...
    heads, owners = [], []
    pos = starts.copy()
    live = np.arange(n_samples)
    while live.size:
        p = pos[live]
        hdr = blocks[p >> 9]
        digits = hdr[:, 124:135] - 48  # uint8: anything but '0'..'7' wraps above 7
        if (digits > 7).any() or ((hdr[:, 135] | 32) != 32).any():  # 11 digits, then NUL or space
            return False
        nxt = p + 512 + ((digits @ _SIZE_WEIGHTS + 511) & ~511)
        end = stops[live]
        if (nxt > end).any():
            return False
        heads.append(hdr)
        owners.append(live)
        pos[live] = nxt
        live = live[nxt < end]
    hdr = np.concatenate(heads) if len(heads) > 1 else heads[0]
    owner = np.concatenate(owners) if len(owners) > 1 else owners[0]

    field = hdr[:, 148:154] - 48
    if _NOT_REGULAR[hdr[:, 156]].any() or (field > 7).any() or (hdr[:, 345] != 0).any() \
            or (hdr[:, 154:156].copy().view(np.uint16) != _NUL_SPACE).any():
        return False  # not a regular file, another checksum layout, or a ustar prefix (the full check joins it)
    total = hdr.sum(1, dtype=np.int64) - hdr[:, 148:156].sum(1, dtype=np.int64) + 256
    if (field @ _SUM_WEIGHTS != total).any():
        return False
    width = prefix.shape[1]
    if width > 100:
        return False
    name = hdr[:, :100]
    own = plen[owner][:, None]
    cols = np.arange(100)
    if not ((name[:, :width] == prefix[owner]) | (cols[:width] >= own)).all():
        return False
    zero = name == 0
    nul = np.where(zero.any(1), zero.argmax(1), 100)[:, None]
    return not (_SEPARATOR[name] & (cols >= own) & (cols < nul)).any()


def _pieces(offs: np.ndarray, ends: np.ndarray, block: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of samples contiguous in the source, together at most ``block`` bytes (or one sample)."""
    offs, ends = np.asarray(offs, np.int64), np.asarray(ends, np.int64)
    bounds = np.concatenate([[0], np.flatnonzero(offs[1:] != ends[:-1]) + 1, [len(offs)]]).tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        while a < b:
            if ends[b - 1] - offs[a] <= block:
                c = b
            else:  # the longest prefix within the block, at least one sample
                c = max(a + 1, int(np.searchsorted(ends[a:b], offs[a] + block, side="right")) + a)
            yield a, c
            a = c


class _Sink:
    """Appends to an output tar: raw ``os.write`` on a local file, ``write`` on an fsspec upload."""

    def __init__(self, dst: BinaryIO, remote: bool):
        self.dst = dst
        self.fd = None if remote else dst.fileno()

    def write(self, data) -> None:
        if self.fd is None:
            self.dst.write(data)
            return
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(self.fd, view):]


class _Source:
    """Random access to one source shard: ``pread`` on a local file, ranged reads through fsspec otherwise."""

    def __init__(self, url: str, size: int, storage_options: dict | None):
        self.url, self.size, self.storage_options = url, size, storage_options
        self.fd: int | None = None
        self.f = None

    def __enter__(self) -> "_Source":
        if storage.is_remote(self.url):
            self.f = storage.open_read(self.url, self.storage_options, block_size=REMOTE_BLOCK)
        else:
            try:
                self.fd = os.open(self.url, os.O_RDONLY)
            except OSError as exc:
                raise StreamPruneError(storage.describe_storage_error(exc, self.url)) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
        if self.f is not None:
            self.f.close()

    def _short(self, start: int, stop: int) -> StreamPruneError:
        return StreamPruneError(f"reshard: shard {self.url} is shorter than catalogued (wanted bytes {start}-{stop}); "
                                "re-run catalog")

    def read_at(self, pos: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` (fewer at the end of the shard)."""
        if self.fd is not None:
            return os.pread(self.fd, n, pos)
        self.f.seek(pos)
        return self.f.read(n)

    def read_into(self, buf: bytearray, at: int, start: int, count: int) -> None:
        """Bytes [start, start + count) of the shard into ``buf[at:at + count]``."""
        with memoryview(buf) as whole:
            view = whole[at:at + count]
            got = 0
            while got < count:
                if self.fd is not None:
                    k = os.preadv(self.fd, [view[got:]], start + got)
                else:
                    self.f.seek(start + got)
                    k = self.f.readinto(view[got:])
                if not k:
                    view.release()
                    raise self._short(start, start + count)
                got += k
            view.release()

    def copy_to(self, sink: _Sink, start: int, count: int) -> None:
        """Append bytes [start, start + count) to ``sink``: in the kernel local to local, else by blocks."""
        pos, stop = start, start + count
        while pos < stop:
            done = 0
            if self.fd is not None and sink.fd is not None:
                try:
                    done = os.copy_file_range(self.fd, sink.fd, stop - pos, pos)
                except OSError:  # e.g. across filesystems on old kernels: copy through memory
                    pass
            if not done:
                data = self.read_at(pos, min(stop - pos, READ_BLOCK))
                if not data:
                    raise self._short(start, stop)
                sink.write(data)
                done = len(data)
            pos += done


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over ``read_at(pos, n)`` with absolute positions (for ``tario.iter_tar``)."""

    def __init__(self, read_at: Callable[[int, int], bytes], pos: int, size: int):
        self._read_at, self._pos, self._size = read_at, pos, size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, max(0, self._size - self._pos))
        data = self._read_at(self._pos, n) if n else b""
        self._pos += len(data)
        return data


def iter_headers(read_at: Callable[[int, int], bytes], start: int, stop: int, size: int) -> Iterator:
    """Members from byte ``start`` up to the one ending at (or past) ``stop``, headers only (``.name/.offset/.end``).

    ``read_at(pos, n)`` reads the shard (``size`` bytes).  Plain ustar/GNU headers of regular
    files are parsed here (the catalogued bytes were checked once already; this re-check must
    cost little next to the copy); anything else (pax, long names, a bad checksum, zeros) goes to
    :func:`tario.iter_tar` from that member on.
    """
    from streamprune.tario import iter_tar

    pos = start
    while pos < stop:
        hdr = read_at(pos, 512)
        if len(hdr) < 512 or hdr[156] not in _REGULAR or hdr[124] & 0x80:
            break
        size_text = hdr[124:136].split(b"\0", 1)[0].strip(b" ") or b"0"
        sum_text = hdr[148:156].split(b"\0", 1)[0].strip(b" ")
        if not (size_text.isdigit() and sum_text.isdigit()):  # int() would take signs, '_', inner spaces
            break
        try:
            length, checksum = int(size_text, 8), int(sum_text, 8)
        except ValueError:  # an 8 or a 9
            break
        if checksum != sum(hdr) - sum(hdr[148:156]) + 256:
            break
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        end = pos + 512 + (length + 511) // 512 * 512
        yield _Header(name.decode("utf-8", "surrogateescape"), pos, end)
        pos = end
    else:
        return
    for m in iter_tar(_RangeFile(read_at, pos, size), read_data=False, base_offset=pos):
        yield m
        if m.end >= stop:
            return


_REGULAR = frozenset(b"0\x007")  # typeflags of regular files: '0', NUL, '7'


def _buffer_members(view: memoryview, base: int) -> Iterator:
    """Members in ``view``, which holds bytes [base, base + len(view)) of a shard; headers only."""

    def read_at(pos: int, n: int) -> bytes:
        return bytes(view[pos - base:pos - base + n])

    return iter_headers(read_at, base, base + len(view), base + len(view))


class _Header:
    __slots__ = ("name", "offset", "end")

    def __init__(self, name: str, offset: int, end: int):
        self.name, self.offset, self.end = name, offset, end


def check_members(members: Iterable, start: int, stop: int, offs, ends, keys, shard: str) -> None:
    """Members spanning bytes [start, stop) of a shard belong to their catalogued keys and have safe names."""
    from streamprune.shards import split_name, unsafe_name
    from streamprune.tario import TarError

    offs = offs.tolist() if isinstance(offs, np.ndarray) else offs
    ends = ends.tolist() if isinstance(ends, np.ndarray) else ends
    j = 0
    covered = start
    prefix = None  # "key." of sample j when that key is a plain WebDataset key (last part without '.')
    try:
        for m in members:
            moved = False
            while j < len(offs) and m.offset >= ends[j]:
                j += 1
                moved = True
            if j == len(offs) or m.offset < offs[j]:
                raise StreamPruneError(f"reshard: shard {shard}: member {m.name!r} at byte {m.offset} is outside "
                                       "the catalogued samples; the shard changed since `streamprune catalog`?")
            if moved or prefix is None:
                last = keys[j].rsplit("/", 1)[-1]
                prefix = keys[j] + "." if last and "." not in last else ""
            name = m.name
            # Fast path, equivalent to the checks below for a plain key: "key.ext", ext without '/',
            # and no character that can make a name unsafe.
            if not (prefix and name.startswith(prefix) and "/" not in name[len(prefix):]
                    and ".." not in name and "\\" not in name and "\x00" not in name and name[0] != "/"):
                if unsafe_name(name):
                    raise StreamPruneError(f"reshard: shard {shard}, key {keys[j]}: unsafe member name {name!r}")
                parts = split_name(name)
                if parts is not None and parts[0] != keys[j]:
                    raise StreamPruneError(f"reshard: shard {shard}: member {name!r} where the catalog has key "
                                           f"{keys[j]}; the shard changed since `streamprune catalog`?")
            covered = m.end
    except TarError as exc:
        raise StreamPruneError(f"reshard: shard {shard}, key {keys[j] if j < len(keys) else keys[-1]}: bytes do not "
                               f"parse as tar members ({exc}); the shard changed since `streamprune catalog`?") from None
    if covered != stop:
        raise StreamPruneError(f"reshard: shard {shard}, key {keys[-1]}: catalogued bytes do not end at a member "
                               "boundary; the shard changed since `streamprune catalog`?")


# reading a pruned view --------------------------------------------------------------------------
class FsspecOpen:
    """webdataset opener stage for fsspec urls (s3://...): yields dict(url=..., stream=...)."""

    def __init__(self, storage_options: dict | None = None, handler: Callable | None = None):
        self.storage_options = dict(storage_options or {})
        self.handler = handler

    def __call__(self, urls: Iterable) -> Iterator[dict]:
        for item in urls:
            url = item["url"] if isinstance(item, dict) else item
            try:
                stream = storage.open_read(url, self.storage_options)
            except Exception as exn:  # noqa: BLE001 - the webdataset handler decides
                if self.handler is not None and self.handler(exn):
                    continue
                raise
            yield dict(url=url, stream=stream)


class KeptKeys:
    """Predicate for ``WebDataset.select``: True for samples a prune kept.

    Holds the keys of one shard at a time, read from ``keys.parquet`` row groups whose ``shard``
    statistics cover that shard (picklable: DataLoader workers re-open the file).
    """

    def __init__(self, keys_url: str, urls: list[str], storage_options: dict | None = None):
        self.keys_url = keys_url
        self.index = {u: i for i, u in enumerate(urls)}
        self.storage_options = dict(storage_options or {})
        self._current: str | None = None
        self._keys: frozenset = frozenset()
        self._file = None
        self._ranges: np.ndarray | None = None
        self._cached: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_ranges": None, "_cached": None, "_current": None,
                "_keys": frozenset()}

    def __call__(self, sample: dict) -> bool:
        url = sample["__url__"]
        if url != self._current:
            self._keys = self.keys_of(url)
            self._current = url
        return sample["__key__"] in self._keys

    def keys_of(self, url: str) -> frozenset:
        """Kept keys of shard ``url``."""
        if url not in self.index:
            raise ValueError(f"{url} is not in the pruned shard list")
        i = self.index[url]
        if self._file is None:
            self._file = pq.ParquetFile(storage.open_read(self.keys_url, self.storage_options))
            md = self._file.metadata
            ranges = []
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(0).statistics
                ranges.append((st.min, st.max) if st is not None and st.has_min_max else (-1, 1 << 31))
            self._ranges = np.asarray(ranges, np.int64).reshape(-1, 2)
        groups = tuple(np.flatnonzero((self._ranges[:, 0] <= i) & (self._ranges[:, 1] >= i)).tolist())
        if self._cached is None or self._cached[0] != groups:  # consecutive shards often share a row group
            table = self._file.read_row_groups(list(groups), columns=["shard", "key"])
            self._cached = (groups, table.column("shard").to_numpy(),
                            table.column("key").to_numpy(zero_copy_only=False))
        _, shard, keys = self._cached
        return frozenset(keys[shard == i].tolist())


def resolve_prune_dir(ws_or_prune_dir: str | Workspace, name: str | None = None,
                      storage_options: dict | None = None) -> tuple[str, dict]:
    """The directory holding shards.txt: a prune dir, a reshard OUT dir, or WS + ``name``."""
    if isinstance(ws_or_prune_dir, Workspace):
        base, so = ws_or_prune_dir.url, ws_or_prune_dir.storage_options
    else:
        base, so = storage.normalize(str(ws_or_prune_dir)), dict(storage_options or {})
    if name is not None:
        return storage.join(base, "prune", name), so
    if storage.exists(storage.join(base, "shards.txt"), so):
        return base, so
    names = storage.listdir(storage.join(base, "prune"), so)
    if len(names) == 1:
        return storage.join(base, "prune", names[0]), so
    raise StreamPruneError(f"{base}: no shards.txt here; give the prune directory (WS/prune/<name>) or name= "
                           f"({', '.join(names) or 'no prune outputs in this workspace'})")


def pruned_dataset(ws_or_prune_dir: str | Workspace, name: str | None = None, storage_options: dict | None = None,
                   **webdataset_kwargs: Any):
    """A ``webdataset.WebDataset`` over a pruned view that yields exactly the kept samples.

    Accepts ``WS/prune/<name>`` (original shards filtered by ``keys.parquet``), a reshard
    output directory (all samples of its tars), or a workspace plus ``name``.  ``s3://`` shards
    are opened through fsspec with ``storage_options``.  ``shardshuffle`` and ``empty_check``
    default to False (a DataLoader may have more workers than the view has shards); other keyword
    arguments go to ``WebDataset``.
    """
    import webdataset as wds
    from webdataset.cache import StreamingOpen

    pdir, so = resolve_prune_dir(ws_or_prune_dir, name, storage_options)
    try:
        text = storage.read_bytes(storage.join(pdir, "shards.txt"), so).decode()
    except (FileNotFoundError, StreamPruneError):
        raise StreamPruneError(f"{pdir}: no shards.txt (run `streamprune prune` first)") from None
    urls = [line.strip() for line in text.splitlines() if line.strip()]
    if not urls:
        raise StreamPruneError(f"{pdir}/shards.txt lists no shards")
    # A DataLoader worker may get no shard (more workers than shards, common after a reshard): it
    # then yields nothing, which WebDataset's empty check would turn into an error.
    kwargs = {"shardshuffle": False, "empty_check": False, **webdataset_kwargs}
    ds = wds.WebDataset(urls, **kwargs)
    if any(storage.is_remote(u) for u in urls):
        handler = kwargs.get("handler")
        ds.pipeline = [FsspecOpen(so, handler) if isinstance(stage, StreamingOpen) else stage
                       for stage in ds.pipeline]
        if not any(isinstance(stage, FsspecOpen) for stage in ds.pipeline):
            raise StreamPruneError("pruned_dataset: cache_dir is not supported for s3:// shards")
    keys_url = storage.join(pdir, "keys.parquet")
    if storage.exists(keys_url, so):
        ds = ds.select(KeptKeys(keys_url, urls, so))
    return ds
