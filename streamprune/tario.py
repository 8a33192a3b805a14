"""A small, fast tar member reader (ustar, GNU long names, pax headers).

Python's ``tarfile`` costs ~100 us per member in stream mode; cataloguing a billion samples needs
better.  This reader parses headers directly, seeks over payloads it does not need on seekable
files, and reports truncation and corruption with the byte offset where it happened.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

BLOCK = 512
MAX_EXTENDED_HEADER = 1 << 20  # pax / GNU long-name payloads are read into memory: bound them


class TarError(Exception):
    """Corrupt or truncated tar data; ``offset`` is where reading failed."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


@dataclass
class RawMember:
    """A regular file in a tar: name, offset of its first header, end after padding, size, payload."""

    name: str
    offset: int
    data_offset: int
    end: int
    size: int
    data: bytes | None


def _octal(field: bytes, what: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        if field[0] == 0xFF:
            raise TarError(f"negative {what} field in tar header", offset)
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    if text.translate(None, b"01234567"):  # int() would accept signs, '_' and spaces inside
        raise TarError(f"bad {what} field in tar header", offset)
    return int(text, 8)


def _header_sum(hdr: bytes) -> int:
    """Sum of a 512-byte header's bytes outside its checksum field (148:156).

    Adler-32's first sum is 1 + the byte sum modulo 65521, exact for up to 256 bytes (at most
    65280): three C calls instead of Python's ``sum`` over 512 ints (measured 1.3 against 4.6 us,
    a third of parsing a 2-member sample).
    """
    return ((zlib.adler32(hdr[:148]) & 0xFFFF) + (zlib.adler32(hdr[156:412]) & 0xFFFF)
            + (zlib.adler32(hdr[412:BLOCK]) & 0xFFFF) - 3)


def _checksum_ok(hdr: bytes, offset: int) -> bool:
    try:
        stored = _octal(hdr[148:156], "checksum", offset)
    except TarError:
        return False
    unsigned = _header_sum(hdr) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum((b - 256 if b > 127 else b) for b in hdr[:148] + hdr[156:]) + 8 * 32
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[sp + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


_NO_FIELDS: dict[str, str] = {}  # shared, never written: most members have no pax records


class _Reader:
    def __init__(self, f: BinaryIO, base: int):
        self.f = f
        self.pos = base
        self.seekable = False
        self.size: int | None = None
        try:
            if f.seekable():
                here = f.tell()
                self.size = f.seek(0, 2) - here + base
                f.seek(here)
                self.seekable = True
        except (OSError, AttributeError, ValueError):
            pass

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Skip n bytes; False when the data ends first."""
        if self.seekable and self.size is not None:
            if self.pos + n > self.size:
                self.f.seek(0, 2)
                self.pos = self.size
                return False
            self.f.seek(n, 1)
            self.pos += n
            return True
        remaining = n
        while remaining:
            chunk = self.f.read(min(remaining, 1 << 20))
            if not chunk:
                return False
            self.pos += len(chunk)
            remaining -= len(chunk)
        return True


def iter_tar(f: BinaryIO, read_data: bool = True, base_offset: int = 0,
             max_member_bytes: int | None = None) -> Iterator[RawMember]:
    """Regular-file members of a tar stream in order.

    Raises ``TarError`` on corruption or truncation (after yielding every complete member before
    it).  Members over ``max_member_bytes`` are yielded with ``data=None`` and never read.
    """
    r = _Reader(f, base_offset)
    long_name: str | None = None
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    first_offset: int | None = None
    while True:
        start = r.pos
        hdr = r.read(BLOCK)
        if not hdr:
            if long_name is not None or pax:
                raise TarError("truncated tar (extended header without its member)", start)
            return
        if len(hdr) < BLOCK:
            raise TarError("truncated tar header", start)
        if hdr[0] == 0 and hdr.count(0) == BLOCK:  # a member's header starts with its name
            return  # end-of-archive marker
        if not _checksum_ok(hdr, start):
            raise TarError("bad tar header checksum (corrupt or not a tar file)", start)
        size = _octal(hdr[124:136], "size", start)
        kind = hdr[156:157]
        name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if first_offset is None and kind != b"g":  # a global header is not part of the member after it
            first_offset = start
        if kind in (b"L", b"x", b"g", b"K"):
            if size > MAX_EXTENDED_HEADER:
                raise TarError(f"extended header of {size} bytes (over {MAX_EXTENDED_HEADER})", start)
            data = r.read(padded)
            if len(data) < padded:
                raise TarError("truncated tar (inside an extended header)", r.pos)
            data = data[:size]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax.update(_pax_records(data))
            elif kind == b"g":
                global_pax.update(_pax_records(data))
            continue
        fields = {**global_pax, **pax} if pax or global_pax else _NO_FIELDS
        if "size" in fields:
            if not fields["size"].isascii() or not fields["size"].isdigit():
                raise TarError(f"bad pax size record {fields['size'][:30]!r}", start)
            size = int(fields["size"])
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        full_name = fields.get("path") or long_name or name.decode("utf-8", "surrogateescape")
        offset, data_offset = first_offset, r.pos
        long_name, pax, first_offset = None, {}, None
        regular = kind in (b"0", b"\0", b"7")
        if regular and read_data and (max_member_bytes is None or size <= max_member_bytes):
            data = r.read(size)  # the payload only: no second copy to cut the padding off
            if len(data) < size:
                raise TarError(f"truncated tar inside member {full_name}", r.pos)
            r.skip(padded - size)  # a short final padding block is tolerated, as before
            yield RawMember(full_name, offset, data_offset, data_offset + padded, size, data)
            continue
        if not r.skip(padded):
            if r.pos - data_offset < size:
                raise TarError(f"truncated tar inside member {full_name}", r.pos)
        if regular:
            yield RawMember(full_name, offset, data_offset, data_offset + padded, size, None)


def plain_members(blob: bytes, max_member_bytes: int | None = None) -> list[tuple[str, bytes]] | None:
    """(name, payload) of every member when ``blob`` is exactly a run of plain regular files, else None.

    Plain: ustar/GNU headers with a valid checksum, type '0' (or NUL), an octal size within
    ``max_member_bytes``, a name without a ustar prefix, the payload and its padding inside the blob,
    and nothing after the last member.  Anything else (extended headers, long names, other types,
    damage, trailing bytes) gives None, and the caller parses the blob with :func:`iter_tar`, which
    reports it.  For reading back a catalogued sample this skips the general reader's generators and
    per-member records (measured: about half of a 2-member sample's parse).
    """
    out: list[tuple[str, bytes]] = []
    pos, n = 0, len(blob)
    while pos < n:
        if n - pos < BLOCK:
            return None
        hdr = blob[pos:pos + BLOCK]
        if hdr[156] not in (48, 0) or (hdr[257:262] == b"ustar" and hdr[345] != 0) or not _checksum_ok(hdr, pos):
            return None
        try:
            size = _octal(hdr[124:136], "size", pos)
        except TarError:
            return None
        name = hdr[0:100].split(b"\0", 1)[0]
        start = pos + BLOCK
        end = start + (size + BLOCK - 1) // BLOCK * BLOCK
        if not name or end > n or (max_member_bytes is not None and size > max_member_bytes):
            return None
        out.append((name.decode("utf-8", "surrogateescape"), blob[start:start + size]))
        pos = end
    return out


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Write (key, {ext: bytes}) samples to a local tar deterministically (fixed mtime/owner).

    Written under a temporary name and moved into place, so a reader never sees a partial tar.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
