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
