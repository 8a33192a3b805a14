"""WebDataset shards: tar reading as small generator stages, the catalog, and the error policy.

Reading is a chain in the webdataset style::

    open_read(url) -> iter_members(...) -> group_samples(...) -> consumer

Every stage takes the ``ErrorPolicy`` as ``handler``: with ``fail`` the first problem raises a
one-line ``SampleError`` naming shard and key; with ``skip`` the problem is recorded (and later
written to errors.jsonl) and reading goes on.  Nothing is dropped without a record.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import pandas as pd

from streamprune import storage
from streamprune.compute import map_tasks
from streamprune.errors import Rule, SampleError, StreamPruneError, whole
from streamprune.leases import releases_leases
from streamprune.tario import TarError, iter_tar, plain_members
from streamprune.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # --max-member-bytes: a bigger member is rejected unread
MEMBER_LIMIT = Rule(whole(1), "a whole number of bytes >= 1")  # what --max-member-bytes must be


# error policy --------------------------------------------------------------------------------
@dataclass
class ErrorPolicy:
    """What to do with a bad sample or shard: ``fail`` (raise) or ``skip`` (record, go on)."""

    mode: str = "fail"
    records: list[dict] = field(default_factory=list)
    stage: str = ""
    quiet: bool = False  # no log line per skipped sample (an outer handler reports it)

    def __post_init__(self) -> None:
        if self.mode not in ("fail", "skip"):
            raise StreamPruneError(f"--on-error must be 'fail' or 'skip', not {self.mode!r}")

    def handle(self, err: SampleError) -> None:
        """Raise in ``fail`` mode, record in ``skip`` mode."""
        if self.mode == "fail":
            raise err
        if not self.quiet:
            log.warning("skipping: %s", err)
        self.records.append(err.record(self.stage))


# tar reading ---------------------------------------------------------------------------------
@dataclass
class Member:
    """One regular file of a tar: name, header offset, end offset (after padding), payload."""

    name: str
    offset: int
    end: int
    size: int
    data: bytes | None = None
    oversized: bool = False
    broken: bool = False  # the tar is damaged here: the sample being read is incomplete


@dataclass
class Sample:
    """Consecutive members sharing a key: the unit of a WebDataset."""

    key: str
    offset: int
    end: int
    members: dict[str, bytes | None]


def split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's key/extension split: 'dir/abc.seg.png' -> ('dir/abc', 'seg.png')."""
    base = name.rsplit("/", 1)
    head, tail = (base[0] + "/", base[1]) if len(base) == 2 else ("", base[0])
    if "." not in tail or tail.startswith("."):
        return None
    stem, ext = tail.split(".", 1)
    return head + stem, ext.lower()


_PATH_CHARS = re.compile(r"[/\\:\x00]")
_DRIVE = re.compile(r"[A-Za-z]:[/\\]")
_SEPARATORS = re.compile(r"[/\\]")


def unsafe_name(name: str) -> bool:
    """A member name that must never reach a filesystem path: absolute or with '..' parts."""
    if _PATH_CHARS.search(name) is None:  # the common case, a bare 'key.ext': one scan
        return name == ".."
    return (name.startswith(("/", "\\")) or "\x00" in name or _DRIVE.match(name) is not None
            or any(p == ".." for p in _SEPARATORS.split(name)))


