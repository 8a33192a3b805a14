"""The command line: every pipeline command is registered, documented, and the demo runs end to end."""

import os

import pytest

from helpers import run_cli

COMMANDS = ["catalog", "subset", "score", "embed", "index", "extrapolate", "prune", "scores", "evaluate",
            "report", "run", "status", "demo"]


def test_all_commands_registered():
    out = run_cli("--help").stdout
    for name in COMMANDS:
        assert f"  {name} " in out or f"  {name}\n" in out, name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    out = run_cli(name, "--help")
    assert "Usage: streamprune " + name in out.stdout


def test_bad_option_is_one_line():
    out = run_cli("subset", "-w", "x", "--fraction", "abc", check=False)
    assert out.returncode == 2 and "Invalid value for '--fraction'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    out = run_cli("demo", str(tmp_path / "demo"), "--quick", "--pruning-curve", "0.5")
    assert "catalog" in out.stdout and "extrapolate du-label-aware" in out.stdout
    shards_txt = [l for l in out.stdout.splitlines() if l.startswith("shards.txt: ")][0].split(": ", 1)[1]
    urls = open(shards_txt).read().split()
    assert urls and all(u.endswith(".tar") and os.path.exists(u) for u in urls)
    report = [l for l in out.stdout.splitlines() if l.startswith("report: ")][0].split(": ", 1)[1]
    assert os.path.exists(report) and os.path.exists(os.path.join(os.path.dirname(report), "pruning_curve.png"))


def test_demo_data_written_again_leaves_the_stages_done(tmp_path):
    """`streamprune demo DIR` run again (after an interrupt) writes the same shards: an unchanged file
    is left as it was, so its catalog (and every stage after it) is still done and the demo resumes."""
    from streamprune.demo import make_demo
    from streamprune.shards import catalog

    data, ws = str(tmp_path / "data"), str(tmp_path / "ws")
    info = make_demo(data, n_shards=2, augment=0)
    catalog(info["train"], ws, scheduler="sync")
    make_demo(data, n_shards=2, augment=0)
    assert catalog(info["train"], ws, scheduler="sync").get("skipped")
    make_demo(data, n_shards=2, augment=0, noise=0.2)  # other data: written, catalogued again
    assert not catalog(info["train"], ws, scheduler="sync").get("skipped")
    assert not [n for d, _, names in os.walk(data) for n in names if not n.endswith(".tar")]


def test_demo_data_records_the_flipped_labels_and_keeps_the_test_digits_apart(tmp_path):
    """Each demo training sample's .json says whether its .cls was flipped and what the clean label
    is; the count of flips is the one reported, and no test digit is among the training sources."""
    import json

    import webdataset as wds

    from streamprune.demo import make_demo

    info = make_demo(str(tmp_path / "data"), n_shards=2, augment=0)
    train = [s for url in info["train"] for s in wds.WebDataset(url, shardshuffle=False)]
    meta = [json.loads(s["json"]) for s in train]
    assert len(train) == info["n_train"] and 0 < info["n_noisy"] == sum(m["noisy"] for m in meta)
    assert all(m["noisy"] == (int(s["cls"]) != m["clean_label"]) for s, m in zip(train, meta))
    test_keys = {s["__key__"] for s in wds.WebDataset(info["test"][0], shardshuffle=False)}
    assert len(test_keys) == info["n_test"] and info["n_train"] + info["n_test"] == 1797  # every digit once
    assert not {f"t{m['source']:04d}" for m in meta} & test_keys


