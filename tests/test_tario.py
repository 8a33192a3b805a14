"""The tar reader against Python's tarfile and webdataset, and on broken input."""

import io
import re
import tarfile

import pytest
import webdataset as wds

from streamprune.shards import ErrorPolicy, iter_samples, read_sample_range
from streamprune.errors import SampleError
from streamprune.tario import TarError, iter_tar, write_tar
from shardgen import make_samples


def _tar_bytes(entries, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_matches_tarfile_including_long_names(fmt):
    long = "a/" + "x" * 150 + "/sample.png" if fmt != tarfile.USTAR_FORMAT else "dir/sample.png"
    entries = [(long, b"1" * 700), ("k1.cls", b"3"), ("k1.json", b"{}"), ("ünï.txt", b"")]
    data = _tar_bytes(entries, fmt)
    ours = list(iter_tar(io.BytesIO(data)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = [(m.name, tar.extractfile(m).read(), m.offset, m.offset_data) for m in tar.getmembers()]
    assert [(m.name, m.data, m.data_offset) for m in ours] == [(n, d, od) for n, d, _, od in ref]
    # Offsets point at the first header of each member (extended headers included).
    assert [m.offset for m in ours] == [o for _, _, o, _ in ref]


def test_skip_payloads_on_non_seekable_stream():
    data = _tar_bytes([("a.bin", b"x" * 5000), ("b.bin", b"y")])
    ms = list(iter_tar(_Unseekable(data), read_data=False))
    assert [(m.name, m.size, m.data) for m in ms] == [("a.bin", 5000, None), ("b.bin", 1, None)]


def test_truncated_and_garbage():
    data = _tar_bytes([("a.bin", b"x" * 3000), ("b.bin", b"y" * 3000)])
    with pytest.raises(TarError, match="truncated"):
        list(iter_tar(io.BytesIO(data[:3000])))
    got = []
    with pytest.raises(TarError):
        for m in iter_tar(io.BytesIO(data[:4500])):
            got.append(m.name)
    assert got == ["a.bin"]  # complete members before the damage are still delivered
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar(io.BytesIO(b"this is not a tar file" * 100)))


def test_samples_equal_webdataset(tmp_path):
    path = str(tmp_path / "s.tar")
    write_tar(path, make_samples(30))
    ours = list(iter_samples(path, ErrorPolicy()))
    ref = list(wds.WebDataset(path, shardshuffle=False))
    assert [s.key for s in ours] == [r["__key__"] for r in ref]
    assert all(s.members["png"] == r["png"] and s.members["cls"] == r["cls"] for s, r in zip(ours, ref))
    # A byte range from the catalog offsets decodes to exactly that sample.
    s = ours[17]
    got = read_sample_range(path, s.offset, s.end)
    assert len(got) == 1 and got[0].key == s.key and got[0].members == s.members


def test_key_split_equals_webdataset_on_tricky_names(tmp_path):
    """Keys and extensions split as webdataset does: the extension is everything after the first dot
    of the file name (not of the path), lower-cased; a dot file has no key and is skipped."""
    entries = [("v1.2/abc.seg.png", b"p"), ("v1.2/abc.seg.cls", b"1"), (".hidden", b"h"), ("v1.2/abc.JSON", b"{}"),
               ("k2.PNG", b"q"), ("k2.cls", b"2"), ("d/e.f/k3.tar.gz", b"z")]
    path = tmp_path / "t.tar"
    path.write_bytes(_tar_bytes(entries))
    ours = [(s.key, s.members) for s in iter_samples(str(path), ErrorPolicy())]
    ref = [(r["__key__"], {k: v for k, v in r.items() if not k.startswith("__")})
           for r in wds.WebDataset(str(path), shardshuffle=False)]
    assert ours == ref
    assert [k for k, _ in ours] == ["v1.2/abc", "k2", "d/e.f/k3"] and sorted(ours[0][1]) == ["json", "seg.cls", "seg.png"]


def test_pax_size_record_overrides_the_header_size():
    """A pax 'size' record (how tar writers store sizes the octal field cannot hold) sets the member's
    size and padding; here the header's own field says 0, and the next member is still found."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a.bin", b"x" * 700), ("b.bin", b"y" * 3)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "a.bin":
                info.pax_headers = {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    blob = bytearray(buf.getvalue())
    hdr = 1024  # a.bin's own header, after the pax header and its block of records
    assert blob[hdr:hdr + 5] == b"a.bin"
    blob[hdr + 124:hdr + 136] = b"00000000000\0"
    blob[hdr + 148:hdr + 156] = b"        "
    blob[hdr + 148:hdr + 155] = b"%06o\0" % sum(blob[hdr:hdr + 512])
    with tarfile.open(fileobj=io.BytesIO(bytes(blob))) as tar:
        ref = [(m.name, tar.extractfile(m).read(), m.offset, m.offset_data) for m in tar.getmembers()]
    assert [(m.name, m.data, m.offset, m.data_offset) for m in iter_tar(io.BytesIO(bytes(blob)))] == ref
    assert [len(d) for _, d, _, _ in ref] == [700, 3]


def test_member_pax_records_override_the_global_ones():
    """A member's own pax records take precedence over a global pax header's (as tarfile applies them)."""
    buf = io.BytesIO()
    names = ["d/" + "a" * 120 + ".bin", "d/" + "b" * 120 + ".bin"]  # long: each gets its own pax path record
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "global.bin"}) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 3 + i
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(data))] == ref
    assert [n for n, _ in ref] == names
    # a member's bytes start at its own (or its pax) header, after the global header, as in tarfile
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.offset for m in iter_tar(io.BytesIO(data))] == [m.offset for m in tar.getmembers()]
    assert data[1024 + 156:1024 + 157] == b"x"  # the first member's pax header, after the global one
    assert next(iter_tar(io.BytesIO(data))).offset == 1024


def test_duplicate_and_unsafe_keys(tmp_path):
    path = str(tmp_path / "d.tar")
    samples = make_samples(3)
    write_tar(path, samples + [samples[0], ("../evil", {"cls": b"1"}), ("/abs", {"cls": b"2"})])
    with pytest.raises(SampleError, match=r"shard .*d\.tar, key s0000000: duplicate key"):
        list(iter_samples(path, ErrorPolicy("fail")))
    policy = ErrorPolicy("skip")
    keys = [s.key for s in iter_samples(path, policy)]
    assert keys == ["s0000000", "s0000001", "s0000002"]
    assert [(r["key"], r["reason"]) for r in policy.records] == [
        ("s0000000", "duplicate_key"), ("../evil", "unsafe_name"), ("/abs", "unsafe_name")]


def test_a_sample_with_the_same_member_twice_is_rejected(tmp_path):
    """Two members of one sample with the same extension (k.cls, k.cls in a row): the sample is rejected as a
    duplicate naming the member, the samples around it are read."""
    path = str(tmp_path / "d.tar")
    with open(path, "wb") as f:
        f.write(_tar_bytes([("a.cls", b"0"), ("k.cls", b"1"), ("k.png", b"p"), ("k.cls", b"2"), ("z.cls", b"3")]))
    with pytest.raises(SampleError, match=r"shard .*d\.tar, key k: duplicate member k\.cls"):
        list(iter_samples(path, ErrorPolicy("fail")))
    policy = ErrorPolicy("skip")
    assert [(s.key, s.members) for s in iter_samples(path, policy)] == [("a", {"cls": b"0"}), ("z", {"cls": b"3"})]
    assert [(r["key"], r["reason"]) for r in policy.records] == [("k", "duplicate_key")]


def test_oversized_member_rejected(tmp_path):
    path = str(tmp_path / "big.tar")
    write_tar(path, [("a", {"bin": b"x" * 10}), ("b", {"bin": b"y" * 5000, "cls": b"1"}), ("c", {"bin": b"z"})])
    policy = ErrorPolicy("skip")
    assert [s.key for s in iter_samples(path, policy, max_member_bytes=1000)] == ["a", "c"]
    assert policy.records[0]["key"] == "b" and policy.records[0]["reason"] == "too_large"


def test_unsafe_name_cases():
    """The one-scan fast path for bare names decides exactly as the full check does."""
    from streamprune.shards import unsafe_name

    unsafe = ["..", "../x.png", "/abs.png", "\\abs.png", "a/../b.png", "a\\..\\b.png", "C:/w.png", "c:\\w.png",
              "x\x00y.png", "a/..", "..\\x"]
    safe = ["k.png", "a..b.png", "..x.png", "x...png", "dir/k.png", "a:b.png", "C:w.png", "dir\\k.png", "d/e/f.cls"]
    assert [n for n in unsafe if not unsafe_name(n)] == []
    assert [n for n in safe if unsafe_name(n)] == []


@pytest.mark.parametrize("field", [b"+0000017\0", b"00 0017\0", b"0_00017\0", b"0000018\0", b"-000017\0"])
def test_bad_octal_size_is_a_tar_error(field):
    """A size field int() would accept ('+', '_', inner space) or with a non-octal digit is corruption."""
    blob = bytearray(_tar_bytes([("a.cls", b"1" * 15)], tarfile.USTAR_FORMAT))
    blob[124:124 + len(field)] = field
    blob[148:156] = b"        "
    blob[148:155] = b"%06o\0" % sum(blob[:512])
    with pytest.raises(TarError, match="bad size field"):
        list(iter_tar(io.BytesIO(bytes(blob))))


def _member_bytes(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One ustar header (type ``kind``) and its padded payload, without end-of-archive blocks."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def _with_size_field(member: bytes, field: bytes) -> bytes:
    """``member`` with its header's size field replaced by ``field`` (12 bytes) and its checksum redone."""
    blob = bytearray(member)
    blob[124:136] = field
    blob[148:156] = b"        "
    blob[148:155] = b"%06o\0" % sum(blob[:512])
    return bytes(blob)


class _Unseekable(io.RawIOBase):
    """A stream that can only be read forward, 777 bytes at a time."""

    def __init__(self, data: bytes):
        self.b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buf):
        chunk = self.b.read(min(len(buf), 777))
        buf[:len(chunk)] = chunk
        return len(chunk)


def test_gnu_base256_size_field():
    """A GNU base-256 size field (how GNU tar writes sizes of 8 GiB and more) is read as tarfile reads it;
    a negative one (leading 0xff) is corruption, and the fast plain-member parser leaves it to the full reader."""
    from streamprune.tario import plain_members

    blob = _with_size_field(_member_bytes("a.cls", b"0123456789abcde"), b"\x80" + (15).to_bytes(11, "big"))
    with tarfile.open(fileobj=io.BytesIO(blob + b"\0" * 1024)) as tar:
        ref = [(m.name, m.size, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert ref == [("a.cls", 15, b"0123456789abcde")]
    assert [(m.name, m.size, m.data) for m in iter_tar(io.BytesIO(blob))] == ref
    assert plain_members(blob) == [("a.cls", b"0123456789abcde")]
    negative = _with_size_field(blob, b"\xff" * 12)
    with pytest.raises(TarError, match="negative size field in tar header at byte 0"):
        list(iter_tar(io.BytesIO(negative)))
    assert plain_members(negative) is None


@pytest.mark.timeout(20)
@pytest.mark.parametrize("garbage", [b"0 path=zero.bin\n", b"-20 path=back.bin\n", b"x1 path=nan.bin\n",
                                     b"no-space-here"])
def test_malformed_pax_records_end_the_record_list(garbage):
    """Records of a pax header are read up to the first malformed one (a length of 0 or below, not a number,
    no space): what came before applies, the rest is ignored, and reading neither stalls nor goes back."""
    records = b"20 path=renamed.bin\n" + garbage
    blob = (_member_bytes("././@PaxHeader", records, tarfile.XHDTYPE) + _member_bytes("a.bin", b"x" * 5)
            + _member_bytes("b.bin", b"y" * 3) + b"\0" * 1024)
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(blob))] == [("renamed.bin", b"x" * 5), ("b.bin", b"yyy")]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_truncation_inside_or_after_an_extended_header(fmt):
    """A tar cut inside a long-name or pax header, or right after one (its member missing), is a truncation
    naming the byte, not a tar that ends cleanly."""
    data = _tar_bytes([("d/" + "n" * 150 + ".bin", b"z" * 10)], fmt)
    assert data[156:157] in (b"L", b"x")
    with pytest.raises(TarError, match=r"truncated tar \(inside an extended header\) at byte 600"):
        list(iter_tar(io.BytesIO(data[:600])))
    with pytest.raises(TarError, match=r"truncated tar \(extended header without its member\) at byte 1024"):
        list(iter_tar(io.BytesIO(data[:1024])))


@pytest.mark.parametrize("unseekable", [False, True])
def test_truncated_payload_is_found_when_payloads_are_skipped(unseekable):
    """Skipping payloads (headers only, or members over max_member_bytes) still finds a member whose payload is
    cut off, seekable stream or not; a member missing only its padding is complete."""
    data = _tar_bytes([("a.bin", b"x" * 3000)])

    def stream(blob):
        return _Unseekable(blob) if unseekable else io.BytesIO(blob)

    for kwargs in ({"read_data": False}, {"max_member_bytes": 100}):
        with pytest.raises(TarError, match="truncated tar inside member a.bin at byte 2000"):
            list(iter_tar(stream(data[:2000]), **kwargs))
        got = [(m.name, m.size, m.data) for m in iter_tar(stream(data[:512 + 3000]), **kwargs)]
        assert got == [("a.bin", 3000, None)]


def test_plain_member_parser_gives_up_on_what_it_cannot_read_whole():
    """The fast parser of catalogued samples returns None (and the full reader takes over) for a trailing
    partial block, a payload reaching past the blob, a member over the size limit or a header without a name;
    it never returns a shortened payload."""
    from streamprune.tario import plain_members

    blob = _member_bytes("k.cls", b"7") + _member_bytes("k.png", b"p" * 600)
    assert plain_members(blob) == [("k.cls", b"7"), ("k.png", b"p" * 600)]
    assert plain_members(blob, max_member_bytes=600) == [("k.cls", b"7"), ("k.png", b"p" * 600)]
    assert plain_members(blob + b"\0" * 100) is None
    assert plain_members(blob[:-1]) is None
    assert plain_members(blob[:512 + 512 + 512]) is None
    assert plain_members(blob, max_member_bytes=599) is None
    assert plain_members(_member_bytes("", b"7")) is None


def test_member_whose_padding_is_cut_off_is_still_read():
    """A last member complete up to its payload, with its padding (and the end blocks) cut off, is
    delivered whole; one byte short of its payload is a truncation."""
    data = _tar_bytes([("a.cls", b"0123456789abcde")], tarfile.USTAR_FORMAT)
    cut = data[:512 + 15]
    ms = list(iter_tar(io.BytesIO(cut)))
    assert [(m.name, m.data, m.end) for m in ms] == [("a.cls", b"0123456789abcde", 1024)]
    with pytest.raises(TarError, match="truncated tar inside member a.cls"):
        list(iter_tar(io.BytesIO(cut[:-1])))


def test_header_sum_equals_the_plain_byte_sum():
    """The checksum's Adler-32 shortcut equals the byte sum outside the checksum field, also for
    headers of 0xff bytes (the largest sums) and random ones."""
    import os

    from streamprune.tario import _header_sum

    headers = [bytes(512), b"\xff" * 512, b"\x80" * 512] + [os.urandom(512) for _ in range(2000)]
    assert [_header_sum(h) for h in headers] == [sum(h[:148]) + sum(h[156:]) for h in headers]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_read_rows_plain_fast_path_equals_the_general_reader(tmp_path, monkeypatch, fmt):
    """Reading catalogued rows back gives the same samples whether plain samples take the fast path
    or every sample goes through the general reader: short and long (> 100 bytes) names, names in
    directories (a ustar prefix), pax records, empty and multi-block members."""
    import numpy as np

    from streamprune import shards
    from streamprune.shards import Catalog, catalog, read_rows
    from streamprune.workspace import Workspace

    long_dir = "d" * 90 + "/" + "e" * 40
    entries = []
    for i in range(12):
        long_name = "x" * 120 + f"{i:03d}" if fmt != tarfile.USTAR_FORMAT else f"x{i:03d}"  # ustar: 100 at most
        key = [f"k{i:03d}", f"{long_dir}/k{i:03d}", long_name, f"dir/sub/k{i:03d}"][i % 4]
        entries += [(f"{key}.png", bytes([i]) * (i * 300)), (f"{key}.cls", str(i).encode()),
                    (f"{key}.json", b"{}" * (i % 3))]
    path = str(tmp_path / "s.tar")
    with open(path, "wb") as f:
        f.write(_tar_bytes(entries, fmt))
    ws = str(tmp_path / "ws")
    catalog([path], ws, scheduler="sync")
    cat = Catalog(Workspace(ws))
    rows = np.arange(cat.n_samples)
    fast = [(r, s.key, s.offset, s.end, s.members) for r, s in read_rows(cat, rows, ErrorPolicy())]
    used = []
    real = shards._plain_sample
    monkeypatch.setattr(shards, "_plain_sample", lambda *a: used.append(real(*a) is not None))
    assert [s.members for _, s in read_rows(cat, rows, ErrorPolicy())] == [m[4] for m in fast]
    monkeypatch.setattr(shards, "_plain_sample", lambda *a: None)
    general = [(r, s.key, s.offset, s.end, s.members) for r, s in read_rows(cat, rows, ErrorPolicy())]
    assert fast == general and len(fast) == 12
    assert fast[1][4] == {"png": b"\x01" * 300, "cls": b"1", "json": b"{}"}
    # plain ustar/GNU samples took the fast path; long names (extended headers) did not
    assert any(used) and (fmt == tarfile.PAX_FORMAT or used.count(True) >= 6)


def _with_header_fix(member: bytes, start: int, field: bytes, signed: bool = False) -> bytes:
    """``member`` with header bytes from ``start`` replaced by ``field`` and the checksum redone (as a sum of
    signed bytes when ``signed``, as some old tar writers did)."""
    blob = bytearray(member)
    blob[start:start + len(field)] = field
    blob[148:156] = b"        "
    total = sum((b - 256 if signed and b > 127 else b) for b in blob[:512])
    blob[148:155] = b"%06o\0" % total
    return bytes(blob)


def test_octal_field_with_leading_spaces_and_signed_checksum():
    """Headers of older tar writers read as tarfile reads them: an octal size padded with spaces, and a
    checksum summed over signed bytes (a name with non-ASCII bytes makes it differ from the unsigned one)."""
    member = _member_bytes("ünï.cls", b"0123456789abcde")
    spaced = _with_header_fix(member, 124, b"         17 ")
    signed = _with_header_fix(member, 0, b"", signed=True)
    assert signed[148:156] != member[148:156]  # the two sums differ for this name
    for blob in (spaced, signed):
        with tarfile.open(fileobj=io.BytesIO(blob + b"\0" * 1024)) as tar:
            ref = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert ref == [("ünï.cls", b"0123456789abcde")]
        assert [(m.name, m.data) for m in iter_tar(io.BytesIO(blob))] == ref


def test_contiguous_file_type_is_a_regular_member():
    """Type '7' (contiguous file) is a regular file to tarfile and webdataset, and so here."""
    blob = _member_bytes("k.cls", b"7", tarfile.CONTTYPE) + _member_bytes("k.png", b"p") + b"\0" * 1024
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(blob))] == [("k.cls", b"7"), ("k.png", b"p")]
    assert [(s.key, s.members) for s in _samples(blob)] == [("k", {"cls": b"7", "png": b"p"})]


