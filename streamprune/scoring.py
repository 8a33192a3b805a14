"""The ``score`` stage: seed scores from recorded training dynamics.

One marker per score (``_stages/score-<name>[-full].json``) so that asking for another score later
re-uses the training run.  Scores are computed over column chunks of the dynamics (every score is
per-sample) of at most ``SCORE_CHUNK_BYTES``, so memory is bounded whatever the subset size and the
number of classes.
Rows whose sample could not be decoded (skipped under ``--on-error skip``) get NaN.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np
import zarr

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.leases import releases_leases
from streamprune.scores import get_score
from streamprune.workspace import Workspace, train_key

SCORE_PARAMS = ("window", "decay", "ddof", "damping", "el2n_epochs")
SCORE_CHUNK_BYTES = 256 << 20  # dynamics read per chunk of rows (the score functions hold a few times this)
SCORE_CHUNK_ROWS = 65536  # at most this many rows per chunk


def score_chunk_rows(epochs: int, classes: int, needs: tuple[str, ...], logits_chunk_rows: int) -> int:
    """Rows of dynamics read at once for a score of ``needs``: within :data:`SCORE_CHUNK_BYTES`, and,
    when that is below :data:`SCORE_CHUNK_ROWS`, whole zarr chunks of logits (each read once)."""
    per_row = 4 * epochs * sum(classes if need == "logits" else 1 for need in needs if need != "labels")
    rows = max(1, SCORE_CHUNK_BYTES // max(1, per_row))
    if rows >= SCORE_CHUNK_ROWS:
        return SCORE_CHUNK_ROWS
    return max(logits_chunk_rows, rows // logits_chunk_rows * logits_chunk_rows) if rows >= logits_chunk_rows else rows


def score_key(name: str, full: bool, replica: int = 0) -> str:
    """Marker of a score: ``score-du``, ``score-du-full`` or, of a replica run, ``score-du-full-r2`` (the
    suffix of its training run's :func:`~streamprune.workspace.train_key`)."""
    return f"score-{name}" + train_key(full, replica)[len("train"):]


def score_array_path(name: str, full: bool, replica: int = 0) -> str:
    """Workspace-relative path of a seed (or full-data, or replica) score array."""
    return f"scores/{score_key(name, full, replica)[len('score-'):]}.zarr"


def score_kwargs(spec, params: dict | None) -> dict:
    """The ``params`` (window, decay, ...) that score ``spec`` takes, without the unset ones."""
    accepted = inspect.signature(spec.fn).parameters
    return {k: v for k, v in (params or {}).items() if k in accepted and v is not None}


# a few samples of two classes: enough for a score function to check its parameters against E epochs
_PROBE_N = 4
_PROBE = {"true_prob": lambda rng, e: rng.uniform(0.05, 0.95, (e, _PROBE_N)).astype(np.float32),
          "loss": lambda rng, e: rng.uniform(0.05, 3.0, (e, _PROBE_N)).astype(np.float32),
          "logits": lambda rng, e: rng.normal(size=(e, _PROBE_N, 2)).astype(np.float32),
          "correct": lambda rng, e: rng.random((e, _PROBE_N)) < 0.5,
          "labels": lambda rng, e: np.arange(_PROBE_N, dtype=np.int64) % 2}


def check_scores(names: list[str], params: dict | None = None, epochs: int | None = None) -> None:
    """Refuse unknown score names, and parameters a score rejects for ``epochs`` recorded epochs, before training.

    The rules are the score functions' own: each runs on a tiny dynamics (four samples, two
    classes) of ``epochs`` epochs; scores that need more than the recorded dynamics (influence)
    are checked by name only.
    """
    if isinstance(names, str) or not names:
        raise StreamPruneError(f"give a list of at least one score name (e.g. ['du']), not {names!r}")
    for name in names:
        try:
            spec = get_score(name)
        except ValueError as exc:
            raise StreamPruneError(str(exc)) from None
        if epochs is None or not all(need in _PROBE for need in spec.needs):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rng = np.random.default_rng(0)
                spec.fn(*(_PROBE[need](rng, int(epochs)) for need in spec.needs), **score_kwargs(spec, params))
        except (TypeError, ValueError) as exc:
            raise _score_error(name, exc) from None


def _score_error(name: str, exc: Exception) -> StreamPruneError:
    text = str(exc)
    return StreamPruneError(f"score {name}: {text[len(name) + 2:] if text.startswith(name + ': ') else text}")


@releases_leases
def compute_scores(workspace: str | Workspace, names: list[str], *, full: bool = False, replica: int = 0,
                   params: dict | None = None, force: bool = False, storage_options: dict | None = None,
                   chunk: int | None = None) -> list[dict]:
    """Compute each named score from the dynamics of the ``train`` (``train-full``, ``train-full-r<N>``) stage.

    ``chunk``: rows of dynamics per step (default :func:`score_chunk_rows`: memory bounded whatever the
    number of classes; 30 epochs of 1,000-class logits are 120 kB a row).
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace, storage_options)
    tkey = train_key(full, replica)
    tm = ws.require(tkey, "score")
    check_scores(names, params, tm.get("counts", {}).get("epochs"))  # every name, before computing any
    markers = []
    for name in names:
        spec = get_score(name)
        kwargs = score_kwargs(spec, params)
        key = score_key(name, full, replica)
        config = {"score": name, "params": kwargs}
        if spec.revision > 1:  # a revision 1 adds nothing: markers from before revisions existed stay current
            config["revision"] = spec.revision
        run = ws.begin("score", config, {"train": tm["fingerprint"]}, force=force, key=key)
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
                epochs, _, classes = dyn["logits"].shape
                step = chunk or score_chunk_rows(epochs, classes, spec.needs, dyn["logits"].chunks[1])
                for i0 in range(0, m, step):
                    sl = slice(i0, min(m, i0 + step))
                    v = valid[sl]
                    if not v.any():
                        continue
                    arrays = {"labels": labels[sl][v]}
                    for need in spec.needs:
                        if need != "labels":
                            arrays[need] = dyn[need][:, sl][:, v]
                    out[sl][v] = spec.fn(*(arrays[n] for n in spec.needs), **kwargs)
        except ValueError as exc:
            raise _score_error(name, exc) from None
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
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        raise StreamPruneError(f"score influence: needs a model whose head is one nn.Linear (the layer it "
                               f"perturbs); this model's head is {type(head).__name__}")
    data = SubsetData(ws, cache_key, memory_budget=0)
    feats = []
    with torch.no_grad():
        for b in range(0, data.m, 1024):
            v = valid[b:b + 1024]
            if v.any():
                x = torch.from_numpy(np.asarray(data.x_arr[b:b + 1024])[v])
                feats.append(model.embed(data.to_float(x)).numpy())
    features = np.concatenate(feats).astype(np.float64)
    return spec.fn(features, labels[valid], head.weight.detach().double().numpy(),
                   head.bias.detach().double().numpy(), **kwargs)


def read_score(ws: Workspace, name: str, full: bool = False) -> np.ndarray:
    """A seed or full-data score array (NaN for invalid rows)."""
    return zarr.open_array(storage.zarr_store(ws.path(score_array_path(name, full)), ws.storage_options), mode="r")[:]
