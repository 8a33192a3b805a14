"""Turning samples into model inputs and labels: images, feature vectors, labels.

Images (``png/jpg/jpeg/webp``) decode to uint8 arrays (C, H, W) and feature vectors (``.npy``)
to float32 arrays; the model sees images scaled to [0, 1].  A grayscale image in a dataset of
colour images gets three equal channels, as converting it to RGB would.  Labels come from ``.cls`` (an
integer as text) or a JSON field (``json.label``), or are absent (``none``, unsupervised).
Every failure is a ``SampleError`` naming shard and key, handled by the caller's policy.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from streamprune.errors import Rule, SampleError, StreamPruneError, whole
from streamprune.shards import Sample

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VECTOR_EXTS = ("npy",)
# Without --num-classes a label sets the number of classes (max + 1): one corrupt huge label would
# size the model's output layer and the GCN's one-hot features by it.
MAX_LABEL = (1 << 20) - 1
MAX_IMAGE_PIXELS = 1 << 26  # checked from the header, before anything is decoded
_INT_RE = re.compile(r"[+-]?[0-9]{1,100}")  # ASCII only; int() would take '1_0', other scripts' digits


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode a sample: input kind, image mode/size, where the label is."""

    input: str = "auto"  # auto | image | vector
    label_key: str = "cls"  # cls | json.<field> | none
    image_mode: str = "auto"  # auto (as stored: L or RGB; L among RGB images becomes RGB) | L | RGB
    image_size: int | None = None  # resize square images to this size (None: keep)

    def __post_init__(self) -> None:
        if self.input not in ("auto", "image", "vector"):
            raise StreamPruneError(f"input kind must be auto, image or vector, not {self.input!r}")
        if not (self.label_key in ("cls", "none") or (self.label_key.startswith("json.") and self.label_key[5:])):
            raise StreamPruneError(f"--label-key must be 'cls', 'json.<field>' or 'none', not {self.label_key!r}")
        if self.image_mode not in ("auto", "L", "RGB"):
            raise StreamPruneError(f"image mode must be auto, L or RGB, not {self.image_mode!r}")
        if self.image_size is not None:
            Rule(whole(1), "a whole number of pixels >= 1").check(self.image_size, "--image-size")
            object.__setattr__(self, "image_size", int(self.image_size))  # a numpy int: a string in the marker

    def to_dict(self) -> dict:
        return asdict(self)


def _find(sample: Sample, exts: tuple[str, ...]) -> tuple[str, bytes] | None:
    for ext in exts:
        data = sample.members.get(ext)
        if data is not None:
            return ext, data
    return None


def decode_input(sample: Sample, cfg: DecodeConfig, shard: str) -> np.ndarray:
    """The model input of one sample: uint8 (C, H, W) image or float32 vector."""
    want_image = cfg.input in ("auto", "image")
    want_vector = cfg.input in ("auto", "vector")
    found = _find(sample, IMAGE_EXTS) if want_image else None
    if found is not None:
        return _decode_image(found[1], cfg, shard, sample.key)
    found = _find(sample, VECTOR_EXTS) if want_vector else None
    if found is not None:
        return _decode_vector(found[1], shard, sample.key)
    kinds = ", ".join(f".{e}" for e in (IMAGE_EXTS if want_image else ()) + (VECTOR_EXTS if want_vector else ()))
    raise SampleError(f"no input member (looked for {kinds}; has {', '.join(sorted(sample.members)) or 'nothing'})",
                      shard, sample.key, reason="missing_input")


