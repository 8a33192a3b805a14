"""`streamprune run`: all stages, skip when done, resume after SIGKILL with identical outputs."""

import io
import os
import re

import numpy as np
import pandas as pd
import pytest
import zarr

from streamprune.errors import StreamPruneError
from streamprune.pipeline import RunConfig, graphs_for
from helpers import kill_when, run_cli
from shardgen import write_shards

CONFIG = """
[subset]
fraction = 0.4
[score]
scores = ["du"]
epochs = 4
model = "mlp"
window = 3
input = "vector"
checkpoint_every = 0
[embed]
chunk_rows = 64
[index]
k = 10
[extrapolate]
methods = ["knn", "label-aware"]
[prune]
keep_fraction = 0.5
name = "p"
"""


def _outputs(ws):
    out = {}
    for m in ("knn", "label-aware"):
        g = zarr.open_group(os.path.join(ws, "extrapolated", f"du-{m}.zarr"), mode="r")
        out[m] = g["score"][:]
    out["emb"] = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")["emb"][:]
    out["keys"] = pd.read_parquet(os.path.join(ws, "prune", "p", "keys.parquet"))
    out["shards"] = open(os.path.join(ws, "prune", "p", "shards.txt")).read()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    shards = write_shards(str(tmp / "data"), 6, 50, kind="npy", dim=16)
    cfg = tmp / "run.toml"
    cfg.write_text(CONFIG)
    ref = str(tmp / "ref")
    first = run_cli("run", *shards, "-w", ref, "--config", str(cfg), "--scheduler", "sync")
    return tmp, shards, str(cfg), ref, first


def test_run_all_stages_then_nothing_to_do(setup):
    tmp, shards, cfg, ref, first = setup
    assert "prune" in first.stdout and "shards.txt: " in first.stdout
    out = _outputs(ref)
    kept = out["keys"]
    assert len(kept) == 150  # keep 0.5 of 300 valid rows
    # prune reads the last method's scores (label-aware): the kept rows are its 150 highest
    score = out["label-aware"]
    assert np.isfinite(score).all() and not np.array_equal(score, out["knn"])
    dropped = np.setdiff1d(np.arange(len(score)), kept.row)
    assert score[kept.row].min() >= score[dropped].max()  # ties at the cut may fall either way
    again = run_cli("run", *shards, "-w", ref, "--config", cfg, "--scheduler", "sync")
    assert "nothing to do" in again.stdout and " ran" not in again.stdout


def test_cli_overrides_config_and_until(setup, tmp_path):
    _, shards, cfg, _, _ = setup
    ws = str(tmp_path / "ws")
    out = run_cli("run", *shards, "-w", ws, "--config", cfg, "--scheduler", "sync", "--fraction", "0.5",
                  "--until", "subset")
    assert "subset" in out.stdout and not os.path.exists(os.path.join(ws, "_stages", "train.json"))
    rows = zarr.open_array(os.path.join(ws, "subset", "rows.zarr"))[:]
    assert 110 < len(rows) < 190  # fraction 0.5 from the command line, not 0.4 from the file


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[subset]\nfractoin = 0.3\n")
    with pytest.raises(StreamPruneError, match=r"\[subset\] has unknown option\(s\) fractoin"):
        RunConfig.load(str(bad))


@pytest.mark.parametrize("stage_dir,threshold", [("train", None), ("embed", 2)])
def test_killed_run_resumes_to_identical_outputs(setup, tmp_path, stage_dir, threshold):
    _, shards, cfg, ref, _ = setup
    ws = str(tmp_path / "ws")

    def ready():
        d = os.path.join(ws, "_stages", stage_dir)
        if not os.path.isdir(d):
            return False
        files = [f for _, _, fs in os.walk(d) for f in fs]
        if threshold is None:  # training: kill once epoch 1 is checkpointed (each checkpoint replaces the
            # previous one, so ckpt-0001 alone lives for one epoch only: any later one will do)
            return (any(f.startswith("ckpt-") and f >= "ckpt-0001" for f in files)
                    and not os.path.exists(os.path.join(ws, "_stages", "train.json")))
        return sum(f.endswith(".json") and f[0].isdigit() for f in files) >= threshold

    kill_when(["run", *shards, "-w", ws, "--config", cfg, "--scheduler", "sync"], ready,
              env={"STREAMPRUNE_TASK_DELAY": "0.2"})
    assert not os.path.exists(os.path.join(ws, "_stages", "prune-p.json"))
    if threshold is None:
        assert not os.path.exists(os.path.join(ws, "_stages", "train.json"))  # killed before training finished
    run_cli("run", *shards, "-w", ws, "--config", cfg, "--scheduler", "sync")
    a, b = _outputs(ref), _outputs(ws)
    for k in ("knn", "label-aware", "emb"):
        np.testing.assert_array_equal(a[k], b[k])
    pd.testing.assert_frame_equal(a["keys"], b["keys"])
    assert a["shards"] == b["shards"]


