"""`streamprune scores`: one row per sample with every score array of the workspace.

Columns: ``url, key, row, label`` then, for each score, ``<score>_seed`` (measured on the subset),
``<score>_full`` (full-data run) and ``<score>_<method>`` for each extrapolation
(``du_knn``, ``du_gcn``, ``du_label_aware``, ...), empty (null) where not available.  Written
shard by shard (parquet row groups or appended CSV), so memory holds one shard plus per-row
score arrays of a few bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import zarr

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.shards import Catalog
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)


def score_columns(ws: Workspace, markers: dict[str, dict] | None = None, who: str = "scores") -> dict[str, np.ndarray]:
    """Every score array of the workspace as a dense (N,) float32 column (NaN = not available).

    ``markers``: the workspace's markers when the caller has read them already; ``who``: the
    command its warnings name.
    """
    cat_n = ws.require("catalog", "scores")["counts"]["n_samples"]
    cols: dict[str, np.ndarray] = {}
    markers = ws.markers() if markers is None else markers
    stages = []
    for st in sorted(markers):
        line = ws.outdated_line(st, markers) if st.startswith(("score-", "extrapolate-")) else None
        if line:  # made from results that were re-run since: its rows may not even be these rows
            log.warning("%s: leaving out %s: %s", who, st, line)
        else:
            stages.append(st)
    seed_rows = None
    for st in stages:
        if not st.startswith("score-"):
            continue
        marker = markers[st]
        name = marker["config"]["score"]
        suffix = st[len(f"score-{name}"):]  # "", "-full" or, of a replica run, "-full-r<N>"
        arr = zarr.open_array(storage.zarr_store(ws.path(marker["outputs"]["score"]), ws.storage_options), mode="r")[:]
        if marker["config"].get("rows") == "all":  # a score defined on every row (label_disagreement)
            cols[name] = arr.astype(np.float32)
        elif suffix:
            cols[name + suffix.replace("-", "_")] = arr.astype(np.float32)
        else:
            if seed_rows is None:
                from streamprune.subset import subset_rows

                seed_rows = subset_rows(ws)
            col = np.full(cat_n, np.nan, np.float32)
            col[seed_rows] = arr
            cols[f"{name}_seed"] = col
    for st in stages:
        if st.startswith("extrapolate-"):
            marker = markers[st]
            out = marker.get("outputs", {}).get("extrapolated") or marker.get("outputs", {}).get("score")
            if out is None:
                continue
            col = _column_name(out)
            g = zarr.open_group(storage.zarr_store(ws.path(out), ws.storage_options), mode="r")
            cols[col] = g["score"][:].astype(np.float32)
    for col, arr in list(cols.items()):
        if len(arr) != cat_n:
            log.warning("%s: leaving out %s: %d rows, the catalog has %d", who, col, len(arr), cat_n)
            del cols[col]
    return cols


METHODS = ("label-aware", "propagate", "kernel", "knn", "gcn")


def _column_name(path: str) -> str:
    """'extrapolated/du-label-aware.zarr' -> 'du_label_aware'."""
    stem = path.rsplit("/", 1)[-1].removesuffix(".zarr")
    for method in METHODS:
        if stem.endswith("-" + method):
            return f"{stem[:-len(method) - 1]}_{method.replace('-', '_')}"
    return stem.replace("-", "_")


def row_labels(ws: Workspace, n: int, markers: dict[str, dict] | None = None) -> np.ndarray:
    """Best-known label per row: embeddings, else full training, else the subset's (-1 unknown).

    Only labels of current stages count (one made for another catalog may not even have ``n`` rows).
    """
    markers = ws.markers() if markers is None else markers
    current = {k for k in ("embed", "train-full", "train") if k in markers and ws.outdated(k, markers) is None}
    if "embed" in current:
        return zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="r")["labels"][:]
    if "train-full" in current:
        from streamprune.train import load_labels

        return load_labels(ws, "train-full")
    labels = np.full(n, -1, np.int64)
    if "train" in current:
        from streamprune.subset import subset_rows
        from streamprune.train import load_labels

        labels[subset_rows(ws)] = load_labels(ws, "train")
    return labels


def export_scores(workspace: str | Workspace, output: str, *, storage_options: dict | None = None) -> dict:
    """Write the per-sample score table to ``output`` (.parquet or .csv, local or s3://)."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    fmt = "parquet" if output.endswith(".parquet") else "csv" if output.endswith(".csv") else None
    if fmt is None:
        raise StreamPruneError(f"--output must end with .parquet or .csv: {output}")
    if not storage.is_remote(output) and os.path.isdir(output):
        raise StreamPruneError(f"--output {output} is a directory; give a file name ending in .{fmt}")
    ws.require("catalog", "scores")  # the command's own name in the error of an empty workspace
    cat = Catalog(ws)
    markers = ws.markers()  # one read of the markers for the columns and the labels
    cols = score_columns(ws, markers)
    labels = row_labels(ws, cat.n_samples, markers)
    fields = [pa.field("url", pa.string()), pa.field("key", pa.string()), pa.field("row", pa.int64()),
              pa.field("label", pa.int64())] + [pa.field(c, pa.float32()) for c in cols]
    schema = pa.schema(fields)
    # Written shard by shard to a local file (beside a local output; in the temporary directory for
    # object storage, then uploaded in parts): memory holds one shard, never the whole table.
    target = _local_tmp(output)
    try:
        with storage.naming(target if storage.is_remote(output) else output):  # the disk that fills
            _write_table(cat, cols, labels, schema, fmt, target)
        storage.upload_file(target, output, ws.storage_options)
    finally:
        if os.path.exists(target):
            os.remove(target)  # no half-written or uploaded temp file left behind
    return {"output": output, "rows": cat.n_samples, "columns": [f.name for f in fields]}


def _write_table(cat: Catalog, cols: dict[str, np.ndarray], labels: np.ndarray, schema: pa.Schema, fmt: str,
                 target) -> None:
    """One table part per shard: url, key, row, label and every score column."""
    writer = pq.ParquetWriter(target, schema) if fmt == "parquet" else pacsv.CSVWriter(target, schema)
    try:
        for i, part in cat.iter_parts():
            r0, n = int(cat.row_start[i]), len(part)
            sl = slice(r0, r0 + n)
            data = {"url": pa.array([cat.urls[i]] * n, pa.string()), "key": pa.array(part.key.tolist(), pa.string()),
                    "row": pa.array(np.arange(r0, r0 + n)), "label": pa.array(labels[sl], mask=labels[sl] < 0)}
            for c, arr in cols.items():
                data[c] = pa.array(arr[sl], mask=np.isnan(arr[sl]))
            writer.write_table(pa.table(data, schema=schema))
    finally:
        writer.close()


def _local_tmp(output: str) -> str:
    if storage.is_remote(output):
        fd, path = tempfile.mkstemp(prefix="streamprune-scores-", suffix=os.path.splitext(output)[1])
        os.close(fd)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return f"{output}.tmp-{os.getpid()}"
