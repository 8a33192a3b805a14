"""Task scheduling with dask: local threads, local worker processes, or an existing cluster.

``scheduler`` values:

* ``"local"`` (default): a ``dask.distributed.LocalCluster`` of worker processes on this machine;
* ``"threads"`` / ``"sync"``: dask's in-process schedulers (no start-up cost; good for small jobs);
* ``"tcp://host:8786"`` (any address): an existing cluster (dask-jobqueue, dask-kubernetes, ...).

Tasks return their result or raise.  User-facing errors (``StreamPruneError``) are carried back
as values so that dask's retries only repeat tasks whose worker died or crashed, never tasks
that failed on bad input.  A full disk (ENOSPC, EDQUOT) or a file-size limit (EFBIG) is such a
user-facing error too: one line, never a retry.

Faults (see docs/scaling.md): a task whose worker process dies is re-run by the scheduler; after
``distributed.scheduler.allowed-failures`` (default 3) such re-runs the next death stops the stage
with one line.  A result is released as soon as the client has recorded it, so a worker lost
later does not make the cluster recompute finished chunks.

Memory: ``memory_limit`` is the limit of one worker process (one task at a time); stages size
their chunks with :func:`chunk_rows_for` so that a task's working set stays within
``MEMORY_SHARE`` of it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from streamprune.errors import DISK_FULL_ERRNOS, StreamPruneError

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("local", "threads", "sync", "processes")
MEMORY_SHARE = 0.25  # of a worker's memory limit that one task's chunk-sized arrays may take


class _Failed:
    """A user-facing error raised inside a task, shipped back as a value."""

    def __init__(self, exc: StreamPruneError, worker: str | None = None):
        self.exc = exc
        self.worker = worker  # the address of the dask worker that raised it (None: not on a worker)

    def error(self, scheduler: str | None) -> StreamPruneError:
        """The error, naming the worker when it ran on a cluster the user started (``scheduler`` an address).

        Such workers need not share the client's environment: a storage error there most often means
        they lack the AWS credentials or endpoint the client has, so that is said too.
        """
        worker = getattr(self, "worker", None)  # None also from a worker running an older streamprune
        if worker is None or worker.startswith("inproc://") or scheduler is None or scheduler in LOCAL_SCHEDULERS:
            return self.exc  # a worker in this process shares its environment
        message, where = str(self.exc), f"on dask worker {worker}"
        from streamprune.storage import STORAGE_ERROR_LINE

        if STORAGE_ERROR_LINE.search(message):
            where += (", which reaches storage with its own environment: it needs the credentials, endpoint "
                      "(or --storage-options) and paths this client uses")
        self.exc.args = (f"{message} ({where})",)
        return self.exc


def _worker_address() -> str | None:
    """The address of the dask worker running this task, None outside one."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


def _call(fn: Callable, args: tuple, what: str = "") -> Any:
    try:
        with disk_errors(what):
            result = fn(*args)
    except StreamPruneError as exc:
        return _Failed(exc, _worker_address())
    delay = float(os.environ.get("STREAMPRUNE_TASK_DELAY", "0") or 0)
    if delay:  # fault-injection knob for crash/resume tests: widen the window to kill a run
        time.sleep(delay)
    return result


# --------------------------------------------------------------------------- disk full


def _disk_full_cause(exc: BaseException) -> OSError | None:
    """The full-disk / file-size OSError in ``exc``'s cause chain, if any.

    C++ libraries (faiss's file writer) report a failed write as a RuntimeError carrying the C
    library's error text; that text stands for its errno here.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if isinstance(exc, RuntimeError):
            for code in sorted(DISK_FULL_ERRNOS):
                if os.strerror(code) in str(exc):
                    return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(exc: BaseException, what: str = "") -> str | None:
    """One line for a full disk, quota or file-size limit anywhere in ``exc``'s chain; else None."""
    err = _disk_full_cause(exc)
    if err is None:
        return None
    name = errno.errorcode.get(err.errno, str(err.errno))
    where = f" writing {_target_path(str(err.filename))}" if err.filename else ""
    prefix = f"{what}: " if what else ""
    return (f"{prefix}{os.strerror(err.errno).lower()} ({name}){where}; free space (or raise the limit), "
            "then re-run the same command to resume")


