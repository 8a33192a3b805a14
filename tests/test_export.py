"""`streamprune scores` export: one row per sample, every score column, parquet and csv."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import zarr

from streamprune.decode import DecodeConfig
from streamprune.errors import StreamPruneError
from streamprune.export import _column_name, export_scores, row_labels
from streamprune.scoring import compute_scores, read_score
from streamprune.shards import catalog
from streamprune.subset import subset, subset_rows
from streamprune.train import TrainConfig, train
from streamprune.workspace import Workspace
from helpers import run_cli
from shardgen import write_shards


@pytest.mark.parametrize("path,col", [("extrapolated/du-knn.zarr", "du_knn"), ("extrapolated/du-gcn.zarr", "du_gcn"),
                                      ("extrapolated/el2n-label-aware.zarr", "el2n_label_aware"),
                                      ("extrapolated/du-my-method.zarr", "du_my_method")])  # a plugin's method
def test_column_names(path, col):
    assert _column_name(path) == col


def test_export_seed_and_full_columns(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 3, 20, kind="npy", dim=8)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    cfg = TrainConfig(model="mlp", epochs=3, batch_size=16)
    train(ws, cfg, DecodeConfig(), scheduler="sync")
    train(ws, cfg, DecodeConfig(), full=True, scheduler="sync")
    compute_scores(ws, ["du"], params={"window": 2})
    compute_scores(ws, ["du"], full=True, params={"window": 2})
    # An extrapolated array as the extrapolate stage writes it.
    g = zarr.open_group(os.path.join(ws, "extrapolated", "du-knn.zarr"), mode="w")
    g.create_array("score", shape=(60,), dtype="float32")[:] = np.arange(60, dtype=np.float32)
    w = Workspace(ws)
    w.begin("extrapolate", {"score": "du", "method": "knn"}, {}, key="extrapolate-du-knn").commit(
        {"extrapolated": "extrapolated/du-knn.zarr"}, {"n": 60})
    run_cli("scores", "-w", ws, "-o", str(tmp_path / "s.parquet"))
    export_scores(ws, str(tmp_path / "s.csv"))
    for df in (pd.read_parquet(tmp_path / "s.parquet"), pd.read_csv(tmp_path / "s.csv")):
        assert list(df.columns) == ["url", "key", "row", "label", "du_seed", "du_full", "du_knn"]
        assert list(df.row) == list(range(60)) and list(df.key) == [f"s{i:07d}" for i in range(60)]
        rows = subset_rows(w)
        np.testing.assert_allclose(df.du_seed.to_numpy()[rows], read_score(w, "du"), rtol=1e-6)
        assert df.du_seed.isna().sum() == 60 - len(rows)
        np.testing.assert_allclose(df.du_full.to_numpy(), read_score(w, "du", full=True), rtol=1e-6)
        assert list(df.du_knn) == list(range(60)) and list(df.label) == [i % 4 for i in range(60)]


def test_results_of_replaced_inputs_are_left_out_or_refused(tmp_path):
    """A catalog grown by a shard re-runs the stages of `run`, not an extrapolation made outside it."""
    shards = write_shards(str(tmp_path / "data"), 3, 20, kind="npy", dim=8)
    ws = str(tmp_path / "ws")
    cfg = TrainConfig(model="mlp", epochs=3, batch_size=16)

    def upstream(urls):
        catalog(urls, ws, scheduler="sync")
        subset(ws, fraction=0.5, seed=0)
        train(ws, cfg, DecodeConfig(), scheduler="sync")
        return compute_scores(ws, ["du"], params={"window": 2})[0]

    score_m = upstream(shards[:2])
    w = Workspace(ws)
    g = zarr.open_group(os.path.join(ws, "extrapolated", "du-knn.zarr"), mode="w")
    g.create_array("score", shape=(40,), dtype="float32")[:] = np.arange(40, dtype=np.float32)
    w.begin("extrapolate", {"score": "du", "method": "knn"}, {"score": score_m["fingerprint"]},
            key="extrapolate-du-knn").commit({"extrapolated": "extrapolated/du-knn.zarr"}, {"n": 40})
    assert w.outdated("extrapolate-du-knn") is None
    upstream(shards)  # 60 rows now; the 40-row extrapolation was made from the old seed scores

    assert w.outdated("extrapolate-du-knn") == ("extrapolate-du-knn", "score")
    out = run_cli("scores", "-w", ws, "-o", str(tmp_path / "s.csv"))
    df = pd.read_csv(tmp_path / "s.csv")
    assert len(df) == 60 and list(df.columns) == ["url", "key", "row", "label", "du_seed"]
    assert ("leaving out extrapolate-du-knn: extrapolate-du-knn is out of date (its input 'score' was re-run "
            f"since); re-run `streamprune extrapolate --score du --method knn -w {ws}`") in out.stderr
    out = run_cli("prune", "-w", ws, "--from", "knn", "--keep-fraction", "0.5", "--scheduler", "sync", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "prune: extrapolate-du-knn is out of date" in out.stderr
    assert not os.path.exists(os.path.join(ws, "prune"))
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert not st["stages"]["extrapolate-du-knn"]["done"] and "out of date" in st["stages"]["extrapolate-du-knn"]["stale"]
    assert st["stages"]["score-du"]["done"] and st["stages"]["score-du"]["stale"] is None
    assert "stale    extrapolate-du-knn" in run_cli("status", "-w", ws).stdout


def test_labels_of_an_out_of_date_embedding_are_not_used(tmp_path):
    """Labels come from current stages only: embeddings made for a replaced catalog may not even have its rows."""
    ws = Workspace(str(tmp_path / "ws"))
    old = ws.begin("catalog", {"shards": ["a.tar"]}, {}).commit({}, {"n_samples": 4})
    g = zarr.open_group(ws.path("embeddings.zarr"), mode="w")
    g.create_array("labels", data=np.array([3, 1, 2, 0]))
    ws.begin("embed", {"test": 1}, {"catalog": old["fingerprint"]}).commit({"embeddings": "embeddings.zarr"}, {"n": 4})
    assert row_labels(ws, 4).tolist() == [3, 1, 2, 0]
    ws.begin("catalog", {"shards": ["a.tar", "b.tar"]}, {}, force=True).commit({}, {"n_samples": 6})
    assert ws.outdated("embed") == ("embed", "catalog")
    assert row_labels(ws, 6).tolist() == [-1] * 6


def test_failed_export_leaves_no_temp_file(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 2, 10, kind="npy", dim=4)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    (tmp_path / "d.csv").mkdir()
    out = run_cli("scores", "-w", ws, "-o", str(tmp_path / "d.csv"), check=False)
    assert out.returncode == 1 and "is a directory" in out.stderr and out.stderr.count("\n") == 1
    parts = sorted(os.listdir(os.path.join(ws, "catalog", "parts")))
    with open(os.path.join(ws, "catalog", "parts", parts[-1]), "wb") as f:
        f.write(b"not parquet")  # the export fails after its first shard's rows are written
    out = run_cli("scores", "-w", ws, "-o", str(tmp_path / "s.csv"), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["d.csv", "data", "ws"]


def test_export_to_object_storage_streams_through_a_local_file(tmp_path, s3server, s3bucket, monkeypatch):
    """The table goes to S3 from a temporary file written shard by shard (not from memory), which is removed."""
    import tempfile

    shards = write_shards(str(tmp_path / "data"), 3, 20, kind="npy", dim=8)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    url = f"s3://{s3bucket}/out/scores.parquet"
    export_scores(ws, url, storage_options=s3server.storage_options)
    export_scores(ws, str(tmp_path / "local.parquet"))
    fs = s3server.fs()
    assert fs.cat_file(url) == (tmp_path / "local.parquet").read_bytes()
    assert len(pd.read_parquet(tmp_path / "local.parquet")) == 60
    assert list(spool.iterdir()) == []


def test_output_format_and_mis_sized_columns(tmp_path, caplog):
    """--output must name a .parquet or .csv file; an extrapolated array that does not hold one value per catalog
    row is left out with a warning naming it and both counts, the other columns exported."""
    ws = Workspace(str(tmp_path / "ws"))
    catalog(write_shards(str(tmp_path / "data"), 2, 10, kind="npy", dim=4), ws, scheduler="sync")
    with pytest.raises(StreamPruneError, match=r"--output must end with \.parquet or \.csv: .*s\.json"):
        export_scores(ws, str(tmp_path / "s.json"))
    for method, n in (("knn", 20), ("kernel", 19)):
        g = zarr.open_group(ws.path("extrapolated", f"du-{method}.zarr"), mode="w")
        g.create_array("score", shape=(n,), dtype="float32")[:] = np.arange(n, dtype=np.float32)
        ws.begin("extrapolate", {"score": "du", "method": method}, {}, key=f"extrapolate-du-{method}").commit(
            {"extrapolated": f"extrapolated/du-{method}.zarr"}, {"n": n})
    with caplog.at_level("WARNING", logger="streamprune.export"):
        export_scores(ws, str(tmp_path / "s.csv"))
    df = pd.read_csv(tmp_path / "s.csv")
    assert list(df.columns) == ["url", "key", "row", "label", "du_knn"] and list(df.du_knn) == list(range(20))
    assert "scores: leaving out du_kernel: 19 rows, the catalog has 20" in caplog.text