def test_extrapolate_options_apply_per_method():
    from streamprune.cli import extrapolate_options

    given = dict(k="7", epochs=3, hidden="64,32", dropout=0.1, batch_size=64, lr=0.01, fanout="10,5,5", weight="sqrt",
                 seed=3, chunk_rows=100, memory_limit="1MiB", device="cpu", tol=1e-4, max_iter=9, bandwidth="auto")
    gcn = extrapolate_options("gcn", **given)
    assert gcn == {"k": 7, "epochs": 3, "hidden": (64, 32), "dropout": 0.1, "batch_size": 64, "lr": 0.01,
                   "fanout": (10, 5, 5), "weight": "sqrt", "seed": 3, "chunk_rows": 100, "memory_limit": 1 << 20,
                   "device": "cpu"}
    assert extrapolate_options("knn", **given) == {"k": 7, "chunk_rows": 100}
    assert extrapolate_options("propagate", **given) == {"k": 7, "tol": 1e-4, "max_iter": 9, "chunk_rows": 100}
    assert extrapolate_options("kernel", **dict(given, bandwidth="0.5")) == {"bandwidth": 0.5, "chunk_rows": 100}
    assert extrapolate_options("gcn", fanout="8") == {"fanout": 8}
    assert extrapolate_options("knn", k="auto") == {"k": "auto"}


@pytest.mark.parametrize("opt,value,flag", [("memory_limit", "lots", "--memory-limit"), ("k", "x", "--k"),
                                            ("bandwidth", "wide", "--bandwidth"), ("fanout", "3,a", "--fanout")])
def test_extrapolate_options_bad_values_are_one_line(opt, value, flag):
    from streamprune.cli import extrapolate_options
    from streamprune.errors import StreamPruneError

    method = {"bandwidth": "kernel"}.get(opt, "gcn")
    with pytest.raises(StreamPruneError, match=flag):
        extrapolate_options(method, **{opt: value})


# user errors: one line, exit 1, before any work ----------------------------------------------------
def _invoke(*args: str):
    """Run the CLI in this process (fast); an exception that escaped it would be ``result.exception``."""
    from click.testing import CliRunner

    from streamprune.cli import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in result.output
    return result


def _no_work_done(ws) -> bool:
    """Whether no stage has started in ``ws`` (no markers, no stage directories)."""
    return not os.path.exists(os.path.join(ws, "_stages"))


KNOWN_SCORES = "aum, du, el2n, entropy, forgetting, influence, margin, tdds"


@pytest.mark.parametrize("args,line", [
    (["score", "--batch-size", "0"], "--batch-size must be a whole number >= 1, not 0"),
    (["score", "--lr", "0"], "--lr must be a number > 0, not 0.0"),
    (["score", "--weight-decay", "-1"], "--weight-decay must be a number >= 0, not -1.0"),
    (["score", "--adversarial", "linf:0.1", "--pgd-steps", "0"], "invalid PGD steps 0: expected an integer >= 1"),
    (["score", "--score", "du,nosuch"], f"unknown score 'nosuch'; known scores: {KNOWN_SCORES}"),
    (["score", "--window", "0"], "score du: window must be >= 1, got 0"),
    (["score", "--window", "1"],
     "score du: window must be >= 2 for a std with ddof=1 (it divides by window - ddof), got 1"),
    (["score", "--epochs", "2"],
     "score du: need at least window=10 epochs, got E=2 (train for more epochs, or give a smaller window: "
     "--window, or window in [score] of a run config)"),
    (["score", "--score", "tdds", "--decay", "0"], "score tdds: decay must be in (0, 1], got 0.0"),
    (["score", "--label-key", "json."], "--label-key must be 'cls', 'json.<field>' or 'none', not 'json.'"),
    (["score", "--device", "gpu"], "--device must be auto, cpu or cuda (cuda:N), not 'gpu'"),
    (["score", "--full-runs", "2"], "--full-runs needs --full and must be at least 1"),
    (["score", "--seed", "18446744073709551616"],
     "--seed must be a whole number from -2^63 to 2^63-1, not 18446744073709551616"),
    (["score", "--score", "el2n", "--el2n-epochs", "50"],
     "score el2n: el2n_epochs must be a whole number of epochs in [1, E=30], got 50"),
    (["score", "--scheduler", "bogus"],
     "--scheduler must be local, threads, sync or a dask scheduler address such as tcp://host:8786, not 'bogus'"),
])
def test_score_refuses_bad_options_before_the_subset_and_training(tmp_path, args, line):
    ws = str(tmp_path / "ws")
    result = _invoke(*args, "-w", ws, "--fraction", "0.5")  # --fraction: the subset would run first
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"Error: {line}"]
    assert _no_work_done(ws)


