"""streamprune: out-of-core data pruning by score extrapolation over WebDataset shards."""

from __future__ import annotations

__version__ = "0.1.0"

from streamprune.errors import StreamPruneError  # noqa: E402

# Only names that are not also submodules (streamprune.embed etc. are modules; call
# streamprune.embed.embed, streamprune.prune.prune, ...).
_LAZY = {
    "catalog": "streamprune.shards",
    "compute_scores": "streamprune.scoring",
    "build_index": "streamprune.index",
    "pruned_dataset": "streamprune.prune",
    "run_pipeline": "streamprune.pipeline",
}

__all__ = ["__version__", "StreamPruneError", *_LAZY]


def __getattr__(name: str):
    # Stage functions are imported lazily so `import streamprune` stays light (no torch, no dask).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
