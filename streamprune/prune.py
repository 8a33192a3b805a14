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
(marker ``_stages/reshard-<name>.json``).  The output is planned up front from the per-row sizes
(catalog ``end - offset``); one dask task writes one output shard under a temporary name (local)
or as one upload that only becomes visible when complete (S3), then its chunk record is written:
a killed run resumes with the shards it had not finished and no partial tar is ever visible
under a final name.

Memory: the selection holds per-row arrays (score 4 B, valid flag 1 B, label 4 B, keep mask 1 B)
plus the temporaries of the strategy (see :mod:`streamprune.select`); key lists are streamed shard
by shard.  Resharding holds the kept row ids (8 B per kept row) and one read block per task.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from streamprune import select as sel
from streamprune import storage
from streamprune.compute import map_tasks
from streamprune.errors import StreamPruneError
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)

SOURCES = {"knn": 1, "gcn": 2, "label-aware": 3, "propagate": 4, "kernel": 5}
ALL_SOURCES = (*SOURCES, "seed", "full")
DEFAULT_SHARD_SIZE = 1 << 30
READ_BLOCK = 8 << 20  # bytes read (and held) at a time while copying samples
TAR_EOF = b"\0" * 1024  # two zero blocks: the tar end-of-archive marker
KEYS_SCHEMA = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("row", pa.int64())])
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
_CHUNK_ROWS = 1 << 22


# inputs --------------------------------------------------------------------------------------
def load_scores(ws: Workspace, score: str, source: str) -> np.ndarray:
    """(N,) float32 scores of every catalog row from ``source`` (NaN = no score)."""
    n = ws.require("catalog", "prune")["counts"]["n_samples"]
    out = _load_scores(ws, score, source)[0]
    if len(out) != n:
        raise StreamPruneError(f"prune: {score} scores from {source} have {len(out)} rows but the catalog has {n}; "
                               "re-run the upstream stages for this catalog")
    return out


def score_marker_key(score: str, source: str) -> str:
    """Marker of the stage that produces ``score`` from ``source``."""
    if source in SOURCES:
        return f"extrapolate-{score}-{source}"
    return f"score-{score}-full" if source == "full" else f"score-{score}"


def _load_scores(ws: Workspace, score: str, source: str) -> tuple[np.ndarray, dict]:
    """Scores and the marker they come from (zarr read directly: streamprune.scoring would import torch)."""
    if source in SOURCES:
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
        return _read_1d(arr, np.float32), marker
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
    raise StreamPruneError(f"prune: unknown score source {source!r}; choose one of {', '.join(ALL_SOURCES)}")


def _read_score_array(ws: Workspace, path: str) -> np.ndarray:
    """A seed or full-data score array (the layout of streamprune.scoring.score_array_path)."""
    try:
        arr = zarr.open_array(storage.zarr_store(ws.path(path), ws.storage_options), mode="r")
    except FileNotFoundError:
        raise StreamPruneError(f"prune: {ws.path(path)} is missing; re-run `streamprune score --force`") from None
    return _read_1d(arr, np.float32)


def _require(ws: Workspace, key: str, command: str) -> dict:
    marker = ws.marker(key)
    if marker is None:
        raise StreamPruneError(f"prune: stage {key} has not run in {ws.url}; run `{command}` first")
    return marker


def _read_1d(arr: Any, dtype: Any) -> np.ndarray:
    """A 1-d zarr array converted chunk by chunk (no full-size temporary of the stored dtype)."""
    n = arr.shape[0]
    out = np.empty(n, dtype)
    for a in range(0, n, _CHUNK_ROWS):
        block = arr[a:a + _CHUNK_ROWS]
        if np.issubdtype(np.dtype(dtype), np.integer) and block.size:
            info = np.iinfo(dtype)
            if block.min() < info.min or block.max() > info.max:
                raise StreamPruneError(f"prune: values in {arr.name or 'array'} exceed {np.dtype(dtype).name}")
        out[a:a + len(block)] = block
    return out


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
    valid = _read_1d(g["valid"], bool) if "valid" in names else None
    labels = _read_1d(g["labels"], np.int32) if "labels" in names else None
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


