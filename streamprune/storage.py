"""Local and object-storage access through fsspec: shard discovery, atomic writes, retries.

Credentials come from the standard AWS environment/config files or from explicit
``storage_options``; they are passed to fsspec and never written or logged, and error
messages are scrubbed of them (:func:`redact`).

Retries (see :class:`RetryPolicy`): on S3 every request — shard reads, zarr chunks, markers —
is retried by one handler inside botocore (5xx, throttling such as 503 SlowDown, connection
errors and timeouts), with jittered exponential backoff and a warning per retry.  botocore's
own retry rules and s3fs's retry loop are switched off so that the attempts do not multiply.
:func:`retry` wraps the calls made here and retries what the inner handler cannot see
(a connection dropped while a body is read, other fsspec protocols).
"""

from __future__ import annotations

import glob as globlib
import io
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import fsspec
import numpy as np
from braceexpand import braceexpand

from streamprune.errors import DISK_FULL_ERRNOS, StreamPruneError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors from object storage worth retrying: connection problems, timeouts, throttling, 5xx.
_TRANSIENT_MARKERS = ("timeout", "timed out", "throttl", "slowdown", "slow down", "connection", "temporarily",
                      "reset by peer", "internalerror")
_TRANSIENT_STATUS = re.compile(r"(?<!\d)50[0234](?!\d)")  # an HTTP status, not a digit run such as 15003
# Errors that no retry mends: missing or forbidden paths, and programming or data errors whose
# text may still name a number or word above ("expected 500 rows", "connection_id").
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError,
              KeyError, IndexError, AttributeError, AssertionError, ArithmeticError, NotImplementedError)
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                     "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "RequestTimeoutException",
                     "PriorRequestNotComplete", "InternalError", "ServiceUnavailable"}
# streamprune's own keys in storage options (never passed to fsspec) and their environment variables.
RETRY_OPTIONS = {"retries": "STREAMPRUNE_RETRIES", "retry_backoff": "STREAMPRUNE_RETRY_BACKOFF",
                 "retry_max_backoff": "STREAMPRUNE_RETRY_MAX_BACKOFF", "timeout": "STREAMPRUNE_TIMEOUT"}


@dataclass(frozen=True)
class RetryPolicy:
    """How storage requests are retried: count, jittered exponential backoff, per-request timeout.

    ``retries`` extra attempts after the first; the n-th retry waits
    ``min(retry_backoff * 2**(n-1), retry_max_backoff)`` seconds times a jitter in [0.5, 1.5);
    ``timeout`` bounds each S3 request's socket reads (connect: ``min(timeout, 10)``).  A request
    that keeps failing gives up after at most ``(retries + 1) * (timeout + 10) + sum(delays)``
    seconds.  Set by the environment (``STREAMPRUNE_RETRIES``, ``STREAMPRUNE_RETRY_BACKOFF``,
    ``STREAMPRUNE_RETRY_MAX_BACKOFF``, ``STREAMPRUNE_TIMEOUT``) or, taking precedence, by the
    same names in ``--storage-options`` (``{"retries": 8, "timeout": 20}``), which travel to
    dask workers with the workspace.
    """

    retries: int = 4
    retry_backoff: float = 0.5
    retry_max_backoff: float = 20.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.retry_backoff < 0 or self.retry_max_backoff < 0 or self.timeout <= 0:
            raise StreamPruneError(f"retry settings must be non-negative (timeout positive): {self}")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jittered."""
        base = min(self.retry_backoff * 2 ** (retry - 1), self.retry_max_backoff)
        return base * (0.5 + random.random())

    @classmethod
    def from_options(cls, storage_options: dict | None = None) -> "RetryPolicy":
        """The policy from the environment, overridden by storage options."""
        values: dict[str, Any] = {}
        for name, env in RETRY_OPTIONS.items():
            raw = (storage_options or {}).get(name, os.environ.get(env))
            if raw is None or raw == "":
                continue
            try:
                values[name] = int(raw) if name == "retries" else float(raw)
            except (TypeError, ValueError):
                raise StreamPruneError(f"storage option / {env} {name!r} must be a number, not {raw!r}") from None
        return cls(**values)


def parse_storage_options(text: str | None) -> dict:
    """Parse the ``--storage-options`` JSON string (or ``STREAMPRUNE_STORAGE_OPTIONS``)."""
    source = "--storage-options" if text is not None else "STREAMPRUNE_STORAGE_OPTIONS"
    text = text if text is not None else os.environ.get("STREAMPRUNE_STORAGE_OPTIONS")
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StreamPruneError(f"{source} is not valid JSON: {exc.msg}") from None
    if not isinstance(opts, dict):
        raise StreamPruneError(f"{source} must be a JSON object")
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


def get_fs(url: str, storage_options: dict | None = None, asynchronous: bool = False) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url`` (options apply to remote protocols only), one per process."""
    proto = protocol(url)
    if proto in ("file", "local"):
        return fsspec.filesystem(proto)
    policy = RetryPolicy.from_options(storage_options)
    _remember_credentials(storage_options)
    opts = {k: v for k, v in (storage_options or {}).items() if k not in RETRY_OPTIONS}
    key = (os.getpid(), proto, json.dumps(opts, sort_keys=True, default=repr), policy, asynchronous)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
    if fs is not None:
        return fs
    try:
        if proto in ("s3", "s3a"):
            fs = _s3_filesystem(opts, policy, asynchronous)
        else:
            fs = fsspec.filesystem(proto, **opts, **({"asynchronous": True} if asynchronous else {}))
    except (ImportError, ValueError, TypeError) as exc:
        raise StreamPruneError(f"cannot open storage for {url!r}: {redact(str(exc), storage_options)}") from None
    with _FS_LOCK:
        return _FS_CACHE.setdefault(key, fs)


