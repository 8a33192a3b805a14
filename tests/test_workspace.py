"""Workspace: markers written last, skip when done, refuse another config, chunk records."""

import json
import os
import re

import numpy as np
import pytest

from streamprune import __version__
from streamprune.errors import StreamPruneError
from streamprune.shards import catalog
from streamprune.subset import subset
from streamprune.workspace import Workspace
from helpers import run_cli


def test_catalog_hint_names_its_shards_argument():
    from streamprune.workspace import repeat_command

    assert repeat_command("catalog", {"catalog": {"stage": "catalog", "config": {"on_error": "fail"}}}) == \
        "catalog SHARDS..."


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


def test_force_runs_a_finished_stage_again_when_its_outputs_are_gone(shards, tmp_path, caplog):
    """A finished stage whose outputs were deleted: a plain re-run still skips it (no check of the
    workspace), the consumer's error says to re-run with --force, and --force makes them again."""
    import shutil

    import zarr

    from streamprune.index import build_index, read_graph
    from streamprune.subset import subset_rows

    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.3, seed=0)
    rows = subset_rows(Workspace(ws))
    shutil.rmtree(os.path.join(ws, "subset", "rows.zarr"))
    assert subset(ws, fraction=0.3, seed=0)["skipped"]
    assert not subset(ws, fraction=0.3, seed=0, force=True).get("skipped")
    assert (subset_rows(Workspace(ws)) == rows).all()
    assert subset(ws, fraction=0.3, seed=0, force=True)["skipped"]  # all there: --force changes nothing
    w = Workspace(ws)
    assert w.missing_outputs({"outputs": {"cache": "train/cache.zarr", "model": None}}) == []  # not results
    assert w.missing_outputs({"outputs": {"model": "train/model.pt"}}) == [w.path("train/model.pt")]
    # a graph: the error of a stage reading it names the command that makes it again
    group = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="w")
    n = 100
    group.create_array("emb", data=np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32), chunks=(50, 4))
    group.create_array("valid", data=np.ones(n, bool), chunks=(50,))
    w.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    build_index(ws, graph="all", k=3, scheduler="sync")
    before = read_graph(w, "all")[0][:]
    shutil.rmtree(os.path.join(ws, "graph", "all.zarr"))
    with pytest.raises(StreamPruneError, match=r"re-run `streamprune index --force`"):
        read_graph(w, "all")
    with caplog.at_level("WARNING", logger="streamprune.workspace"):
        build_index(ws, graph="all", k=3, scheduler="sync", force=True)
    assert any("graph/all.zarr is missing: running it again (--force)" in r.message for r in caplog.records)
    assert (read_graph(w, "all")[0][:] == before).all()


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


