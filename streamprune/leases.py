"""One run of a stage at a time: a lease object beside the stage's marker.

Two runs of one stage on one workspace (a job restarted by its scheduler while the first copy still
runs, a second terminal, ``--force`` with other options) would write the same arrays and chunk
records, or remove each other's.  So a run takes ``WS/_stages/<key>.lease`` before it touches
anything: an object created only if absent (``link()`` on local disk, ``If-None-Match: *`` on S3),
naming its holder (host, process, start time) and renewed every ``RENEW_S`` seconds by a thread of
the holding process.  A second run finds it and stops with one line naming the holder.

A lease is *stale*, and the next run takes it over, when its holder stopped renewing it for
``LEASE_S`` seconds (a crashed machine) or, on the same host and process namespace, when the
holding process no longer exists (a killed run resumes at once), or when it is a lease of this
process that no live thread holds.  A stale lease is removed only while it is unchanged (under
``flock`` on local disk, by a delete conditional on its ETag on S3), so of several runs taking it
over at once one goes on.  Leases are released when the stage commits, when the stage function
that took them returns or raises (:func:`releases_leases`), and at interpreter exit.

A renewal that finds another holder's token marks the lease lost; the run then refuses to record
chunks or commit (:meth:`Lease.check`).  Writes it issued before noticing are not undone: that can
only happen after the holder stalled for ``LEASE_S`` (a suspended machine) and a run with other
options was started meanwhile.  Staleness compares the holder's clock with the reader's: hosts
whose clocks differ by a sizeable part of ``LEASE_S`` should not share a workspace.  Stores that
ignore conditional writes are covered by reading the lease back after creating it, which leaves a
window of one round trip.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import fsspec.asyn

from streamprune import storage
from streamprune.errors import StreamPruneError

log = logging.getLogger(__name__)

LEASE_S = 120.0  # a lease not renewed for this long is stale
RENEW_S = 20.0  # how often the holding process renews its leases
WAIT_POLL_S = 0.2  # polling interval of acquire(wait=...)

F = TypeVar("F", bound=Callable)


def _where() -> str:
    """This host and its process namespace: process ids are comparable only within one."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{ns}" if ns else socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(info: dict, now: float | None = None) -> str:
    """'pid 123 on host h, started 2026-11-28T01:00:00Z, renewed 4 s ago' for a lease's contents."""
    now = time.time() if now is None else now
    host = str(info.get("where", "?")).split("/", 1)[0]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(info.get("started", 0))))
    return f"pid {info.get('pid')} on host {host}, started {started}, renewed {now - float(info.get('renewed', 0)):.0f} s ago"


def is_stale(info: dict, now: float | None = None) -> bool:
    """Whether the lease ``info`` has no live holder (see the module docstring)."""
    now = time.time() if now is None else now
    try:
        renewed, pid = float(info["renewed"]), int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # not a lease this code wrote: nobody renews it
    if now - renewed > LEASE_S:
        return True
    return info.get("where") == _where() and pid != os.getpid() and not _alive(pid)


def _mine(info: dict) -> bool:
    return info.get("where") == _where() and info.get("pid") == os.getpid()


def _held_here(info: dict) -> bool:
    """Whether a live thread of this process holds the lease ``info`` (a lease of this process that
    no live thread holds was left behind, and is taken over)."""
    with _HELD_LOCK:
        return info.get("token") in _CREATING or any(
            lease.token == info.get("token") and not lease.released and lease.thread is not None
            and lease.thread.is_alive() for lease in _HELD.values())


@dataclass
class Lease:
    """A held lease: its object, the token written into it, and whether another run took it over."""

    url: str
    what: str
    storage_options: dict | None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)
    lost_to: dict | None = None
    thread: threading.Thread = field(default_factory=threading.current_thread, repr=False, compare=False)
    released: bool = False
    # held while a renewal or the release reads and writes the object: a renewal that overlapped the
    # release would write the lease back after it was removed, held by a live process that no longer
    # renews it
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"], state["thread"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), thread=None)

    def body(self) -> bytes:
        return json.dumps({"token": self.token, "what": self.what, "where": _where(), "pid": os.getpid(),
                           "started": self.started, "renewed": time.time()}).encode()

    def check(self) -> None:
        """Refuse to go on when another run has taken this lease over."""
        if self.lost_to is not None:
            raise StreamPruneError(
                f"{self.what}: another run took this stage over ({describe(self.lost_to)}) after this one "
                f"stopped renewing its lease for {LEASE_S:.0f} s; this run stops without recording more")

    def renew(self) -> None:
        """Rewrite the renewal time, or mark the lease lost when another run holds it now."""
        with self._lock:
            if self.released or self.lost_to is not None:
                return
            info = read(self.url, self.storage_options)
            if info is None and _create(self.url, self.body(), self.storage_options):
                return  # removed by a run that found it stale; nobody has taken it since
            if info is None:
                info = read(self.url, self.storage_options)
            if info is not None and info.get("token") != self.token:
                self.lost_to = info
                log.warning("%s: lease taken over by %s", self.what, describe(info))
                return
            storage.write_bytes_atomic(self.url, self.body(), self.storage_options)