_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_FS_LOCK = threading.Lock()


def _s3_filesystem(opts: dict, policy: RetryPolicy, asynchronous: bool) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem whose requests are retried by ``policy`` only (see the module docstring)."""
    import aiobotocore.session
    import s3fs

    opts = dict(opts)
    config = dict(opts.pop("config_kwargs", None) or {})
    # botocore's own retry rules are off: the handler below is the one retry layer (a "retries"
    # entry in config_kwargs would only add attempts that the handler's budget does not see).
    config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    config.setdefault("connect_timeout", min(policy.timeout, 10.0))
    config.setdefault("read_timeout", policy.timeout)
    session = aiobotocore.session.AioSession()
    session.register("needs-retry.s3", _RetryHandler(policy))
    fs = s3fs.S3FileSystem(session=session, config_kwargs=config, skip_instance_cache=True,
                           asynchronous=asynchronous, **opts)
    fs.retries = 1  # s3fs's own loop would repeat the handler's whole sequence
    return fs


class _RetryHandler:
    """botocore ``needs-retry`` hook: the delay before the next attempt, or None to give up."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    def __call__(self, attempts: int, response=None, caught_exception=None, operation=None, request_dict=None,
                 **_) -> float | None:
        reason = _retry_reason(response, caught_exception)
        if reason is None:
            return None
        from urllib.parse import urlsplit

        what = f"{getattr(operation, 'name', 'request')} {urlsplit((request_dict or {}).get('url', '')).path}"
        if attempts >= self.policy.attempts:
            log.info("S3 %s: %s; giving up after %d attempts", what, reason, attempts)
            return None
        delay = self.policy.delay(attempts)
        log.info("S3 %s: %s; retry %d of %d in %.2fs", what, reason, attempts, self.policy.retries, delay)
        return delay


def _retry_reason(response, caught_exception) -> str | None:
    """Why an S3 attempt should be retried (5xx, throttling, connection, timeout), or None."""
    if caught_exception is not None:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

        if isinstance(caught_exception, (BotoConnectionError, HTTPClientError, TimeoutError, ConnectionError)):
            return type(caught_exception).__name__
        return None
    if not response:
        return None
    http, parsed = response
    status = getattr(http, "status_code", 200)
    code = (parsed or {}).get("Error", {}).get("Code", "")
    if status >= 500 or status == 429 or code in _THROTTLING_CODES:
        return f"{status} {code}".strip()
    return None


