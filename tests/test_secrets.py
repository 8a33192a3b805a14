"""Credentials never reach the workspace, the report, stdout/stderr or logs — on success and on
the error path (a wrong secret is reported in one line that does not echo it)."""

from __future__ import annotations

import json
import os
import secrets

import pytest

from helpers import run_cli
from shardgen import write_shards

CONFIG = """
[subset]
fraction = 0.4
[score]
scores = ["du"]
epochs = 3
window = 2
model = "mlp"
input = "vector"
[embed]
chunk_rows = 32
[index]
k = 5
[extrapolate]
methods = ["knn"]
[prune]
keep_fraction = 0.5
name = "p"
"""


def _leaks(blob: bytes, needles: dict[str, str]) -> list[str]:
    return [name for name, value in needles.items() if value.encode() in blob]


def _upload(s3server, bucket: str, shards: list[str]) -> str:
    fs = s3server.fs()
    for s in shards:
        fs.put_file(s, f"{bucket}/data/{os.path.basename(s)}")
    return f"s3://{bucket}/data/"


@pytest.mark.slow
def test_whole_pipeline_on_s3_leaks_no_credentials(s3server, s3bucket, tmp_path):
    canary = "canary-" + secrets.token_hex(16)  # planted where a dump of the environment would show it
    needles = {"secret key": s3server.secret_key, "access key": s3server.access_key, "planted canary": canary}
    prefix = _upload(s3server, s3bucket, write_shards(str(tmp_path / "data"), 3, 40, kind="npy", dim=8))
    ws = f"s3://{s3bucket}/ws"
    (tmp_path / "run.toml").write_text(CONFIG)
    env = {**s3server.env, "STREAMPRUNE_CACHE": str(tmp_path / "cache"), "STREAMPRUNE_TEST_CANARY": canary}
    # Credentials from the environment for the pipeline; as --storage-options for the later commands.
    opts = json.dumps({"key": s3server.access_key, "secret": s3server.secret_key,
                       "endpoint_url": s3server.endpoint_url})
    report_dir, scores_csv = tmp_path / "report", tmp_path / "scores.csv"
    runs = [
        run_cli("-v", "run", prefix, "-w", ws, "--config", str(tmp_path / "run.toml"), "--scheduler", "threads",
                env=env),
        run_cli("-v", "report", "-w", ws, "-o", str(report_dir), "--storage-options", opts, env=env),
        run_cli("-v", "scores", "-w", ws, "-o", str(scores_csv), "--storage-options", opts, env=env),
        run_cli("status", "-w", ws, "--json", "--storage-options", opts, env=env),
    ]
    assert "shards.txt: " in runs[0].stdout
    for out in runs:
        assert not _leaks((out.stdout + out.stderr).encode(), needles), (out.args, out.stdout, out.stderr)

    fs = s3server.fs()
    objects = fs.find(f"{s3bucket}/ws")
    stages = {os.path.basename(p) for p in objects if "/_stages/" in p}
    assert {"catalog.json", "subset.json", "train.json", "embed.json", "index-seeds.json",
            "extrapolate-du-knn.json", "prune-p.json"} <= stages, sorted(stages)
    for path in objects:
        assert not _leaks(fs.cat_file(path), needles), path
    local = [os.path.join(r, f) for d in (report_dir, tmp_path / "cache") for r, _, fs_ in os.walk(d) for f in fs_]
    assert any(p.endswith(".png") for p in local) and any(p.endswith("report.md") for p in local)
    for path in local + [str(scores_csv)]:
        assert not _leaks(open(path, "rb").read(), needles), path


@pytest.fixture
def shard_on_s3(s3server, s3bucket, tmp_path):
    shards = write_shards(str(tmp_path / "data"), 1, 5)
    return shards, _upload(s3server, s3bucket, shards)


@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_wrong_credentials_are_one_line_without_secrets(s3server, s3bucket, shard_on_s3, tmp_path, wrong):
    shards, prefix = shard_on_s3
    bad_secret, bad_key = secrets.token_hex(20), "AK" + secrets.token_hex(9).upper()
    env = dict(s3server.env)
    if wrong == "secret":
        env["AWS_SECRET_ACCESS_KEY"] = bad_secret
    else:
        env["AWS_ACCESS_KEY_ID"] = bad_key
    needles = {"secret key": s3server.secret_key, "access key": s3server.access_key, "wrong secret": bad_secret,
               "wrong key": bad_key}
    commands = [
        ("catalog", prefix, "-w", str(tmp_path / "ws-local"), "--scheduler", "sync"),  # unreadable shards
        ("catalog", *shards, "-w", f"s3://{s3bucket}/ws", "--scheduler", "sync"),  # unwritable workspace
        ("status", "-w", f"s3://{s3bucket}/ws"),
    ]
    for args in commands if wrong == "secret" else commands[:1]:
        out = run_cli(*args, env=env, check=False)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, (args, out.stderr)
        assert "permission denied" in lines[0] and "check the credentials" in lines[0], (args, lines[0])
        assert not _leaks((out.stdout + out.stderr).encode(), needles), (args, out.stderr)


def test_wrong_secret_in_storage_options_is_not_echoed(s3server, shard_on_s3, tmp_path):
    _, prefix = shard_on_s3
    bad_secret = secrets.token_hex(20)
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_DEFAULT_REGION": "us-east-1"}
    opts = json.dumps({"key": s3server.access_key, "secret": bad_secret, "endpoint_url": s3server.endpoint_url})
    out = run_cli("catalog", prefix, "-w", str(tmp_path / "ws"), "--storage-options", opts, env=env, check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0], out.stderr
    assert bad_secret not in out.stderr and s3server.access_key not in out.stderr
    # Malformed options are refused without repeating them.
    out = run_cli("catalog", prefix, "-w", str(tmp_path / "ws"), "--storage-options", opts[:-5], env=env,
                  check=False)
    assert out.returncode != 0 and "not valid JSON" in out.stderr and bad_secret not in out.stderr
    assert "--storage-options is not valid JSON" in out.stderr
    # The same options from the environment: the error names where they came from.
    out = run_cli("catalog", prefix, "-w", str(tmp_path / "ws"), env={**env, "STREAMPRUNE_STORAGE_OPTIONS": opts[:-5]},
                  check=False)
    assert out.returncode == 1 and "STREAMPRUNE_STORAGE_OPTIONS is not valid JSON" in out.stderr
    assert bad_secret not in out.stderr and out.stderr.count("\n") == 1


def test_debug_logs_do_not_show_credentials(s3server, s3bucket, tmp_path):
    shards = write_shards(str(tmp_path / "data"), 1, 5)
    out = run_cli("-vv", "catalog", *shards, "-w", f"s3://{s3bucket}/ws", "--scheduler", "sync", env=s3server.env)
    assert "DEBUG botocore.endpoint" in out.stderr  # botocore logs signed requests at this level
    needles = {"secret key": s3server.secret_key, "access key": s3server.access_key}
    assert not _leaks((out.stdout + out.stderr).encode(), needles)