def test_begin_checks_only_a_run_that_will_run_and_before_force_removes_anything(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    done = ws.begin("s", {"a": 1}, {}).commit({}, {})

    def refuse():
        raise StreamPruneError("this machine cannot run it")

    assert ws.begin("s", {"a": 1}, {}, check=refuse).already_done  # a finished run is skipped, unchecked
    with pytest.raises(StreamPruneError, match="cannot run it"):
        ws.begin("s", {"a": 2}, {}, force=True, check=refuse)
    assert ws.marker("s")["fingerprint"] == done["fingerprint"]
    ws.begin("s", {"a": 2}, {}, force=True).commit({}, {})  # the refused run released its lease


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


def test_a_chunk_record_killed_before_its_rename_is_not_done(tmp_path):
    """A record is written to `.tmp-<id>-<chunk>.json`, then renamed: a run killed in between leaves
    the temporary file, and its chunk is not finished (subset reads the record names as task numbers)."""
    ws = Workspace(str(tmp_path / "ws"))
    run = ws.begin("subset", {"fraction": 0.5}, {"catalog": "c"})
    run.mark_chunk(4, {"tasks": 4, "rows": 10})
    chunks = tmp_path / "ws" / "_stages" / "subset" / run.fingerprint[:16] / "chunks"
    (chunks / ".tmp-0123abcd-5.json").write_text('{"chunk": "5", "tas')
    assert run.done_chunks() == {"4"}
    assert ws.begin("subset", {"fraction": 0.5}, {"catalog": "c"}).done_chunks() == {"4"}


def test_status_json(shards, tmp_path):
    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync")
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert st["n_samples"] == 200 and st["n_shards"] == 10
    assert st["stages"]["catalog"]["done"] and "subset" in st["pending"]
    assert st["stages"]["catalog"]["outputs"]["shards"].endswith("catalog/shards.parquet")
    text = run_cli("status", "-w", ws).stdout
    assert "200 in 10 shards" in text


def test_status_text_marks_a_stale_stage():
    from streamprune.status import format_status

    def stage(stale):
        return {"counts": {}, "wall_s": 1.0, "outputs": {}, "stale": stale}

    info = {"workspace": "ws", "version": "x", "n_samples": 10, "n_shards": 1, "pending": [],
            "stages": {"catalog": stage(None), "subset": stage("made from a catalog since replaced")},
            "errors": {"total": 0, "file": "errors.jsonl"}}
    lines = format_status(info).splitlines()
    assert lines[2].split()[:2] == ["done", "catalog"] and lines[3].split()[:2] == ["stale", "subset"]


def test_status_lists_stages_only_not_the_workspace_files_lease(shards, tmp_path):
    """The lease that guards the workspace's shared files, held while a stage commits, is no stage:
    status lists nothing running or stopped for it."""
    from streamprune import leases
    from streamprune.status import status

    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    lease = leases.acquire(Workspace(ws).path("_stages", "shared.lease"), "workspace files")
    try:
        info = status(ws)
    finally:
        leases.release(lease)
    assert info["stages"]["catalog"]["done"] and not info["running"] and not info["interrupted"]


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


def test_status_text_rounds_float_counts():
    """A float count is shown to 4 significant digits (`status --json` keeps every digit)."""
    from streamprune.status import format_status

    info = {"workspace": "ws", "version": "x", "n_samples": 10, "n_shards": 1, "pending": [],
            "errors": {"total": 0, "by_stage": {}, "file": "errors.jsonl"},
            "stages": {"subset": {"wall_s": 1.0, "outputs": {}, "stale": None, "counts": {
                "n_subset": 1179, "realised_fraction": 0.20497218358831712, "mean": 2.0508997440338135e-07}}}}
    row = [line for line in format_status(info).splitlines() if line.startswith("  done")][0]
    assert row.split()[-3:] == ["n_subset=1179,", "realised_fraction=0.205,", "mean=2.051e-07"]


def test_status_text_columns_fit_long_stage_names():
    """A stage name longer than the usual column (extrapolate-du-label-aware) widens the column for every row."""
    from streamprune.status import format_status

    stages = {name: {"wall_s": 1.5, "outputs": {"out": f"ws/{name}"}, "counts": {"n": 1}, "stale": None}
              for name in ("catalog", "extrapolate-du-label-aware")}
    info = {"workspace": "ws", "version": "x", "n_samples": 10, "n_shards": 1, "pending": [], "stages": stages,
            "errors": {"total": 0, "by_stage": {}, "file": "errors.jsonl"}}
    lines = format_status(info).splitlines()
    rows = [line for line in lines if line.startswith("  done")]
    assert len(rows) == 2 and len({row.index("1.5s") for row in rows}) == 1
    assert rows[1].split() == ["done", "extrapolate-du-label-aware", "1.5s", "n=1"]
    outs = [line for line in lines if "out: ws/" in line]
    # outputs start where the wall-time field does: past the longest name
    assert {line.index("out:") for line in outs} == {11 + len("extrapolate-du-label-aware") + 1}


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


def test_hints_repeat_embed_and_gcn_chunking_and_a_sampled_fanout():
    from streamprune.workspace import repeat_command

    gcn = {"method": "gcn", "score": "du", "k": 10, "hidden": [512, 256], "dropout": 0.5, "epochs": 25,
           "batch_size": 128, "lr": 1e-3, "weight": "exp", "seed": 0, "prior": "knn", "training": "auto",
           "patience": 10, "fanout": [5, 10, 10], "chunk_rows": 500}
    hint = repeat_command("extrapolate-du-gcn", {"extrapolate-du-gcn": {"stage": "extrapolate", "config": gcn}})
    assert hint == "extrapolate --score du --method gcn --fanout 5,10,10 --chunk-rows 500"
    every = {**gcn, "fanout": [10, 10, 10], "chunk_rows": None}  # all k neighbours: the default
    assert repeat_command("extrapolate-du-gcn", {"extrapolate-du-gcn": {"stage": "extrapolate", "config": every}}) \
        == "extrapolate --score du --method gcn"
    embed = {"encoder": "subset", "dtype": "float16", "normalize": False, "batch_size": 256, "threads": 1,
             "chunk_rows": 4096, "decode": {}}
    assert repeat_command("embed", {"embed": {"stage": "embed", "config": embed}}) == \
        "embed --dtype float16 --chunk-rows 4096"


def test_stale_subset_hint_repeats_its_options_and_works(shards, tmp_path):
    """After re-cataloguing, the hint for a subset made with --fraction 0.3 carries the fraction: pasted,
    it re-makes the subset instead of being refused as another configuration."""
    import shlex

    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards[:5], "-w", ws, "--scheduler", "sync")
    run_cli("subset", "-w", ws, "--fraction", "0.3", "--scheduler", "sync")
    run_cli("catalog", *shards, "-w", ws, "--scheduler", "sync", "--force")
    stale = json.loads(run_cli("status", "-w", ws, "--json").stdout)["stages"]["subset"]["stale"]
    hint = re.search(r"re-run `streamprune (.*)`$", stale).group(1)
    assert hint == f"subset --fraction 0.3 -w {ws}"
    out = run_cli(*shlex.split(hint), "--scheduler", "sync", check=False)
    assert out.returncode == 0 and "target 0.3" in out.stdout, out.stderr
    assert json.loads(run_cli("status", "-w", ws, "--json").stdout)["stages"]["subset"]["done"]