_CREDENTIAL_KEYS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                    "aws_session_token")
_SEEN_CREDENTIALS: set[str] = set()  # from storage options used in this process, for redact()
_SIGV4_CREDENTIAL = re.compile(r"(Credential=)[^/\s'\"]+")


def _remember_credentials(storage_options: dict | None) -> None:
    for k in _CREDENTIAL_KEYS:
        v = (storage_options or {}).get(k)
        if isinstance(v, str) and len(v) >= 4:
            _SEEN_CREDENTIALS.add(v)


def redact(text: str, storage_options: dict | None = None) -> str:
    """``text`` with every credential we know of (storage options, AWS environment) replaced."""
    secrets = [os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    secrets += [(storage_options or {}).get(k) for k in _CREDENTIAL_KEYS] + list(_SEEN_CREDENTIALS)
    for s in sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _SIGV4_CREDENTIAL.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """A logging filter that removes credentials from records (botocore's debug logs show them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# botocore logs signed request headers (the access key id) and error bodies at DEBUG (-vv).
for _name in ("botocore.endpoint", "aiobotocore.endpoint", "botocore.auth", "botocore.parsers", "botocore.hooks",
              "botocore.retryhandler", "botocore.httpsession", "aiobotocore.httpsession", "s3fs", "fsspec"):
    logging.getLogger(_name).addFilter(RedactingFilter())


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


STORAGE_ERROR_LINE = re.compile(r"(^|: )(cannot access|permission denied:|not found:) ")
"""Matches a line :func:`describe_storage_error` made, also behind a stage's ``what: `` prefix."""


def describe_storage_error(exc: BaseException, url: str, storage_options: dict | None = None) -> str:
    """One line saying what went wrong with ``url``, without credentials."""
    name = type(exc).__name__
    text = exc.strerror if isinstance(exc, OSError) and isinstance(exc.strerror, str) else str(exc)
    msg = text.splitlines()[0] if text else name
    code = _s3_code(exc)
    if isinstance(exc, FileNotFoundError):
        out = f"not found: {url}"
    elif isinstance(exc, (FileExistsError, NotADirectoryError)):  # mkdir over a file; a file used as a folder
        out = f"cannot access {url}: a file is where a directory is needed ({name})"
    elif isinstance(exc, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        label = (f"HTTP {code}: " if code.isdigit() else f"{code}: ") if code else ""
        out = f"permission denied: {url} ({label}{msg}); check the credentials"
    elif code:
        out = f"cannot access {url}: " + (f"HTTP {code}" if code.isdigit() else f"S3 error {code}") + f": {msg}"
    else:
        out = f"cannot access {url}: {name}: {msg}"
    return redact(out, storage_options)


def _s3_code(exc: BaseException) -> str:
    """The S3 error code (SlowDown, AccessDenied, ...) of a botocore error in ``exc``'s chain."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return ""


def _retry_code(exc: BaseException) -> str:
    """The S3 error code when it is one the retry handler retries (throttling, 5xx), else ''."""
    code = _s3_code(exc)
    return code if code in _THROTTLING_CODES or code[:1] == "5" else ""


def _retried_inside(exc: BaseException) -> bool:
    """Whether the S3 retry handler has already retried this error (a botocore error in the chain)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - s3 extra not installed
        return False
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (BotoCoreError, ClientError)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def error_line(exc: BaseException, given: Iterable[str] = ()) -> str | None:
    """One line for a storage failure that escaped :func:`retry` (e.g. raised inside zarr), else None.

    For the CLI: an ``OSError`` or botocore error becomes ``"cannot access ...: ..."`` without
    credentials instead of a traceback.  An error without a file name is about the one of the
    paths the user ``given`` that its message mentions (the longest), else about "object storage".
    """
    if isinstance(exc, StreamPruneError):
        return str(exc)
    if not (isinstance(exc, OSError) or _retried_inside(exc)):
        return None
    text = str(exc)
    mentioned = sorted((p for p in given if isinstance(p, str) and p and p in text), key=len, reverse=True)
    where = getattr(exc, "filename", None) or (mentioned[0] if mentioned else "object storage")
    msg = describe_storage_error(exc, str(where))
    return msg + (" (gave up after retries)" if is_transient(exc) or _retry_code(exc) else "")


_ZARR_DECODING = ("_decode", "decode", "decompress", "_read_metadata")  # zarr's and numcodecs' frames that read data


def _zarr_location(store_path: Any) -> str:
    """The path or URL of a zarr StorePath, as the user gave the workspace (its str() names the store class)."""
    store, key = store_path.store, store_path.path
    if isinstance(getattr(store, "root", None), os.PathLike):  # a local store
        base = str(store.root)
    else:
        proto = getattr(getattr(store, "fs", None), "protocol", "")
        proto = proto[0] if isinstance(proto, (tuple, list)) else proto
        base = f"{proto}://{getattr(store, 'path', '')}" if proto else str(store_path)
    return join(base, key) if key else base


def zarr_read_error_line(exc: BaseException) -> str | None:
    """One line for zarr data that cannot be decoded (a chunk or ``zarr.json`` cut short, overwritten or
    written by another tool), else None.

    zarr raises what its codecs raise (a zstd or blosc error, a reshape to the chunk's shape, a JSON
    error) without the file's name; it is read from the innermost zarr frame that holds a
    ``store_path`` (the array, or the group whose zarr.json failed).  Errors of zarr's writes (a
    wrong shape given by a caller), errors of a selection (an index out of bounds: a bug of the caller)
    and storage errors (:func:`error_line`) are not this: only an error raised while a codec decodes a
    chunk or while metadata is parsed.
    """
    if isinstance(exc, (OSError, StreamPruneError)):
        return None
    tb, where, decoding = exc.__traceback__, None, False
    while tb is not None:
        code = tb.tb_frame.f_code
        if f"{os.sep}zarr{os.sep}" in code.co_filename or f"{os.sep}numcodecs{os.sep}" in code.co_filename:
            decoding = decoding or code.co_name.startswith(_ZARR_DECODING)
            path = tb.tb_frame.f_locals.get("store_path")
            if type(path).__name__ == "StorePath":
                where = _zarr_location(path)
                if code.co_name.startswith(("_from_bytes", "_read_metadata")):
                    where = join(where, "zarr.json")
        tb = tb.tb_next
    if not decoding:
        return None
    first = (str(exc).splitlines() or [""])[0]
    return (f"{where or 'zarr data of the workspace'} cannot be read ({type(exc).__name__}: {first}): it is damaged or "
            "was written by another tool; remove the output of the stage that wrote it and re-run that stage with "
            "--force, or use a new workspace")


def is_transient(exc: BaseException) -> bool:
    """Whether an error from storage is worth retrying."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(m in text for m in _TRANSIENT_MARKERS) or bool(_TRANSIENT_STATUS.search(text))


def retry(fn: Callable[[], T], what: str, storage_options: dict | None = None) -> T:
    """Call ``fn`` retrying transient storage errors with jittered exponential backoff.

    The policy comes from ``storage_options``/the environment (:class:`RetryPolicy`); errors
    that the S3 request handler already retried are not retried again here.  A final failure
    is a one-line ``StreamPruneError`` without credentials.
    """
    policy = RetryPolicy.from_options(storage_options)
    attempts = policy.attempts
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StreamPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            transient = is_transient(exc) or bool(_retry_code(exc))
            if not transient or _retried_inside(exc) or attempt == attempts:
                msg = describe_storage_error(exc, what, storage_options)
                if transient:
                    tries = policy.attempts if _retried_inside(exc) else attempt
                    msg += f" (gave up after {tries} attempt{'s' if tries != 1 else ''})"
                raise StreamPruneError(msg) from exc
            delay = policy.delay(attempt)
            log.info("storage: %s on %s; retry %d of %d in %.2fs", type(exc).__name__, what, attempt,
                     attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


MAX_BRACE_NAMES = 10_000_000
"""Most names one brace pattern may expand to: braceexpand builds each ``{A..B}`` range as a list, so an
extra digit in a range (``{000..0099999999}``) held the command for minutes and gigabytes before the first
name was looked at; ten times the shards of a billion rows at a thousand samples a shard."""

_INT_RANGE = re.compile(r"(?<!\\)\{(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?\}")


def brace_names(spec: str) -> int:
    """How many names the integer ranges of brace pattern ``spec`` expand to at most (their sizes' product;
    comma alternatives are not counted)."""
    n = 1
    for first, last, step in _INT_RANGE.findall(spec):
        n *= abs(int(last) - int(first)) // max(1, int(step or 1)) + 1
    return n


def expand_shards(specs: Iterable[str], storage_options: dict | None = None) -> list[str]:
    """Expand shard specs (paths, globs, brace patterns, directories/prefixes) to sorted URLs."""
    urls: set[str] = set()
    for spec in specs:
        names = brace_names(spec)
        if names > MAX_BRACE_NAMES:
            raise StreamPruneError(f"shard pattern {spec!r} expands to {names:,} names, more than the "
                                   f"{MAX_BRACE_NAMES:,} allowed; check its {{first..last}} range")
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
        if os.path.isdir(path):  # a folder named like a shard ('x.tar/') is a folder, not a shard
            return [p for p in sorted(globlib.glob(os.path.join(path, "**", "*.tar"), recursive=True))
                    if os.path.isfile(p)]
        if os.path.isfile(path):
            return [path]
        raise StreamPruneError(f"shard not found: {path}")
    fs = get_fs(pattern, storage_options)
    if globlib.has_magic(pattern):
        found = retry(lambda: fs.glob(pattern), pattern, storage_options=storage_options)
        return [_with_protocol(p, proto) for p in sorted(found)]

    def _stat() -> list[str]:
        if fs.isdir(pattern):
            return [_with_protocol(p, proto) for p in sorted(fs.find(pattern)) if p.endswith(".tar")]
        if fs.isfile(pattern):
            return [pattern]
        raise FileNotFoundError(pattern)

    try:
        return retry(_stat, pattern, storage_options=storage_options)
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
    info = retry(lambda: fs.info(url), url, storage_options=storage_options)
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
    return retry(lambda: fs.open(url, "rb", block_size=block_size, cache_type="readahead"), url,
                 storage_options=storage_options)


def read_range(url: str, start: int, end: int, storage_options: dict | None = None) -> bytes:
    """Bytes [start, end) of an object, with retries on object storage; fewer (none) where the
    object ends before ``end`` (``start``), on local disk and object storage alike."""
    if not is_remote(url):
        return _local(url, lambda: _pread(url, start, end))
    fs = get_fs(url, storage_options)

    def read() -> bytes:
        try:
            return fs.cat_file(url, start=start, end=end)
        except OSError as exc:
            if _s3_code(exc) == "InvalidRange":  # S3 answers a range past the end with an error
                return b""
            raise

    return retry(read, url, storage_options=storage_options)


def _pread(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _local(path: str, fn: Callable[[], T]) -> T:
    """Run a local file operation; errors other than "not found" become one-line errors."""
    try:
        return fn()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StreamPruneError(describe_storage_error(exc, path)) from exc


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Whole object as bytes."""
    if not is_remote(url):
        return _local(url, lambda: _read_all(url))
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.cat_file(url), url, storage_options=storage_options)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether an object or directory exists."""
    if not is_remote(url):
        return os.path.exists(url)
    fs = get_fs(url, storage_options)
    return retry(lambda: fs.exists(url), url, storage_options=storage_options)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` so that readers see either the old object or the complete new one."""
    if not is_remote(url):
        directory = os.path.dirname(url)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(url)}")
        try:
            with naming(url), open(tmp, "wb") as f:
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
    retry(lambda: fs.pipe_file(url, data), url, storage_options=storage_options)


