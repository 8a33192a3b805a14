"""Errors a user can cause: the CLI prints their message as one line, never a traceback; the option
checks that raise them."""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""A full disk, a quota, a file-size limit: a write failed for want of space."""


class StreamPruneError(Exception):
    """A user-facing failure (bad input, bad workspace, unreachable storage)."""


class SampleError(StreamPruneError):
    """A problem with one sample or shard; carries where it happened for errors.jsonl."""

    def __init__(self, message: str, shard: str, key: str | None = None, reason: str = "error"):
        where = f"shard {shard}" + (f", key {key}" if key is not None else "")
        super().__init__(f"{where}: {message}")
        self.shard = shard
        self.key = key
        self.reason = reason
        self.detail = message

    def record(self, stage: str) -> dict:
        """The errors.jsonl entry for this failure."""
        return {"stage": stage, "shard": self.shard, "key": self.key, "reason": self.reason, "message": self.detail}


@dataclass(frozen=True)
class Rule:
    """What a method option must be: a predicate and its description, for one error message
    whichever way the value came (a flag, the Python API or a ``run`` configuration key)."""

    ok: Callable[[Any], bool]
    what: str

    def check(self, value: Any, name: str) -> None:
        """Raise ``<name> must be <what>, not <value>`` unless ``value`` passes."""
        if not self.ok(value):
            raise StreamPruneError(f"{name} must be {self.what}, not {value!r}")


def whole(least: int) -> Callable[[Any], bool]:
    """A predicate: a whole number (not a bool) of at least ``least``."""
    return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least


def check_whole(value: Any, name: str, least: int = 1) -> None:
    """Raise ``<name> must be a whole number >= <least>, not <value>`` unless ``value`` is one."""
    Rule(whole(least), f"a whole number >= {least}").check(value, name)


def check_optional_whole(value: Any, name: str, least: int = 1) -> None:
    """:func:`check_whole` for an option whose None means "choose for me"."""
    if value is not None:
        check_whole(value, name, least)


def finite(v: Any) -> bool:
    """A real number (not a bool) that is finite."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return isinstance(v, (int, np.integer)) or math.isfinite(v)  # ints of any size are finite


SEED_LIMIT = 2**63
"""Seeds are below this in magnitude: the subset hash salts with 8 bytes and torch seeds with 64 bits."""


def check_seed(value: Any, name: str, signed: bool = False) -> None:
    """Raise ``<name> must be a whole number from 0 (or -2^63) to 2^63-1, not <value>`` unless ``value`` is
    one; ``signed``: negative seeds are accepted too (the subset hash and torch take them)."""
    least = -SEED_LIMIT if signed else 0
    Rule(lambda v: whole(least)(v) and v < SEED_LIMIT,
         f"a whole number from {'-2^63' if signed else 0} to 2^63-1").check(value, name)
