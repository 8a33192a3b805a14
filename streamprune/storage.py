"""Local and object-storage access through fsspec: shard discovery, atomic writes, retries.

Credentials come from the standard AWS environment/config files or from explicit
``storage_options``; they are passed to fsspec and never written or logged.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import os
import random
import time
import uuid
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from braceexpand import braceexpand

from streamprune.errors import StreamPruneError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors from object storage worth retrying: connection problems, timeouts, throttling, 5xx.
_TRANSIENT_MARKERS = ("timeout", "timed out", "throttl", "slowdown", "slow down", "503", "500", "502",
                      "504", "connection", "temporarily", "reset by peer", "internalerror")


def parse_storage_options(text: str | None) -> dict:
    """Parse the ``--storage-options`` JSON string (or ``STREAMPRUNE_STORAGE_OPTIONS``)."""
    text = text if text is not None else os.environ.get("STREAMPRUNE_STORAGE_OPTIONS")
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StreamPruneError(f"--storage-options is not valid JSON: {exc.msg}") from None
    if not isinstance(opts, dict):
        raise StreamPruneError("--storage-options must be a JSON object")
    # Accept the common shorthand {"endpoint_url": ...} as s3fs's client_kwargs.
    if "endpoint_url" in opts:
        opts = dict(opts)
        opts.setdefault("client_kwargs", {})["endpoint_url"] = opts.pop("endpoint_url")
    return opts


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than the local filesystem."""
    proto = url.split("://", 1)[0] if "://" in url else "file"
    return proto not in ("file", "local")


def protocol(url: str) -> str:
    """The fsspec protocol of a URL ("file" for plain paths)."""
    return url.split("://", 1)[0] if "://" in url else "file"


def get_fs(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url`` (options apply to remote protocols only)."""
    proto = protocol(url)
    opts = dict(storage_options or {}) if proto not in ("file", "local") else {}
    if proto == "s3":
        opts.setdefault("config_kwargs", {}).setdefault("retries", {"max_attempts": 5, "mode": "standard"})
    try:
        return fsspec.filesystem(proto, **opts)
    except (ImportError, ValueError) as exc:
        raise StreamPruneError(f"cannot open storage for {url!r}: {exc}") from None


def normalize(url: str) -> str:
    """Canonical form of a location: absolute local paths, unchanged remote URLs."""
    if is_remote(url):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or remote URL with '/'."""
    out = url.rstrip("/")
    for p in parts:
        if p:
            out = out + "/" + p.strip("/")
    return out


def _with_protocol(url_like: str, proto: str) -> str:
    return url_like if proto == "file" or "://" in url_like else f"{proto}://{url_like}"


def describe_storage_error(exc: BaseException, url: str) -> str:
    """One line saying what went wrong with ``url``, without credentials."""
    name = type(exc).__name__
    msg = str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, FileNotFoundError):
        return f"not found: {url}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {url} ({msg})"
    return f"cannot access {url}: {name}: {msg}"


