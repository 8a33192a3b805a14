"""Hostile and broken input: every problem is one line naming shard and key, or (``--on-error
skip``) one record in errors.jsonl counted by ``status``; nothing is dropped silently.

Covered elsewhere: truncated tars, non-tar files, empty shards and duplicate keys
(test_catalog), a shard changed after catalog (test_prune), undecodable images at embed
(test_embed), another config / another version in streamprune.json (test_workspace).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from streamprune.decode import MAX_LABEL, DecodeConfig, check_label, decode_input, decode_label
from streamprune.errors import SampleError, StreamPruneError
from streamprune.shards import DEFAULT_MAX_MEMBER_BYTES, ErrorPolicy, Sample, catalog, iter_members, iter_samples
from helpers import run_cli
from shardgen import make_samples, npy_bytes, write_shards


# building hostile tars -------------------------------------------------------------------------
def _entries(samples) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()]


def _members(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    """Tar member blocks for (name, data) pairs, without the end-of-archive marker."""
    out = b""
    for name, data in entries:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        out += info.tobuf(fmt) + data + b"\0" * (-len(data) % 512)
    return out


def _tar(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    return _members(entries, fmt) + b"\0" * 1024


def _header(name: str, size: int, size_field: bytes | None = None) -> bytes:
    """One ustar header block for a regular file, with an optional raw size field (checksum fixed)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 0
    hdr = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size_field is not None:
        hdr[124:136] = size_field.ljust(12, b"\0")[:12]
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _pax_header(records: dict[str, str], claimed_size: int | None = None) -> bytes:
    """A pax extended header block (type 'x') carrying ``records``, optionally lying about its size."""
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + len(str(len(rec)))
        n += len(str(n)) - len(str(len(rec)))
        body += str(n).encode() + rec
    info = tarfile.TarInfo("././@PaxHeader")
    info.size, info.type, info.mtime = len(body), tarfile.XHDTYPE, 0
    hdr = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if claimed_size is not None:
        hdr[124:136] = b"%011o\0" % claimed_size
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr) + body.ljust((len(body) + 511) // 512 * 512, b"\0")


def _hostile_shards(d: str) -> dict[str, tuple[str, set, int]]:
    """name -> (path, expected (key, reason) records, number of good samples)."""
    os.makedirs(d, exist_ok=True)
    out = {}

    def put(name, data, expect, n_good):
        path = os.path.join(d, name)
        open(path, "wb").write(data)
        out[name] = (path, expect, n_good)

    put("a-good.tar", _tar(_entries(make_samples(5, start=0))), set(), 5)
    # A header in the middle with a bad checksum: the sample being read when it hit is dropped.
    data = bytearray(_tar(_entries(make_samples(5, start=100))))
    second = data.find(b"s0000102.png")
    data[second] ^= 0x01
    put("b-badsum.tar", bytes(data), {("s0000101", "corrupt_tar")}, 1)
    # A header whose checksum is right but whose size field is garbage.
    good = _members(_entries(make_samples(1, start=200)))
    put("c-badsize.tar", good + _header("s0000201.png", 10, size_field=b"12x4567") + b"\0" * 2048,
        {("s0000200", "corrupt_tar")}, 0)
    # Names that would escape an extraction directory; rejected, never sanitised into a key.
    unsafe = [("../evil.png", b"x"), ("../evil.cls", b"1"), ("/abs/x.png", b"x"), ("ok/../../y.png", b"x"),
              ("../../etc/passwd", b"root"), ("C:/win.png", b"x")]
    put("d-unsafe.tar", _tar(_entries(make_samples(1, start=300)) + unsafe + _entries(make_samples(1, start=301))),
        {("../evil", "unsafe_name"), ("/abs/x", "unsafe_name"), ("ok/../../y", "unsafe_name"),
         ("../../etc/passwd", "unsafe_name"), ("C:/win", "unsafe_name")}, 2)
    # One member over --max-member-bytes (4096 in these tests).
    big = make_samples(3, start=400)
    big[1][1]["bin"] = b"z" * 5000
    put("e-big.tar", _tar(_entries(big)), {("s0000401", "too_large")}, 2)
    # A pax header claiming 2 GiB (would be read into memory) and one with a negative size record.
    two = _members(_entries(make_samples(2, start=500)))
    put("f-paxbomb.tar", two + _pax_header({"path": "s0000502.png"}, claimed_size=2 << 30),
        {("s0000501", "corrupt_tar")}, 1)
    two = _members(_entries(make_samples(2, start=600)))
    put("g-negsize.tar", two + _pax_header({"size": "-5"}) + _header("s0000602.png", 0) + b"\0" * 1024,
        {("s0000601", "corrupt_tar")}, 1)
    return out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# catalog: fail mode --------------------------------------------------------------------------
@pytest.mark.parametrize("name,pattern", [
    ("b-badsum.tar", r"key s0000101: corrupt or truncated tar after member s0000101\.json \(bad tar header "
                     r"checksum .* at byte \d+\); the rest of the shard is unreadable"),
    ("c-badsize.tar", r"key s0000200: corrupt or truncated tar .*bad size field"),
    ("d-unsafe.tar", r"key \.\./evil: unsafe member name '\.\./evil\.png'"),
    ("e-big.tar", r"key s0000401: member s0000401\.bin is 5000 bytes, over the limit of 4096"),
    ("f-paxbomb.tar", r"key s0000501: .*extended header of 2147483648 bytes"),
    ("g-negsize.tar", r"key s0000601: .*bad pax size record '-5'"),
])
def test_hostile_tar_fails_with_one_line(tmp_path, name, pattern):
    shards = _hostile_shards(str(tmp_path / "data"))
    ws = str(tmp_path / "ws")
    with pytest.raises(SampleError) as err:
        catalog([shards["a-good.tar"][0], shards[name][0]], ws, scheduler="sync", max_member_bytes=4096)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"shard {shards[name][0]}, "), msg
    assert re.search(pattern, msg), msg
    assert not os.path.exists(os.path.join(ws, "_stages", "catalog.json"))