def test_index_graphs_follow_the_methods():
    assert graphs_for(["knn"]) == "seeds" and graphs_for(["kernel"]) == "seeds"
    assert graphs_for(["label-aware"]) == "all" and graphs_for(["propagate"]) == "all"
    assert graphs_for(["gcn"], "none") == "all"
    assert graphs_for(["gcn"]) == "both"  # its kNN prior reads the seeds graph
    assert graphs_for(["knn", "label-aware"]) == "both" and graphs_for([]) == "seeds"


def test_score_cache_memory_reaches_training(setup, tmp_path):
    _, shards, cfg, _, _ = setup
    small = tmp_path / "small.toml"
    small.write_text(open(cfg).read().replace('input = "vector"', 'input = "vector"\ncache_memory = "1KiB"'))
    ws = str(tmp_path / "ws")
    run_cli("run", *shards, "-w", ws, "--config", str(small), "--scheduler", "sync", "--until", "score")
    from streamprune.workspace import Workspace

    assert Workspace(ws).marker("train")["timings"]["in_memory"] is False
    bad = tmp_path / "bad.toml"
    bad.write_text(open(cfg).read().replace('input = "vector"', 'input = "vector"\ncache_memory = "lots"'))
    out = run_cli("run", *shards, "-w", str(tmp_path / "ws2"), "--config", str(bad), "--scheduler", "sync", check=False)
    assert out.returncode == 1 and "score.cache_memory must be a size" in out.stderr and out.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "ws2" / "_stages" / "catalog.json")  # refused before any stage ran