def _chain(ws: Workspace, train_config: dict) -> dict:
    """Markers catalog -> subset -> train -> score-du, score-el2n -> embed, as the stages would write them."""
    cat = ws.begin("catalog", {"v": 1}, {"shards": "a"}).commit({}, {})
    sub = ws.begin("subset", {"fraction": 0.3, "seed": 0}, {"catalog": cat["fingerprint"]}).commit({}, {})
    tr = ws.begin("train", train_config, {"catalog": cat["fingerprint"], "subset": sub["fingerprint"]}).commit({}, {})
    for name, params in (("du", {"window": 4}), ("el2n", {})):
        ws.begin("score", {"score": name, "params": params}, {"train": tr["fingerprint"]},
                 key=f"score-{name}").commit({}, {})
    ws.begin("embed", {"encoder": "subset", "dtype": "float32", "normalize": True, "batch_size": 256, "threads": 1,
                       "decode": {"input": "auto", "label_key": "cls", "image_size": None}, "on_error": "fail",
                       "chunk_rows": 64}, {"catalog": cat["fingerprint"], "train": tr["fingerprint"]}).commit({}, {})
    return cat


TRAIN = {"train": {"model": "mlp", "model_kwargs": {}, "epochs": 5, "batch_size": 128, "optimizer": "sgd", "lr": None,
                   "seed": 0, "device": "auto"},
         "decode": {"input": "vector", "label_key": "cls", "image_size": None}, "on_error": "fail"}