def _decode_image(data: bytes, cfg: DecodeConfig, shard: str, key: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                raise SampleError(f"image of {img.size[0]}x{img.size[1]} pixels is over the limit of "
                                  f"{MAX_IMAGE_PIXELS}; not decoded", shard, key, reason="too_large")
            mode = cfg.image_mode if cfg.image_mode != "auto" else ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
            if img.mode != mode:
                img = img.convert(mode)
            if cfg.image_size is not None and img.size != (cfg.image_size, cfg.image_size):
                img = img.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds
        raise SampleError(f"undecodable image ({type(exc).__name__}: {exc})", shard, key, reason="undecodable") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


@functools.lru_cache(maxsize=64)
def _npy_layout(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header (magic, length and the header dict).

    Parsed once per distinct header: numpy parses each with ``ast.literal_eval``, and with two
    parses per sample (the size check, then ``np.load``) that was 70 % of an embedding pass over
    256-d vectors on the CPU (40k rows: 6.9 of 10.0 s).  A dataset's vectors share one header.
    """
    from numpy.lib import format as npy

    if head[6:8] == b"\x03\x00":  # 3.0 is 2.0 with a utf-8 header, and has no public reader: read
        head = head[:6] + b"\x02\x00" + head[8:]  # it as 2.0 (only structured dtypes, refused anyway, differ)
    f = io.BytesIO(head)
    version = npy.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy.read_array_header_2_0(f)
    else:
        raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
    return tuple(shape), bool(fortran), dtype


def _npy_array(data: bytes) -> np.ndarray:
    """The array of a .npy file's bytes, as ``np.load(..., allow_pickle=False)`` reads it, the size
    checked against the bytes that follow the header before anything is allocated."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError(f"not a .npy file (starts {data[:6]!r})")
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    if major not in (1, 2, 3) or len(data) < 8 + size_bytes:
        raise ValueError(f"unknown .npy format version {major}.{data[7]}")
    offset = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    shape, fortran, dtype = _npy_layout(bytes(data[:offset]))
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    count = math.prod(shape)
    if count * dtype.itemsize > len(data) - offset:
        raise ValueError("header shape is larger than the data")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _decode_vector(data: bytes, shard: str, key: str) -> np.ndarray:
    try:
        arr = _npy_array(data)
    except Exception as exc:  # noqa: BLE001
        raise SampleError(f"undecodable .npy ({type(exc).__name__}: {exc})", shard, key, reason="undecodable") from None
    if arr.dtype.kind not in "fiu":
        raise SampleError(f".npy has dtype {arr.dtype}, expected numbers", shard, key, reason="undecodable")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, rejected below
        arr = np.array(arr, np.float32).reshape(-1)  # a copy: the array may view the sample's bytes
    if not np.isfinite(arr).all():
        raise SampleError("feature vector contains NaN/inf", shard, key, reason="nan")
    return arr


def decode_label(sample: Sample, cfg: DecodeConfig, shard: str) -> int:
    """The integer label of a sample (-1 when ``label_key`` is 'none')."""
    if cfg.label_key == "none":
        return -1
    if cfg.label_key == "cls":
        data = sample.members.get("cls")
        if data is None:
            raise SampleError("missing label (no .cls member)", shard, sample.key, reason="missing_label")
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            text = None
        if text is None or not _INT_RE.fullmatch(text):
            raise SampleError(f"label {data[:20]!r} is not an integer", shard, sample.key, reason="bad_label")
        return int(text)
    field = cfg.label_key[len("json."):]
    data = sample.members.get("json")
    if data is None:
        raise SampleError("missing label (no .json member)", shard, sample.key, reason="missing_label")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(f"undecodable .json ({type(exc).__name__})", shard, sample.key,
                          reason="undecodable") from None
    if not isinstance(doc, dict) or field not in doc:
        raise SampleError(f"missing label (no field {field!r} in .json)", shard, sample.key,
                          reason="missing_label")
    value = doc[field]
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SampleError(f"label field {field!r} is {str(value)[:20]!r}, not an integer", shard, sample.key,
                      reason="bad_label")


def check_label(label: int, num_classes: int | None, shard: str, key: str) -> None:
    """Reject a label outside [0, num_classes) (``num_classes`` None: [0, MAX_LABEL])."""
    if num_classes is None and label > MAX_LABEL:
        raise SampleError(f"label {label} is implausibly large (over {MAX_LABEL}); pass --num-classes if the "
                          "dataset really has that many classes", shard, key, reason="label_range")
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = MAX_LABEL + 1 if num_classes is None else num_classes
        raise SampleError(f"label {label} out of range [0, {bound})", shard, key, reason="label_range")


def fit_input(x: np.ndarray, input_shape: tuple[int, ...], shard: str, key: str,
              whose: str = "the dataset's", hint: bool = True) -> np.ndarray:
    """``x`` in the dataset's ``input_shape`` (a grayscale image among colour ones gets three channels), else a
    :class:`SampleError` naming both shapes (``whose``: what the shape is of; ``hint``: name the decode
    flag that would help, for the dataset's own samples)."""
    if x.ndim == 3 and x.shape[0] == 1 and len(input_shape) == 3 and input_shape[0] == 3:
        x = np.repeat(x, 3, axis=0)  # a grayscale image among colour ones: R = G = B, as PIL's L -> RGB
    if tuple(x.shape) != tuple(input_shape):
        image = hint and x.ndim == 3 and len(input_shape) == 3
        hint = (" (set --image-size)" if image and x.shape[1:] != tuple(input_shape[1:])
                else " (set --image-mode RGB)" if image and x.shape[0] == 3 and input_shape[0] == 1 else "")
        raise SampleError(f"input shape {tuple(x.shape)} differs from {whose} {tuple(input_shape)}" + hint,
                          shard, key, reason="shape")
    return x


def decode_rows(cat, rows: np.ndarray, cfg: DecodeConfig, handler, input_shape: tuple[int, ...] | None,
                num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the given sorted rows: inputs (n, *shape), labels (n,), valid (n,) bool.

    Rows that fail (read, decode, label, shape) are zero-filled, marked invalid and reported to
    ``handler`` (which raises in ``fail`` mode).  ``input_shape`` None means "take it from the
    first valid sample" (used to probe).
    """
    from streamprune.shards import read_rows

    rows = np.asarray(rows, np.int64)
    pos = {int(r): i for i, r in enumerate(rows)}
    shard_of = dict(zip(rows.tolist(), cat.shard_of(rows).tolist()))
    xs: np.ndarray | None = None
    labels = np.full(len(rows), -1, np.int64)
    valid = np.zeros(len(rows), bool)
    for row, sample in read_rows(cat, rows, handler):
        shard = cat.urls[shard_of[row]]
        try:
            x = decode_input(sample, cfg, shard)
            y = decode_label(sample, cfg, shard)
            if cfg.label_key != "none":
                check_label(y, num_classes, shard, sample.key)
            if input_shape is None:
                input_shape = tuple(x.shape)
            x = fit_input(x, input_shape, shard, sample.key)
        except SampleError as err:
            handler.handle(err)
            continue
        if xs is None:
            xs = np.zeros((len(rows), *input_shape), x.dtype)
        i = pos[row]
        xs[i], labels[i], valid[i] = x, y, True
    if xs is None:
        xs = np.zeros((len(rows), *(input_shape or (0,))), np.float32)
    return xs, labels, valid
