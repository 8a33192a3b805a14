"""heap.bound_heap: a freed large buffer goes back to the OS even when glibc would have kept it."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(ctypes.util.find_library("c") is None or not sys.platform.startswith("linux"),
                                reason="glibc malloc tuning")

# A 16 MiB buffer freed once raises glibc's dynamic mmap threshold to 16 MiB; the next one then
# comes from the heap, a small allocation lands above it, and freeing it leaves a hole the heap
# cannot shrink past.  Prints how many MiB stay resident after the second buffer is freed.
SCRIPT = """
import sys
import numpy as np
from streamprune.heap import bound_heap, trim_heap

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmRSS"))

if sys.argv[1] == "bound":
    bound_heap(4 << 20)
a = np.ones(16 << 20, np.uint8)
del a
base = rss_mib()
b = np.ones(16 << 20, np.uint8)
small = np.ones(64 << 10, np.uint8)
del b
kept = rss_mib() - base
trim_heap()
print(kept, rss_mib() - base)
"""


def _kept(mode: str) -> tuple[int, int]:
    # glibc's defaults: MALLOC_* variables (dask's nannies export MALLOC_TRIM_THRESHOLD_) fix the threshold too
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    kept, after_trim = out.stdout.split()
    return int(kept), int(after_trim)


def test_bound_heap_returns_freed_buffers_and_trim_heap_the_holes():
    kept, trimmed = _kept("default")
    assert kept >= 12, "glibc's default kept the freed buffer resident (the behaviour bound_heap exists for)"
    assert trimmed <= 2, "trim_heap hands the hole back"
    kept, _ = _kept("bound")
    assert kept <= 2, "with a fixed threshold the buffer was mmap-served and returned on free"