def prune(workspace: str | Workspace, *, score: str = "du", source: str = "knn", strategy: str = "hard",
          keep_fraction: float | None = None, keep_count: int | None = None, name: str | None = None, seed: int = 0,
          reshard: str | None = None, shard_size: int | str | None = None, max_count: int | None = None,
          scheduler: str | None = "local", force: bool = False, storage_options: dict | None = None,
          row_group_rows: int = 1 << 20, **strategy_opts: Any) -> dict:
    """Select the rows to keep and write ``prune/<name>/`` (shards.txt, keys.parquet, stats.json).

    ``strategy_opts`` go to the strategy (``beta``/``n_strata`` for ccs, ``eps`` for
    influence-budget, ``higher_is_harder`` to override the score's direction).  Returns the
    ``prune-<name>`` marker; with ``reshard`` the kept samples are also re-written as new tars
    (see :func:`reshard`), the returned ``outputs["reshard"]`` is ``OUT/shards.txt`` and
    ``"reshard"`` holds the reshard marker.  ``row_group_rows`` sets keys.parquet's row groups.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    try:
        strategy = sel.canonical(strategy)
    except ValueError as exc:
        raise StreamPruneError(f"prune: {exc}") from None
    if source not in ALL_SOURCES:
        raise StreamPruneError(f"prune: unknown score source {source!r}; choose one of {', '.join(ALL_SOURCES)}")
    direction = bool(strategy_opts.pop("higher_is_harder", higher_is_harder(score)))
    eps = strategy_opts.get("eps")
    if strategy == "influence-budget":
        if eps is None:
            raise StreamPruneError("prune: strategy influence-budget needs eps (budget on the summed norms removed)")
        if keep_fraction is not None or keep_count is not None:
            raise StreamPruneError("prune: influence-budget keeps what its eps allows; do not give a keep fraction "
                                   "or count")
    elif (keep_fraction is None) == (keep_count is None):
        raise StreamPruneError("prune: give exactly one of --keep-fraction and --keep-count")
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

    marker = _select_stage(ws, name=name, score=score, source=source, strategy=strategy, keep_fraction=keep_fraction,
                           keep_count=keep_count, seed=seed, direction=direction, opts=strategy_opts, force=force,
                           row_group_rows=row_group_rows)
    if reshard is None:
        return marker
    rm = _run_reshard(ws, name, reshard, shard_size=shard_size, max_count=max_count, scheduler=scheduler,
                      force=force)
    shards_url = storage.join(rm["config"]["out"], "shards.txt")
    return marker | {"outputs": {**marker["outputs"], "reshard": shards_url}, "reshard": rm}


def _noise_for_hard_clean(ws: Workspace, scores: np.ndarray, noise_fraction) -> tuple[np.ndarray, int, dict]:
    """Label disagreement per row and how many eligible rows to drop as likely mislabelled.

    ``auto`` estimates the count from the data: eligible rows whose exp(-d)-weighted neighbour
    majority carries another label.  A number is a fraction of the eligible rows.
    """
    from streamprune.extrapolate.label_aware import noise_estimate, read_disagreement

    noise = read_disagreement(ws)
    eligible = ~np.isnan(scores)
    if noise_fraction == "auto":
        k = int(ws.marker("score-label_disagreement")["config"]["k"])
        suspects = noise_estimate(ws, k=k) & eligible
        drop = int(suspects.sum())
    else:
        drop = int(round(float(noise_fraction) * int(eligible.sum())))
    est = drop / max(1, int(eligible.sum()))
    return noise, drop, {"noise_fraction": noise_fraction, "noise_estimate": round(est, 6), "drop_target": drop}


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise StreamPruneError(f"prune: name {name!r} must be letters, digits and . _ + = - (no '/' or '..')")


def _select_stage(ws: Workspace, *, name: str, score: str, source: str, strategy: str, keep_fraction: float | None,
                  keep_count: int | None, seed: int, direction: bool, opts: dict, force: bool,
                  row_group_rows: int) -> dict:
    from streamprune.shards import Catalog

    cat_m = ws.require("catalog", "prune")
    scores, score_marker = (None, None)
    if strategy != "random" or ws.marker(score_marker_key(score, source)) is not None:
        scores, score_marker = _load_scores(ws, score, source)
    else:
        log.info("prune: no %s scores from %s; random selection among all valid rows", score, source)
    valid, embed_labels, embed_marker = load_embed_columns(ws)
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
    if strategy == "hard-clean":
        dm = ws.marker("score-label_disagreement")
        if dm is None:
            from streamprune.extrapolate.label_aware import compute_disagreement

            dm = compute_disagreement(ws)
        inputs["disagreement"] = dm["fingerprint"]
    run = ws.begin("prune", config, inputs, force=force, key=f"prune-{name}")
    if run.already_done:
        return run.previous | {"skipped": True}
    t0 = time.time()
    noise_info: dict = {}

    if scores is None:
        scores = np.zeros(n, np.float32)
    n_nan = int(np.isnan(scores).sum())
    n_invalid = 0
    if valid is not None:
        n_invalid = int((~valid).sum())
        scores[~valid] = np.nan  # an undecodable sample is never kept, whatever its score
    del valid
    eligible_count = int((~np.isnan(scores)).sum())
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
            k = sel.keep_count_from(eligible_count, keep_fraction, keep_count)
            noise, drop_count, noise_info = _noise_for_hard_clean(ws, scores, opts["noise_fraction"])
            mask = sel.select(strategy, scores, labels, k, seed, higher_is_harder=direction, noise=noise,
                              drop_count=drop_count)
            noise_info["dropped"] = int(min(drop_count, max(0, eligible_count - k)))
        else:
            k = sel.keep_count_from(eligible_count, keep_fraction, keep_count)
            mask = sel.select(strategy, scores, labels, k, seed, higher_is_harder=direction, **opts)
    except ValueError as exc:
        raise StreamPruneError(f"prune: {strategy}: {exc} ({n} rows: {n_invalid} invalid, {n_nan} without a score, "
                               f"{eligible_count} eligible)") from None
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

    def quantiles(v: np.ndarray) -> dict:
        return {f"{q:g}": float(x) for q, x in zip(qs, np.quantile(v, qs))} if v.size else {}

    kept_scores = scores[mask]
    out: dict[str, Any] = {
        "n_rows": int(len(scores)), "n_eligible": n_eligible, "n_kept": n_kept,
        "realised_keep_fraction": n_kept / n_eligible if n_eligible else 0.0,
        "kept_fraction_of_all_rows": n_kept / len(scores) if len(scores) else 0.0,
        "higher_is_harder": direction,
        "score_quantiles": quantiles(scores[eligible]),
        "kept_score_quantiles": quantiles(kept_scores),
        "kept_score_range": [float(kept_scores.min()), float(kept_scores.max())] if kept_scores.size else None,
    }
    if labels is not None:
        el, ec = np.unique(labels[eligible], return_counts=True)
        kl, kc = np.unique(labels[mask], return_counts=True)
        kept = dict(zip(kl.tolist(), kc.tolist()))
        out["per_class"] = {str(c): {"eligible": int(e), "kept": int(kept.get(c, 0))} for c, e in zip(el.tolist(), ec)}
    nz = per_shard_kept > 0
    out["per_shard"] = {"kept": per_shard_kept[nz].tolist(), "total": per_shard_total[nz].tolist(),
                        "note": "aligned with the lines of shards.txt"}
    out["n_shards_kept"] = int(nz.sum())
    out["n_shards_dropped"] = int((~nz).sum())
    return out


def _read_part(cat, shard: int, columns: list[str]) -> pd.DataFrame:
    """Columns of one catalog part, read without the catalog's cache (safe from several threads)."""
    url = cat.ws.path("catalog", "parts", f"{cat.shards.part.iloc[shard]}.parquet")
    return pd.read_parquet(io.BytesIO(storage.read_bytes(url, cat.ws.storage_options)), columns=columns)


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
    with atomic_output(url, storage_options) as f:
        writer = pq.ParquetWriter(f, KEYS_SCHEMA, compression="zstd", use_dictionary=["shard"])
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
        writer.close()
    return per_shard, urls


