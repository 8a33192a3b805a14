"""streamprune: out-of-core data pruning by score extrapolation over WebDataset shards."""

from __future__ import annotations

__version__ = "0.1.0"

from streamprune.errors import StreamPruneError  # noqa: E402

__all__ = ["__version__", "StreamPruneError", "catalog", "subset"]


def __getattr__(name: str):
    # Stage functions are imported lazily so `import streamprune` stays light (no torch, no dask).
    if name == "catalog":
        from streamprune.shards import catalog

        return catalog
    if name == "subset":
        from streamprune.subset import subset

        return subset
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
