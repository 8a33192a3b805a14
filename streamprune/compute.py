"""Task scheduling with dask: local threads, local worker processes, or an existing cluster.

``scheduler`` values:

* ``"local"`` (default): a ``dask.distributed.LocalCluster`` of worker processes on this machine;
* ``"threads"`` / ``"sync"``: dask's in-process schedulers (no start-up cost; good for small jobs);
* ``"tcp://host:8786"`` (any address): an existing cluster (dask-jobqueue, dask-kubernetes, ...).

Tasks return their result or raise.  User-facing errors (``StreamPruneError``) are carried back
as values so that dask's retries only repeat tasks whose worker died or crashed, never tasks
that failed on bad input.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from streamprune.errors import StreamPruneError

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("local", "threads", "sync", "processes")


class _Failed:
    """A user-facing error raised inside a task, shipped back as a value."""

    def __init__(self, exc: StreamPruneError):
        self.exc = exc


def _call(fn: Callable, args: tuple) -> Any:
    try:
        result = fn(*args)
    except StreamPruneError as exc:
        return _Failed(exc)
    delay = float(os.environ.get("STREAMPRUNE_TASK_DELAY", "0") or 0)
    if delay:  # fault-injection knob for crash/resume tests: widen the window to kill a run
        time.sleep(delay)
    return result


def worker_count(n_tasks: int) -> int:
    """Local worker processes for ``n_tasks`` tasks: one per core, at most one per task."""
    return max(1, min(os.cpu_count() or 1, n_tasks))


@contextmanager
def client_for(scheduler: str | None, n_tasks: int = 1, memory_limit: str | None = None) -> Iterator[Any]:
    """A dask.distributed Client for ``scheduler`` (an address or "local"), closed on exit."""
    from dask.distributed import Client, LocalCluster

    if scheduler in (None, "local", "processes"):
        cluster = LocalCluster(n_workers=worker_count(n_tasks), threads_per_worker=1, processes=True,
                               memory_limit=memory_limit or "auto", dashboard_address=":0",
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(scheduler, timeout="30s")
    except OSError as exc:
        raise StreamPruneError(f"cannot reach dask scheduler {scheduler}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


def map_tasks(fn: Callable, args_list: Sequence[tuple], *, scheduler: str | None = "local", desc: str = "",
              unit: str = "task", weights: Sequence[float] | None = None, retries: int = 2,
              memory_limit: str | None = None, on_result: Callable[[int, Any], None] | None = None) -> list:
    """Run ``fn(*args)`` for each args tuple under ``scheduler``, with a progress bar.

    Results come back in input order.  ``weights`` (e.g. samples per task) drive the progress
    bar so that it shows samples/s; ``on_result(i, result)`` is called on the client as each
    task finishes (in completion order).
    """
    n = len(args_list)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    weights = list(weights) if weights is not None else [1] * n
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, unit_scale=True, mininterval=1.0,
               disable=os.environ.get("STREAMPRUNE_PROGRESS", "1") == "0")

    def _done(i: int, value: Any) -> None:
        if isinstance(value, _Failed):
            raise value.exc
        results[i] = value
        bar.update(weights[i])
        if on_result is not None:
            on_result(i, value)

    try:
        if scheduler in ("threads", "sync"):
            _run_local(fn, args_list, scheduler, _done)
        else:
            _run_distributed(fn, args_list, scheduler, _done, retries, memory_limit)
    finally:
        bar.close()
    return results


def _run_local(fn: Callable, args_list: Sequence[tuple], scheduler: str, done: Callable) -> None:
    if scheduler == "sync":
        for i, args in enumerate(args_list):
            done(i, _call(fn, args))
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {pool.submit(_call, fn, args): i for i, args in enumerate(args_list)}
        try:
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _run_distributed(fn: Callable, args_list: Sequence[tuple], scheduler: str | None, done: Callable,
                     retries: int, memory_limit: str | None) -> None:
    from dask.distributed import as_completed

    with client_for(scheduler, len(args_list), memory_limit) as client:
        futures = [client.submit(_call, fn, args, pure=False, retries=retries) for args in args_list]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                if fut.status == "error":
                    exc = fut.exception()
                    raise StreamPruneError(f"task failed on a dask worker: {type(exc).__name__}: {exc}") from exc
                done(index[fut.key], fut.result())
        finally:
            client.cancel(futures)