# atomic output files -----------------------------------------------------------------------------
@contextmanager
def atomic_output(url: str, storage_options: dict | None = None, block_size: int = 16 << 20) -> Iterator[BinaryIO]:
    """A binary file that appears under ``url`` only when complete; nothing appears on error or kill.

    Local: a ``.tmp-`` file in the same directory, fsynced and renamed.  S3: one PUT or a
    multipart upload, both invisible until completed (an aborted upload is discarded).
    """
    if not storage.is_remote(url):
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(url)}.partial")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, url)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs = storage.get_fs(url, storage_options)
    f = storage.retry(lambda: fs.open(url, "wb", block_size=block_size), url)
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

    def load(j: int) -> tuple[int, np.ndarray, np.ndarray]:
        a, b = int(bounds[j]), int(bounds[j + 1])
        s = int(src[a])
        part = _read_part(cat, s, ["key", "offset", "end"])
        local = rows[a:b] - cat.row_start[s]
        sizes = part.end.to_numpy(np.int64)[local] - part.offset.to_numpy(np.int64)[local]
        return a, sizes, part.key.to_numpy(object)[local]

    if len(rows):
        for a, sizes, keys in _prefetch(load, range(len(bounds) - 1), depth=4):
            planner.feed(a, sizes, keys)
    return src, np.asarray(planner.starts, np.int64)