def test_a_member_of_exactly_the_size_limit_is_read():
    """--max-member-bytes is the largest size read: a member of exactly that many bytes is read, one byte
    more is rejected (reading whole payloads or skipping them)."""
    blob = _tar_bytes([("a.bin", b"x" * 1000), ("a.cls", b"1"), ("b.bin", b"y" * 1001), ("c.bin", b"z")])
    for read_data in (True, False):
        policy = ErrorPolicy("skip")
        got = [(s.key, sorted(s.members)) for s in _samples(blob, policy, read_data, 1000)]
        assert got == [("a", ["bin", "cls"]), ("c", ["bin"])]
        assert [(r["key"], r["reason"]) for r in policy.records] == [("b", "too_large")]
    assert [m.data for m in iter_tar(io.BytesIO(blob), max_member_bytes=1000)][:2] == [b"x" * 1000, b"1"]


def _samples(blob: bytes, policy: ErrorPolicy | None = None, read_data: bool = True, limit: int = 1 << 20):
    """The samples of an in-memory tar, through the shard reader's generator stages."""
    from streamprune.shards import group_samples, iter_members

    policy = policy or ErrorPolicy("fail")
    members = iter_members(io.BytesIO(blob), "t.tar", policy, read_data=read_data, max_member_bytes=limit)
    return list(group_samples(members, "t.tar", policy))