@pytest.mark.parametrize("args,line", [
    (["--pruning-curve", "abc"],
     "--pruning-curve must be comma-separated keep fractions in (0, 1], e.g. 0.3,0.5,0.7, not 'abc'"),
    (["--pruning-curve", "0.5,1.5"], "evaluate --pruning-curve: keep fraction must be in (0, 1], got 1.5"),
    (["--pruning-curve", "-0.3"], "evaluate --pruning-curve: keep fraction must be in (0, 1], got -0.3"),
    (["--pruning-curve", "0.5"], "evaluate --pruning-curve needs --test SHARDS (held-out test shards)"),
    (["--strategy", "hard,bogus"], "evaluate: unknown strategy 'bogus'; choose one of hard, easy, ccs, balanced, "
                                   "random, influence-budget, hard-clean"),
    (["--seeds", "0"], "evaluate: --seeds must be at least 1, not 0"),
    (["--seeds", "-2"], "evaluate: --seeds must be at least 1, not -2"),
    ([], "evaluate: stage 'catalog' has not run in {ws}; run `streamprune catalog` first"),
])
def test_evaluate_refuses_bad_arguments(tmp_path, args, line):
    ws = str(tmp_path / "ws")
    result = _invoke("evaluate", "-w", ws, *args)
    assert result.exit_code == 1 and result.stderr.splitlines() == ["Error: " + line.format(ws=ws)]


@pytest.mark.parametrize("args,line", [
    (["--strategy", "hard-clean", "--noise-fraction", "abc"],
     "prune: --noise-fraction must be 'auto' or a fraction in [0, 1), not 'abc'"),
    (["--reshard", "{tmp}/out", "--shard-size", "abc"], "--shard-size must be a size such as 4GiB or 500MB, not 'abc'"),
    (["--reshard", "{tmp}/out", "--max-count", "0"], "prune: --max-count must be >= 1, got 0"),
    (["--strategy", "ccs", "--seed", "-1"], "prune: --seed must be a whole number from 0 to 2^63-1, not -1"),
])
def test_prune_refuses_bad_options_before_the_selection(tmp_path, args, line):
    ws = str(tmp_path / "ws")
    result = _invoke("prune", "-w", ws, "--keep-fraction", "0.5", *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"Error: {line}"]
    assert _no_work_done(ws) and not os.path.exists(tmp_path / "out")


def test_prune_checks_shard_size_before_the_selection_from_python(tmp_path):
    from streamprune.errors import StreamPruneError
    from streamprune.prune import prune

    with pytest.raises(StreamPruneError, match=r"^prune: --shard-size must be a size such as 4GiB or 500MB, not 'x'$"):
        prune(str(tmp_path / "ws"), keep_fraction=0.5, reshard=str(tmp_path / "out"), shard_size="x")
    assert _no_work_done(tmp_path / "ws")
    # reshard on its own applies the same rule, under its own name
    from streamprune.prune import reshard

    with pytest.raises(StreamPruneError, match=r"^reshard: --shard-size must be a size such as 4GiB or 500MB, not 'x'$"):
        reshard(str(tmp_path / "ws"), "p", str(tmp_path / "out"), shard_size="x")
    with pytest.raises(StreamPruneError, match=r"^reshard: --max-count must be >= 1, got 0$"):
        reshard(str(tmp_path / "ws"), "p", str(tmp_path / "out"), max_count=0)


def test_unknown_extrapolation_method_lists_every_method(tmp_path):
    result = _invoke("extrapolate", "-w", str(tmp_path / "ws"), "--method", "bogus")
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "Error: unknown extrapolation method 'bogus'; known: gcn, kernel, knn, label-aware, propagate"]


def test_extrapolate_warns_of_options_no_chosen_method_uses(tmp_path):
    ws = str(tmp_path / "ws")
    result = _invoke("extrapolate", "-w", ws, "--method", "knn", "--patience", "3", "--bandwidth", "0.5",
                     "--gcn-seed", "1", "--k", "5")
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "warning: --gcn-seed, --patience, --bandwidth not used by --method knn; ignored",
        f"Error: extrapolate-du-knn: graph 'seeds' has not been built in {ws}; run `streamprune index` first"]
    # an option some chosen method takes is no warning
    result = _invoke("extrapolate", "-w", ws, "--method", "knn,gcn", "--patience", "3")
    assert not result.stderr.startswith("warning")