def _target_path(path: str) -> str:
    """The file an atomic write was producing, not its temporary name (ours or zarr's)."""
    head, base = os.path.split(path)
    base = re.sub(r"^\.tmp-[0-9a-f]{12,32}-", "", base)
    base = re.sub(r"\.[0-9a-f]{32}\.partial$", "", base)
    base = re.sub(r"\.partial$", "", base)
    return os.path.join(head, base) if head else base


@contextmanager
def disk_errors(what: str = "") -> Iterator[None]:
    """Re-raise a full disk (ENOSPC, EDQUOT) or file-size limit (EFBIG) as one clear StreamPruneError."""
    try:
        yield
    except StreamPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - only disk-full errors are translated, the rest re-raised
        msg = disk_full_message(exc, what)
        if msg is None:
            raise
        raise StreamPruneError(msg) from None


# --------------------------------------------------------------------------- memory


def parse_memory(value: str | int | None, flag: str = "--memory-limit") -> int | None:
    """Bytes of a memory size such as ``"4GiB"``, ``"500MB"`` or an int; None stays None."""
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        nbytes = int(value) if isinstance(value, int) else int(parse_bytes(str(value)))
    except (ValueError, TypeError, KeyError):
        raise StreamPruneError(f"{flag} must be a size such as 4GiB or 500MB, not {value!r}") from None
    if nbytes <= 0:
        raise StreamPruneError(f"{flag} must be positive, not {value!r}")
    return nbytes


def chunk_rows_for(memory_limit_bytes: int, bytes_per_row: int, floor: int = 1, cap: int | None = None,
                   share: float = MEMORY_SHARE) -> int:
    """Rows per task whose working set (``bytes_per_row`` each) fits ``share`` of a worker's memory.

    The largest power of two within the budget, clamped to ``[floor, cap]``: at ``floor`` the
    budget may be exceeded (the caller warns).  The rest of the limit is for the process itself
    (interpreter, torch, the model, an index), batch activations and dask's own headroom (it
    pauses a worker at 80 % and restarts it at 95 %).
    """
    if memory_limit_bytes <= 0 or bytes_per_row <= 0 or floor < 1 or (cap is not None and cap < floor):
        raise ValueError(f"chunk_rows_for({memory_limit_bytes}, {bytes_per_row}, {floor}, {cap}): "
                         "sizes must be positive and floor <= cap")
    budget = int(memory_limit_bytes * share) // int(bytes_per_row)
    rows = 1 << (budget.bit_length() - 1) if budget >= 1 else 0
    if cap is not None:
        rows = min(rows, int(cap))
    return max(int(floor), rows)