def test_pax_value_may_hold_an_equals_sign():
    """A pax record splits at its first '=' (keywords have none; values may, e.g. 'path=id=5/k.cls')."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.cls")
        info.size, info.pax_headers = 1, {"path": "id=5/k.cls", "comment": "a=b"}
        tar.addfile(info, io.BytesIO(b"1"))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["id=5/k.cls"]
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(data))] == [("id=5/k.cls", b"1")]


def test_a_tar_cut_inside_its_first_member_is_truncated_not_not_a_tar(tmp_path):
    """Damage after a valid first header is a truncated tar, even before any member was complete; only a
    first header that does not parse is 'not a tar file'."""
    data = _tar_bytes([("a.bin", b"x" * 3000), ("b.bin", b"y")])
    cut = r"^corrupt or truncated tar \(truncated tar inside member a\.bin at byte 2000\)"
    for blob, expect in ((data[:2000], cut), (b"garbage" * 100, r"^not a tar file \(bad tar header checksum")):
        path = tmp_path / "t.tar"
        path.write_bytes(blob)
        policy = ErrorPolicy("skip")
        assert list(iter_samples(str(path), policy)) == []
        assert [r["reason"] for r in policy.records] == ["corrupt_tar"]
        assert re.match(expect, policy.records[0]["message"]), policy.records[0]["message"]


def test_read_rows_coalesces_nearby_samples_into_one_ranged_read(tmp_path, monkeypatch):
    """Requested samples of a shard less than ``coalesce_gap`` bytes apart are fetched by one ranged read
    (one request on object storage); a larger gap starts a new read. The samples are the same either way."""
    import numpy as np

    from streamprune import storage
    from streamprune.shards import Catalog, catalog, read_rows
    from streamprune.workspace import Workspace

    path = str(tmp_path / "s.tar")
    write_tar(path, make_samples(20))
    ws = str(tmp_path / "ws")
    catalog([path], ws, scheduler="sync")
    cat = Catalog(Workspace(ws))
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda url, a, b, so=None: reads.append((a, b)) or real(url, a, b, so))
    rows = np.array([0, 1, 2, 10, 19])
    part = cat.part(0)
    want = [(f"s{r:07d}", int(part.offset[r]), int(part.end[r])) for r in rows]
    for gap, n_reads in ((1 << 20, 1), (0, 3)):
        reads.clear()
        got = [(s.key, s.offset, s.end) for _, s in read_rows(cat, rows, ErrorPolicy(), coalesce_gap=gap)]
        assert got == want and len(reads) == n_reads
    assert reads == [(want[0][1], want[2][2]), (want[3][1], want[3][2]), (want[4][1], want[4][2])]


def test_only_an_all_zero_block_ends_the_archive():
    """A block starting with NUL but not all zeros is a damaged header (reported), not the end of the archive
    (which would drop every member after it without a word)."""
    good = _member_bytes("a.cls", b"1")
    damaged = b"\0" + b"junk" * 127 + b"\0\0\0"
    got = []
    with pytest.raises(TarError, match="bad tar header checksum .* at byte 1024"):
        for m in iter_tar(io.BytesIO(good + damaged + _member_bytes("b.cls", b"2"))):
            got.append(m.name)
    assert got == ["a.cls"]
    assert [m.name for m in iter_tar(io.BytesIO(good + b"\0" * 512 + _member_bytes("b.cls", b"2")))] == ["a.cls"]


def test_ustar_prefix_joins_the_name_with_a_slash():
    """A ustar name too long for the name field is split at a '/' into prefix and name; read back whole."""
    name = "d" * 90 + "/" + "e" * 40 + "/k.cls"
    data = _tar_bytes([(name, b"1")], tarfile.USTAR_FORMAT)
    assert data[345:346] == b"d" and data[:1] == b"e"  # stored split
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(data))] == [(name, b"1")]


def test_extended_header_over_the_bound_is_refused_unread():
    """A pax or long-name header is read into memory, so one over MAX_EXTENDED_HEADER is corruption."""
    from streamprune.tario import MAX_EXTENDED_HEADER

    for kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
        ext = _with_size_field(_member_bytes("././@LongLink", b"", kind), b"%011o\0" % (MAX_EXTENDED_HEADER + 1))
        with pytest.raises(TarError, match=f"extended header of {MAX_EXTENDED_HEADER + 1} bytes"):
            list(iter_tar(io.BytesIO(ext + b"\0" * 1024)))


def test_read_rows_reports_a_rewritten_sample_holding_a_member_twice(tmp_path):
    """A catalogued sample whose bytes now hold the same member twice (shard rewritten in place, same sizes)
    is a changed shard, not a sample whose second copy silently wins; the samples after it are still read."""
    import numpy as np

    from streamprune.shards import Catalog, catalog, read_rows
    from streamprune.workspace import Workspace

    path = tmp_path / "s.tar"
    long = "l" * 120  # a long name: read back by the general reader, after the damaged sample
    path.write_bytes(_tar_bytes([("a.cls", b"0"), ("k.cls", b"1"), ("k.txt", b"2"), (f"{long}.cls", b"3")]))
    ws = str(tmp_path / "ws")
    catalog([str(path)], ws, scheduler="sync")
    path.write_bytes(_tar_bytes([("a.cls", b"0"), ("k.cls", b"1"), ("k.cls", b"2"), (f"{long}.cls", b"3")]))
    policy = ErrorPolicy("skip")
    got = [(s.key, s.members) for _, s in read_rows(Catalog(Workspace(ws)), np.arange(3), policy)]
    assert got == [("a", {"cls": b"0"}), (long, {"cls": b"3"})]
    assert [(r["key"], r["reason"]) for r in policy.records] == [("k", "changed_shard")]


def test_links_and_directories_are_not_members():
    """Only regular files are members: a symlink or hard link named like a sample file, and a directory,
    are skipped (webdataset reads regular files only), the members around them are read."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in (("k.cls", tarfile.REGTYPE, b"1"), ("k.lnk", tarfile.SYMTYPE, b""),
                                 ("k.hard", tarfile.LNKTYPE, b""), ("k.d", tarfile.DIRTYPE, b""),
                                 ("k.png", tarfile.REGTYPE, b"p")):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), "k.cls" if kind != tarfile.REGTYPE else ""
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    assert [(m.name, m.data) for m in iter_tar(io.BytesIO(data))] == [("k.cls", b"1"), ("k.png", b"p")]
    assert [(s.key, s.members) for s in _samples(data)] == [("k", {"cls": b"1", "png": b"p"})]


