"""The command line: every pipeline command is registered; unbuilt ones say so and fail."""

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


def test_demo_builds_data_and_catalogs(tmp_path):
    out = run_cli("demo", str(tmp_path / "demo"))
    assert "catalog: 10 shards, 5752 samples" in out.stdout
    assert "seed rows" in out.stdout
