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
