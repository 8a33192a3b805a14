"""The benchmark scripts under scripts/ still start against the current package.

They are not run by the suite (they take minutes to hours), so a renamed function, option or
module would otherwise only show when someone runs one.  Checked here, quickly and without a GPU:

* each script parses ``--help`` in a fresh interpreter (its top-level imports and argparse);
* every ``from streamprune... import name`` in a script, in its functions and in the code it
  hands to child processes as strings, names something the package still has.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))
# "from streamprune.x import a, b" on one line, also inside code strings (child processes)
_FROM = re.compile(r"^\s*from\s+(streamprune(?:\.\w+)*)\s+import\s+([\w, ]+?)\s*(?:#.*)?$", re.M)


def test_every_script_is_checked():
    assert {"bench_decode.py", "bench_extrapolation.py", "bench_gcn.py", "bench_gpu_e2e.py", "bench_index.py",
            "bench_index_s3.py", "bench_gcn_s3.py", "bench_prune.py", "bench_scale.py", "bench_select.py",
            "bench_train.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def _imports(path: str) -> list[tuple[str, str]]:
    """(module, name) of every streamprune import in the script, its functions and its code strings."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "streamprune":
            found += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "streamprune"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for module, names in _FROM.findall(node.value):
                found += [(module, n.strip()) for n in names.split(",") if n.strip()]
            found += [(m, "") for m in re.findall(r"\bimport\s+(streamprune(?:\.\w+)+)", node.value)]
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_exist(script):
    found = _imports(os.path.join(ROOT, "scripts", script))
    missing = []
    for module, name in found:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{module}: {exc}")
            continue
        if name and not hasattr(mod, name):
            try:  # a submodule imported by name (from streamprune import storage)
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{script} imports what the package no longer has: {missing}"


def test_gpu_e2e_arguments():
    """bench_gpu_e2e's options as scripts/gpu_session.sh passes them."""
    args = _bench_gpu_e2e().parse_args(["--n", "1000", "--epochs", "2", "--no-full", "--workdir", "/tmp/x",
                                     "--out", "/tmp/x/b.json", "--skip-bare", "--stages", "embed"])
    assert (args.n, args.epochs, args.full, args.stages) == (1000, 2, False, ["embed"])


def _bench_gpu_e2e():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_gpu_e2e
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return bench_gpu_e2e


@pytest.mark.parametrize("bare, expected", [
    ({"knn_d128": {"rows_per_s": 4e5}, "knn_d512": {"rows_per_s": 1e5}, "knn_product_dim": {"rows_per_s": 1e5}}, 0.5),
    ({"knn_d64": {"rows_per_s": 8e5}, "knn_d128": {"rows_per_s": 4e5}}, 0.125),  # no 512: the widest
])
def test_gpu_e2e_table_compares_the_graph_with_the_bare_knn(bare, expected):
    """The index rows of bench_gpu_e2e's table hold the graph's rows/s against the bare exact kNN's."""
    mk = {"counts": {"n_index": 1000, "engine": "torch", "factory": "auto"}, "timings": {"wall_s": 0.02}}
    results = {"bare": bare, "product": {"stages": {"index": {"wall_s": 0.05}}}, "markers": {"index-all": mk}}
    row = next(r for r in _bench_gpu_e2e().build_table(results, 1000, 2, 0.2) if r["stage"].startswith("  index-all"))
    assert row["samples_per_s"] == 50_000 and row["ratio"] == pytest.approx(expected)


def test_bench_select_measures_every_strategy(tmp_path):
    """bench_select runs each strategy at N and 2N and writes what it kept and its bytes per row."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_select.py"), "--n", "20000",
                          "--scale", "2", "--chunk-rows", "1000", "--group-rows", "1000", "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["chunk_rows"] == 1000 and sorted(results["rows"]) == ["20000", "40000"]
    for n, by_strategy in results["rows"].items():
        assert len(by_strategy) == 7
        for name, r in by_strategy.items():
            eligible = int(n) - round(0.01 * int(n))  # 1 % NaN scores, drawn
            if name != "influence-budget":  # keeps what its eps allows
                assert abs(r["kept"] - 0.5 * eligible) < 0.01 * int(n), (n, name, r)
            assert r["select_b_per_row"] > 0 and r["stats_b_per_row"] > 0
        assert f"| {name} |" in out.stdout


def test_bench_omp_wait_trains_under_each_policy(tmp_path):
    """bench_omp_wait trains each model under each policy beside a busy process, and prints the ratios."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_omp_wait.py"), "--vector-rows", "500",
                          "--image-rows", "500", "--epochs", "2", "--repeats", "1", "--busy", "1", "--loads", "busy",
                          "--policies", "default,passive"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("mlp ", "cnn "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, "busy", p) for m in ("mlp", "cnn")
                                                for p in ("default", "passive", "passive")]
    for r in rows:
        if r[3] == "/":  # passive / default: the ratio of the two runs' samples/s
            assert r[4] == "default" and float(r[5]) > 0
        else:  # samples/s, steps s, eval s, process s
            assert len(r) == 7 and all(float(v) > 0 for v in r[3:])