def _not_utf8(name: str) -> bool:
    """A name whose bytes are not UTF-8 (read with surrogateescape): it cannot be stored as a key."""
    if name.isascii():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(name: str) -> str:
    """A name as printable text: bytes that are not UTF-8 written as escapes (``b\\xff``)."""
    return name if name.isascii() else name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def iter_members(fileobj: BinaryIO, shard: str, handler: ErrorPolicy, read_data: bool = False,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, base_offset: int = 0) -> Iterator[Member]:
    """Regular files of a tar stream, in order; corruption and oversized members go to ``handler``."""
    last_name: str | None = None
    try:
        for m in iter_tar(fileobj, read_data=read_data, base_offset=base_offset, max_member_bytes=max_member_bytes):
            last_name = m.name
            oversized = m.size > max_member_bytes
            if oversized:
                handler.handle(SampleError(f"member {_shown(m.name)} is {m.size} bytes, over the limit of "
                                           f"{max_member_bytes} (--max-member-bytes); not read", shard,
                                           _key_of(m.name), reason="too_large"))
            yield Member(m.name, m.offset, m.end, m.size, m.data, oversized)
    except TarError as exc:
        if last_name is None and exc.offset == base_offset:
            msg = f"not a tar file ({exc})"
        else:
            msg = ("corrupt or truncated tar" + (f" after member {last_name}" if last_name else "")
                   + f" ({exc}); the rest of the shard is unreadable")
        handler.handle(SampleError(msg, shard, _key_of(last_name), reason="corrupt_tar"))
        yield Member("", exc.offset, exc.offset, 0, None, broken=True)


def _key_of(name: str | None) -> str | None:
    if name is None:
        return None
    parts = split_name(name)
    return _shown(parts[0] if parts else name)


def group_samples(members: Iterable[Member], shard: str, handler: ErrorPolicy) -> Iterator[Sample]:
    """Group consecutive members by key; report duplicate keys, unsafe and oversized members.

    A sample with a reported problem is dropped whole (the report names its key).  Unsafe
    member names (absolute, ``..``, NUL) are rejected rather than sanitised, like ``prune
    --reshard`` does: a sanitised name could collide with another sample's key.  So are names
    that are not UTF-8, which no key (stored as text) can hold.
    """
    seen: set[str] = set()
    current: Sample | None = None
    bad_current = False

    def finish(sample: Sample | None, bad: bool) -> Sample | None:
        return None if sample is None or bad else sample

    for m in members:
        if m.broken:
            return  # the in-progress sample is incomplete; iter_members reported it
        not_utf8 = _not_utf8(m.name)
        if not_utf8 or unsafe_name(m.name):
            key = _key_of(m.name)
            if current is not None and current.key == key and bad_current:
                continue  # another member of a sample already reported
            done = finish(current, bad_current)
            if done is not None:
                yield done
            why = (f"member name '{_shown(m.name)}' is not valid UTF-8" if not_utf8
                   else f"unsafe member name {m.name!r} (absolute path or '..')")
            handler.handle(SampleError(f"{why}; rejected", shard, key, reason="unsafe_name"))
            current, bad_current = Sample(key, m.offset, m.end, {}), True
            continue
        parts = split_name(m.name)
        if parts is None:
            continue  # webdataset ignores names without an extension (e.g. directories' files)
        key, ext = parts
        if current is not None and key == current.key:
            if ext in current.members:
                handler.handle(SampleError(f"duplicate member {m.name}", shard, key, reason="duplicate_key"))
                bad_current = True
                continue
            current.members[ext] = m.data
            current.end = m.end
            bad_current = bad_current or m.oversized
            continue
        done = finish(current, bad_current)
        if done is not None:
            yield done
        current, bad_current = None, False
        if key in seen:
            handler.handle(SampleError("duplicate key (appears twice in the shard)", shard, key,
                                       reason="duplicate_key"))
            current, bad_current = Sample(key, m.offset, m.end, {}), True
            continue
        seen.add(key)
        current, bad_current = Sample(key, m.offset, m.end, {ext: m.data}), m.oversized
    done = finish(current, bad_current)
    if done is not None:
        yield done