def test_status_lists_stale_stages_in_pipeline_order_with_their_options(tmp_path):
    """Several stale stages: the earliest (subset) comes first, and each hint carries the options that differ
    from the CLI defaults (the train hint names every score made from it and the scores' own options)."""
    from streamprune.status import format_status, status

    ws = Workspace(str(tmp_path / "ws"))
    _chain(ws, TRAIN)
    ws.begin("catalog", {"v": 1}, {"shards": "b"}).commit({}, {})  # re-catalogued: everything after is stale
    info = status(ws)
    assert list(info["stages"]) == ["catalog", "subset", "train", "score-du", "score-el2n", "embed"]
    w = f"-w {ws.url}`"
    assert info["stages"]["subset"]["stale"].endswith(f"`streamprune subset --fraction 0.3 {w}")
    train_hint = f"`streamprune score --score du,el2n --model mlp --epochs 5 --input vector --window 4 {w}"
    assert info["stages"]["train"]["stale"].endswith(train_hint)
    assert info["stages"]["score-du"]["stale"].startswith("train is out of date (its input 'catalog' was re-run")
    assert info["stages"]["score-du"]["stale"].endswith(train_hint)
    assert info["stages"]["embed"]["stale"].endswith(f"`streamprune embed --normalize --chunk-rows 64 {w}")
    stale_lines = [line.strip() for line in format_status(info).splitlines() if "is out of date" in line]
    assert stale_lines[0].startswith("subset is out of date")


def test_label_disagreement_is_listed_after_the_graph_it_reads(tmp_path):
    """score-label_disagreement is a score marker made by `extrapolate --method label-aware` from graph/all: after a
    re-embed, status lists it after index-all, so that the first stale line names the graph, the one to re-run first
    (re-running label-aware first is refused while index-all is out of date)."""
    from streamprune.status import format_status, status

    ws = Workspace(str(tmp_path / "ws"))
    _chain(ws, TRAIN)
    emb = ws.marker("embed")["fingerprint"]
    graph = ws.begin("index", {"k": 20}, {"embed": emb}, key="index-all").commit({}, {})["fingerprint"]
    dis = ws.begin("score", {"score": "label_disagreement", "rows": "all", "k": 20}, {"embed": emb, "graph": graph},
                   key="score-label_disagreement").commit({}, {})["fingerprint"]
    ws.begin("extrapolate", {"score": "du", "method": "label-aware", "k": 20},
             {"disagreement": dis, "score": ws.marker("score-du")["fingerprint"]},
             key="extrapolate-du-label-aware").commit({}, {})
    ws.begin("embed", {"dtype": "float16"}, ws.marker("embed")["inputs"], force=True).commit({}, {})  # re-embedded
    info = status(ws)
    assert list(info["stages"])[-4:] == ["embed", "index-all", "score-label_disagreement",
                                         "extrapolate-du-label-aware"]
    stale_lines = [line.strip() for line in format_status(info).splitlines() if "is out of date" in line]
    assert stale_lines[0].startswith("index-all is out of date (its input 'embed' was re-run since)")


def test_status_lists_each_stage_after_the_results_it_read(tmp_path):
    """Order comes from the inputs a marker records, not from its stage's name: a score stage that reads an
    extrapolation (as a plug-in could) is listed after it, and an unrelated score keeps the pipeline's place."""
    from streamprune.status import status
    from streamprune.workspace import dependency_order

    ws = Workspace(str(tmp_path / "ws"))
    _chain(ws, TRAIN)
    graph = ws.begin("index", {"k": 20}, {"embed": ws.marker("embed")["fingerprint"]},
                     key="index-all").commit({}, {})["fingerprint"]
    knn = ws.begin("extrapolate", {"score": "du", "method": "knn"},
                   {"graph": graph, "score": ws.marker("score-du")["fingerprint"]},
                   key="extrapolate-du-knn").commit({}, {})["fingerprint"]
    ws.begin("score", {"score": "agreement"}, {"knn": knn}, key="score-agreement").commit({}, {})
    order = list(status(ws)["stages"])
    assert order.index("score-agreement") > order.index("extrapolate-du-knn")
    assert order.index("score-du") < order.index("embed") < order.index("index-all")
    markers = ws.markers()
    assert dependency_order(markers)[:3] == ["catalog", "subset", "train"]
    markers["catalog"]["inputs"] = {"loop": markers["train"]["fingerprint"]}  # a cycle: no stage makes one
    assert sorted(dependency_order(markers)) == sorted(markers)