def system_memory() -> int:
    """Memory available to this machine or container (cgroup limits included), in bytes."""
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def worker_count(n_tasks: int, memory_limit: int | None = None, total_memory: int | None = None,
                 cores: int | None = None) -> int:
    """Local worker processes: one per core, at most one per task, and as many limits as fit in memory."""
    n = min(cores or os.cpu_count() or 1, n_tasks)
    if memory_limit:
        n = min(n, (total_memory or system_memory()) // memory_limit)
    return max(1, n)


_SHARED: list[dict] = []  # the active shared_local_cluster() scope, if any (nested scopes share it)


@contextmanager
def shared_local_cluster() -> Iterator[None]:
    """Within this block every "local" stage without a ``memory_limit`` of its own runs on one
    LocalCluster (a worker per core, started at the first such stage, closed at the end) instead
    of starting and stopping its own: a pipeline pays the workers' start-up and imports once.

    ``streamprune run`` opens one around its stages.  Nested scopes share the outer one.  What a
    stage sets process-wide in its workers stays for the later stages on them: the index stage's
    heap threshold (:func:`~streamprune.heap.bound_heap`), an embed worker's loaded encoder.
    """
    if _SHARED:
        yield
        return
    scope: dict = {"cluster": None}
    _SHARED.append(scope)
    try:
        yield
    finally:
        _SHARED.remove(scope)
        if scope["cluster"] is not None:
            scope["cluster"].close()


# Worker settings of the local clusters this module starts.  dask's statistical profiler samples every
# worker's stack every 10 ms, holding the interpreter lock: on embed's read + decode tasks (Python and
# Pillow) it cost ~8 % more CPU per row (one worker, 6 alternating rounds of 6 x 4096 rows: median
# 192 us/row with it, 176 without, lower without in every round).  scripts/bench_decode.py measures
# the whole read + decode path against bare decoding.
LOCAL_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


def dask_setup(worker: Any) -> None:
    """Preload of the local clusters' worker processes (dask calls it at each worker's start): ignore SIGINT.

    Ctrl-C in a terminal reaches every process of its process group, the workers too; each printed its
    KeyboardInterrupt traceback above the command's one line.  The stage's process, interrupted, closes
    its cluster as it unwinds, and a worker whose parent is gone exits by itself.
    """
    import signal

    if threading.current_thread() is threading.main_thread():  # a worker's event loop runs there
        signal.signal(signal.SIGINT, signal.SIG_IGN)


SCRIPT_GUARD_HINT = 'call streamprune under `if __name__ == "__main__":`, or pass scheduler="threads"'


def refuse_in_main_reimport() -> None:
    """Stop a stage called while a worker process imports the user's script (a script without a
    ``__main__`` guard): it would run the script's stages a second time, beside the parent's."""
    import multiprocessing

    # multiprocessing's own test for "importing main in a spawned child" (spawn._check_not_importing_main)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise StreamPruneError("streamprune called while a worker process starts: the local scheduler's worker "
                               f"processes import the main script again; in a script, {SCRIPT_GUARD_HINT}")


def _local_cluster(n_workers: int, limit: int | None):
    import dask
    from dask.distributed import LocalCluster

    refuse_in_main_reimport()
    try:
        with dask.config.set(LOCAL_WORKER_CONFIG):  # the nannies hand this config to their worker processes
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                memory_limit=limit or "auto", dashboard_address=":0", silence_logs=logging.ERROR,
                                preload=[__name__])
    except RuntimeError as exc:  # "Nanny failed to start": the worker's own error is printed above it
        raise StreamPruneError(f"could not start local dask workers ({exc}); if this runs from a script without a "
                               f"main guard, {SCRIPT_GUARD_HINT}") from None


def check_scheduler(scheduler: str | None) -> None:
    """Refuse a ``scheduler`` that is neither a local one nor a dask address (before any work is done)."""
    if scheduler is None or scheduler in LOCAL_SCHEDULERS:
        return
    from distributed.comm.addressing import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme = parse_address(str(scheduler))[0]
        get_backend(scheme)  # a known protocol (a typo such as tpc:// would fail deep in Client)
        if scheme in ("tcp", "tls"):
            get_address_host_port(str(scheduler))
    except (TypeError, ValueError):
        raise StreamPruneError(f"--scheduler must be local, threads, sync or a dask scheduler address such as "
                               f"tcp://host:8786, not {scheduler!r}") from None