def test_hostile_tar_cli_one_line(tmp_path):
    shards = _hostile_shards(str(tmp_path / "data"))
    out = run_cli("catalog", shards["a-good.tar"][0], shards["d-unsafe.tar"][0], "-w", str(tmp_path / "ws"),
                  "--scheduler", "sync", check=False)
    assert out.returncode == 1
    line = _one_line(out.stderr)
    assert re.search(r"^Error: shard .*d-unsafe\.tar, key \.\./evil: unsafe member name", line), line


def test_hostile_tars_skipped_are_all_recorded(tmp_path):
    shards = _hostile_shards(str(tmp_path / "data"))
    ws = str(tmp_path / "ws")
    out = run_cli("catalog", str(tmp_path / "data"), "-w", ws, "--scheduler", "sync", "--on-error", "skip",
                  "--max-member-bytes", "4096")
    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    got = {(os.path.basename(e["shard"]), e["key"], e["reason"]) for e in errors}
    want = {(name, key, reason) for name, (_, expect, _) in shards.items() for key, reason in expect}
    assert got == want and len(errors) == len(want)
    assert all(e["stage"] == "catalog" and e["message"] for e in errors)
    assert f"{len(want)} errors recorded" in out.stdout
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert st["errors"]["total"] == len(want) and st["errors"]["by_stage"] == {"catalog": len(want)}
    assert st["n_samples"] == sum(n for _, _, n in shards.values())
    # No unsafe name became a key, and nothing was written outside the workspace.
    from streamprune.shards import Catalog
    from streamprune.workspace import Workspace

    keys = Catalog(Workspace(ws)).keys()
    assert not [k for k in keys if ".." in k or k.startswith("/") or ":" in k]
    written = {os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs}
    assert not [p for p in written if not p.startswith(("data" + os.sep, "ws" + os.sep))]
    assert not [p for p in written if re.search(r"evil|passwd|win\.png|y\.png", p)]