@pytest.mark.parametrize("command", [["report"], ["scores", "-o", "scores.csv"]])
def test_report_and_scores_name_themselves_when_the_workspace_is_empty(tmp_path, command):
    ws = str(tmp_path / "ws")
    result = _invoke(command[0], "-w", ws, *(str(tmp_path / a) if a.endswith(".csv") else a for a in command[1:]))
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"Error: {command[0]}: stage 'catalog' has not run in {ws}; run `streamprune catalog` first"]


def test_scheduler_address_check():
    from streamprune.compute import check_scheduler
    from streamprune.errors import StreamPruneError

    for ok in (None, "local", "threads", "sync", "processes", "tcp://10.0.0.1:8786", "scheduler:8786"):
        check_scheduler(ok)
    for bad in ("bogus", "tcp://host", "tcp://host:port", "", "tpc://127.0.0.1:8786"):
        with pytest.raises(StreamPruneError, match=r"^--scheduler must be local, threads, sync or a dask"):
            check_scheduler(bad)


def test_bad_scheduler_is_one_line_before_cataloguing(shards, tmp_path):
    ws = str(tmp_path / "ws")
    out = run_cli("catalog", *shards, "-w", ws, "--scheduler", "bogus", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["Error: --scheduler must be local, threads, sync or a dask scheduler address "
                                       "such as tcp://host:8786, not 'bogus'"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_unwritable_output_names_the_given_path(shards, tmp_path):
    ws = str(tmp_path / "ws")
    assert _invoke("catalog", *shards, "-w", ws, "--scheduler", "sync").exit_code == 0
    result = _invoke("scores", "-w", ws, "-o", "/proc/s.csv")
    assert result.exit_code == 1 and result.stderr.splitlines() == ["Error: not found: /proc/s.csv"]


def test_a_file_in_place_of_a_directory_is_named_as_such(shards, tmp_path):
    """An output path or workspace under a plain file says a file is where a directory is needed."""
    ws = str(tmp_path / "ws")
    assert _invoke("catalog", *shards, "-w", ws, "--scheduler", "sync").exit_code == 0
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for args, path in ((("scores", "-w", ws, "-o", f"{blocker}/s.csv"), str(blocker)),
                       (("report", "-w", ws, "-o", f"{blocker}/r"), f"{blocker}/r"),
                       (("status", "-w", str(blocker)), f"{blocker}/streamprune.json")):
        result = _invoke(*args)
        assert result.exit_code == 1 and result.stderr.splitlines() == [
            f"Error: cannot access {path}: a file is where a directory is needed "
            f"({'FileExistsError' if args[0] == 'scores' else 'NotADirectoryError'})"], (args, result.stderr)


def test_storage_error_line_names_the_path_it_mentions():
    from streamprune.storage import error_line

    exc = FileNotFoundError(2, "Failed to open local file '/out/dir/s.csv.tmp-12'")  # no filename, as pyarrow's
    assert error_line(exc, ["/ws", "/out/dir/s.csv", "/out"]) == "not found: /out/dir/s.csv"
    assert error_line(exc) == "not found: object storage"


def test_file_urls_and_bad_paths_and_options_are_one_line(shards, tmp_path):
    """file:// shard and workspace URLs are the local paths they name; a shard path that does not exist and
    storage options that are JSON but not an object are refused with one line naming them."""
    import pandas as pd

    ws = str(tmp_path / "ws")
    assert _invoke("catalog", *(f"file://{s}" for s in shards), "-w", f"file://{ws}", "--scheduler",
                   "sync").exit_code == 0
    assert pd.read_parquet(os.path.join(ws, "catalog", "shards.parquet")).url.tolist() == sorted(shards)
    missing = str(tmp_path / "data" / "nope.tar")
    result = _invoke("catalog", shards[0], missing, "-w", str(tmp_path / "ws2"), "--scheduler", "sync")
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"Error: shard not found: {missing}"]
    result = _invoke("catalog", *shards, "-w", str(tmp_path / "ws2"), "--storage-options", '["key"]')
    assert result.exit_code == 1 and result.stderr.splitlines() == ["Error: --storage-options must be a JSON object"]
    assert not os.path.exists(tmp_path / "ws2")


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_extrapolate_without_a_method_is_one_line(tmp_path, methods):
    result = _invoke("extrapolate", "-w", str(tmp_path / "ws"), "--method", methods)
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "Error: --method names no method; choose one or more of gcn, kernel, knn, label-aware, propagate"]
    assert not os.path.exists(tmp_path / "ws")