def test_a_removed_input_is_named_missing_and_pending(tmp_path):
    """A `--force` re-run that failed leaves its stage without a marker: what was made from it says the input
    is missing (not re-run), names the command that makes it with its last options, and status lists it pending."""
    from streamprune.status import status

    ws = Workspace(str(tmp_path / "ws"))
    _chain(ws, TRAIN)
    os.remove(os.path.join(ws.url, "_stages", "train.json"))
    info = status(ws)
    line = info["stages"]["embed"]["stale"]
    assert line == ("embed is out of date (its input 'train' is missing: it has not run or was removed); run "
                    f"`streamprune score --score du,el2n --model mlp --epochs 5 --input vector --window 4 -w {ws.url}`")
    assert "is missing" in info["stages"]["score-du"]["stale"]
    assert info["pending"] == ["train", "index", "extrapolate", "prune"]
    assert info["stages"]["subset"]["done"]


def test_index_hints_name_their_graph_and_can_be_pasted(tmp_path):
    """A graph's hints name that graph: `index` alone builds both, so a refusal's `index ... --force`
    would replace the other graph too.  The stale hint, pasted, rebuilds only its graph."""
    import shlex

    import numpy as np

    from streamprune.index import build_index
    from streamprune.status import status
    from test_index import clustered, make_workspace

    ws = make_workspace(tmp_path / "ws", clustered(300, 4), subset=np.arange(0, 300, 3), chunk=50)
    built = build_index(ws, graph="both", k=10, scheduler="sync")
    with pytest.raises(StreamPruneError) as err:
        build_index(ws, graph="seeds", k=5, scheduler="sync")
    assert str(err.value).startswith(f"index-seeds: workspace {ws.url} already holds results of another configuration "
                                     "(changed: k 10 -> 5); use --force")
    assert str(err.value).endswith("`streamprune index --graph seeds ... --force` only this one)")
    ws.begin("embed", {"test": 2}, {}, force=True).commit({"embeddings": "embeddings.zarr"}, {"n": 300})
    stages = status(ws)["stages"]
    for name in ("seeds", "all"):
        assert stages[f"index-{name}"]["stale"] == (f"index-{name} is out of date (its input 'embed' was re-run "
                                                    f"since); re-run `streamprune index --graph {name} --k 10 "
                                                    f"-w {ws.url}`")
    hint = re.search(r"re-run `streamprune (.*)`$", stages["index-seeds"]["stale"]).group(1)
    run_cli(*shlex.split(hint), "--scheduler", "sync")
    stages = status(ws)["stages"]
    assert stages["index-seeds"]["done"] and stages["index-seeds"]["stale"] is None
    assert ws.marker("index-all")["fingerprint"] == built["all"]["fingerprint"] and stages["index-all"]["stale"]