# huge members --------------------------------------------------------------------------------
class _LazyTar(io.RawIOBase):
    """A non-seekable tar stream with one member of ``size`` zero bytes, generated on the fly."""

    def __init__(self, size: int):
        before = _members(_entries(make_samples(1, start=0)))
        after = _tar(_entries(make_samples(1, start=2)))
        self.parts = [before + _header("s0000001.bin", size), size + (-size % 512), after]
        self.max_request = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self.max_request = max(self.max_request, len(buf))
        while self.parts:
            head = self.parts[0]
            if isinstance(head, int):
                n = min(head, len(buf))
                buf[:n] = bytes(n)
                self.parts[0] = head - n
            else:
                n = min(len(head), len(buf))
                buf[:n] = head[:n]
                self.parts[0] = head[n:]
            if not self.parts[0]:
                self.parts.pop(0)
            if n:
                return n
        return 0


def test_huge_member_is_rejected_without_being_read_into_memory():
    assert DEFAULT_MAX_MEMBER_BYTES == 64 << 20
    stream = _LazyTar(256 << 20)
    policy = ErrorPolicy("skip")
    tracemalloc.start()
    try:
        members = iter_members(io.BufferedReader(stream, 1 << 16), "lazy.tar", policy, read_data=True)
        from streamprune.shards import group_samples

        keys = [s.key for s in group_samples(members, "lazy.tar", policy)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert keys == ["s0000000", "s0000002"]
    assert [(r["key"], r["reason"]) for r in policy.records] == [("s0000001", "too_large")]
    assert "268435456 bytes, over the limit of 67108864" in policy.records[0]["message"]
    assert peak < 8 << 20 and stream.max_request <= 1 << 20  # streamed past in 1 MiB reads


def _sparse_tar(path: str, size: int) -> None:
    """A tar holding a ``size``-byte member of zeros as a sparse file (no disk, no write time)."""
    with open(path, "wb") as f:
        f.write(_members(_entries(make_samples(1, start=0))))
        f.write(_header("s0000001.bin", size))
        f.seek(size + (-size % 512), 1)
        f.write(_tar(_entries(make_samples(1, start=2))))


def test_huge_member_default_limit_and_bounded_memory_through_cli(tmp_path):
    path = str(tmp_path / "data" / "huge.tar")
    os.makedirs(os.path.dirname(path))
    _sparse_tar(path, 100 << 20)
    if os.stat(path).st_blocks * 512 > 50 << 20:
        pytest.skip("the temporary filesystem does not keep sparse files")
    # The library default (64 MiB) rejects a 100 MiB member.
    policy = ErrorPolicy("skip")
    assert [s.key for s in iter_samples(path, policy)] == ["s0000000", "s0000002"]
    assert policy.records[0]["reason"] == "too_large"
    # A 6 GiB member through the CLI: one line, and the process never holds it.
    _sparse_tar(path, 6 << 30)
    out = run_cli("catalog", path, "-w", str(tmp_path / "ws"), "--scheduler", "sync", "--max-member-bytes",
                  str(64 << 20), check=False)
    assert out.returncode == 1
    line = _one_line(out.stderr)
    assert re.search(r"huge\.tar, key s0000001: member s0000001\.bin is 6442450944 bytes, over the limit of "
                     r"67108864 \(--max-member-bytes\); not read", line), line


def test_huge_member_cli_peak_memory(tmp_path):
    path = str(tmp_path / "huge.tar")
    _sparse_tar(path, 6 << 30)
    if os.stat(path).st_blocks * 512 > 50 << 20:
        pytest.skip("the temporary filesystem does not keep sparse files")
    code = ("import resource, sys\n"
            "from streamprune.shards import catalog\n"
            f"m = catalog([{path!r}], {str(tmp_path / 'ws')!r}, scheduler='sync', on_error='skip')\n"
            "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(m['counts']['n_samples'], m['counts']['errors'], rss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "STREAMPRUNE_PROGRESS": "0"})
    n, n_err, maxrss_kb = map(int, out.stdout.split())
    assert (n, n_err) == (2, 1), out.stderr
    assert maxrss_kb < 1 << 20, f"peak RSS {maxrss_kb / 1024:.0f} MiB for a 6 GiB member"


# labels, vectors, images ---------------------------------------------------------------------
def _sample(**members) -> Sample:
    return Sample("k1", 0, 0, {k: v for k, v in members.items()})


@pytest.mark.parametrize("cls,label", [(b"3", 3), (b" 3\n", 3), (b"+2", 2), (b"0", 0)])
def test_good_cls_labels(cls, label):
    assert decode_label(_sample(cls=cls), DecodeConfig(), "s.tar") == label


@pytest.mark.parametrize("cls", [b"abc", b"1.5", b"", b"1_0", "\u0663".encode(), b"\xff\xfe", b"3 4", b"0x10"])
def test_bad_cls_labels(cls):
    with pytest.raises(SampleError, match=r"shard s\.tar, key k1: label .* is not an integer") as err:
        decode_label(_sample(cls=cls), DecodeConfig(), "s.tar")
    assert err.value.reason == "bad_label"


@pytest.mark.parametrize("doc,label", [({"label": 2}, 2), ({"label": 2.0}, 2), ({"label": "4"}, 4)])
def test_good_json_labels(doc, label):
    assert decode_label(_sample(json=json.dumps(doc).encode()), DecodeConfig(label_key="json.label"), "s.tar") == label


@pytest.mark.parametrize("raw,reason", [
    (b'{"label": 1.5}', "bad_label"), (b'{"label": true}', "bad_label"), (b'{"label": "x"}', "bad_label"),
    (b'{"label": null}', "bad_label"), (b'{"label": NaN}', "bad_label"), (b'{"label": Infinity}', "bad_label"),
    (b'{"label": [1]}', "bad_label"), (b'{"other": 1}', "missing_label"), (b"[1, 2]", "missing_label"),
    (b"{not json", "undecodable"), (b"\xff", "undecodable"),
])
def test_bad_json_labels(raw, reason):
    with pytest.raises(SampleError, match=r"shard s\.tar, key k1: ") as err:
        decode_label(_sample(json=raw), DecodeConfig(label_key="json.label"), "s.tar")
    assert err.value.reason == reason


def test_label_range():
    check_label(3, 4, "s.tar", "k1")
    check_label(MAX_LABEL, None, "s.tar", "k1")
    for label, num_classes in [(-1, None), (-1, 4), (4, 4), (MAX_LABEL + 1, None), (10**30, None)]:
        with pytest.raises(SampleError, match=r"shard s\.tar, key k1: label .*(out of range|implausibly large)"):
            check_label(label, num_classes, "s.tar", "k1")
    with pytest.raises(SampleError, match=r"label -1 out of range \[0, 1048576\)$"):  # not "[0, None)"
        check_label(-1, None, "s.tar", "k1")


@pytest.mark.parametrize("data,message", [
    (npy_bytes(np.array([1.0, np.nan], np.float32)), "NaN/inf"),
    (npy_bytes(np.array([1.0, np.inf])), "NaN/inf"),
    (npy_bytes(np.array([1e300, 1.0])), "NaN/inf"),  # finite float64, inf as float32
    (npy_bytes(np.array(["a", "b"])), "expected numbers"),
    (npy_bytes(np.zeros(10, np.float32))[:-8], "undecodable .npy"),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }".ljust(128)
     + b"\0" * 16, "undecodable .npy"),  # a header claiming 8 TB: refused before numpy allocates
    (b"not numpy", "undecodable .npy"),
])
def test_bad_vectors(data, message):
    with pytest.raises(SampleError, match=rf"shard s\.tar, key k1: .*{re.escape(message)}"):
        decode_input(_sample(npy=data), DecodeConfig(input="vector"), "s.tar")