def test_scheduler_and_force_are_described_wherever_they_are_taken():
    """--scheduler and --force say what they do in every command that takes them (index and prune did not)."""
    from streamprune.cli import cli

    taken = []
    for name, command in cli.commands.items():
        for param in command.params:
            if {"--scheduler", "--force"} & set(param.opts):
                taken.append(name)
                assert param.help, (name, param.opts)
    assert {"index", "prune", "extrapolate"} <= set(taken)
    out = run_cli("prune", "--help").stdout
    assert "Replace a pruned set of this name made with another" in out and "writing --reshard shards" in out


def test_guide_names_each_scheduler_default():
    """docs/guide.md's word on which scheduler the chunked stages default to matches the commands."""
    import click

    from streamprune.cli import cli

    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md")).read()
    claim = " ".join(guide.split("## Parallelism", 1)[1].split("starts a dask", 1)[0].split())
    for name in ("catalog", "subset", "score", "embed", "index", "extrapolate", "prune"):
        command = cli.commands[name]
        default = next(p for p in command.params if "--scheduler" in p.opts).get_default(click.Context(command))
        if default != "local":
            assert f"`{name}`, which defaults to `{default}`" in claim, (name, default)


def test_image_mode_rgb_reads_a_colour_dataset_whose_first_image_is_grayscale(tmp_path):
    """The dataset's channels come from its first image; when that one is grayscale, the colour ones
    are refused naming --image-mode RGB, with which score and embed take every image as colour
    (and `run` as [score] image_mode)."""
    import json

    import numpy as np

    from shardgen import png_bytes
    from streamprune.pipeline import RunConfig, check_config
    from streamprune.tario import write_tar

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(8, 8))] + [rng.integers(0, 255, size=(8, 8, 3)) for _ in range(23)]
    os.makedirs(tmp_path / "data")
    shard = str(tmp_path / "data" / "a.tar")
    write_tar(shard, [(f"k{i:02d}", {"png": png_bytes(img), "cls": str(i % 2).encode()})
                      for i, img in enumerate(images)])
    ws = str(tmp_path / "ws")
    run_cli("catalog", shard, "-w", ws, "--scheduler", "sync")
    args = ["score", "-w", ws, "--fraction", "1.0", "--epochs", "2", "--window", "2", "--model", "mlp",
            "--scheduler", "sync"]
    bad = run_cli(*args, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "key k01: input shape (3, 8, 8) differs from the dataset's (1, 8, 8) (set --image-mode RGB)" in bad.stderr
    run_cli(*args, "--image-mode", "RGB")
    run_cli("embed", "-w", ws, "--scheduler", "sync")
    marker = json.load(open(os.path.join(ws, "_stages", "train.json")))
    assert marker["config"]["decode"]["image_mode"] == "RGB" and marker["counts"]["n_valid"] == 24
    assert json.load(open(os.path.join(ws, "_stages", "embed.json")))["counts"]["n_valid"] == 24
    assert check_config(RunConfig.load(None, {"score": {"image_mode": "RGB"}}))["decode"].image_mode == "RGB"


def test_score_selects_its_subset_on_the_given_scheduler(tmp_path, monkeypatch):
    import streamprune.subset
    from streamprune.errors import StreamPruneError

    seen = []

    def subset(*args, **kwargs):
        seen.append(kwargs.get("scheduler"))
        raise StreamPruneError("stop here")

    monkeypatch.setattr(streamprune.subset, "subset", subset)
    result = _invoke("score", "-w", str(tmp_path / "ws"), "--fraction", "0.5", "--scheduler", "threads")
    assert result.exit_code == 1 and seen == ["threads"]


def _stop_at(monkeypatch, target: str) -> dict:
    """Replace the library function ``target`` ("module.name") by one that records its arguments and
    stops the command with a one-line error; returns what it records."""
    import importlib

    from streamprune.errors import StreamPruneError

    seen: dict = {}

    def stop(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise StreamPruneError("stopped here")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, stop)
    return seen


@pytest.mark.parametrize("args,target,given", [
    (["catalog", "a.tar", "--max-member-bytes", "123", "--on-error", "skip"], "streamprune.shards.catalog",
     {"max_member_bytes": 123, "on_error": "skip"}),
    (["subset", "--fraction", "0.3", "--seed", "3"], "streamprune.subset.subset", {"fraction": 0.3, "seed": 3}),
    (["embed", "--normalize", "--label-key", "json.y"], "streamprune.embed.embed", {"normalize": True}),
    (["index", "--nprobe", "7", "--refine", "2"], "streamprune.index.build_index", {"nprobe": 7, "refine": 2}),
    (["prune", "--durable", "--strategy", "hard-clean", "--noise-fraction", "0.1"], "streamprune.prune.prune",
     {"durable": True, "strategy": "hard-clean", "noise_fraction": 0.1}),
    (["prune", "--strategy", "hard-clean", "--noise-fraction", "auto"], "streamprune.prune.prune",
     {"noise_fraction": "auto"}),
    (["evaluate", "--seeds", "3"], "streamprune.evaluate.evaluate", {"seeds": 3}),
])
def test_flags_reach_the_library_function(tmp_path, monkeypatch, args, target, given):
    """Each command hands its flags, parsed, to the one library function it calls."""
    seen = _stop_at(monkeypatch, target)
    result = _invoke(*args, "-w", str(tmp_path / "ws"))
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == "Error: stopped here"
    assert {k: seen.get(k) for k in given} == given
    if args[0] == "embed":  # a decoding flag makes embed decode as told, not as the subset's training did
        assert seen["decode"].label_key == "json.y"


def test_run_flags_override_the_config_file(tmp_path, monkeypatch):
    """Every flag of `run` lands in its stage's table of the configuration handed to the pipeline."""
    path = tmp_path / "run.toml"
    path.write_text('scheduler = "threads"\n[prune]\nkeep_fraction = 0.5\nreshard = "/from/file"\n')
    seen = _stop_at(monkeypatch, "streamprune.pipeline.run_pipeline")
    result = _invoke("run", "a.tar", "-w", str(tmp_path / "ws"), "--config", str(path), "--until", "index",
                     "--scheduler", "sync", "--on-error", "skip", "--force", "--fraction", "0.3", "--score", "du,el2n",
                     "--epochs", "12", "--model", "mlp", "--full", "--full-runs", "2", "--methods", "knn,gcn",
                     "--strategy", "easy", "--keep-fraction", "0.4", "--reshard", str(tmp_path / "out"))
    assert result.stderr.splitlines()[-1] == "Error: stopped here"
    shards, ws, cfg = seen["args"]
    assert shards == ["a.tar"] and seen["until"] == "index"
    assert (cfg.scheduler, cfg.on_error, cfg.force) == ("sync", "skip", True)
    s = cfg.stages
    assert s["subset"]["fraction"] == 0.3 and s["extrapolate"]["methods"] == ["knn", "gcn"]
    assert {k: s["score"][k] for k in ("scores", "epochs", "model", "full", "full_runs")} == {
        "scores": ["du", "el2n"], "epochs": 12, "model": "mlp", "full": True, "full_runs": 2}
    assert {k: s["prune"][k] for k in ("strategy", "keep_fraction", "reshard")} == {
        "strategy": "easy", "keep_fraction": 0.4, "reshard": str(tmp_path / "out")}


def test_run_ends_with_the_shards_txt_of_the_rewritten_shards(tmp_path, monkeypatch):
    """With a reshard, `run` names the re-written shards' list as well as the pruned set's: it is what a
    training job reads, and it lies outside the workspace."""
    import streamprune.pipeline

    outputs = {"shards": "prune/p/shards.txt", "reshard": str(tmp_path / "out" / "shards.txt")}
    monkeypatch.setattr(streamprune.pipeline, "run_pipeline",
                        lambda *args, **kwargs: {"outputs": {"prune": {"outputs": outputs}}})
    result = _invoke("run", "a.tar", "-w", str(tmp_path / "ws"), "--reshard", str(tmp_path / "out"))
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-2:] == [f"shards.txt: {tmp_path / 'ws'}/prune/p/shards.txt",
                                               f"re-written shards: {tmp_path / 'out' / 'shards.txt'}"]