def read(url: str, storage_options: dict | None = None) -> dict | None:
    """The contents of a lease, None when absent, {} when damaged."""
    return _read_tagged(url, storage_options)[0]


def _parse(data: bytes) -> dict:
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}  # damaged: stale
    return info if isinstance(info, dict) else {}


def _read_tagged(url: str, storage_options: dict | None = None) -> tuple[dict | None, str | None]:
    """:func:`read`, with the object's ETag on object storage (of the very version read)."""
    if storage.is_remote(url) and storage.protocol(url) in ("s3", "s3a"):
        fs = storage.get_fs(url, storage_options)
        bucket, key, _ = fs.split_path(url)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await resp["Body"].read(), resp.get("ETag")
            finally:
                resp["Body"].close()
        got = storage.none_if_missing(lambda: storage.retry(lambda: fsspec.asyn.sync(fs.loop, get), url,
                                                            storage_options=storage_options))
        return (None, None) if got is None else (_parse(got[0]), got[1])
    data = storage.read_if_exists(url, storage_options)
    return (None, None) if data is None else (_parse(data), None)


def _s3_answer(exc: BaseException | None) -> tuple[str, int | None] | None:
    """(error code, HTTP status) of the first store answer in ``exc``'s chain; a FileNotFoundError met
    first reads as ("NoSuchKey", 404); None when the chain holds neither."""
    while exc is not None:
        if isinstance(exc, FileNotFoundError):
            return "NoSuchKey", 404
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")), response.get("ResponseMetadata", {}).get(
                "HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a store refused a conditional request because its condition did not hold (or the object is gone)."""
    answer = _s3_answer(exc)
    return answer is not None and (answer[0] in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict")
                                   or answer[1] in (404, 409, 412))