def _npy_file(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, arr, version=version, allow_pickle=False)
    return f.getvalue()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from(["<f4", ">f4", "<f8", "<f2", "|i1", "<i4", ">i8", "|u1", "<u2"]),
       fortran=st.booleans(), version=st.sampled_from([None, (1, 0), (2, 0), (3, 0)]),
       trailing=st.sampled_from([b"", b"xyz"]))
def test_vectors_decode_as_np_load_reads_them(shape, dtype, fortran, version, trailing):
    """Headers are parsed once per distinct header, the values read with frombuffer: the vector is
    np.load's array flattened, for every byte order, layout and format version, and writable."""
    rng = np.random.default_rng(len(shape))
    arr = (rng.random(shape) * 100).astype(dtype)
    arr = np.asfortranarray(arr) if fortran else arr
    data = _npy_file(arr, version) + trailing
    want = np.asarray(np.load(io.BytesIO(data), allow_pickle=False), np.float32).reshape(-1)
    for _ in range(2):  # the second read takes the cached header
        got = decode_input(_sample(npy=data), DecodeConfig(input="vector"), "s.tar")
        assert got.dtype == np.float32 and got.flags.writeable and np.array_equal(got, want)


def test_object_and_unknown_version_npy_are_refused():
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }".ljust(117) + b"\n"
    obj = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 16
    with pytest.raises(SampleError, match="undecodable .npy .*Object arrays cannot be loaded"):
        decode_input(_sample(npy=obj), DecodeConfig(input="vector"), "s.tar")
    v9 = b"\x93NUMPY\x09\x00" + _npy_file(np.zeros(2, np.float32))[8:]
    with pytest.raises(SampleError, match="undecodable .npy"):
        decode_input(_sample(npy=v9), DecodeConfig(input="vector"), "s.tar")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_bad_images():
    from shardgen import png_bytes

    png = png_bytes(np.zeros((8, 8)))
    for data, message in [(b"garbage", "undecodable image"), (png[:45], "undecodable image"),
                          (_png_header(9000, 9000), "image of 9000x9000 pixels is over the limit of 67108864"),
                          (_png_header(30000, 30000), "undecodable image .*DecompressionBombError")]:
        with pytest.raises(SampleError, match=rf"shard s\.tar, key k1: {message}"):
            decode_input(_sample(png=data), DecodeConfig(), "s.tar")