def test_stage_lines_name_outputs_under_the_given_workspace(tmp_path, monkeypatch):
    """`-> extrapolated/du-knn.zarr` read as a path from the current directory, where nothing is: every
    stage line names its output under the -w the user gave, as prune's does."""
    import streamprune.extrapolate

    marker = {"outputs": {"extrapolated": "extrapolated/du-knn.zarr"}, "counts": {"n_predicted": 8, "n_seed": 2}}
    monkeypatch.setattr(streamprune.extrapolate, "extrapolate", lambda *args, **kwargs: marker)
    ws = str(tmp_path / "ws")
    result = _invoke("extrapolate", "-w", ws)
    assert result.stdout.splitlines() == [
        f"extrapolate du (knn): 8 rows predicted, 2 seed rows kept -> {ws}/extrapolated/du-knn.zarr"]


def test_output_into_a_closed_pipe_exits_quietly(tmp_path):
    """`streamprune status | head` (or a demo piped into head): the reader has gone, so the command stops
    as a program killed by SIGPIPE does, instead of "Error: cannot access object storage: BrokenPipeError"."""
    import subprocess
    import sys

    (tmp_path / "ws").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "streamprune.cli", "status", "-w", str(tmp_path / "ws")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "STREAMPRUNE_PROGRESS": "0"})
    proc.stdout.close()  # before the interpreter has started: its first line meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_a_failed_command_is_its_one_line_whatever_async_reads_it_left_pending(tmp_path):
    """A failed zarr read leaves the other reads of its batch pending on zarr's I/O loop; at exit asyncio logged
    "Task was destroyed but it is pending!" with the task's repr below the command's one line (seen on a
    damaged chunk). Here a loop thread holds such tasks, as zarr's does, when the command fails."""
    import subprocess
    import sys

    code = ("import asyncio, sys, threading, time\n"
            "from streamprune import cli\n"
            "loop = asyncio.new_event_loop()\n"
            "threading.Thread(target=loop.run_forever, daemon=True).start()\n"
            "async def read(): await asyncio.Event().wait()\n"
            "async def batch(): await asyncio.gather(read(), read())\n"
            "pending = asyncio.run_coroutine_threadsafe(batch(), loop)  # held, as zarr holds its reads\n"
            "time.sleep(0.2)\n"
            f"sys.argv = ['streamprune', 'status', '-w', {str(tmp_path / 'nothing')!r}]\n"
            "cli.main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"Error: status: no workspace at {tmp_path / 'nothing'} (nothing has run "
                                       "there; check -w)"], out.stderr


def test_interrupted_command_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C in a stage is one line saying that the same command resumes, and the shell's exit status 130."""
    import streamprune.subset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streamprune.subset, "subset", interrupted)
    result = _invoke("subset", "-w", str(tmp_path / "ws"))
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["interrupted; re-run the same command to resume"]


@pytest.mark.parametrize("flags,level", [([], "WARNING"), (["-v"], "INFO"), (["-vv"], "DEBUG")])
def test_verbose_flag_sets_the_log_level(tmp_path, monkeypatch, flags, level):
    """No -v: warnings only; -v: the stages' info lines; -vv: debug lines too."""
    import logging

    seen = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    noisy = {name: logging.getLogger(name).level  # the command quietens these: put them back after
             for name in ("distributed", "tornado", "asyncio", "fsspec", "s3fs", "botocore", "aiobotocore")}
    try:
        _invoke(*flags, "status", "-w", str(tmp_path))
    finally:
        for name, was in noisy.items():
            logging.getLogger(name).setLevel(was)
    assert logging.getLevelName(seen["level"]) == level
