"""Workspace: markers written last, skip when done, refuse another config, chunk records."""

import json
import os
import re

import pytest

from streamprune import __version__
from streamprune.errors import StreamPruneError
from streamprune.shards import catalog
from streamprune.subset import subset
from streamprune.workspace import Workspace
from helpers import run_cli


def test_refuses_other_config_unless_forced(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.2, seed=0)
    with pytest.raises(StreamPruneError) as err:
        subset(ws, fraction=0.5, seed=0)
    assert str(err.value).endswith("another configuration (changed: fraction 0.2 -> 0.5); use --force to replace "
                                   "them (`run --force` replaces every stage whose options changed; "
                                   "`streamprune subset ... --force` only this one)")
    m = subset(ws, fraction=0.5, seed=0, force=True)
    assert m["config"]["fraction"] == 0.5
    meta = json.load(open(os.path.join(ws, "streamprune.json")))
    assert meta["stages"]["subset"]["fraction"] == 0.5 and meta["version"] == __version__
    assert len(meta["inputs"]["shards"]) == 10 and {"url", "size", "etag"} <= set(meta["inputs"]["shards"][0])


def test_refuses_other_version(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    meta_path = os.path.join(ws, "streamprune.json")
    meta = json.load(open(meta_path))
    meta["version"] = "9.9.0"
    json.dump(meta, open(meta_path, "w"))
    out = run_cli("subset", "-w", ws, check=False)
    assert out.returncode == 1 and "made by streamprune 9.9.0" in out.stderr and out.stderr.count("\n") == 1


def test_stage_needs_its_input(tmp_path):
    out = run_cli("subset", "-w", str(tmp_path / "empty"), check=False)
    assert out.returncode == 1 and "run `streamprune catalog` first" in out.stderr


def test_chunk_records_are_per_fingerprint(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    run = ws.begin("embed", {"a": 1}, {"x": "1"})
    run.mark_chunk(0, {"rows": 5})
    run.mark_chunk(1, errors=[{"shard": "s", "key": "k", "reason": "bad"}])
    assert run.done_chunks() == {"0", "1"}
    # A resumed run with the same config sees the chunks; another config does not.
    assert ws.begin("embed", {"a": 1}, {"x": "1"}).done_chunks() == {"0", "1"}
    other = ws.begin("embed", {"a": 1}, {"x": "2"})
    assert other.done_chunks() == set()
    assert ws.begin("embed", {"a": 1}, {"x": "1"}).done_chunks() == set()  # the stale run was dropped
    run = ws.begin("embed", {"a": 1}, {"x": "1"})
    run.mark_chunk(3, errors=[{"shard": "s", "key": "k2", "reason": "bad"}])
    marker = run.commit({"out": "x"}, {"n": 1})
    assert marker["counts"]["errors"] == 1 and ws.errors()[0]["key"] == "k2"
    assert ws.begin("embed", {"a": 1}, {"x": "1"}).already_done
    assert not os.path.exists(tmp_path / "ws" / "_stages" / "embed")


def test_status_json(shards, tmp_path):
    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync")
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert st["n_samples"] == 200 and st["n_shards"] == 10
    assert st["stages"]["catalog"]["done"] and "subset" in st["pending"]
    assert st["stages"]["catalog"]["outputs"]["shards"].endswith("catalog/shards.parquet")
    text = run_cli("status", "-w", ws).stdout
    assert "200 in 10 shards" in text


def test_marker_of_another_version_is_refused_unless_forced(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    m = subset(ws, fraction=0.2, seed=0)
    path = os.path.join(ws, "_stages", "subset.json")
    with open(path, "w") as f:
        json.dump(dict(m, version="0.0.1"), f)
    with pytest.raises(StreamPruneError, match=r"subset.json was written by streamprune 0.0.1.*--force"):
        subset(ws, fraction=0.2, seed=0)
    out = run_cli("subset", "-w", ws, "--fraction", "0.2", check=False)
    assert out.returncode == 1 and "written by streamprune 0.0.1" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    again = subset(ws, fraction=0.2, seed=0, force=True)
    assert again["version"] == __version__ and not again.get("skipped")
    assert subset(ws, fraction=0.2, seed=0)["skipped"]


def test_marker_that_is_not_an_object_is_one_line(shards, tmp_path):
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    with open(os.path.join(ws, "_stages", "catalog.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(StreamPruneError, match="not a stage marker"):
        Workspace(ws).marker("catalog")


def test_results_made_from_replaced_outputs_are_refused(tmp_path):
    """A marker whose input (or an input's input) was re-run since is out of date, and nothing builds on it."""
    ws = Workspace(str(tmp_path / "ws"))
    cat = ws.begin("catalog", {"v": 1}, {"shards": "not a marker"}).commit({}, {})
    sub = ws.begin("subset", {"fraction": 0.1}, {"catalog": cat["fingerprint"]}).commit({}, {})
    ext = ws.begin("extrapolate", {"score": "du", "method": "knn"}, {"graph": sub["fingerprint"]},
                   key="extrapolate-du-knn").commit({}, {})
    ws.begin("prune", {"name": "p", "score": "du", "source": "knn"}, {"scores": ext["fingerprint"]},
             key="prune-p").commit({}, {})
    assert ws.outdated("prune-p") is None and ws.outdated("catalog") is None

    ws.begin("subset", {"fraction": 0.2}, {"catalog": cat["fingerprint"]}, force=True).commit({}, {})
    assert ws.outdated("extrapolate-du-knn") == ("extrapolate-du-knn", "graph")
    assert ws.outdated("prune-p") == ("extrapolate-du-knn", "graph")  # the first stale link of the chain
    assert ws.outdated("subset") is None
    line = "extrapolate-du-knn is out of date (its input 'graph' was re-run since); " \
           f"re-run `streamprune extrapolate --score du --method knn -w {ws.url}`"
    assert ws.outdated_line("prune-p", ws.markers()) == line
    with pytest.raises(StreamPruneError, match=r"^prune-p: " + re.escape(line) + " first$"):
        ws.begin("prune", {"name": "p", "score": "du", "source": "knn"}, {"scores": ext["fingerprint"]},
                 key="prune-p")  # would otherwise be "already done"

    sub2 = ws.marker("subset")
    ext2 = ws.begin("extrapolate", {"score": "du", "method": "knn"}, {"graph": sub2["fingerprint"]},
                    key="extrapolate-du-knn").commit({}, {})
    assert ws.outdated("extrapolate-du-knn") is None and ws.outdated("prune-p") == ("prune-p", "scores")
    run = ws.begin("prune", {"name": "p", "score": "du", "source": "knn"}, {"scores": ext2["fingerprint"]},
                   key="prune-p")
    assert not run.already_done
    run.commit({}, {})
    assert ws.outdated("prune-p") is None


def test_status_of_a_workspace_that_does_not_exist(tmp_path):
    out = run_cli("status", "-w", str(tmp_path / "typo"), check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no workspace at" in out.stderr


def test_status_text_leaves_long_counts_to_json():
    """A stage's long count (the GCN's per-epoch history) would fill the terminal: the text status
    shows the short counts only; `status --json` keeps everything."""
    from streamprune.status import format_status

    history = [{"epoch": e, "train_loss": 0.5, "val_pearson": 0.7} for e in range(26)]
    info = {"workspace": "ws", "version": "x", "n_samples": 10, "n_shards": 1, "pending": [],
            "errors": {"total": 0, "by_stage": {}, "file": "errors.jsonl"},
            "stages": {"extrapolate-du-gcn": {"wall_s": 1.0, "outputs": {}, "counts": {
                "epochs_run": 25, "history": history, "validation_pearson": {"10": 0.77}}}}}
    text = format_status(info)
    assert "epochs_run=25" in text and "validation_pearson={'10': 0.77}" in text
    assert "history" not in text and max(len(line) for line in text.splitlines()) < 200


def test_changed_configuration_names_nested_options_old_and_new(tmp_path):
    """A changed nested option is named by its dotted key with its old and new values."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("train", {"train": {"epochs": 3, "model": "cnn"}, "on_error": "fail"}, {}).commit({}, {})
    with pytest.raises(StreamPruneError) as err:
        ws.begin("train", {"train": {"epochs": 5, "model": "cnn", "lr": 0.1}, "on_error": "fail"}, {})
    assert "(changed: train.epochs 3 -> 5; train.lr (unset) -> 0.1); use --force" in str(err.value)
    assert "`streamprune score ... --force` only this one" in str(err.value)


def test_rerun_hint_for_a_prune_set_can_be_pasted():
    """The hint that re-makes a pruned set carries its strategy and keep option, not '...'."""
    from streamprune.workspace import rerun_command

    cfg = {"name": "g1", "score": "du", "source": "gcn", "strategy": "hard-clean", "keep_fraction": 0.5,
           "keep_count": None}
    assert rerun_command("prune-g1", {"prune-g1": {"config": cfg}}) == \
        "prune --name g1 --score du --from gcn --strategy hard-clean --keep-fraction 0.5"
    by_count = {**cfg, "keep_fraction": None, "keep_count": 300}
    assert rerun_command("prune-g1", {"prune-g1": {"config": by_count}}).endswith("--keep-count 300")