def test_score_hints_recompute_the_score_on_its_current_training_run(tmp_path):
    """A score made from a training run that has been re-run since is out of date, with a hint carrying the score's
    own options and the current run's; a replica's score takes the options of the first full run (the command
    re-makes every replica with them; without that run, the replica's own less its seed offset).  A refused score
    names the score, full run and replica count."""
    from streamprune.status import status
    from streamprune.workspace import repeat_command

    ws = Workspace(str(tmp_path / "ws"))
    cat = _chain(ws, TRAIN)
    sub = ws.marker("subset")
    full = {**TRAIN, "train": {**TRAIN["train"], "epochs": 6}}
    inputs = {"catalog": cat["fingerprint"], "subset": sub["fingerprint"]}
    made = {}
    for replica, key in enumerate(("train-full", "train-full-r1")):
        old = ws.begin("train", {**full, "train": {**full["train"], "seed": replica, "lr": 0.1}}, inputs,
                       key=key).commit({}, {})
        made[key] = ws.begin("score", {"score": "du", "params": {"window": 4}}, {"train": old["fingerprint"]},
                             key="score-du" + key[len("train"):]).commit({}, {})
        again = {**full["train"], "seed": replica} | ({"epochs": 8} if replica else {})
        ws.begin("train", {**full, "train": again}, inputs, key=key, force=True).commit({}, {})
    ws.begin("train", {**TRAIN, "train": {**TRAIN["train"], "epochs": 7}}, inputs, force=True).commit({}, {})
    stages = status(ws)["stages"]
    w = f"-w {ws.url}`"
    assert stages["score-du"]["stale"] == ("score-du is out of date (its input 'train' was re-run since); re-run "
                                           f"`streamprune score --score du --window 4 --model mlp --epochs 7 "
                                           f"--input vector {w}")
    assert stages["score-du-full"]["stale"].endswith(
        f"`streamprune score --score du --full --window 4 --model mlp --epochs 6 --input vector {w}")
    assert stages["score-du-full-r1"]["stale"].endswith(
        f"`streamprune score --score du --full --full-runs 2 --window 4 --model mlp --epochs 6 --input vector {w}")
    # without the first full run, a replica's own options less its seed offset (replica 2 of --seed 3 ran seed 5)
    markers = {"train-full-r2": {"stage": "train", "config": {**TRAIN, "train": {**TRAIN["train"], "seed": 5}}},
               "score-el2n-full-r2": {"stage": "score", "config": {"score": "el2n", "params": {}}}}
    assert repeat_command("score-el2n-full-r2", markers) == \
        "score --score el2n --full --full-runs 3 --model mlp --epochs 5 --seed 3 --input vector"
    for key, says in (("score-du-full-r1", "`streamprune score --score du --full --full-runs 2 ... --force`"),
                      ("score-du", "`streamprune score --score du ... --force`")):
        with pytest.raises(StreamPruneError, match=r"\(changed: params.window 4 -> 5\); use --force") as err:
            ws.begin("score", {"score": "du", "params": {"window": 5}}, made["train-full"]["inputs"], key=key)
        assert str(err.value).endswith(f"{says} only this one)")