def _remove_stale(url: str, info: dict, etag: str | None, storage_options: dict | None) -> None:
    """Remove the lease object at ``url`` if it still is the stale lease ``info`` (read with ``etag``).

    Of runs that take the same stale lease over at once, each removes it only while it is unchanged:
    on local disk under an exclusive lock on its directory, on S3 by a delete conditional on the
    ETag.  A check followed by a plain remove could remove the lease that another run had just
    created in its place, and both would run.
    """
    if not storage.is_remote(url):
        import fcntl

        fd = os.open(os.path.dirname(url) or ".", os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks on directories: checked, not locked
                pass
            if read(url, storage_options) == info:
                try:
                    os.unlink(url)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
        return
    if etag is not None:
        fs = storage.get_fs(url, storage_options)
        bucket, key, _ = fs.split_path(url)
        try:
            fsspec.asyn.sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            fs.invalidate_cache(url)
            return
        except Exception as exc:  # noqa: BLE001 - classified below
            fs.invalidate_cache(url)
            if _precondition_failed(exc):
                return  # replaced or removed meanwhile: read it again
            log.debug("conditional delete of %s refused (%s); checking and removing instead", url, exc)
    if read(url, storage_options) == info:  # a store without conditional deletes: a window of one round trip
        storage.remove(url, storage_options)


def _create(url: str, data: bytes, storage_options: dict | None) -> bool:
    """Create ``url`` holding ``data`` unless it exists; False when it does."""
    if not storage.is_remote(url):
        # Written whole to a temporary file, then linked to its name: link() fails when the name
        # exists, and a reader never sees the object empty (as it would between O_EXCL and write).
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(url)}")
        with storage.naming(url), open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, url)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links (some FUSE mounts): O_EXCL, written at once
            try:
                fd = os.open(url, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.unlink(tmp)
        return True
    fs = storage.get_fs(url, storage_options)
    try:
        storage.retry(lambda: fs.pipe_file(url, data, mode="create"), url, storage_options=storage_options)
    except StreamPruneError as exc:
        # The store refused the conditional write: the lease exists, or did a moment ago (runs
        # taking over one stale lease remove and create it at once); the caller reads it again.
        if _create_refused(exc) or storage.exists(url, storage_options):
            return False
        raise
    return True


def _create_refused(exc: BaseException | None) -> bool:
    """Whether a store refused a create-if-absent because the object existed (HTTP 412 or 409)."""
    answer = _s3_answer(exc)
    return answer is not None and (answer[0] in ("PreconditionFailed", "ConditionalRequestConflict")
                                   or answer[1] in (409, 412))


# The leases this process holds (renewed by one thread) by URL, and those it is creating.
_HELD: dict[str, Lease] = {}
_CREATING: set[str] = set()  # tokens of leases this process is creating (held once read back)
_HELD_LOCK = threading.Lock()
_RENEWER: threading.Thread | None = None
_STOP = threading.Event()


def _renew_loop() -> None:
    while not _STOP.wait(RENEW_S):
        with _HELD_LOCK:
            held = list(_HELD.values())
        for lease in held:
            if lease.lost_to is not None:
                continue
            try:
                lease.renew()
            except Exception as exc:  # a failed renewal is retried at the next tick
                log.warning("%s: could not renew its lease (%s)", lease.what, exc)


def _hold(lease: Lease) -> None:
    global _RENEWER
    with _HELD_LOCK:
        _HELD[lease.url] = lease
        if _RENEWER is None or not _RENEWER.is_alive():
            _RENEWER = threading.Thread(target=_renew_loop, name="streamprune-lease", daemon=True)
            _RENEWER.start()


def acquire(url: str, what: str, storage_options: dict | None = None, wait: float = 0.0) -> Lease:
    """Take the lease at ``url`` for ``what`` (a stage key), waiting up to ``wait`` seconds for its holder.

    Raises a one-line :class:`StreamPruneError` naming the holder when it stays held.
    """
    deadline = time.time() + wait
    while True:
        with _HELD_LOCK:
            held = _HELD.get(url)
        if held is not None and held.thread is threading.current_thread() and held.lost_to is None:
            return held  # a stage function taking its own lease again
        lease = Lease(url, what, storage_options)
        with _HELD_LOCK:
            _CREATING.add(lease.token)
        try:
            if _create(url, lease.body(), storage_options):
                info = read(url, storage_options)
                if info is not None and info.get("token") == lease.token:  # a store ignoring If-None-Match
                    _hold(lease)
                    return lease
        finally:
            with _HELD_LOCK:
                _CREATING.discard(lease.token)
        info, etag = _read_tagged(url, storage_options)
        if info == {}:  # damaged, or (without hard links) created but not yet written: look again
            time.sleep(WAIT_POLL_S)
            info, etag = _read_tagged(url, storage_options)
        if info is None:
            continue  # released meanwhile
        if not _held_here(info) and (_mine(info) or is_stale(info)):
            if not _mine(info):
                log.warning("%s: taking over a stale lease (%s)", what, describe(info))
            _remove_stale(url, info, etag, storage_options)
            continue  # of runs taking it over at once, one wins the create
        if time.time() >= deadline:
            raise StreamPruneError(
                f"{what}: another run of this stage is using the workspace ({describe(info)}); wait for it to "
                f"finish (if its machine is gone, its lease expires {LEASE_S:.0f} s after its last renewal)")
        time.sleep(WAIT_POLL_S)


def release(lease: Lease) -> None:
    """Give a lease back (its object is removed unless another run has taken it over)."""
    with _HELD_LOCK:
        if _HELD.get(lease.url) is lease:
            del _HELD[lease.url]
    with lease._lock:
        if lease.released:
            return
        lease.released = True
        if lease.lost_to is not None:
            return
        try:
            info = read(lease.url, lease.storage_options)
            if info is not None and info.get("token") == lease.token:
                storage.remove(lease.url, lease.storage_options)
        except Exception as exc:  # it goes stale by itself
            log.warning("%s: could not release its lease (%s)", lease.what, exc)


def held() -> list[Lease]:
    """The leases this process holds."""
    with _HELD_LOCK:
        return list(_HELD.values())


def releases_leases(fn: F) -> F:
    """Decorate a stage function: the leases its thread takes while it runs are released when it ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        me = threading.current_thread()
        before = set(map(id, held()))
        try:
            return fn(*args, **kwargs)
        finally:
            for lease in held():
                if lease.thread is me and id(lease) not in before:
                    release(lease)
    return wrapper  # type: ignore[return-value]


@atexit.register
def _release_all() -> None:
    _STOP.set()
    for lease in held():
        release(lease)


def _forget_in_child() -> None:
    """A forked child holds none of its parent's leases: neither its exit nor a commit in it releases them."""
    global _HELD_LOCK, _RENEWER
    for lease in _HELD.values():
        lease._lock, lease.released = threading.Lock(), True  # the lock may have been held by the renewer
    _HELD.clear()
    _CREATING.clear()
    _HELD_LOCK, _RENEWER = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_in_child)