def reshard(workspace: str | Workspace, name: str, out: str, *, shard_size: int | str | None = None,
            max_count: int | None = None, scheduler: str | None = "local", force: bool = False,
            storage_options: dict | None = None) -> dict:
    """Write the kept samples of ``prune/<name>`` as new tars ``OUT/pruned-NNNNNN.tar`` plus ``OUT/shards.txt``.

    Members are copied byte for byte from the catalogued ranges of the source shards; one dask
    task per output shard; resumable per output shard.
    """
    from dask.utils import parse_bytes

    from streamprune.shards import Catalog

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    _check_name(name)
    size = DEFAULT_SHARD_SIZE if shard_size is None else (
        parse_bytes(shard_size) if isinstance(shard_size, str) else int(shard_size))
    if size <= 0:
        raise StreamPruneError(f"reshard: --shard-size must be positive, got {shard_size}")
    if max_count is not None and int(max_count) < 1:
        raise StreamPruneError(f"reshard: --max-count must be >= 1, got {max_count}")
    out = storage.normalize(out)
    if storage.normalize(out).rstrip("/") == ws.url.rstrip("/"):
        raise StreamPruneError("reshard: the output location must not be the workspace itself")
    pm = ws.require(f"prune-{name}", "reshard")
    cat_m = ws.require("catalog", "reshard")
    config = {"name": name, "out": out, "shard_size": size, "max_count": None if max_count is None else int(max_count)}
    run = ws.begin("prune", config, {"prune": pm["fingerprint"], "catalog": cat_m["fingerprint"]}, force=force,
                   key=f"reshard-{name}")
    if run.already_done:
        return run.previous | {"skipped": True}
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
    so = ws.storage_options
    # Readers take OUT/shards.txt as the list of complete outputs: hide it while outputs change.
    storage.remove(storage.join(out, "shards.txt"), so)
    _remove_stale(out, n_out, so)

    done = run.done_chunks()
    stops = np.append(starts[1:], len(rows))
    args, weights, todo = [], [], []
    for i in range(n_out):
        if str(i) in done:
            continue
        a, b = int(starts[i]), int(stops[i])
        segments = []
        for s in np.unique(src[a:b]):
            sel_rows = rows[a:b][src[a:b] == s]
            part_url = ws.path("catalog", "parts", f"{cat.shards.part.iloc[s]}.parquet")
            segments.append((str(cat.shards.url.iloc[s]), part_url, sel_rows - int(cat.row_start[s]),
                             int(cat.shards["size"].iloc[s]), str(cat.shards.etag.iloc[s])))
        args.append((output_url(out, i), segments, so))
        weights.append(b - a)
        todo.append(i)
    log.info("reshard %s: %d output shards, %d already written", name, n_out, n_out - len(todo))
    infos = {i: run.chunk_done(i) or {} for i in range(n_out) if str(i) in done}

    def finished(j: int, info: dict) -> None:
        run.mark_chunk(todo[j], info)  # the chunk record, after the tar is complete under its final name
        infos[todo[j]] = info

    map_tasks(write_output_shard, args, scheduler=scheduler, desc=f"reshard {name}", unit="sample", weights=weights,
              on_result=finished)
    infos = list(infos.values())
    urls = [output_url(out, i) for i in range(n_out)]
    storage.write_bytes_atomic(storage.join(out, "shards.txt"), "".join(u + "\n" for u in urls).encode(), so)
    n_bytes = int(sum(info.get("bytes", 0) for info in infos))
    n_samples = int(sum(info.get("n_samples", 0) for info in infos))
    if n_samples != len(rows):
        raise StreamPruneError(f"reshard: wrote {n_samples} samples but {len(rows)} were kept; re-run with --force")
    ws.write_json({"out": out, "shards": storage.join(out, "shards.txt"), "n_shards": n_out, "n_samples": n_samples,
                   "bytes": n_bytes, "shard_size": size, "max_count": config["max_count"]},
                  "prune", name, "reshard.json")
    wall = time.time() - t0
    return run.commit(outputs={"reshard": f"prune/{name}/reshard.json"},
                      counts={"n_shards": n_out, "n_samples": n_samples, "bytes": n_bytes},
                      timings={"plan_s": round(t_plan, 3), "write_s": round(wall - t_plan, 3),
                               "bytes_per_s": round(n_bytes / max(wall - t_plan, 1e-9), 1)})