def test_refusals_of_label_disagreement_and_reshard_name_their_command(tmp_path):
    """The label disagreement is made by label-aware extrapolation and a reshard by prune --reshard: a refused
    re-run with other options names those commands, not the stage's name."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("score", {"score": "label_disagreement", "rows": "all", "k": 20}, {},
             key="score-label_disagreement").commit({}, {})
    with pytest.raises(StreamPruneError) as err:
        ws.begin("score", {"score": "label_disagreement", "rows": "all", "k": 10}, {}, key="score-label_disagreement")
    assert "(changed: k 20 -> 10)" in str(err.value)
    assert str(err.value).endswith("`streamprune extrapolate --method label-aware ... --force` only this one)")
    ws.begin("prune", {"name": "half", "out": "/data/out", "shard_size": 100, "max_count": None}, {},
             key="reshard-half").commit({}, {})
    with pytest.raises(StreamPruneError) as err:
        ws.begin("prune", {"name": "half", "out": "/data/out", "shard_size": 200, "max_count": None}, {},
                 key="reshard-half")
    assert "(changed: shard_size 100 -> 200)" in str(err.value)
    assert str(err.value).endswith("`streamprune prune --name half ... --reshard /data/out ... --force` only this one)")


def test_rerun_options_follow_the_cli_defaults():
    """A hint leaves out an option at its CLI default: the defaults the hints assume are those of the commands
    (and of each extrapolation method), so a default that changes there cannot leave a hint wrong."""
    import inspect

    import click

    from streamprune.cli import cli
    from streamprune.extrapolate import common
    from streamprune.workspace import _FLAGS, _SCORE_FLAGS, _TRAIN_FLAGS

    def defaults(command: str) -> dict:
        ctx = click.Context(cli.commands[command])
        return {o: p.get_default(ctx) for p in cli.commands[command].params for o in p.opts}

    for command, table in (("subset", _FLAGS["subset"]), ("score", _TRAIN_FLAGS + _SCORE_FLAGS),
                           ("embed", _FLAGS["embed"]), ("index", _FLAGS["index"]), ("prune", _FLAGS["prune"])):
        cli_defaults = defaults(command)
        for _, flag, default in table:
            given = cli_defaults[flag]
            assert (json.loads(given) if flag == "--model-kwargs" else given) == default, (command, flag)
    for method in ("knn", "gcn", "propagate", "kernel"):
        common.known_methods()  # registers the built-in methods
        params = inspect.signature(common._METHODS[method]).parameters
        for path, flag, default in _FLAGS[method]:
            assert flag in defaults("extrapolate")
            want = params[path].default
            assert (list(want) if isinstance(want, tuple) else want) == default, (method, flag)


def test_a_workspace_file_of_something_else_is_refused(tmp_path):
    """A streamprune.json that is not a workspace's (no version) is named, not read as an empty workspace and
    overwritten; an empty workspace location is refused."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "streamprune.json").write_text('{"name": "my-package", "stages": []}')
    ws = Workspace(str(tmp_path / "ws"))
    with pytest.raises(StreamPruneError, match=r"ws/streamprune\.json is not a streamprune workspace file"):
        ws.metadata()
    with pytest.raises(StreamPruneError, match="a workspace is required"):
        Workspace("")


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    """When the final rename of an atomic write fails (here the target is a directory), the temporary file it
    wrote is removed and the target is left as it was."""
    from streamprune import storage

    target = tmp_path / "out" / "x.json"
    target.mkdir(parents=True)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(str(target), b"{}")
    assert os.listdir(tmp_path / "out") == ["x.json"] and target.is_dir() and not os.listdir(target)


def test_a_run_replacing_a_marker_removes_it_before_it_runs(tmp_path):
    """A run with other options or inputs (or over a marker of another version) removes the old marker as
    it starts: when it fails, the stage is not listed as finished with results the run has overwritten."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("s", {"a": 1}, {}).commit({}, {})
    run = ws.begin("s", {"a": 2}, {}, force=True)
    assert not run.already_done and ws.marker("s") is None
    done = run.commit({}, {})
    ws.begin("s", {"a": 2}, {"x": "new"})
    assert ws.marker("s") is None
    path = tmp_path / "ws" / "_stages" / "s.json"
    path.write_text(json.dumps(dict(done, version="0.0.1")))
    assert not ws.begin("s", {"a": 2}, {}, force=True).already_done
    assert not path.exists()


def test_a_marker_of_another_patch_release_is_used(tmp_path):
    """Workspaces are compatible across patch releases: a finished stage is skipped, not refused."""
    ws = Workspace(str(tmp_path / "ws"))
    done = ws.begin("s", {"a": 1}, {}).commit({}, {})
    patch = __version__.rsplit(".", 1)[0] + ".99"
    for name in ("streamprune.json", os.path.join("_stages", "s.json")):
        path = tmp_path / "ws" / name
        path.write_text(json.dumps(dict(json.loads(path.read_text()), version=patch)))
    run = ws.begin("s", {"a": 1}, {})
    assert run.already_done and run.previous["run"] == done["run"]


def test_force_overrides_a_workspace_of_another_version(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("s", {"a": 1}, {}).commit({}, {})
    path = tmp_path / "ws" / "streamprune.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), version="9.9.0")))
    with pytest.raises(StreamPruneError, match="made by streamprune 9.9.0"):
        ws.begin("t", {"a": 1}, {})
    ws.begin("t", {"a": 1}, {}, force=True).commit({}, {})
    assert ws.metadata()["version"] == __version__ and set(ws.markers()) == {"s", "t"}


def test_a_commit_replaces_the_errors_of_its_own_key_only(tmp_path):
    """Two markers of one stage (scores): re-running one replaces its errors.jsonl entries and keeps the other's."""
    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("score", {"score": "a"}, {}, key="score-a").commit({}, {}, errors=[{"key": "a1", "reason": "bad"}])
    ws.begin("score", {"score": "b"}, {}, key="score-b").commit({}, {}, errors=[{"key": "b1", "reason": "bad"}])
    ws.begin("score", {"score": "a", "w": 2}, {}, key="score-a", force=True).commit(
        {}, {}, errors=[{"key": "a2", "reason": "bad"}])
    assert sorted((e["stage_key"], e["key"]) for e in ws.errors()) == [("score-a", "a2"), ("score-b", "b1")]