def test_run_full_runs_trains_replicas_and_refuses_a_bad_count(setup, tmp_path):
    _, shards, cfg, _, _ = setup
    ws = str(tmp_path / "ws")
    out = run_cli("run", *shards, "-w", ws, "--config", cfg, "--scheduler", "sync", "--until", "score", "--full",
                  "--full-runs", "2")
    assert "train-full-r1" in out.stdout and "score-full-r1" in out.stdout
    runs = [zarr.open_array(os.path.join(ws, "scores", f"du-full{t}.zarr"))[:] for t in ("", "-r1")]
    assert runs[0].shape == runs[1].shape == (300,) and not np.array_equal(runs[0], runs[1])
    bad = run_cli("run", *shards, "-w", str(tmp_path / "ws2"), "--config", cfg, "--scheduler", "sync", "--full",
                  "--full-runs", "0", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "score.full_runs must be a whole number >= 1, not 0" in bad.stderr
    assert not os.path.exists(tmp_path / "ws2" / "_stages" / "catalog.json")
    bad = run_cli("run", *shards, "-w", str(tmp_path / "ws3"), "--config", cfg, "--scheduler", "sync",
                  "--full-runs", "2", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "Error: score.full_runs needs score.full (--full): replicas are full-data runs"]


@pytest.mark.parametrize("toml,line", [
    ('[subset]\nfraction = "abc"', "subset.fraction must be a number, not 'abc'"),
    ('[score]\nepochs = "ten"', "score.epochs must be an integer, not 'ten'"),
    ("[score]\nepochs = 2.5", "score.epochs must be an integer, not 2.5"),
    ("[score]\nfull = 1", "score.full must be true or false, not 1"),
    ("[score]\nscores = [1]", "score.scores must be a list of score names, not [1]"),
    ("[score]\nmodel_kwargs = 3", "score.model_kwargs must be a table, not 3"),
    ('[extrapolate]\nknn_k = "x"\nmethods = 3', "extrapolate.methods must be a list of method names, not 3"),
    ("[prune]\nreshard = 5", "prune.reshard must be a string, not 5"),
    ("scheduler = 3", "scheduler must be a string, not 3"),
    ("on_error = 3", "on_error must be a string, not 3"),
    ("[score]\nepochs = true", "score.epochs must be an integer, not True"),
])
def test_config_types_are_checked_on_load(tmp_path, toml, line):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    with pytest.raises(StreamPruneError) as err:
        RunConfig.load(str(path))
    assert str(err.value) == f"--config {path}: {line}"


def test_command_line_scheduler_and_on_error_win_over_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('scheduler = "threads"\non_error = "skip"\n[subset]\nfraction = 0.3\n')
    cfg = RunConfig.load(str(path), {"subset": {"fraction": None}}, scheduler="tcp://127.0.0.1:8786", on_error="fail")
    assert (cfg.scheduler, cfg.on_error, cfg.stages["subset"]["fraction"]) == ("tcp://127.0.0.1:8786", "fail", 0.3)
    cfg = RunConfig.load(str(path), scheduler=None, on_error=None, force=None)  # flags not given: the file's
    assert (cfg.scheduler, cfg.on_error, cfg.force) == ("threads", "skip", False)


def test_config_lists_may_be_strings_like_the_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[score]\nscores = "du"\nlr = 1\n[extrapolate]\nmethods = "knn, label-aware"\n')
    cfg = RunConfig.load(str(path))
    assert cfg.stages["score"]["scores"] == ["du"] and cfg.stages["score"]["lr"] == 1.0
    assert cfg.stages["extrapolate"]["methods"] == ["knn", "label-aware"]
    cfg = RunConfig.load(None, {"score": {"scores": "du,tdds"}, "extrapolate": {"methods": "gcn"}})
    assert cfg.stages["score"]["scores"] == ["du", "tdds"] and cfg.stages["extrapolate"]["methods"] == ["gcn"]


@pytest.mark.parametrize("overrides,line", [
    ({"prune": {"keep_fraction": 0}}, "prune: keep fraction must be in (0, 1], got 0.0"),
    ({"prune": {"strategy": "bogus"}}, "prune: unknown strategy 'bogus'; choose one of hard, easy, ccs, balanced, "
                                       "random, influence-budget, hard-clean"),
    ({"prune": {"strategy": "influence-budget"}},
     "prune: strategy influence-budget needs eps (budget on the summed norms removed)"),
    ({"prune": {"source": "nope"}}, "prune: unknown score source 'nope'; choose one of knn, gcn, label-aware, "
                                    "propagate, kernel, seed, full"),
    ({"extrapolate": {"methods": "knn,bogus"}},
     "unknown extrapolation method 'bogus'; known: gcn, kernel, knn, label-aware, propagate"),
    ({"score": {"scores": "du,nosuch"}},
     "unknown score 'nosuch'; known scores: aum, du, el2n, entropy, forgetting, influence, margin, tdds"),
    ({"score": {"epochs": 3}}, "score du: need at least window=10 epochs, got E=3 "
                               "(train for more epochs, or give a smaller window: --window, or window in "
                               "[score] of a run config)"),
    ({"score": {"window": 0}}, "score du: window must be >= 1, got 0"),
    ({"score": {"batch_size": 0}}, "--batch-size must be a whole number >= 1, not 0"),
    ({"embed": {"memory_limit": "lots"}}, "embed.memory_limit must be a size such as 4GiB or 500MB, not 'lots'"),
    ({"extrapolate": {"methods": "knn,gcn", "gcn_patience": -1}},
     "extrapolate.gcn_patience must be a whole number of epochs >= 0 (0: no early stop), not -1"),
    ({"extrapolate": {"methods": "gcn", "gcn_epochs": 0}}, "extrapolate.gcn_epochs must be a whole number >= 1, not 0"),
    ({"extrapolate": {"methods": "knn,gcn", "gcn_prior": "foo"}}, "extrapolate.gcn_prior must be one of knn, none, "
                                                                  "not 'foo'"),
    ({"extrapolate": {"methods": "knn", "knn_k": "abc"}},
     "extrapolate.knn_k must be 'auto' or a whole number >= 1, not 'abc'"),
    ({"extrapolate": {"methods": "knn", "knn_k": 0}}, "extrapolate.knn_k must be 'auto' or a whole number >= 1, not 0"),
    ({"extrapolate": {"methods": "kernel", "kernel_bandwidth": "wide"}},
     "extrapolate.kernel_bandwidth must be 'auto' or a distance > 0, not 'wide'"),
    ({"extrapolate": {"methods": "propagate", "propagate_max_iter": 0}},
     "extrapolate.propagate_max_iter must be a whole number >= 1, not 0"),
    ({"extrapolate": {"methods": "gcn", "gcn_k": 50}},
     "extrapolate.gcn_k = 50 needs as many neighbours per row in the graph, which holds index.k = 20: raise index.k "
     "or lower gcn_k"),
    ({"score": {"scores": []}}, "score.scores names no score"),
    ({"subset": {"seed": 2**64}}, "subset.seed must be a whole number from -2^63 to 2^63-1, not 18446744073709551616"),
    ({"prune": {"seed": -1}}, "prune: --seed must be a whole number from 0 to 2^63-1, not -1"),
])
def test_run_refuses_bad_options_before_any_stage(tmp_path, overrides, line):
    from streamprune.pipeline import run_pipeline

    ws = tmp_path / "ws"
    cfg = RunConfig.load(None, overrides, scheduler="sync")
    with pytest.raises(StreamPruneError) as err:
        run_pipeline([str(tmp_path / "data" / "*.tar")], str(ws), cfg, echo=lambda *a: None)
    assert str(err.value) == line
    assert not (ws / "_stages").exists()  # no stage ran: not even the catalog


def test_run_options_use_the_methods_own_rules():
    """Every [extrapolate] key names an option its method registered a rule for, and run refuses a
    value by the key's name with the very rule the method applies to its own flag."""
    from streamprune.extrapolate.common import option_rules
    from streamprune.extrapolate.gcn import extrapolate_gcn
    from streamprune.pipeline import DEFAULTS, RUN_OPTIONS

    for key, (method, option) in RUN_OPTIONS.items():
        assert key in DEFAULTS["extrapolate"] and option in option_rules(method), key
        option_rules(method)[option].check(DEFAULTS["extrapolate"][key], key)  # the defaults pass
    with pytest.raises(StreamPruneError) as flag:
        extrapolate_gcn("unused", "du", patience=-1)
    with pytest.raises(StreamPruneError) as key:
        option_rules("gcn")["patience"].check(-1, "extrapolate.gcn_patience")
    assert str(flag.value).replace("--patience", "extrapolate.gcn_patience") == str(key.value)


def test_run_checks_only_the_stages_it_runs(tmp_path):
    from streamprune.pipeline import check_config

    # the bounds themselves are allowed: a subset of every row, a GCN reading every neighbour of the graph
    check_config(RunConfig.load(None, {"subset": {"fraction": 1.0}, "extrapolate": {"methods": "gcn", "gcn_k": 20}}))

    cfg = RunConfig.load(None, {"prune": {"keep_fraction": 0}, "extrapolate": {"methods": ["bogus"]}})
    assert check_config(cfg, "embed")["train"].epochs == 30  # --until embed: prune and extrapolate never run
    with pytest.raises(StreamPruneError, match="unknown extrapolation method 'bogus'"):
        check_config(cfg, "index")


def test_run_bad_config_type_is_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[score]\nepochs = "ten"\n')
    out = run_cli("run", str(tmp_path / "*.tar"), "-w", str(tmp_path / "ws"), "--config", str(path), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [f"Error: --config {path}: score.epochs must be an integer, not 'ten'"]


def test_finite_takes_any_real_number_and_nothing_else():
    import numpy as np

    from streamprune.errors import finite

    assert all(finite(v) for v in (0, -3, 2**64, 10**400, 1.5, np.float32(2), np.int64(7)))
    assert not any(finite(v) for v in (True, float("nan"), float("inf"), -np.inf, "1", None, [1]))


@pytest.mark.parametrize("override, says", [
    ({"subset": {"fraction": 1.5}}, "subset.fraction must be in (0, 1], not 1.5"),
    ({"index": {"k": 0}}, "index.k must be a whole number >= 1, not 0"),
    ({"index": {"refine": -1}}, "index.refine must be a whole number >= 0, not -1"),
    ({"embed": {"dtype": "float8"}}, "embed.dtype must be float16 or float32, not 'float8'"),
    ({"embed": {"encoder": "bogus"}}, "unknown encoder 'bogus'"),
    ({"embed": {"chunk_rows": 0}}, "embed.chunk_rows must be a whole number >= 1, not 0"),
    ({"embed": {"batch_size": 0}}, "embed.batch_size must be a whole number >= 1, not 0"),
    ({"score": {"model": "nosuch"}}, "unknown model 'nosuch'"),
    ({"score": {"image_size": 0}}, "--image-size must be a whole number of pixels >= 1, not 0"),
    ({"catalog": {"max_member_bytes": -1}}, "catalog.max_member_bytes must be a whole number >= 1, not -1"),
    ({"score": {"label_key": "none"}}, "--label-key none decodes no labels: supervised training needs them"),
    ({"score": {"labels": "pseudo:5", "num_classes": 3}}, "--num-classes 3 disagrees with --labels pseudo:5"),
])
def test_run_refuses_later_stages_options_before_the_first_stage(override, says):
    """Options of the embed and index stages, the model and the catalog's limits are checked before
    catalog runs, not when their stage is reached after training."""
    from streamprune.pipeline import check_config

    with pytest.raises(StreamPruneError) as err:
        check_config(RunConfig.load(None, override))
    assert says in str(err.value)
    if "index" in override:  # --until embed never runs the index stage: its options are not its business
        check_config(RunConfig.load(None, override), "embed")


def test_run_trains_with_the_score_tables_checkpoint_and_cache_options():
    from streamprune.pipeline import check_config

    checked = check_config(RunConfig.load(None, {"score": {"checkpoint_every": 0, "cache_memory": "1MiB"}}))
    assert checked["train"].checkpoint_seconds == 0 and checked["train"].memory_budget == 1 << 20


def test_prune_reads_the_first_score_and_the_last_method_unless_named():
    from streamprune.pipeline import prune_options

    cfg = RunConfig.load(None, {"score": {"scores": ["el2n", "du"]}, "extrapolate": {"methods": ["knn", "gcn"]}})
    opts = prune_options(cfg.stages, ["knn", "gcn"])
    assert (opts["score"], opts["source"]) == ("el2n", "gcn") and "noise_fraction" not in opts
    cfg = RunConfig.load(None, {"score": {"scores": ["el2n", "du"]},
                                "prune": {"score": "du", "source": "knn", "strategy": "hard-clean", "noise_fraction": 0.1}})
    opts = prune_options(cfg.stages, ["knn", "gcn"])
    assert (opts["score"], opts["source"], opts["strategy"], opts["noise_fraction"]) == ("du", "knn", "hard-clean", 0.1)


def test_run_timing_table_fits_long_stage_names():
    """The closing table of `run` widens its stage column for a long name such as 'extrapolate du-label-aware'."""
    from streamprune.pipeline import _finish

    lines: list[str] = []
    timings = [("catalog", 1.0, False), ("extrapolate du-label-aware-with-suffix", 2.5, True)]
    _finish(timings, {}, lines.append)
    table = [line for line in lines if line]
    assert table[0].startswith("stage") and table[-1].startswith("total")
    ends = {line.index("s  status") + 1 if line.startswith("stage") else line.index(".") + 2 for line in table}
    assert len(ends) == 1  # every wall time ends in the column of the header's 'wall s'
    assert table[2].split() == ["extrapolate", "du-label-aware-with-suffix", "2.5", "skipped"]


def test_run_embeds_with_another_encoder_the_way_score_decodes(tmp_path):
    """With ``[embed] encoder`` other than the subset model, embed reads the samples as ``[score]``
    says (here: labels in a .json field, no .cls), not with the default decoding."""
    import json

    from shardgen import make_samples
    from streamprune.pipeline import run_pipeline
    from streamprune.tario import write_tar

    os.makedirs(tmp_path / "data")
    shards, labels = [], []
    for s in range(2):
        samples = make_samples(20, start=s * 20, kind="npy")
        for _, payload in samples:
            label = int(payload.pop("cls"))
            payload["json"] = json.dumps({"lab": label}).encode()
            labels.append(label)
        shards.append(str(tmp_path / "data" / f"shard-{s:06d}.tar"))
        write_tar(shards[-1], samples)
    cfg = RunConfig.load(None, {"score": {"model": "mlp", "epochs": 3, "window": 2, "input": "vector",
                                          "label_key": "json.lab"},
                                "embed": {"encoder": "features"}}, scheduler="sync")
    ws = str(tmp_path / "ws")
    run_pipeline(shards, ws, cfg, until="embed", echo=lambda line: None)
    g = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")
    assert g["valid"][:].all() and g["labels"][:].tolist() == labels


def test_run_uses_the_score_device_for_embed_and_the_gcn(tmp_path, monkeypatch):
    """``[score] device`` is the run's device: the embedding pass and the GCN get it, not 'auto' (a
    GPU the user asked not to use)."""
    import streamprune.embed
    import streamprune.extrapolate
    from streamprune.pipeline import run_pipeline

    seen = {}

    def spy(module, name):
        real = getattr(module, name)

        def call(*args, **kwargs):
            seen[name if name == "embed" else args[2]] = kwargs.get("device")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    spy(streamprune.embed, "embed")
    spy(streamprune.extrapolate, "extrapolate")
    shards = write_shards(str(tmp_path / "data"), 2, 40, kind="npy", dim=8)
    cfg = RunConfig.load(None, {"score": {"model": "mlp", "epochs": 3, "window": 2, "device": "cpu"},
                                "subset": {"fraction": 0.5},
                                "extrapolate": {"methods": ["knn", "gcn"], "gcn_epochs": 2}}, scheduler="sync")
    run_pipeline(shards, str(tmp_path / "ws"), cfg, until="extrapolate", echo=lambda line: None)
    assert seen == {"embed": "cpu", "knn": None, "gcn": "cpu"}


def test_run_prunes_by_the_named_score_with_the_reshard_options(tmp_path):
    """``[prune]`` names the score (default: the first of ``[score] scores``), the seed and hard-clean's
    noise fraction, and the reshard's shard size and sample count; each is checked before the first stage."""
    import json

    import webdataset as wds

    from streamprune.pipeline import check_config, run_pipeline

    base = {"score": {"model": "mlp", "epochs": 3, "window": 2, "scores": ["du", "el2n"]}, "subset": {"fraction": 0.5}}
    for prune_opts, line in (({"score": "aum"}, "prune.score must be one of the run's scores (du, el2n), not 'aum'"),
                             ({"noise_fraction": 0.1}, "prune: strategy hard does not take noise_fraction"),
                             ({"max_count": 5}, "prune: --shard-size and --max-count apply to --reshard OUT"),
                             ({"shard_size": "big", "reshard": "out"}, "--shard-size must be a size")):
        with pytest.raises(StreamPruneError, match=re.escape(line)):
            check_config(RunConfig.load(None, {**base, "prune": prune_opts}))
    out = str(tmp_path / "out")
    cfg = RunConfig.load(None, {**base, "prune": {"score": "el2n", "keep_fraction": 0.5, "reshard": out,
                                                  "max_count": 7}}, scheduler="sync")
    shards = write_shards(str(tmp_path / "data"), 2, 40, kind="npy", dim=8)
    ws = str(tmp_path / "ws")
    run_pipeline(shards, ws, cfg, echo=lambda line: None)
    (name,) = os.listdir(os.path.join(ws, "prune"))
    marker = json.load(open(os.path.join(ws, "_stages", f"prune-{name}.json")))
    assert marker["config"]["score"] == "el2n" and marker["counts"]["n_kept"] == 40
    urls = open(os.path.join(out, "shards.txt")).read().split()
    sizes = [len(list(wds.WebDataset(u, shardshuffle=False))) for u in urls]
    assert sum(sizes) == 40 and max(sizes) == 7


def test_run_reports_a_reshard_written_again(tmp_path):
    """A run whose prune selection is done but whose --reshard output is written again (its shards.txt
    gone, as after a run killed mid-reshard) reports prune as run, not 'nothing to do'."""
    from streamprune.pipeline import run_pipeline

    shards = write_shards(str(tmp_path / "data"), 2, 20, kind="npy", dim=8)
    out_dir = tmp_path / "out"
    cfg = RunConfig.load(None, {"subset": {"fraction": 0.5},
                                "score": {"model": "mlp", "epochs": 3, "window": 2, "input": "vector"},
                                "index": {"k": 5}, "prune": {"name": "p", "reshard": str(out_dir)}}, scheduler="sync")
    ws = str(tmp_path / "ws")
    run_pipeline(shards, ws, cfg, echo=lambda line: None)
    os.remove(out_dir / "shards.txt")
    lines: list[str] = []
    out = run_pipeline(shards, ws, cfg, echo=lines.append)
    assert (out_dir / "shards.txt").exists()
    assert {t["stage"]: t["skipped"] for t in out["timings"]}["prune"] is False
    assert not any("nothing to do" in line for line in lines)


def test_run_hands_each_stage_the_options_of_its_own_table(tmp_path):
    """``[catalog]`` on_error and max_member_bytes, ``[subset]`` seed, ``[index]`` nprobe and ``[prune]``
    seed reach their stages: each stage's marker records the value of its table, not the default."""
    import json

    from shardgen import make_samples
    from streamprune.pipeline import run_pipeline
    from streamprune.tario import write_tar

    os.makedirs(tmp_path / "data")
    shards = []
    for s in range(2):
        samples = make_samples(30, start=s * 30, kind="npy")
        if s == 0:
            samples[0][1]["txt"] = b"x" * 5000  # over max_member_bytes: the catalog skips this sample
        shards.append(str(tmp_path / "data" / f"shard-{s:06d}.tar"))
        write_tar(shards[-1], samples)
    cfg = RunConfig.load(None, {"catalog": {"on_error": "skip", "max_member_bytes": 4096},
                                "subset": {"fraction": 0.5, "seed": 3},
                                "score": {"model": "mlp", "epochs": 3, "window": 2, "input": "vector"},
                                "index": {"k": 5, "factory": "IVF2,Flat", "nprobe": 2},
                                "prune": {"strategy": "random", "seed": 4, "name": "p"}}, scheduler="sync")
    ws = str(tmp_path / "ws")
    run_pipeline(shards, ws, cfg, echo=lambda line: None)

    def config(key):
        return json.load(open(os.path.join(ws, "_stages", f"{key}.json")))["config"]

    assert config("catalog") == {"on_error": "skip", "max_member_bytes": 4096}
    assert json.load(open(os.path.join(ws, "_stages", "catalog.json")))["counts"]["errors"] == 1
    assert config("subset")["seed"] == 3
    assert config("index-seeds")["nprobe"] == 2
    assert config("prune-p")["seed"] == 4


@pytest.mark.slow
def test_run_on_object_storage_equals_a_local_run(setup, tmp_path, s3server, s3bucket):
    """`run` over shards and a workspace on S3, its stages on worker processes, with an IVF-PQ index
    (its re-rank reads the host's local copy of the embeddings): the same scores and the same kept
    samples as a local run of the same config; the pruned shard list names the S3 shards."""
    tmp, shards, _, _, _ = setup
    cfg = tmp_path / "ivf.toml"
    cfg.write_text(CONFIG.replace("[index]\nk = 10", '[index]\nk = 10\nfactory = "IVF8,PQ4x4"'))
    local = str(tmp_path / "local")
    run_cli("run", *shards, "-w", local, "--config", str(cfg), "--scheduler", "sync")
    fs = s3server.fs()
    for path in shards:
        fs.put_file(path, f"{s3bucket}/data/{os.path.basename(path)}")
    remote = f"s3://{s3bucket}/ws"
    env = {**s3server.env, "STREAMPRUNE_CACHE": str(tmp_path / "cache")}
    out = run_cli("run", *[f"s3://{s3bucket}/data/{os.path.basename(p)}" for p in shards], "-w", remote,
                  "--config", str(cfg), env=env)
    assert "shards.txt: s3://" in out.stdout
    assert len(list((tmp_path / "cache" / "embeddings").glob("*/*/done"))) == 1  # one copy, shared by the workers
    opts = s3server.storage_options
    from streamprune import storage

    for m in ("knn", "label-aware"):
        got = zarr.open_group(storage.zarr_store(f"{remote}/extrapolated/du-{m}.zarr", opts), mode="r")["score"][:]
        np.testing.assert_array_equal(got, _outputs(local)[m])
    kept = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{remote}/prune/p/keys.parquet", opts)))
    pd.testing.assert_frame_equal(kept[["row", "key"]], _outputs(local)["keys"][["row", "key"]])
    listed = storage.read_bytes(f"{remote}/prune/p/shards.txt", opts).decode().split()
    assert listed and all(u.startswith(f"s3://{s3bucket}/data/") for u in listed)
