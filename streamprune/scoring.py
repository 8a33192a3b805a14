"""The ``score`` stage: seed scores from recorded training dynamics.

One marker per score (``_stages/score-<name>[-full].json``) so that asking for another score later
re-uses the training run.  Scores are computed over column chunks of the dynamics (every score is
per-sample), so memory is bounded by ``chunk`` x epochs x classes, not by the subset size.
Rows whose sample could not be decoded (skipped under ``--on-error skip``) get NaN.
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.scores import get_score
from streamprune.workspace import Workspace, train_key

SCORE_PARAMS = ("window", "decay", "ddof", "damping")


def score_key(name: str, full: bool, replica: int = 0) -> str:
    """Marker of a score: ``score-du``, ``score-du-full`` or, of a replica run, ``score-du-full-r2`` (the
    suffix of its training run's :func:`~streamprune.workspace.train_key`)."""
    return f"score-{name}" + train_key(full, replica)[len("train"):]


def score_array_path(name: str, full: bool, replica: int = 0) -> str:
    """Workspace-relative path of a seed (or full-data, or replica) score array."""
    return f"scores/{score_key(name, full, replica)[len('score-'):]}.zarr"


def compute_scores(workspace: str | Workspace, names: list[str], *, full: bool = False, replica: int = 0,
                   params: dict | None = None, force: bool = False, storage_options: dict | None = None,
                   chunk: int = 65536) -> list[dict]:
    """Compute each named score from the dynamics of the ``train`` (``train-full``, ``train-full-r<N>``) stage."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    tkey = train_key(full, replica)
    tm = ws.require(tkey, "score")
    markers = []
    for name in names:
        try:
            spec = get_score(name)
        except ValueError as exc:
            raise StreamPruneError(str(exc)) from None
        accepted = inspect.signature(spec.fn).parameters
        kwargs = {k: v for k, v in (params or {}).items() if k in accepted and v is not None}
        key = score_key(name, full, replica)
        run = ws.begin("score", {"score": name, "params": kwargs}, {"train": tm["fingerprint"]}, force=force, key=key)
        if run.already_done:
            markers.append(run.previous | {"skipped": True})
            continue
        t0 = time.time()
        from streamprune.train import load_labels  # imports torch: only when a score is computed

        labels = load_labels(ws, tkey)
        m = len(labels)
        valid = labels >= 0
        out = np.full(m, np.nan, np.float32)
        try:
            if "features" in spec.needs:
                cache_key = tm["outputs"]["cache"].split("/")[0]
                out[valid] = _influence(ws, tkey, cache_key, labels, valid, spec, kwargs)
            else:
                dyn = zarr.open_group(storage.zarr_store(ws.path(tkey, "dynamics.zarr"), ws.storage_options), mode="r")
                for i0 in range(0, m, chunk):
                    sl = slice(i0, min(m, i0 + chunk))
                    v = valid[sl]
                    if not v.any():
                        continue
                    arrays = {"labels": labels[sl][v]}
                    for need in spec.needs:
                        if need != "labels":
                            arrays[need] = dyn[need][:, sl][:, v]
                    out[sl][v] = spec.fn(*(arrays[n] for n in spec.needs), **kwargs)
        except ValueError as exc:
            raise StreamPruneError(f"score {name}: {exc}") from None
        path = score_array_path(name, full, replica)
        arr = zarr.create_array(storage.zarr_store(ws.path(path), ws.storage_options), shape=(m,),
                                chunks=(min(m, 1 << 20),), dtype="float32", fill_value=np.nan, overwrite=True)
        arr[:] = out
        arr.attrs.update({"score": name, "rows": "all" if full else "subset", "higher_is_harder": spec.higher_is_harder})
        markers.append(run.commit(outputs={"score": path},
                                  counts={"n": m, "n_valid": int(valid.sum()), "mean": float(np.nanmean(out)),
                                          "std": float(np.nanstd(out))},
                                  timings={"score_s": round(time.time() - t0, 3)}))
    return markers


def _influence(ws: Workspace, train_key: str, cache_key: str, labels: np.ndarray, valid: np.ndarray, spec,
               kwargs: dict) -> np.ndarray:
    """Influence needs penultimate features of the trained rows (m x D floats held in memory).

    The decoded inputs are streamed from the cache (block by block), never held whole.
    """
    import torch

    from streamprune.train import SubsetData, load_model

    model, _ = load_model(ws, train_key)
    data = SubsetData(ws, cache_key, memory_budget=0)
    feats = []
    with torch.no_grad():
        for b in range(0, data.m, 1024):
            v = valid[b:b + 1024]
            if v.any():
                x = torch.from_numpy(np.asarray(data.x_arr[b:b + 1024])[v])
                feats.append(model.embed(data.to_float(x)).numpy())
    features = np.concatenate(feats).astype(np.float64)
    head = model.head
    return spec.fn(features, labels[valid], head.weight.detach().double().numpy(),
                   head.bias.detach().double().numpy(), **kwargs)


def read_score(ws: Workspace, name: str, full: bool = False) -> np.ndarray:
    """A seed or full-data score array (NaN for invalid rows)."""
    return zarr.open_array(storage.zarr_store(ws.path(score_array_path(name, full)), ws.storage_options), mode="r")[:]
