"""The command line: every pipeline command is registered; unbuilt ones say so and fail."""

import pytest

from helpers import run_cli

COMMANDS = ["catalog", "subset", "score", "embed", "index", "extrapolate", "prune", "scores", "evaluate",
            "report", "run", "status", "demo"]


def test_all_commands_registered():
    out = run_cli("--help").stdout
    for name in COMMANDS:
        assert f"  {name} " in out or f"  {name}\n" in out, name


@pytest.mark.parametrize("name", ["index", "extrapolate", "prune"])
def test_unbuilt_commands_fail_clearly(name):
    out = run_cli(name, "-w", "x", check=False)
    if out.returncode == 0:
        pytest.fail(f"{name} reported success")
    assert out.returncode != 0


def test_demo_builds_data_and_catalogs(tmp_path):
    out = run_cli("demo", str(tmp_path / "demo"))
    assert "catalog: 10 shards, 5752 samples" in out.stdout
    assert "seed rows" in out.stdout
