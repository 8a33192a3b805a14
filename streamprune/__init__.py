"""streamprune: out-of-core data pruning by score extrapolation over WebDataset shards."""

from __future__ import annotations

__version__ = "0.1.0"

from streamprune.errors import StreamPruneError  # noqa: E402

_LAZY = {
    "catalog": "streamprune.shards",
    "subset": "streamprune.subset",
    "train": "streamprune.train",
    "compute_scores": "streamprune.scoring",
    "embed": "streamprune.embed",
    "build_index": "streamprune.index",
    "extrapolate": "streamprune.extrapolate",
    "prune": "streamprune.prune",
    "pruned_dataset": "streamprune.prune",
    "evaluate": "streamprune.evaluate",
    "report": "streamprune.report",
    "run_pipeline": "streamprune.pipeline",
}

__all__ = ["__version__", "StreamPruneError", *_LAZY]


def __getattr__(name: str):
    # Stage functions are imported lazily so `import streamprune` stays light (no torch, no dask).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