@contextmanager
def client_for(scheduler: str | None, n_tasks: int = 1, memory_limit: str | int | None = None) -> Iterator[Any]:
    """A dask.distributed Client for ``scheduler`` (an address or "local"), closed on exit.

    ``memory_limit`` (per worker, e.g. "4GiB") applies to the local cluster this starts; an
    existing cluster keeps the limits its workers were started with.  Inside
    :func:`shared_local_cluster`, "local" without a memory limit uses the shared cluster.
    """
    from dask.distributed import Client

    if scheduler in (None, "local", "processes"):
        limit = parse_memory(memory_limit)
        if _SHARED and not limit:
            scope = _SHARED[0]
            if scope["cluster"] is None:
                scope["cluster"] = _local_cluster(worker_count(os.cpu_count() or 1), None)
            client = Client(scope["cluster"])
            try:
                yield client
            finally:
                client.close()
            return
        cluster = _local_cluster(worker_count(n_tasks, limit), limit)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    check_scheduler(scheduler)
    try:
        client = Client(scheduler, timeout="30s")
    except OSError as exc:
        raise StreamPruneError(f"cannot reach dask scheduler {scheduler}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


class OneBehind:
    """Calls run in one background thread, one at a time, at most one pending: :meth:`submit` first
    waits for the previous call (re-raising its error in the caller), so the caller works at most one
    step ahead of the background (a chunk's write while the next chunk is computed).

    :meth:`close` waits for the last call and re-raises its error (``quiet``: swallowed, for a caller
    already unwinding from its own error), then stops the thread.
    """

    def __init__(self, name: str):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending = None

    def submit(self, fn: Callable, *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self, quiet: bool = False) -> None:
        try:
            self.wait()
        except BaseException:
            if not quiet:
                raise
        finally:
            self._pool.shutdown(wait=True)


def map_tasks(fn: Callable, args_list: Sequence[tuple], *, scheduler: str | None = "local", desc: str = "",
              unit: str = "task", weights: Sequence[float] | None = None, retries: int = 2,
              memory_limit: str | int | None = None, on_result: Callable[[int, Any], None] | None = None,
              threads: int | None = None, inflight_per_worker: int | None = None, keep: bool = True,
              ordered_window: int | None = None) -> list:
    """Run ``fn(*args)`` for each args tuple under ``scheduler``, with a progress bar.

    Results come back in input order.  ``weights`` (e.g. samples per task) drive the progress
    bar so that it shows samples/s; ``on_result(i, result)`` is called on the client as each
    task finishes (in completion order), exactly once per task even when a worker died and the
    task ran again.  ``retries``: re-runs of a task that raised something other than a
    ``StreamPruneError``; ``memory_limit``: per worker of the local cluster this starts;
    ``threads``: the pool of the "threads" scheduler (default one per core);
    ``keep=False``: results are handed to ``on_result`` only, not kept for the returned list (all
    None), so results consumed as they come (row ids written in order) need not all fit in memory.
    ``ordered_window``: task ``i`` is submitted only once every task before ``i - ordered_window``
    has finished, so a caller that consumes results in input order holds at most that many
    finished ahead of a slow one.
    ``inflight_per_worker``: at most this many tasks per worker submitted and not yet handed to
    ``on_result`` (None: all at once).  Bounds the memory of finished results waiting for a slower
    ``on_result`` (embed's encoding in the calling process), which would otherwise hold every
    decoded chunk on the workers.
    """
    check_scheduler(scheduler)
    n = len(args_list)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    weights = list(weights) if weights is not None else [1] * n
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, unit_scale=True, mininterval=1.0,
               disable=os.environ.get("STREAMPRUNE_PROGRESS", "1") == "0")

    def _done(i: int, value: Any) -> None:
        if isinstance(value, _Failed):
            raise value.error(scheduler)
        if keep:
            results[i] = value
        bar.update(weights[i])
        if on_result is not None:
            with disk_errors(desc):
                on_result(i, value)

    try:
        if scheduler in ("threads", "sync"):
            _run_local(fn, args_list, scheduler, _done, desc, threads, inflight_per_worker, ordered_window)
        else:
            _run_distributed(fn, args_list, scheduler, _done, retries, memory_limit, desc, inflight_per_worker,
                             ordered_window)
    finally:
        bar.close()
    return results


class _Feed:
    """Which tasks to submit next: in input order, at most ``window`` running, and none at or past
    ``ordered`` tasks beyond the first unfinished one (``ordered_window`` of :func:`map_tasks`)."""

    def __init__(self, n: int, window: int, ordered: int | None):
        self.n, self.window, self.ordered = n, window, ordered
        self.next = self.low = self.running = 0
        self.finished: set[int] = set()

    def take(self) -> list[int]:
        out = []
        while self.next < self.n and self.running < self.window and \
                (self.ordered is None or self.next < self.low + self.ordered):
            out.append(self.next)
            self.next += 1
            self.running += 1
        return out

    def done(self, i: int) -> None:
        self.running -= 1
        self.finished.add(i)
        while self.low in self.finished:
            self.finished.remove(self.low)
            self.low += 1