def test_an_error_list_killed_before_its_rename_is_not_counted(tmp_path):
    """A chunk's errors are written to `.tmp-<id>-<chunk>.jsonl`, then renamed: a run killed in between leaves
    the temporary file, whose errors belong to no finished chunk."""
    ws = Workspace(str(tmp_path / "ws"))
    run = ws.begin("subset", {"fraction": 0.5}, {"catalog": "c"})
    run.mark_chunk(4, errors=[{"key": "k4", "reason": "bad"}])
    errors = tmp_path / "ws" / "_stages" / "subset" / run.fingerprint[:16] / "errors"
    (errors / ".tmp-0123abcd-5.jsonl").write_text('{"key": "k5", "reason": "bad"}\n{"key": "k6", "rea')
    assert [e["key"] for e in run.chunk_errors()] == ["k4"]
    assert run.commit({}, {})["counts"]["errors"] == 1 and [e["key"] for e in ws.errors()] == ["k4"]


def test_a_marker_killed_before_its_rename_is_not_a_finished_stage(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    done = ws.begin("s", {"a": 1}, {}).commit({}, {})
    (tmp_path / "ws" / "_stages" / ".tmp-0123abcd-t.json").write_text(json.dumps(dict(done, key="t")))
    assert set(ws.markers()) == {"s"}


def test_a_chunk_whose_errors_could_not_be_written_is_not_done(tmp_path, monkeypatch):
    """A chunk's errors are written before its record: a run that fails (or is killed) in between does the
    chunk again on resume instead of losing the errors it found."""
    from streamprune import storage

    ws = Workspace(str(tmp_path / "ws"))
    run = ws.begin("subset", {"fraction": 0.5}, {"catalog": "c"})
    write = storage.write_bytes_atomic

    def disk_full_for_error_lists(url, data, storage_options=None):
        if url.endswith(".jsonl"):
            raise OSError(28, "No space left on device")
        write(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes_atomic", disk_full_for_error_lists)
    with pytest.raises(OSError, match="No space left"):
        run.mark_chunk(0, errors=[{"key": "k0", "reason": "bad"}])
    assert run.done_chunks() == set()


def test_a_script_without_a_main_guard_gets_the_reason_not_a_failed_nanny(tmp_path):
    """The local scheduler's worker processes import the user's script again.  Unguarded, the script's
    stage calls ran a second time in each worker (where they met the parent's lease, or failed to start
    processes of their own) and the parent saw only "Nanny failed to start"; now both say what to do."""
    import subprocess
    import sys

    script = tmp_path / "prune_job.py"
    script.write_text("from streamprune.compute import client_for\nfrom streamprune.workspace import Workspace\n\n"
                      f"Workspace({str(tmp_path / 'ws')!r})\nwith client_for('local', n_tasks=1):\n    pass\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "streamprune called while a worker process starts" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("streamprune.errors.StreamPruneError: could not start local dask workers") and (
        'call streamprune under `if __name__ == "__main__":`, or pass scheduler="threads"' in last)