_run_reshard = reshard  # prune()'s ``reshard`` argument shadows the function there


def output_url(out: str, i: int) -> str:
    """Url of output shard ``i``."""
    return storage.join(out, f"pruned-{i:06d}.tar")


_OUTPUT_RE = re.compile(r"pruned-(\d{6,})\.tar")


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


def write_output_shard(url: str, segments: list[tuple], storage_options: dict | None) -> dict:
    """One output tar: the catalogued byte ranges of the given source rows, checked, copied, then the tar end.

    Member headers are parsed again (names must match the catalogued key and be safe) before
    their bytes are copied.  Local to local, the bytes move with ``os.copy_file_range`` (in the
    kernel, like ``shutil.copyfile``); otherwise through memory, ``READ_BLOCK`` bytes at a time.
    """
    n = 0
    written = 0
    with atomic_output(url, storage_options) as dst:
        kernel_copy = not storage.is_remote(url)
        for src_url, part_url, local, size, etag in segments:
            now = storage.stat(src_url, storage_options)
            if now["size"] != size or now["etag"] != etag:
                raise StreamPruneError(f"reshard: shard {src_url} changed since `streamprune catalog` "
                                       f"(size/etag {size}/{etag} -> {now['size']}/{now['etag']}); re-run catalog")
            part = pd.read_parquet(io.BytesIO(storage.read_bytes(part_url, storage_options)),
                                   columns=["key", "offset", "end"])
            offs = part.offset.to_numpy(np.int64)[local]
            ends = part.end.to_numpy(np.int64)[local]
            keys = part.key.to_numpy(object)[local]
            local_src = kernel_copy and not storage.is_remote(src_url)
            # Unbuffered locally: the header walk reads 512-byte blocks at scattered offsets.
            with (open(src_url, "rb", buffering=0) if local_src
                  else storage.open_read(src_url, storage_options, block_size=READ_BLOCK)) as f:
                for a, b in _pieces(offs, ends, None if local_src else READ_BLOCK):
                    start, stop = int(offs[a]), int(ends[b - 1])
                    if local_src:
                        check_members(_file_members(f, start, stop), start, stop, offs[a:b], ends[a:b], keys[a:b],
                                      src_url)
                        _copy_range(f, dst, start, stop - start, src_url)
                    else:
                        f.seek(start)
                        data = f.read(stop - start)
                        if len(data) != stop - start:
                            raise StreamPruneError(f"reshard: shard {src_url} is shorter than catalogued (wanted "
                                                   f"bytes {start}-{stop}); re-run catalog")
                        check_members(_bytes_members(data, start), start, stop, offs[a:b], ends[a:b], keys[a:b],
                                      src_url)
                        dst.write(data)
                    written += stop - start
                    n += b - a
        dst.write(TAR_EOF)
    return {"url": url, "n_samples": n, "bytes": written + len(TAR_EOF)}