def upload_file(local: str, url: str, storage_options: dict | None = None) -> None:
    """Publish the local file ``local`` as ``url`` (a rename locally; a streamed, retried upload remotely)."""
    if not is_remote(url):
        if os.path.abspath(local) != os.path.abspath(url):
            os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
            os.replace(local, url)
        return
    fs = get_fs(url, storage_options)
    retry(lambda: fs.put_file(local, url), url, storage_options=storage_options)


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Atomically write a JSON document."""
    write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode(),
                       storage_options)


def none_if_missing(fn: Callable[[], T]) -> T | None:
    """``fn()`` (a storage call, retried or not), or None when what it reads does not exist."""
    try:
        return fn()
    except FileNotFoundError:
        return None
    except StreamPruneError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise


def read_if_exists(url: str, storage_options: dict | None = None) -> bytes | None:
    """Whole object as bytes, or None when it does not exist."""
    return none_if_missing(lambda: read_bytes(url, storage_options))


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    """Read a JSON document, or None when it does not exist."""
    data = read_if_exists(url, storage_options)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StreamPruneError(f"{url} is not valid JSON ({exc}); it was damaged or written by another "
                               "tool: remove it (and re-run the stage) or use a new workspace") from None


def listdir(url: str, storage_options: dict | None = None) -> list[str]:
    """Names (not paths) of the entries directly below ``url``; empty when absent."""
    if not is_remote(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs = get_fs(url, storage_options)
    entries = none_if_missing(lambda: retry(lambda: fs.ls(url, detail=False, refresh=True), url,
                                            storage_options=storage_options))
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries or [])


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
    retry(lambda: fs.rm(url, recursive=recursive), url, storage_options=storage_options)


def zarr_store(url: str, storage_options: dict | None = None):
    """A zarr v3 store for a local path or an fsspec URL."""
    import zarr

    if is_remote(url):
        fs = get_fs(url, storage_options, asynchronous=True)  # the same retry policy as every other request
        return zarr.storage.FsspecStore(fs, path=fs._strip_protocol(url))
    return _local_store_class()(url)


@contextmanager
def naming(path: str) -> Iterator[None]:
    """Give a full disk's OSError (ENOSPC, EDQUOT, EFBIG) raised without a file name the name ``path``: a
    failed ``write()`` carries none, and its one line could not say which file (so which disk) it was."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in DISK_FULL_ERRNOS:
            exc.filename = path
        raise


