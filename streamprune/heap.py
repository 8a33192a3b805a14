"""Keeping a process's resident size to what it holds: glibc malloc tuning (no-ops elsewhere).

Chunked stages allocate and free buffers of tens to hundreds of MB per task.  glibc's default
*dynamic* mmap threshold rises to the size of each large buffer freed (up to 32 MiB), so later
buffers of that size come from the heap; once a small long-lived allocation lands above them,
the freed space cannot be handed back and the resident size creeps up with the work done.  A
fixed threshold (:func:`bound_heap`) serves large buffers with mmap, returned on free;
:func:`trim_heap` hands back free pages inside the heap (an index's thousands of per-list
buffers, once the index is dropped).
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache  # called per chunk task: load the library once per process
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def bound_heap(threshold: int) -> None:
    """Serve allocations of ``threshold`` bytes and more with mmap, process-wide.

    Fixing the threshold also stops glibc from raising it.  The price is fresh (zero-filled)
    pages for every buffer above it: the lower the threshold, the more page faults.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
