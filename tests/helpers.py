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


def run_killing_a_worker(module: str, n_records, stage, min_records: int, after_kill=None) -> dict:
    """Run ``stage(scheduler_address)`` on a fresh 2-process LocalCluster, SIGKILL a busy worker once
    ``n_records()`` reaches ``min_records``; returns the stage's result and what happened.

    Keys: ``result``, ``killed_pid``, ``records`` (at the kill), ``rerun`` (tasks the scheduler
    re-ran after the death) and ``pids_after`` (worker pids once the nanny replaced the dead one).
    """
    import threading

    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      env={"STREAMPRUNE_TASK_DELAY": "0.4"}) as cluster, Client(cluster) as client:
        client.run(lambda: __import__(module))  # warm imports: the kill lands mid-stage
        pids = client.run(os.getpid)
        killed: dict = {}

        def kill_a_busy_worker() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and n_records() < min_records:
                time.sleep(0.02)
            busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
            addr = busy[0] if busy else next(iter(pids))
            killed.update(killed_pid=pids[addr], records=n_records())
            os.kill(pids[addr], signal.SIGKILL)
            if after_kill is not None:
                after_kill()

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        result = stage(cluster.scheduler_address)
        killer.join(10)
        rerun = sum(p.suspicious for p in cluster.scheduler.task_prefixes.values())
        client.wait_for_workers(2, timeout=60)
        after = client.run(os.getpid)
    return dict(killed, result=result, rerun=rerun, pids_after=set(after.values()))