def iter_samples(url: str, handler: ErrorPolicy, storage_options: dict | None = None, read_data: bool = True,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """All samples of one shard, streamed."""
    with storage.open_read(url, storage_options) as f:
        members = iter_members(f, url, handler, read_data=read_data, max_member_bytes=max_member_bytes)
        yield from group_samples(members, url, handler)


def read_sample_range(url: str, start: int, end: int, shard_label: str | None = None,
                      storage_options: dict | None = None, handler: ErrorPolicy | None = None,
                      data: bytes | None = None, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> list[Sample]:
    """Samples stored in bytes [start, end) of a shard (one ranged read; offsets from the catalog)."""
    handler = handler or ErrorPolicy("fail")
    blob = data if data is not None else storage.read_range(url, start, end, storage_options)
    members = iter_members(io.BytesIO(blob), shard_label or url, handler, read_data=True, base_offset=start,
                           max_member_bytes=max_member_bytes)
    return list(group_samples(members, shard_label or url, handler))


def _plain_sample(data: bytes, key: str, offset: int, end: int, max_member_bytes: int) -> Sample | None:
    """The sample in ``data`` (its catalogued byte range) when it is plain: regular members of safe
    names, all of ``key`` with distinct extensions (see :func:`~streamprune.tario.plain_members`);
    None sends it to the general reader, which reports whatever is wrong."""
    members = plain_members(data, max_member_bytes)
    if not members:
        return None
    sample = Sample(key, offset, end, {})
    for name, payload in members:
        parts = split_name(name)
        if parts is None or parts[0] != key or parts[1] in sample.members or unsafe_name(name):
            return None
        sample.members[parts[1]] = payload
    return sample


def read_rows(cat: "Catalog", rows: np.ndarray, handler: ErrorPolicy,
              coalesce_gap: int = 1 << 20) -> Iterator[tuple[int, Sample]]:
    """Samples of the given (sorted) rows, read by byte ranges from the catalog offsets.

    Requested samples of one shard whose gaps are under ``coalesce_gap`` bytes are fetched in
    one ranged read (one request per run of nearby samples on object storage).  A sample whose
    bytes no longer parse, or whose key differs from the catalog (the shard changed since it
    was catalogued), goes to ``handler``.
    """
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return
    shard_idx = cat.shard_of(rows)
    bounds = np.flatnonzero(np.diff(shard_idx)) + 1
    for group in np.split(np.arange(len(rows)), bounds):
        s = int(shard_idx[group[0]])
        url = cat.urls[s]
        part = cat.part(s)
        local = rows[group] - cat.row_start[s]
        offs = part.offset.to_numpy()[local]
        ends = part.end.to_numpy()[local]
        keys = part.key.to_numpy(object)[local]
        runs = np.split(np.arange(len(local)), np.flatnonzero(offs[1:] - ends[:-1] > coalesce_gap) + 1)
        for run in runs:
            start, stop = int(offs[run[0]]), int(ends[run[-1]])
            blob = storage.read_range(url, start, stop, cat.ws.storage_options)
            parse = ErrorPolicy("skip", stage=handler.stage, quiet=True)  # one report per sample, below
            for j in run:
                o, e = int(offs[j]) - start, int(ends[j]) - start
                if e > len(blob):  # the shard ends before this sample does
                    handler.handle(SampleError(f"shard is shorter than catalogued (wanted bytes {offs[j]}-{ends[j]})",
                                               url, keys[j], reason="changed_shard"))
                    continue
                plain = _plain_sample(blob[o:e], keys[j], int(offs[j]), int(ends[j]), cat.max_member_bytes)
                if plain is not None:
                    yield int(rows[group[j]]), plain
                    continue
                parse.records.clear()
                got = read_sample_range(url, int(offs[j]), int(ends[j]), handler=parse, data=blob[o:e],
                                        max_member_bytes=cat.max_member_bytes)
                if parse.records or len(got) != 1 or got[0].key != keys[j]:
                    why = f": {parse.records[0]['message']}" if parse.records else ""
                    handler.handle(SampleError(f"sample bytes do not match the catalog (shard changed since "
                                               f"`catalog`?){why}", url, keys[j], reason="changed_shard"))
                    continue
                yield int(rows[group[j]]), got[0]


# catalog -------------------------------------------------------------------------------------
def shard_id(url: str, size: int, etag: str, max_member_bytes: int) -> str:
    """Id of a shard version scanned under a member limit: its catalog part is reused while this holds."""
    return hashlib.sha256(f"{url}\n{size}\n{etag}\n{max_member_bytes}".encode()).hexdigest()[:20]


def scan_shard(url: str, part_url: str, on_error: str, storage_options: dict | None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> dict:
    """Catalog one shard: keys, byte offsets and extensions of its samples, written as parquet."""
    handler = ErrorPolicy(on_error, stage="catalog")
    keys, offsets, ends, exts = [], [], [], []
    for s in iter_samples(url, handler, storage_options, read_data=False, max_member_bytes=max_member_bytes):
        keys.append(s.key)
        offsets.append(s.offset)
        ends.append(s.end)
        exts.append(",".join(sorted(s.members)))
    if not keys and not handler.records:
        handler.handle(SampleError("empty shard (no samples)", url, None, reason="empty_shard"))
    table = pd.DataFrame({"key": pd.array(keys, dtype="string"), "offset": np.asarray(offsets, np.int64),
                          "end": np.asarray(ends, np.int64), "exts": pd.array(exts, dtype="string")})
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    errors = [dict(e, stage="catalog") for e in handler.records]
    # The errors travel inside the part (parquet metadata is awkward: keep a sidecar JSON first).
    if errors:
        storage.write_json_atomic(part_url + ".errors.json", errors, storage_options)
    storage.write_bytes_atomic(part_url, buf.getvalue(), storage_options)  # written last: the done record
    return {"n_samples": len(keys), "n_errors": len(errors)}


@releases_leases
def catalog(shards: Iterable[str], workspace: str | Workspace, *, storage_options: dict | None = None,
            on_error: str = "fail", scheduler: str | None = "local", force: bool = False,
            max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> dict:
    """Index shards into the workspace catalog: dense row ids, keys, per-sample byte offsets.

    One task per shard; each writes a content-addressed part file, so a killed run re-scans only
    the shards without a part and appending shards re-uses the parts of the old ones.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    ErrorPolicy(on_error)  # validate early
    MEMBER_LIMIT.check(max_member_bytes, "--max-member-bytes")
    t0 = time.time()
    urls = storage.expand_shards(list(shards), ws.storage_options)
    stats = map_tasks(storage.stat, [(u, ws.storage_options) for u in urls], scheduler="threads", desc="stat shards") \
        if len(urls) > 1 else [storage.stat(u, ws.storage_options) for u in urls]
    table = pd.DataFrame({"url": urls, "size": [s["size"] for s in stats], "etag": [s["etag"] for s in stats]})
    table["part"] = [shard_id(u, s, e, max_member_bytes) for u, s, e in zip(table.url, table["size"], table.etag)]
    config = {"on_error": on_error, "max_member_bytes": max_member_bytes}
    inputs = {"shards": fingerprint_shards(table)}
    run = ws.begin("catalog", config, inputs, force=force)
    if run.already_done:
        return run.previous | {"skipped": True}

    part_dir = ws.path("catalog", "parts")
    existing = set(storage.listdir(part_dir, ws.storage_options))
    todo = [i for i, p in enumerate(table.part) if f"{p}.parquet" not in existing]
    log.info("catalog: %d shards, %d already scanned", len(table), len(table) - len(todo))
    map_tasks(scan_shard, [(table.url[i], storage.join(part_dir, f"{table.part[i]}.parquet"), on_error,
                            ws.storage_options, max_member_bytes) for i in todo],
              scheduler=scheduler, desc="catalog", unit="shard")

    counts, errors = [], []
    for i, part in enumerate(table.part):
        meta = _read_table(storage.join(part_dir, f"{part}.parquet"), ws.storage_options, columns=["key"])
        counts.append(len(meta))
        side = storage.read_json(storage.join(part_dir, f"{part}.parquet.errors.json"), ws.storage_options)
        errors.extend(side or [])
    if errors and on_error == "fail":  # recorded by a skip-mode scan whose part this run re-uses
        e = errors[0]
        raise SampleError(e["message"], e["shard"], e["key"], reason=e["reason"])
    table["n_samples"] = np.asarray(counts, np.int64)
    table["row_start"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else []
    buf = io.BytesIO()
    table[["url", "n_samples", "row_start", "size", "etag", "part"]].to_parquet(buf, index=False)
    storage.write_bytes_atomic(ws.path("catalog", "shards.parquet"), buf.getvalue(), ws.storage_options)
    n = int(table.n_samples.sum())
    with ws.exclusive():
        ws.update_metadata("catalog", config, inputs={"shards": [
            {"url": u, "size": int(s), "etag": e} for u, s, e in zip(table.url, table["size"], table.etag)]})
    return run.commit(outputs={"shards": "catalog/shards.parquet", "parts": "catalog/parts/"},
                      counts={"n_shards": len(table), "n_samples": n, "bytes": int(table["size"].sum())},
                      errors=errors, timings={"scan_s": round(time.time() - t0, 3)})


def fingerprint_shards(table: pd.DataFrame) -> str:
    """One hash over (url, size, etag) of every shard."""
    h = hashlib.sha256()
    for u, s, e in zip(table.url, table["size"], table.etag):
        h.update(f"{u}\n{s}\n{e}\n".encode())
    return h.hexdigest()


def _read_table(url: str, storage_options: dict | None, columns: list[str] | None = None) -> pd.DataFrame:
    """A catalog parquet table; a missing or damaged one is a one-line error saying what to re-run."""
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise StreamPruneError(f"catalog file {url} is missing; re-run `streamprune catalog --force`") from None
    try:
        return pd.read_parquet(io.BytesIO(data), columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for damaged files
        raise StreamPruneError(f"catalog file {url} is damaged ({type(exc).__name__}); re-run "
                               "`streamprune catalog --force`") from None


class Catalog:
    """Read access to a workspace catalog: shard table, keys and offsets by row."""

    def __init__(self, ws: Workspace):
        marker = ws.require("catalog", "catalog read")
        self.ws = ws
        # Samples were vetted against this limit when catalogued; reading them back uses the same one.
        self.max_member_bytes = int(marker.get("config", {}).get("max_member_bytes") or DEFAULT_MAX_MEMBER_BYTES)
        self.shards = _read_table(ws.path("catalog", "shards.parquet"), ws.storage_options)
        self.n_samples = int(self.shards.n_samples.sum())
        self.row_start = self.shards.row_start.to_numpy(np.int64)
        self.urls: list[str] = self.shards.url.tolist()
        self._parts: dict[int, pd.DataFrame] = {}

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def part(self, shard: int) -> pd.DataFrame:
        """key, offset, end, exts of every sample of shard ``shard`` (by catalog index)."""
        if shard not in self._parts:
            if len(self._parts) > 64:
                self._parts.clear()
            self._parts[shard] = self._read_part(shard)
        return self._parts[shard]

    def _read_part(self, shard: int) -> pd.DataFrame:
        name = self.shards.part.iloc[shard]
        return _read_table(self.ws.path("catalog", "parts", f"{name}.parquet"), self.ws.storage_options)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """Catalog index of the shard holding each row."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_samples):
            raise StreamPruneError(f"row ids out of range [0, {self.n_samples})")
        return np.searchsorted(self.row_start, rows, side="right") - 1

    def keys(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Keys of the given rows (all rows when None), as an object array."""
        if rows is None:
            return np.concatenate([self.part(i).key.to_numpy(object) for i in range(self.n_shards)]) \
                if self.n_shards else np.array([], object)
        rows = np.asarray(rows, np.int64)
        shard = self.shard_of(rows)
        out = np.empty(len(rows), object)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.part(int(s)).key.to_numpy(object)[rows[sel] - self.row_start[s]]
        return out

    def part_keys(self, shard: int) -> np.ndarray:
        """The sample keys of shard ``shard`` (object array), read without caching the part."""
        if shard in self._parts:
            return self._parts[shard].key.to_numpy(object)
        name = self.shards.part.iloc[shard]
        return _read_table(self.ws.path("catalog", "parts", f"{name}.parquet"), self.ws.storage_options,
                           ["key"]).key.to_numpy(object)

    def iter_parts(self) -> Iterator[tuple[int, pd.DataFrame]]:
        """(shard index, part table) for every shard, in row order.

        A streaming pass: parts not already cached are read without being cached, so the pass holds
        one part at a time (the cache of :meth:`part`, for random access, holds up to 65).
        """
        for i in range(self.n_shards):
            yield i, self._parts[i] if i in self._parts else self._read_part(i)