def _pieces(offs: np.ndarray, ends: np.ndarray, block: int | None) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of samples contiguous in the source, together at most ``block`` bytes (or one sample)."""
    n = len(offs)
    a = 0
    while a < n:
        b = a + 1
        while b < n and offs[b] == ends[b - 1] and (block is None or ends[b] - offs[a] <= block):
            b += 1
        yield a, b
        a = b


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, count: int, shard: str) -> None:
    """Copy ``count`` bytes at ``offset`` of a local file to the end of ``dst`` inside the kernel."""
    dst.flush()
    fd_in, fd_out = src.fileno(), dst.fileno()
    while count > 0:
        try:
            done = os.copy_file_range(fd_in, fd_out, count, offset)
        except OSError:  # e.g. across filesystems on old kernels: fall back to a plain copy
            chunk = os.pread(fd_in, min(count, READ_BLOCK), offset)
            done = len(chunk)
            if done:
                os.write(fd_out, chunk)
        if done == 0:
            raise StreamPruneError(f"reshard: shard {shard} is shorter than catalogued (wanted bytes "
                                   f"{offset}-{offset + count}); re-run catalog")
        offset += done
        count -= done
    dst.seek(0, 2)  # re-sync the buffered writer with the file offset the kernel advanced


def _bytes_members(data: bytes, base: int) -> Iterator:
    from streamprune.tario import iter_tar

    return iter_tar(io.BytesIO(data), read_data=False, base_offset=base)


def _file_members(f: BinaryIO, start: int, stop: int) -> Iterator:
    """Members of a local tar file from byte ``start`` up to the one ending at (or past) ``stop``; headers only.

    Plain ustar/GNU headers of regular files are parsed here with one ``pread`` each (the
    catalogued bytes were checked once already; this re-check must not cost more than the copy);
    anything else (pax, long names, a bad checksum, zeros) is handed to :func:`tario.iter_tar`.
    """
    from streamprune.tario import iter_tar

    fd = f.fileno()
    pos = start
    while pos < stop:
        hdr = os.pread(fd, 512, pos)
        if len(hdr) < 512 or hdr[156:157] not in (b"0", b"\0", b"7") or hdr[124] & 0x80:
            break
        try:
            size = int(hdr[124:136].split(b"\0", 1)[0].strip(b" ") or b"0", 8)
            checksum = int(hdr[148:156].split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
        except ValueError:
            break
        if checksum != sum(hdr) - sum(hdr[148:156]) + 256:
            break
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        end = pos + 512 + (size + 511) // 512 * 512
        yield _Header(name.decode("utf-8", "surrogateescape"), pos, end)
        pos = end
    else:
        return
    f.seek(pos)
    for m in iter_tar(f, read_data=False, base_offset=pos):
        yield m
        if m.end >= stop:
            return


class _Header:
    __slots__ = ("name", "offset", "end")

    def __init__(self, name: str, offset: int, end: int):
        self.name, self.offset, self.end = name, offset, end


def check_members(members: Iterable, start: int, stop: int, offs: np.ndarray, ends: np.ndarray, keys: np.ndarray,
                  shard: str) -> None:
    """Members spanning bytes [start, stop) of a shard belong to their catalogued keys and have safe names."""
    from streamprune.shards import split_name, unsafe_name
    from streamprune.tario import TarError

    j = 0
    covered = start
    try:
        for m in members:
            while j < len(offs) and m.offset >= ends[j]:
                j += 1
            if j == len(offs) or m.offset < offs[j]:
                raise StreamPruneError(f"reshard: shard {shard}: member {m.name!r} at byte {m.offset} is outside "
                                       "the catalogued samples; the shard changed since `streamprune catalog`?")
            if unsafe_name(m.name):
                raise StreamPruneError(f"reshard: shard {shard}, key {keys[j]}: unsafe member name {m.name!r}")
            parts = split_name(m.name)
            if parts is not None and parts[0] != keys[j]:
                raise StreamPruneError(f"reshard: shard {shard}: member {m.name!r} where the catalog has key "
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
    are opened through fsspec with ``storage_options``.  ``shardshuffle`` defaults to False;
    other keyword arguments go to ``WebDataset``.
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
    kwargs = {"shardshuffle": False, **webdataset_kwargs}
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