def is_transient(exc: BaseException) -> bool:
    """Whether an error from storage is worth retrying."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _TRANSIENT_MARKERS)


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn`` retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except StreamPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc) or attempt == attempts - 1:
                raise StreamPruneError(describe_storage_error(exc, what)) from exc
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            log.warning("transient error on %s (%s), retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def expand_shards(specs: Iterable[str], storage_options: dict | None = None) -> list[str]:
    """Expand shard specs (paths, globs, brace patterns, directories/prefixes) to sorted URLs."""
    urls: set[str] = set()
    for spec in specs:
        for pattern in braceexpand(spec):
            found = _expand_one(pattern, storage_options)
            if not found:
                raise StreamPruneError(f"no shards match {pattern!r}")
            urls.update(found)
    return sorted(urls)


def _expand_one(pattern: str, storage_options: dict | None) -> list[str]:
    proto = protocol(pattern)
    if proto == "file":
        path = normalize(pattern)
        if globlib.has_magic(path):
            return [p for p in sorted(globlib.glob(path)) if os.path.isfile(p)]
        if os.path.isdir(path):
            return sorted(globlib.glob(os.path.join(path, "**", "*.tar"), recursive=True))
        if os.path.isfile(path):
            return [path]
        raise StreamPruneError(f"shard not found: {path}")
    fs = get_fs(pattern, storage_options)
    if globlib.has_magic(pattern):
        found = retry(lambda: fs.glob(pattern), pattern)
        return [_with_protocol(p, proto) for p in sorted(found)]

    def _stat() -> list[str]:
        if fs.isdir(pattern):
            return [_with_protocol(p, proto) for p in sorted(fs.find(pattern)) if p.endswith(".tar")]
        if fs.isfile(pattern):
            return [pattern]
        raise FileNotFoundError(pattern)

    try:
        return retry(_stat, pattern)
    except StreamPruneError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise StreamPruneError(f"shard not found (missing bucket or key?): {pattern}") from None
        raise


def stat(url: str, storage_options: dict | None = None) -> dict:
    """Size and version tag (S3 ETag, or local mtime) of one object."""
    if not is_remote(url):
        try:
            st = os.stat(url)
        except OSError as exc:
            raise StreamPruneError(describe_storage_error(exc, url)) from None
        return {"size": st.st_size, "etag": f"mtime:{st.st_mtime_ns}"}
    fs = get_fs(url, storage_options)
    info = retry(lambda: fs.info(url), url)
    etag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return {"size": int(info.get("size", 0)), "etag": str(etag).strip('"')}


def open_read(url: str, storage_options: dict | None = None, block_size: int = 8 << 20):
    """Open ``url`` for sequential reading (buffered, readahead for object storage)."""
    if not is_remote(url):
        try:
            return open(url, "rb", buffering=1 << 20)
        except OSError as exc:
            raise StreamPruneError(describe_storage_error(exc, url)) from None
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.open(url, "rb", block_size=block_size, cache_type="readahead"), url)


def read_range(url: str, start: int, end: int, storage_options: dict | None = None) -> bytes:
    """Bytes [start, end) of an object, with retries on object storage."""
    if not is_remote(url):
        with open(url, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.cat_file(url, start=start, end=end), url)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Whole object as bytes."""
    if not is_remote(url):
        with open(url, "rb") as f:
            return f.read()
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.cat_file(url), url)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists."""
    if not is_remote(url):
        return os.path.exists(url)
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.exists(url), url)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so that readers see either the old object or the complete new one."""
    if not is_remote(url):
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(url)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, url)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs = get_fs(url, storage_options)
    # A single PUT is atomic on S3-compatible stores: readers never see a partial object.
    retry(lambda: fs.pipe_file(url, data), url)


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Atomically write a JSON document."""
    write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode(),
                       storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    """Read a JSON document, or None when it does not exist."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    except StreamPruneError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise
    return json.loads(data)


def listdir(url: str, storage_options: dict | None = None) -> list[str]:
    """Names (not paths) of the entries directly below ``url``; empty when absent."""
    if not is_remote(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs = get_fs(url, storage_options)
    try:
        entries = retry(lambda: fs.ls(url, detail=False, refresh=True), url)
    except StreamPruneError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return []
        raise
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def remove(url: str, storage_options: dict | None = None, recursive: bool = False) -> None:
    """Delete a file or (with ``recursive``) a tree; absent paths are fine."""
    if not exists(url, storage_options):
        return
    if not is_remote(url):
        import shutil

        if os.path.isdir(url):
            if recursive:
                shutil.rmtree(url)
            else:
                os.rmdir(url)
        else:
            os.unlink(url)
        return
    fs = get_fs(url, storage_options)
    retry(lambda: fs.rm(url, recursive=recursive), url)


def zarr_store(url: str, storage_options: dict | None = None):
    """A zarr v3 store for a local path or an fsspec URL."""
    import zarr

    if is_remote(url):
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {})
    return zarr.storage.LocalStore(url)


def buffered(data: bytes) -> io.BytesIO:
    """A seekable in-memory file over ``data``."""
    return io.BytesIO(data)