def test_auto_input_prefers_the_image_of_a_sample_with_both():
    from shardgen import png_bytes

    sample = _sample(png=png_bytes(np.zeros((8, 8))), npy=npy_bytes(np.ones(4, np.float32)))
    assert decode_input(sample, DecodeConfig(), "s.tar").shape == (1, 8, 8)
    assert decode_input(sample, DecodeConfig(input="vector"), "s.tar").shape == (4,)


@pytest.mark.parametrize("mode", ["1", "I;16"])
def test_bilevel_and_wide_grayscale_images_decode_to_one_channel(mode):
    """Grayscale stored as 1-bit or 16-bit pixels is grayscale: one channel under --image-mode auto."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (8, 6)).save(buf, format="PNG")
    assert decode_input(_sample(png=buf.getvalue()), DecodeConfig(), "s.tar").shape == (1, 6, 8)


def test_a_chunk_is_decoded_to_the_datasets_shape_not_its_first_samples(tmp_path):
    """embed's reader holds each chunk to the dataset's input shape: an odd first sample is the one
    refused, not the rest of its chunk."""
    from streamprune.decode_tasks import decode_range
    from streamprune.tario import write_tar
    from streamprune.workspace import Workspace

    vectors = [np.ones(4, np.float32)] + [np.ones(8, np.float32)] * 3
    write_tar(str(tmp_path / "a.tar"), [(f"k{i}", {"npy": npy_bytes(v), "cls": b"1"}) for i, v in enumerate(vectors)])
    ws = str(tmp_path / "ws")
    catalog([str(tmp_path / "a.tar")], ws, scheduler="sync")
    spec = {"on_error": "skip", "decode": DecodeConfig(input="vector").to_dict(), "input_shape": [8]}
    out = decode_range(Workspace(ws), 0, 4, spec)
    assert out["x"].shape == (4, 8) and out["valid"].tolist() == [False, True, True, True]


def test_grayscale_image_among_colour_ones_gets_three_channels(tmp_path):
    """A grayscale image in a colour dataset (ImageNet has some) is decoded as its RGB conversion, not
    rejected as a shape mismatch with advice (--image-size) that cannot help; a colour image among
    grayscale ones is refused with the option that mends it, --image-mode RGB, and with it decodes."""
    from PIL import Image

    from shardgen import png_bytes
    from streamprune.decode import decode_rows
    from streamprune.shards import Catalog
    from streamprune.tario import write_tar
    from streamprune.workspace import Workspace

    rng = np.random.default_rng(0)
    colour = [rng.integers(0, 255, size=(12, 12, 3)) for _ in range(3)]
    gray = rng.integers(0, 255, size=(12, 12))
    write_tar(str(tmp_path / "a.tar"), [(f"k{i}", {"png": png_bytes(img), "cls": b"1"})
                                        for i, img in enumerate([colour[0], gray, colour[1], colour[2]])])
    catalog([str(tmp_path / "a.tar")], str(tmp_path / "ws"), scheduler="sync")
    cat = Catalog(Workspace(str(tmp_path / "ws")))
    for size in (None, 8):
        xs, _, valid = decode_rows(cat, np.arange(4), DecodeConfig(image_size=size), ErrorPolicy("fail"), None)
        assert valid.all() and xs.shape == (4, 3, size or 12, size or 12)
        img = Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
        img = img if size is None else img.resize((size, size), Image.BILINEAR)
        assert np.array_equal(xs[1], np.asarray(img).transpose(2, 0, 1))
    with pytest.raises(SampleError, match=r"key k0: input shape \(3, 12, 12\) differs from the dataset's "
                                          r"\(1, 12, 12\) \(set --image-mode RGB\)$"):
        decode_rows(cat, np.arange(4), DecodeConfig(), ErrorPolicy("fail"), (1, 12, 12))
    write_tar(str(tmp_path / "b.tar"), [(f"k{i}", {"png": png_bytes(img), "cls": b"1"})
                                        for i, img in enumerate([gray, colour[0], colour[1]])])  # grayscale first
    catalog([str(tmp_path / "b.tar")], str(tmp_path / "ws-b"), scheduler="sync")
    cat = Catalog(Workspace(str(tmp_path / "ws-b")))
    handler = ErrorPolicy("skip")
    assert decode_rows(cat, np.arange(3), DecodeConfig(), handler, None)[2].tolist() == [True, False, False]
    assert [r["message"].endswith("(set --image-mode RGB)") for r in handler.records] == [True, True]
    xs, _, valid = decode_rows(cat, np.arange(3), DecodeConfig(image_mode="RGB"), ErrorPolicy("fail"), None)
    assert valid.all() and xs.shape == (3, 3, 12, 12) and np.array_equal(xs[0], xs[0][[1, 2, 0]])


# bad rows through score and embed (CLI) ------------------------------------------------------
def _bad_vector_shard(path: str) -> dict[str, str]:
    """A shard of npy samples each broken in one way; returns key -> what is wrong."""
    rng = np.random.default_rng(0)
    good = lambda: npy_bytes(rng.normal(size=16).astype(np.float32))  # noqa: E731
    liar = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (16000000000,), }".ljust(128)
    rows = {
        "b0000000": ({"npy": good(), "cls": b"-1"}, "label -1 out of range"),
        "b0000001": ({"npy": good(), "cls": b"abc"}, "is not an integer"),
        "b0000002": ({"npy": good(), "cls": b"7"}, "label 7 out of range [0, 4)"),
        "b0000003": ({"npy": good(), "cls": b"1" * 30}, "implausibly large"),
        "b0000004": ({"npy": npy_bytes(np.full(16, np.nan, np.float32)), "cls": b"1"}, "NaN/inf"),
        "b0000005": ({"npy": npy_bytes(np.full(16, np.inf, np.float32)), "cls": b"1"}, "NaN/inf"),
        "b0000006": ({"npy": liar + b"\0" * 64, "cls": b"1"}, "undecodable .npy"),
        "b0000007": ({"npy": good()[:-30], "cls": b"1"}, "undecodable .npy"),
        "b0000008": ({"cls": b"1"}, "no input member"),
    }
    open(path, "wb").write(_tar(_entries([(k, m) for k, (m, _) in rows.items()])))
    return {k: why for k, (_, why) in rows.items()}


@pytest.mark.slow
def test_bad_rows_through_score_and_embed(tmp_path):
    from streamprune.embed import embed
    from streamprune.subset import subset
    from streamprune.train import TrainConfig, train

    shards = write_shards(str(tmp_path / "data"), 1, 40, kind="npy", dim=16)
    bad_path = str(tmp_path / "data" / "z-bad.tar")
    bad = _bad_vector_shard(bad_path)
    ws = str(tmp_path / "ws")
    catalog([*shards, bad_path], ws, scheduler="sync")
    subset(ws, fraction=1.0, seed=0)
    # Through the CLI, the first bad row stops the run with one line.
    out = run_cli("score", "-w", ws, "--epochs", "2", "--window", "2", "--model", "mlp", "--input", "vector",
                  "--num-classes", "4", "--scheduler", "sync", check=False)
    assert out.returncode == 1
    line = _one_line(out.stderr)
    assert re.search(r"z-bad\.tar, key b0000000: label -1 out of range", line), line
    cfg = TrainConfig(model="mlp", epochs=1, batch_size=16, num_classes=4)
    train(ws, cfg, DecodeConfig(input="vector"), scheduler="sync", on_error="skip")
    with pytest.raises(SampleError, match=r"z-bad\.tar, key b0000000: label -1 out of range"):
        embed(ws, encoder="features", decode=DecodeConfig(input="vector"), scheduler="sync")
    embed(ws, encoder="features", decode=DecodeConfig(input="vector"), scheduler="sync", on_error="skip")

    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    by_stage: dict[str, dict[str, dict]] = {}
    for e in errors:
        assert os.path.basename(e["shard"]) == "z-bad.tar"
        assert e["key"] not in by_stage.setdefault(e["stage_key"], {}), e  # one record per sample
        by_stage[e["stage_key"]][e["key"]] = e
    assert set(by_stage["train"]) == set(bad)
    for key, why in bad.items():
        want = "out of range [0, 4)" if key == "b0000003" else why  # --num-classes given: plain range check
        assert want in by_stage["train"][key]["message"], (key, by_stage["train"][key])
    # embed has no class count: label 7 is accepted there, every other broken row is rejected.
    assert set(by_stage["embed"]) == set(bad) - {"b0000002"}
    assert "implausibly large" in by_stage["embed"]["b0000003"]["message"]
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert st["errors"]["by_stage"] == {"train": len(bad), "embed": len(bad) - 1}
    # Nothing dropped silently: every row is valid or has a record.
    counts = st["stages"]["train"]["counts"]
    assert (counts["n_rows"], counts["n_valid"]) == (40 + len(bad), 40)
    valid = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")["valid"][:]
    assert valid.sum() == 40 + 1 and not valid[[40 + i for i in range(9) if i != 2]].any()


# NaN embeddings -----------------------------------------------------------------------------
NAN_ENCODER = """
import torch

