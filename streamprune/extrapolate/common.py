"""Shared I/O for extrapolators: seed scores in, ``extrapolated/<score>-<method>.zarr`` out.

An extrapolation method is a function ``fn(ws, score, **opts) -> marker`` registered under its
name with :func:`register_method`; :func:`extrapolate` dispatches to it.  On first use it imports
``streamprune.extrapolate.<name>`` (dashes as underscores), so a method module either calls
``register_method`` at import time or simply defines ``extrapolate_<name>(ws, score, **opts)``.

Most methods produce their output chunk by chunk with :func:`write_chunks`: give it a picklable
``predict(ws, start, stop, *args) -> (stop - start,) float32`` and it runs one task per chunk of
rows (each task owns whole zarr chunks), overrides seed rows with their measured scores
(source 0) and invalid rows with NaN (source 255), writes the chunk, records it for resume, and
returns the counts for the marker.  A typical method::

    def extrapolate_mine(ws, score="du", *, force=False, scheduler="sync", chunk_rows=None):
        run = ws.begin("extrapolate", config, inputs, force=force, key=marker_key(score, "mine"))
        if run.already_done:
            return run.previous | {"skipped": True}
        counts = write_chunks(ws, run, score, "mine", n, predict_mine, (arg1,), chunk_rows=..., scheduler=...)
        return run.commit(outputs={"extrapolated": output_path(score, "mine")}, counts=counts)

    register_method("mine", extrapolate_mine)

Output format: group with ``score`` (N,) float32 and ``source`` (N,) uint8, codes in ``SOURCES``;
a valid row with no usable prediction keeps the method's code and a NaN score.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import zarr

from streamprune import storage
from streamprune.compute import map_tasks
from streamprune.errors import Rule, StreamPruneError
from streamprune.leases import releases_leases
from streamprune.workspace import StageRun, Workspace

SOURCES = {"seed": 0, "knn": 1, "gcn": 2, "label-aware": 3, "propagate": 4, "kernel": 5}
INVALID = 255

_METHODS: dict[str, Callable[..., dict]] = {}
_OPTIONS: dict[str, dict[str, "Rule"]] = {}
_SEEDS: dict[tuple[str, str], "SeedScores"] = {}
_SEEDS_LOCK = threading.Lock()
DENSE_LOOKUP_BYTES = 256 << 20  # a per-row table of seed scores up to this size replaces the binary search ...
DENSE_LOOKUP_FREE = 16 << 20  # ... when it is at most this, or 4x the sorted seed arrays it stands beside


# --------------------------------------------------------------------------- registry


def register_method(name: str, fn: Callable[..., dict], options: dict[str, "Rule"] | None = None) -> None:
    """Make ``fn(ws, score, **opts) -> marker`` available as ``extrapolate(ws, score, name)``.

    ``options``: the rules of the method's own options by keyword (:class:`Rule`), which the
    method applies when it runs and ``run`` applies to its configuration before any stage."""
    _METHODS[name] = fn
    _OPTIONS[name] = dict(options or {})


def option_rules(method: str) -> dict[str, "Rule"]:
    """The option rules a method registered (importing it first, like :func:`extrapolate`)."""
    check_method(method)
    return _OPTIONS.get(method, {})


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


BUILTIN_METHODS = tuple(m for m in SOURCES if m != "seed")  # one module each; gcn and label-aware load on first use


def _import_method(method: str) -> None:
    """Import ``streamprune.extrapolate.<method>`` (dashes as underscores) if there is one, registering its method."""
    module_name = method.replace("-", "_")
    if not module_name.isidentifier():
        return
    name = f"streamprune.extrapolate.{module_name}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return
    fn = getattr(module, f"extrapolate_{module_name}", None)
    if method not in _METHODS and callable(fn):  # a module that defines extrapolate_<method> and did not register it
        register_method(method, fn)


def check_method(method: str) -> None:
    """Refuse an unknown extrapolation method, listing every known one (``run`` checks before its first stage)."""
    if not isinstance(method, str):
        raise StreamPruneError(f"an extrapolation method is a name, not {method!r}")
    if method not in _METHODS:
        _import_method(method)
    if method not in _METHODS:
        known = ", ".join(known_methods()) or "none"
        raise StreamPruneError(f"unknown extrapolation method {method!r}; known: {known}")


def known_methods() -> list[str]:
    """Names of every method, the built-in ones included (they register on import)."""
    for builtin in BUILTIN_METHODS:
        _import_method(builtin)
    return methods()


@releases_leases
def extrapolate(ws: str | Workspace, score: str, method: str, **opts: Any) -> dict:
    """Run extrapolation ``method`` for ``score``; returns its stage marker."""
    check_method(method)
    return _METHODS[method](ws, score, **opts)


def source_code(method: str) -> int:
    """The ``source`` value of rows predicted by ``method``."""
    if method not in SOURCES:
        raise StreamPruneError(f"no source code for method {method!r}; add it to SOURCES")
    return SOURCES[method]


def output_path(score: str, method: str) -> str:
    """Workspace-relative path of the output of ``method`` for ``score``."""
    return f"extrapolated/{score}-{method}.zarr"


def marker_key(score: str, method: str) -> str:
    """Marker name of an extrapolation run: ``extrapolate-<score>-<method>``."""
    return f"extrapolate-{score}-{method}"


def as_workspace(ws: str | Workspace, storage_options: dict | None = None) -> Workspace:
    """A Workspace from a Workspace or a URL."""
    return ws if isinstance(ws, Workspace) else Workspace(ws, storage_options)


# --------------------------------------------------------------------------- seed scores


@dataclass(frozen=True)
class SeedScores:
    """Measured seed scores: sorted subset rows and their values (NaN = not measurable)."""

    rows: np.ndarray  # (m,) int64, sorted
    values: np.ndarray  # (m,) float32
    fingerprint: str  # of the score marker

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Scores of arbitrary ``rows`` (NaN for non-seeds and ids < 0).

        From a dense per-row table (4 bytes per row up to the last seed) when it takes at most
        :data:`DENSE_LOOKUP_BYTES` (rows up to ~67M) and at most 4x the sorted seed arrays (or
        :data:`DENSE_LOOKUP_FREE`): one gather instead of a binary search per id, 22x faster for a
        graph chunk of 65,536 x 20 ids against 200k seeds (scripts/bench_gcn.py --setup: 14 against
        317 ms on the CPU box).  Every process that looks up keeps its table, so a sparse subset
        (few seeds over many rows) keeps the binary search (memory O(seeds))."""
        table = self._dense
        if table is None:
            return lookup(self.rows, self.values, rows)
        rows = np.asarray(rows, np.int64)
        return table[np.where((rows >= 0) & (rows < len(table) - 1), rows, len(table) - 1)]

    @cached_property
    def _dense(self) -> np.ndarray | None:
        """Seed scores by row id up to the last seed, NaN elsewhere, plus one NaN slot for every id
        outside (None when too large)."""
        size = (int(self.rows[-1]) + 2) if len(self.rows) else 1
        beside = 4 * (self.rows.nbytes + self.values.nbytes)
        if size * 4 > min(DENSE_LOOKUP_BYTES, max(DENSE_LOOKUP_FREE, beside)):
            return None
        table = np.full(size, np.nan, np.float32)
        table[self.rows] = self.values
        return table


