"""Helpers for tests: run the CLI as a user would, kill a run mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the streamprune CLI in a subprocess, as a user would."""
    full_env = {**os.environ, "STREAMPRUNE_PROGRESS": "0", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "streamprune.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"streamprune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_process_when(argv: list[str], ready, env: dict | None = None, timeout: float = 300) -> None:
    """Start ``argv`` in its own session, SIGKILL it as soon as ``ready()`` is true, assert it had not finished."""
    full_env = {**os.environ, "STREAMPRUNE_PROGRESS": "0", **(env or {})}
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"run finished before it could be killed (rc={proc.returncode}):\n{out.decode()}\n{err.decode()}")
            if time.time() > deadline:
                raise AssertionError("timed out waiting for the kill point")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def kill_when(args: list[str], ready, env: dict | None = None, timeout: float = 300) -> None:
    """Run the CLI with ``args`` and SIGKILL it as soon as ``ready()`` is true."""
    kill_process_when([sys.executable, "-m", "streamprune.cli", *args], ready, env, timeout)


def kill_python_when(code: str, ready, env: dict | None = None, timeout: float = 300) -> None:
    """Run ``python -c code`` and SIGKILL it as soon as ``ready()`` is true."""
    kill_process_when([sys.executable, "-c", code], ready, env, timeout)


def count_files(directory: str | Path, suffix: str = "") -> int:
    """Files below directory whose name ends with suffix (temporary files excluded)."""
    d = Path(directory)
    if not d.exists():
        return 0
    return sum(1 for p in d.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith(".tmp"))