def _run_local(fn: Callable, args_list: Sequence[tuple], scheduler: str, done: Callable, what: str,
               threads: int | None = None, inflight_per_worker: int | None = None,
               ordered_window: int | None = None) -> None:
    if scheduler == "sync":
        for i, args in enumerate(args_list):
            done(i, _call(fn, args, what))
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    workers = threads or os.cpu_count() or 1
    window = len(args_list) if inflight_per_worker is None else max(1, inflight_per_worker * workers)
    feed = _Feed(len(args_list), window, ordered_window)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures: dict = {}

        def submit() -> None:
            for i in feed.take():
                futures[pool.submit(_call, fn, args_list[i], what)] = i

        submit()
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = futures.pop(fut)
                    done(i, fut.result())
                    feed.done(i)
                    submit()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


NO_WORKERS_CHECK_S = 30.0  # how often a stage on an existing cluster looks for workers while it waits


@contextmanager
def _warn_without_workers(client, scheduler: str | None) -> Iterator[None]:
    """On an existing cluster (``tcp://...``), a warning whenever the scheduler has no workers: tasks
    then wait without a word (the only worker died, or none was started).  Waiting stays right, as
    an adaptive cluster may start workers later; the warning says what the stage is waiting for."""
    if scheduler in (None, *LOCAL_SCHEDULERS):
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        warned = False
        while not stop.is_set():
            try:
                none = not client.nthreads()
            except Exception:  # noqa: BLE001 - the client closing or the scheduler gone: the stage reports it
                return
            if none and not warned:
                log.warning("dask scheduler %s has no workers: the stage waits for one (start workers, or stop "
                            "it and re-run later to resume)", scheduler)
            warned = none
            stop.wait(NO_WORKERS_CHECK_S)

    thread = threading.Thread(target=watch, name="streamprune-no-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _run_distributed(fn: Callable, args_list: Sequence[tuple], scheduler: str | None, done: Callable,
                     retries: int, memory_limit: str | int | None, what: str,
                     inflight_per_worker: int | None = None, ordered_window: int | None = None) -> None:
    from concurrent.futures import CancelledError

    from dask.distributed import as_completed

    with client_for(scheduler, len(args_list), memory_limit) as client, _warn_without_workers(client, scheduler):
        futures = {}
        if inflight_per_worker is None:
            window = len(args_list)
        else:
            n_workers = len(client.scheduler_info().get("workers", {})) or os.cpu_count() or 1
            window = max(1, inflight_per_worker * n_workers)
        feed = _Feed(len(args_list), window, ordered_window)

        def submit() -> list:
            out = []
            for i in feed.take():
                fut = client.submit(_call, fn, args_list[i], what, pure=False, retries=retries)
                futures[fut.key] = (i, fut)
                out.append(fut)
            return out

        try:
            # The client's own loop: as_completed otherwise tracks on the process's default client,
            # which is another loop when the caller already has a Client (a notebook, a test).
            pending = as_completed(submit(), loop=client.loop)
            for fut in pending:
                i = futures[fut.key][0]
                if fut.status == "error":
                    raise StreamPruneError(_task_failure(fut.exception(), what)) from None
                try:
                    result = fut.result()
                except CancelledError:  # only this loop cancels, after it stops: the scheduler went away
                    raise StreamPruneError(f"{what + ': ' if what else ''}lost the dask scheduler {scheduler} "
                                           "mid-stage; the finished chunks are kept: re-run the same command to "
                                           "resume") from None
                done(i, result)
                feed.done(i)
                # Release the result: a worker lost later must not make the cluster recompute it.
                del futures[fut.key]
                fut.release()
                for nxt in submit():
                    pending.add(nxt)
        finally:
            client.cancel([f for _, f in futures.values()])


def _task_failure(exc: BaseException, what: str) -> str:
    """One line for a task that failed on a worker (crashed it repeatedly, or raised)."""
    prefix = f"{what}: " if what else ""
    if type(exc).__name__ == "KilledWorker":
        n = getattr(exc, "allowed_failures", 3) + 1
        return (f"{prefix}a dask worker died each of the {n} times a task ran (out of memory? raise --memory-limit "
                "or lower --chunk-rows); finished chunks are kept, re-run to resume")
    from streamprune.storage import redact

    first = str(exc).splitlines()[0] if str(exc) else ""
    return redact(f"{prefix}task failed on a dask worker: {type(exc).__name__}: {first}")