def lookup(seed_rows: np.ndarray, seed_values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Values at ``rows`` from a sorted (seed_rows, seed_values) table; NaN where absent."""
    rows = np.asarray(rows, np.int64)
    out = np.full(rows.shape, np.nan, np.float32)
    if not len(seed_rows):
        return out
    pos = np.searchsorted(seed_rows, rows)
    pos_c = np.minimum(pos, len(seed_rows) - 1)
    hit = (seed_rows[pos_c] == rows) & (rows >= 0)
    out[hit] = seed_values[pos_c[hit]]
    return out


def seed_scores(ws: Workspace, score: str, cache: bool = True) -> SeedScores:
    """Seed rows and measured scores of ``score`` (cached per process and score marker unless ``cache`` is False).

    m int64 + m float32 held in memory: per-row arrays of a few bytes, seed rows only.
    """
    from streamprune.scoring import read_score
    from streamprune.subset import subset_rows

    marker = ws.marker(f"score-{score}")
    if marker is None:
        raise StreamPruneError(f"extrapolate: score '{score}' has not been computed in {ws.url}; "
                               f"run `streamprune score --score {score}` first")
    key = (ws.url, score)
    with _SEEDS_LOCK:
        hit = _SEEDS.get(key)
        if hit is not None and hit.fingerprint == marker["fingerprint"]:
            return hit
    rows = subset_rows(ws)
    values = np.asarray(read_score(ws, score), np.float32)
    if values.shape != rows.shape:
        raise StreamPruneError(f"extrapolate: scores/{score}.zarr has {len(values)} values but the subset has "
                               f"{len(rows)} rows; re-run `streamprune score`")
    if np.isinf(values).any():
        raise StreamPruneError(f"extrapolate: scores/{score}.zarr holds infinite values "
                               f"(first at seed row {int(rows[np.isinf(values)][0])})")
    if len(values) and np.isnan(values).all():
        raise StreamPruneError(f"extrapolate: scores/{score}.zarr has no value: all {len(values)} seed rows are NaN "
                               "(none decoded, or the score is undefined on them); nothing to extrapolate from")
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise StreamPruneError("extrapolate: subset/rows.zarr is not strictly increasing; re-run `streamprune subset`")
    seeds = SeedScores(rows, values, marker["fingerprint"])
    if cache:
        with _SEEDS_LOCK:
            _SEEDS[key] = seeds
    return seeds


def score_fingerprint(ws: Workspace, score: str, for_stage: str) -> str:
    """Fingerprint of the seed-score marker of ``score`` (for a stage's inputs)."""
    marker = ws.marker(f"score-{score}")
    if marker is None:
        raise StreamPruneError(f"{for_stage}: score '{score}' has not been computed in {ws.url}; "
                               f"run `streamprune score --score {score}` first")
    return marker["fingerprint"]


def read_valid(ws: Workspace, start: int, stop: int) -> np.ndarray:
    """``valid`` flags of rows [start, stop) from embeddings.zarr."""
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")
    return np.asarray(group["valid"][start:stop], bool)


# --------------------------------------------------------------------------- output


def finalize_chunk(start: int, predicted: np.ndarray, valid: np.ndarray, seeds: SeedScores, method: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(score, source) of rows [start, start + n): seeds keep measured scores, invalid rows NaN/255."""
    n = len(predicted)
    score = np.asarray(predicted, np.float32).copy()
    source = np.full(n, source_code(method), np.uint8)
    lo, hi = np.searchsorted(seeds.rows, [start, start + n])
    rows, values = seeds.rows[lo:hi], seeds.values[lo:hi]
    measured = np.isfinite(values)
    score[rows[measured] - start] = values[measured]
    source[rows[measured] - start] = SOURCES["seed"]
    score[~valid] = np.nan
    source[~valid] = INVALID
    return score, source


def open_output(ws: Workspace, run: StageRun, score: str, method: str, n: int, chunk_rows: int) -> zarr.Group:
    """The output group, created (empty: NaN / 255) unless this run already created it with this layout.

    A run resumed with another ``chunk_rows`` (an option that need not be part of a method's
    configuration) starts the output afresh, and forgets the rows it recorded in the old layout.
    """
    url = ws.path(output_path(score, method))
    rec = run.layout("output-layout", url, "rows-")
    if rec is not None and rec.get("n") == n and rec.get("chunk_rows") == chunk_rows:
        return zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="r+")
    for chunk in run.done_chunks():
        if chunk.startswith("rows-"):
            run.forget_chunk(chunk)
    group = zarr.open_group(storage.zarr_store(url, ws.storage_options), mode="w")
    group.create_array("score", shape=(n,), chunks=(chunk_rows,), dtype="float32", fill_value=np.nan)
    group.create_array("source", shape=(n,), chunks=(chunk_rows,), dtype="uint8", fill_value=INVALID)
    group.attrs.update({"score": score, "method": method, "sources": {**SOURCES, "invalid": INVALID}})
    run.mark_chunk("output-layout", {"n": n, "chunk_rows": chunk_rows})
    return group


def write_chunk(ws: Workspace, score: str, method: str, start: int, values: np.ndarray, source: np.ndarray) -> None:
    """Write rows [start, start + len(values)) of the output (whole chunks: one writer each)."""
    group = zarr.open_group(storage.zarr_store(ws.path(output_path(score, method)), ws.storage_options), mode="r+")
    group["score"][start:start + len(values)] = values
    group["source"][start:start + len(values)] = source


def _chunk_task(ws: Workspace, score: str, method: str, start: int, stop: int, predict: Callable, args: tuple) -> dict:
    predicted = np.asarray(predict(ws, start, stop, *args), np.float32)
    if predicted.shape != (stop - start,):
        raise StreamPruneError(f"extrapolate {method}: predict returned shape {predicted.shape} for rows "
                               f"[{start}, {stop})")
    values, source = finalize_chunk(start, predicted, read_valid(ws, start, stop), seed_scores(ws, score), method)
    write_chunk(ws, score, method, start, values, source)
    return {"n": stop - start,
            "n_seed": int(np.count_nonzero(source == SOURCES["seed"])),
            "n_invalid": int(np.count_nonzero(source == INVALID)),
            "n_nan": int(np.count_nonzero(np.isnan(values) & (source != INVALID))),
            "sum": float(np.nansum(values[source != INVALID], dtype=np.float64)),
            "sumsq": float(np.nansum(np.square(values[source != INVALID], dtype=np.float64)))}


def write_chunks(ws: Workspace, run: StageRun, score: str, method: str, n: int, predict: Callable, args: tuple = (),
                 *, chunk_rows: int, scheduler: str | None = "sync") -> dict:
    """Predict and write every chunk of rows not yet done; returns counts over all chunks.

    ``predict`` must be a module-level function (tasks may run in other processes).
    """
    open_output(ws, run, score, method, n, chunk_rows)
    done = run.done_chunks()
    starts = [s for s in range(0, n, chunk_rows) if f"rows-{s // chunk_rows}" not in done]

    def _record(i: int, result: dict) -> None:
        run.mark_chunk(f"rows-{starts[i] // chunk_rows}", result)

    map_tasks(_chunk_task, [(ws, score, method, s, min(n, s + chunk_rows), predict, args) for s in starts],
              scheduler=scheduler, desc=f"extrapolate {score} ({method})", unit="row",
              weights=[min(chunk_rows, n - s) for s in starts], on_result=_record)
    totals = {"n": 0, "n_seed": 0, "n_invalid": 0, "n_nan": 0, "sum": 0.0, "sumsq": 0.0}
    for s in range(0, n, chunk_rows):
        rec = run.chunk_done(f"rows-{s // chunk_rows}") or {}
        for key in totals:
            totals[key] += rec.get(key, 0)
    n_scored = totals["n"] - totals["n_invalid"] - totals["n_nan"]
    mean = totals["sum"] / n_scored if n_scored else float("nan")
    std = (max(0.0, totals["sumsq"] / n_scored - mean * mean)) ** 0.5 if n_scored else float("nan")
    return {"n": totals["n"], "n_seed": totals["n_seed"], "n_predicted": n_scored - totals["n_seed"],
            "n_invalid": totals["n_invalid"], "n_nan": totals["n_nan"], "mean": mean, "std": std}


def read_extrapolated(ws: str | Workspace, score: str, method: str,
                      storage_options: dict | None = None) -> tuple[zarr.Array, zarr.Array]:
    """The (score, source) arrays of a finished extrapolation."""
    ws = as_workspace(ws, storage_options)
    if ws.marker(marker_key(score, method)) is None:
        raise StreamPruneError(f"no {method} extrapolation of '{score}' in {ws.url}; "
                               f"run `streamprune extrapolate --score {score} --method {method}` first")
    group = zarr.open_group(storage.zarr_store(ws.path(output_path(score, method)), ws.storage_options), mode="r")
    return group["score"], group["source"]