_LOCAL_STORE: list[type] = []


def _local_store_class() -> type:
    """zarr's LocalStore whose failed writes name their file (:func:`naming`); made on first use, so that
    importing this module does not import zarr."""
    if not _LOCAL_STORE:
        import zarr

        class NamingLocalStore(zarr.storage.LocalStore):
            async def set(self, key: str, value: Any) -> None:
                with naming(os.path.join(str(self.root), key)):
                    await super().set(key, value)

            async def set_if_not_exists(self, key: str, value: Any) -> None:
                with naming(os.path.join(str(self.root), key)):
                    await super().set_if_not_exists(key, value)

        NamingLocalStore.__module__, NamingLocalStore.__qualname__ = __name__, "NamingLocalStore"  # picklable
        _LOCAL_STORE.append(NamingLocalStore)
    return _LOCAL_STORE[0]


def __getattr__(name: str) -> Any:
    if name == "NamingLocalStore":  # what a pickled store names
        return _local_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def buffered(data: bytes) -> io.BytesIO:
    """A seekable in-memory file over ``data``."""
    return io.BytesIO(data)


def read_1d(arr: Any, dtype: Any, what: str, chunk_rows: int = 1 << 22) -> np.ndarray:
    """A 1-d zarr array converted to ``dtype`` chunk by chunk (no full-size temporary of the stored dtype).

    Integer targets are range-checked: values that do not fit raise a one-line error naming the
    array, prefixed by ``what`` (the stage reading it).
    """
    n = arr.shape[0]
    out = np.empty(n, dtype)
    for a in range(0, n, chunk_rows):
        block = arr[a:a + chunk_rows]
        if np.issubdtype(np.dtype(dtype), np.integer) and block.size:
            info = np.iinfo(dtype)
            if block.min() < info.min or block.max() > info.max:
                raise StreamPruneError(f"{what}: values in {arr.store_path} (rows {a} to {a + len(block) - 1}) "
                                       f"exceed {np.dtype(dtype).name}")
        out[a:a + len(block)] = block
    return out