def test_read_rows_reports_a_header_damaged_since_catalog(tmp_path):
    """A catalogued sample whose member header no longer checks out (a byte flipped on disk) is reported as a
    changed shard by the fast plain-sample path too, never returned; a header cut short is a truncation."""
    import numpy as np

    from streamprune.shards import Catalog, catalog, read_rows
    from streamprune.workspace import Workspace

    path = tmp_path / "s.tar"
    data = _tar_bytes([("a.cls", b"0"), ("k.cls", b"1"), ("z.cls", b"3")])
    path.write_bytes(data)
    ws = str(tmp_path / "ws")
    catalog([str(path)], ws, scheduler="sync")
    damaged = bytearray(data)
    damaged[1024 + 136] ^= 0x01  # k.cls's mtime field: the header's checksum no longer matches
    path.write_bytes(bytes(damaged))
    policy = ErrorPolicy("skip")
    got = [s.key for _, s in read_rows(Catalog(Workspace(ws)), np.arange(3), policy)]
    assert got == ["a", "z"] and [(r["key"], r["reason"]) for r in policy.records] == [("k", "changed_shard")]
    assert "bad tar header checksum" in policy.records[0]["message"]
    with pytest.raises(TarError, match="truncated tar header at byte 2048"):
        list(iter_tar(io.BytesIO(data[:2048 + 300])))