class NanWhenHuge(torch.nn.Module):
    def forward(self, x):
        return torch.where(x[:, :1] > 500, torch.full_like(x, float("nan")), x)

def make(input_shape, num_classes):
    torch.manual_seed(0)
    return torch.nn.Sequential(NanWhenHuge(), torch.nn.Linear(input_shape[0], 6), torch.nn.Linear(6, num_classes))
"""


def test_nan_embeddings_become_invalid_rows_not_a_poisoned_index(tmp_path, monkeypatch):
    from streamprune.embed import embed
    from streamprune.index import build_index

    (tmp_path / "nanenc.py").write_text(NAN_ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    samples = make_samples(60, kind="npy", dim=8)
    poisoned = [5, 17, 42]
    for i in poisoned:
        samples[i][1]["npy"] = npy_bytes(np.full(8, 1000.0, np.float32))  # finite input, NaN embedding
    from streamprune.tario import write_tar

    os.makedirs(tmp_path / "data")
    write_tar(str(tmp_path / "data" / "s.tar"), samples)
    ws = str(tmp_path / "ws")
    catalog([str(tmp_path / "data" / "s.tar")], ws, scheduler="sync")
    decode = DecodeConfig(input="vector")
    with pytest.raises(StreamPruneError, match=r"^shard .*s\.tar, key s0000005: embedding contains NaN/inf$"):
        embed(ws, encoder="nanenc:make", decode=decode, scheduler="sync")
    m = embed(ws, encoder="nanenc:make", decode=decode, scheduler="sync", on_error="skip")
    assert m["counts"]["n_valid"] == 57 and m["counts"]["errors"] == 3
    g = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")
    emb, valid = g["emb"][:], g["valid"][:]
    assert np.isfinite(emb).all() and list(np.flatnonzero(~valid)) == poisoned
    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    assert sorted(e["key"] for e in errors if e["stage"] == "embed") == [f"s{i:07d}" for i in poisoned]
    build_index(ws, graph="all", k=5, scheduler="sync")
    graph = zarr.open_group(os.path.join(ws, "graph", "all.zarr"), mode="r")
    nb, dist = graph["neighbors"][:], graph["distances"][:]
    assert not np.isin(nb, poisoned).any()  # an invalid row is nobody's neighbour
    assert np.isfinite(dist[nb >= 0]).all()


# damaged workspace files -------------------------------------------------------------------------
def test_damaged_marker_and_catalog_are_one_line(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 2, 5)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    marker = os.path.join(ws, "_stages", "catalog.json")
    good = open(marker).read()
    open(marker, "w").write(good[: len(good) // 2])  # e.g. copied by a tool that died
    out = run_cli("subset", "-w", ws, check=False)
    assert out.returncode == 1
    assert re.search(r"_stages/catalog\.json is not valid JSON .*remove it", _one_line(out.stderr))
    open(marker, "w").write(good)
    table = os.path.join(ws, "catalog", "shards.parquet")
    open(table, "wb").write(b"PAR1 garbage")
    out = run_cli("subset", "-w", ws, check=False)
    assert out.returncode == 1
    assert re.search(r"catalog file .*shards\.parquet is damaged .*re-run `streamprune catalog --force`",
                     _one_line(out.stderr))


def test_numpy_int_options_reach_the_marker_as_ints():
    """A numpy int (from a caller's array) is a valid size and is stored as a plain int: json would
    write it as a string, and the marker would no longer match a later run with a plain int."""
    cfg = DecodeConfig(image_size=np.int64(32))
    assert type(cfg.image_size) is int and json.dumps(cfg.to_dict()) == json.dumps(DecodeConfig(image_size=32).to_dict())
