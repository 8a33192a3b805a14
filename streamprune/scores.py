"""Per-sample difficulty scores computed from training dynamics.

Pure numpy functions, no I/O.  Conventions shared by every score:

* Dynamics arrays are epoch-major: ``true_prob`` (E, n), ``logits`` (E, n, C),
  ``correct`` (E, n), ``labels`` (n,) integers in ``[0, C)``.
* Every score returns a float64 (or int64 for :func:`forgetting`) array of shape (n,).
* Invalid input (wrong shape, NaN/inf, labels out of range, bad parameters) raises
  ``ValueError`` whose message starts with the score's name and, for NaN/inf, names
  the offending index.
* Arithmetic is done in float64; (E, n, C) inputs are processed one epoch at a time
  so a float32 memmap is never copied whole.

The module-level registry :data:`SCORES` maps a score name to a :class:`ScoreSpec`
saying which dynamics arrays it reads; :func:`compute_score` dispatches on it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from streamprune.errors import whole

__all__ = [
    "SCORES",
    "ScoreSpec",
    "aum",
    "compute_score",
    "du",
    "el2n",
    "entropy",
    "forgetting",
    "get_score",
    "influence",
    "margin",
    "register_score",
    "tdds",
]

_TDDS_EPS = 1e-8  # the reference TDDS code adds 1e-8 inside its logs
_MAX_BLOCK_ELEMS = 1 << 24  # cap (in float64 elements) on temporaries in influence()
_CG_RTOL = 1e-10  # relative residual at which a CG system counts as solved

_AXES_EPOCH_SAMPLE = ("epoch", "sample")
_AXES_LOGITS = ("epoch", "sample", "class")


# --------------------------------------------------------------------------- validation


def _as_real_array(x: object, fn: str, arg: str) -> np.ndarray:
    """Return ``x`` as an ndarray (no copy if possible); reject non-numeric/complex dtypes."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{fn}: {arg} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def _check_ndim(arr: np.ndarray, ndim: int, fn: str, arg: str, layout: str) -> None:
    """Raise if ``arr`` does not have ``ndim`` dimensions (``layout`` names them)."""
    if arr.ndim != ndim:
        raise ValueError(f"{fn}: {arg} must have shape {layout}, got shape {arr.shape}")


def _check_finite(arr: np.ndarray, fn: str, arg: str, axes: Sequence[str]) -> None:
    """Raise naming the first NaN/inf entry, e.g. ``"du: true_prob contains NaN/inf at epoch 2, sample 5"``."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    first = np.argwhere(~finite)[0]
    where = ", ".join(f"{axis} {int(i)}" for axis, i in zip(axes, first))
    raise ValueError(f"{fn}: {arg} contains NaN/inf at {where} (value {arr[tuple(first)]})")


def _epoch_logits(logits: object, fn: str) -> np.ndarray:
    """Validate logits and return them as (E, n, C); an (n, C) input becomes one epoch."""
    arr = _as_real_array(logits, fn, "logits")
    if arr.ndim == 2:
        arr = arr[None]
    _check_ndim(arr, 3, fn, "logits", "(E, n, C) or (n, C)")
    if arr.shape[0] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{fn}: logits need at least one epoch and one class, got shape {arr.shape}")
    _check_finite(arr, fn, "logits", _AXES_LOGITS)
    return arr


def _check_labels(labels: object, n: int, n_classes: int, fn: str) -> np.ndarray:
    """Validate integer labels of shape (n,) with values in [0, n_classes); return them as int64."""
    arr = np.asarray(labels)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{fn}: labels must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{fn}: labels must have shape ({n},) to match the other input, got {arr.shape}")
    if n:
        bad = np.flatnonzero((arr < 0) | (arr >= n_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{fn}: label {int(arr[i])} at sample {i} is out of range [0, {n_classes})"
            )
    return arr.astype(np.int64, copy=False)


def _check_min_classes(n_classes: int, minimum: int, fn: str) -> None:
    """Raise if fewer than ``minimum`` classes are present (e.g. margins need a rival class)."""
    if n_classes < minimum:
        raise ValueError(f"{fn}: needs at least {minimum} classes, got C={n_classes}")


def _check_window(n_epochs: int, window: int, minimum: int, fn: str) -> None:
    """Raise unless ``minimum <= window <= n_epochs`` (a window must fit in the recorded epochs)."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise ValueError(f"{fn}: window must be an integer, got {window!r}")
    if window < minimum:
        raise ValueError(f"{fn}: window must be >= {minimum}, got {window}")
    if n_epochs < window:
        raise ValueError(f"{fn}: need at least window={window} epochs, got E={n_epochs} "
                         "(train for more epochs, or give a smaller window: --window, or window in [score] "
                         "of a run config)")


# --------------------------------------------------------------------------- numerics


def _softmax(z: np.ndarray) -> np.ndarray:
    """Stable softmax over the last axis in float64: exp(z - max z) / sum exp(z - max z)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis in float64: z - logsumexp(z)."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _windowed_sq_dev(x: np.ndarray, m: int) -> np.ndarray:
    """Sum of squared deviations from the window mean for every length-``m`` window along axis 0.

    Returns shape (T - m + 1, ...): out[k] = sum_{j<m} (x[k+j] - mean_{j'} x[k+j'])^2.
    Two-pass over the m offsets (loop over window positions, not samples), after
    shifting by x[0] so a constant series gives exactly 0.
    """
    y = x - x[:1]
    k = y.shape[0] - m + 1
    mean = sum(y[j : j + k] for j in range(m)) / m
    return sum((y[j : j + k] - mean) ** 2 for j in range(m))


def _rival_max(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Largest entry over classes other than the label: max_{c != y_i} values[..., i, c]."""
    masked = np.array(values, dtype=np.float64, copy=True)
    masked[..., np.arange(labels.size), labels] = -np.inf
    return masked.max(axis=-1)


def _take_label(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Entry at each sample's label: values[..., i, y_i]."""
    return np.asarray(values, dtype=np.float64)[..., np.arange(labels.size), labels]


# --------------------------------------------------------------------------- scores


def du(true_prob: np.ndarray, window: int = 10, ddof: float = 1) -> np.ndarray:
    """Dynamic Uncertainty (He et al., 2023, "Large-scale Dataset Pruning with Dynamic Uncertainty"): mean over sliding windows of the std of the true-class probability.

    DU_i = 1/(E-J+1) * sum_{k=0}^{E-J} std_ddof(P[k:k+J, i]),
    std_ddof(v) = sqrt(sum_j (v_j - mean v)^2 / (J - ddof)); ddof=1 is the sample std of the paper.

    Args:
        true_prob: (E, n) probability of the true class at each epoch.
        window: J, epochs per window; requires 1 <= J <= E.
        ddof: delta degrees of freedom, 0 <= ddof < J.

    Returns:
        (n,) float64, >= 0; higher = prediction fluctuates more = harder.
    """
    x = _as_real_array(true_prob, "du", "true_prob")
    _check_ndim(x, 2, "du", "true_prob", "(E, n)")
    _check_finite(x, "du", "true_prob", _AXES_EPOCH_SAMPLE)
    _check_window(x.shape[0], window, 1, "du")
    if not np.isscalar(ddof) or not (math.isfinite(ddof) and ddof >= 0):
        raise ValueError(f"du: ddof must be a finite number >= 0, got {ddof!r}")
    if ddof >= window:  # the window is what is short: a std over J epochs divides by J - ddof
        raise ValueError(f"du: window must be >= {math.floor(ddof) + 1} for a std with ddof={ddof} "
                         f"(it divides by window - ddof), got {window}")
    ss = _windowed_sq_dev(x.astype(np.float64), window)
    return np.sqrt(ss / (window - ddof)).mean(axis=0)


def _tdds_changes(logits: np.ndarray) -> np.ndarray:
    """Per-epoch prediction change of TDDS, (E-1, n).

    d_t = sum_c | p_{t+1,c} * (log(p_{t+1,c} + 1e-8) - log(p_{t,c} + 1e-8)) |, p_t = softmax(logits_t).
    """
    out = np.empty((logits.shape[0] - 1, logits.shape[1]), dtype=np.float64)
    p_prev = _softmax(logits[0])
    log_prev = np.log(p_prev + _TDDS_EPS)
    for t in range(out.shape[0]):
        p_next = _softmax(logits[t + 1])
        log_next = np.log(p_next + _TDDS_EPS)
        out[t] = np.abs(p_next * (log_next - log_prev)).sum(axis=-1)
        log_prev = log_next
    return out


def tdds(logits: np.ndarray, window: int = 10, decay: float = 0.9) -> np.ndarray:
    """Temporal Dual-Depth Scoring (Zhang et al., CVPR 2024), as in the authors' reference code.

    With changes d_t (t = 0..E-2, see below), each window k = 0..E-W of W epochs holds the
    W-1 changes d_k..d_{k+W-2}; norm_k = ||d_{k:k+W-1} - mean(d_{k:k+W-1})||_2 and
    score = sum_k decay * (1-decay)^(E-W-k) * norm_k  (later windows weigh more).
    d_t = sum_c |p_{t+1,c} (log(p_{t+1,c}+1e-8) - log(p_{t,c}+1e-8))|, p_t = softmax(logits_t).

    Args:
        logits: (E, n, C) logits per epoch.
        window: W, epochs per window; requires 2 <= W <= E (W=2 windows hold one change, so score 0).
        decay: exponential-moving-average factor in (0, 1].

    Returns:
        (n,) float64, >= 0; higher = more variable prediction dynamics = more important/harder.
    """
    z = _as_real_array(logits, "tdds", "logits")
    _check_ndim(z, 3, "tdds", "logits", "(E, n, C)")
    _check_finite(z, "tdds", "logits", _AXES_LOGITS)
    _check_window(z.shape[0], window, 2, "tdds")
    if not np.isscalar(decay) or not 0.0 < decay <= 1.0:
        raise ValueError(f"tdds: decay must be in (0, 1], got {decay!r}")
    n_epochs = z.shape[0]
    norms = np.sqrt(_windowed_sq_dev(_tdds_changes(z), window - 1))  # (E-W+1, n)
    k = np.arange(n_epochs - window + 1)
    weights = decay * (1.0 - decay) ** (n_epochs - window - k)
    return weights @ norms


def _epoch_indices(epochs: int | Sequence[int] | slice | np.ndarray | None, n_epochs: int, fn: str) -> np.ndarray:
    """Resolve an epoch selection (None = all, int, slice, index sequence or bool mask) to indices."""
    all_epochs = np.arange(n_epochs)
    if epochs is None:
        return all_epochs
    if isinstance(epochs, slice):
        idx = all_epochs[epochs]
    else:
        sel = np.atleast_1d(np.asarray(epochs))
        if sel.size == 0:
            raise ValueError(f"{fn}: epochs selects no epoch (E={n_epochs})")
        if sel.dtype == np.bool_:
            if sel.shape != (n_epochs,):
                raise ValueError(f"{fn}: boolean epochs mask must have shape ({n_epochs},), got {sel.shape}")
            idx = all_epochs[sel]
        elif np.issubdtype(sel.dtype, np.integer) and sel.ndim == 1:
            bad = sel[(sel < -n_epochs) | (sel >= n_epochs)]
            if bad.size:
                raise ValueError(f"{fn}: epoch {int(bad[0])} is out of range for E={n_epochs}")
            idx = all_epochs[sel]
        else:
            raise ValueError(f"{fn}: epochs must be None, an int, a slice or a 1-D integer sequence, got {epochs!r}")
    if idx.size == 0:
        raise ValueError(f"{fn}: epochs selects no epoch (E={n_epochs})")
    return idx


def el2n(logits: np.ndarray, labels: np.ndarray, epochs: int | Sequence[int] | slice | None = None) -> np.ndarray:
    """EL2N (Paul et al., NeurIPS 2021): error L2 norm ||softmax(z) - onehot(y)||_2, averaged over epochs.

    EL2N_i = 1/|S| * sum_{e in S} || softmax(logits[e, i]) - onehot(labels[i]) ||_2, S = ``epochs``
    (None = all; int, slice, index sequence or bool mask also accepted). Values lie in [0, sqrt(2)].

    Args:
        logits: (E, n, C), or (n, C) treated as a single epoch.
        labels: (n,) integer labels in [0, C).
        epochs: which epochs to average over.

    Returns:
        (n,) float64; higher = larger error = harder.
    """
    z = _epoch_logits(logits, "el2n")
    y = _check_labels(labels, z.shape[1], z.shape[2], "el2n")
    idx = _epoch_indices(epochs, z.shape[0], "el2n")
    rows = np.arange(y.size)
    total = np.zeros(y.size, dtype=np.float64)
    for e in idx:
        err = _softmax(z[e])
        err[rows, y] -= 1.0
        total += np.sqrt((err * err).sum(axis=-1))
    return total / idx.size


def _el2n_early(logits: np.ndarray, labels: np.ndarray, el2n_epochs: int | None = None,
                epochs: int | Sequence[int] | slice | None = None) -> np.ndarray:
    """:func:`el2n` as the ``el2n`` score: over the first ``el2n_epochs`` epochs, or all (None), or
    over the ``epochs`` :func:`el2n` takes (the Python API's finer choice; not both).

    Paul et al. take the error early in training (epoch 20 of 200) and average it over ~10 runs;
    with one run, the default averages over all its epochs, which also counts how long a sample
    stayed wrong.  ``el2n_epochs`` = K gives early-training EL2N.
    """
    n_epochs = _epoch_logits(logits, "el2n").shape[0]
    if el2n_epochs is None:
        return el2n(logits, labels, epochs)
    if epochs is not None:
        raise ValueError("el2n: give el2n_epochs or epochs, not both")
    if isinstance(el2n_epochs, bool) or not isinstance(el2n_epochs, (int, np.integer)) \
            or not 1 <= el2n_epochs <= n_epochs:
        raise ValueError(f"el2n_epochs must be a whole number of epochs in [1, E={n_epochs}], got {el2n_epochs!r}")
    return el2n(logits, labels, epochs=slice(0, int(el2n_epochs)))


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events (Toneva et al., ICLR 2019): count of correct -> incorrect transitions.

    F_i = sum_{t=0}^{E-2} [correct[t, i] and not correct[t+1, i]]; a sample never classified
    correctly scores E, above any count (at most floor(E/2)).  The paper counts such samples as
    forgotten infinitely often, so that they rank hardest; E keeps the score finite for the
    extrapolation's averages while giving the same order.

    Args:
        correct: (E, n) bool (or 0/1 integer/float) correctness per epoch.

    Returns:
        (n,) int64; higher = forgotten more often = harder.
    """
    arr = _as_real_array(correct, "forgetting", "correct")
    _check_ndim(arr, 2, "forgetting", "correct", "(E, n)")
    _check_finite(arr, "forgetting", "correct", _AXES_EPOCH_SAMPLE)
    if arr.dtype != np.bool_:
        bad = np.argwhere((arr != 0) & (arr != 1))
        if bad.size:
            e, i = (int(v) for v in bad[0])
            raise ValueError(
                f"forgetting: correct must be boolean or 0/1, got {arr[e, i]!r} at epoch {e}, sample {i}"
            )
        arr = arr.astype(bool)
    counts = (arr[:-1] & ~arr[1:]).sum(axis=0, dtype=np.int64)
    counts[~arr.any(axis=0)] = arr.shape[0]  # never learned: above every count
    return counts


def aum(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Area Under the Margin (Pleiss et al., NeurIPS 2020): mean over epochs of the logit margin.

    AUM_i = 1/E * sum_e ( z[e, i, y_i] - max_{c != y_i} z[e, i, c] ).

    Args:
        logits: (E, n, C), or (n, C) as one epoch; C >= 2.
        labels: (n,) integer labels in [0, C).

    Returns:
        (n,) float64; LOW (negative) = hard / likely mislabelled, so higher_is_harder=False.
    """
    z = _epoch_logits(logits, "aum")
    _check_min_classes(z.shape[2], 2, "aum")
    y = _check_labels(labels, z.shape[1], z.shape[2], "aum")
    total = np.zeros(y.size, dtype=np.float64)
    for e in range(z.shape[0]):
        total += _take_label(z[e], y) - _rival_max(z[e], y)
    return total / z.shape[0]


def entropy(logits: np.ndarray) -> np.ndarray:
    """Predictive entropy of the final epoch: H_i = -sum_c p_c log p_c, p = softmax(z[-1, i]), natural log.

    Args:
        logits: (E, n, C) (only the last epoch is used) or (n, C).

    Returns:
        (n,) float64 in [0, log C]; higher = more uncertain = harder.
    """
    z = _epoch_logits(logits, "entropy")
    log_p = _log_softmax(z[-1])
    return np.maximum(-(np.exp(log_p) * log_p).sum(axis=-1), 0.0)


def margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Final-epoch probability margin: p_{y_i} - max_{c != y_i} p_c with p = softmax(z[-1, i]).

    Args:
        logits: (E, n, C) (only the last epoch is used) or (n, C); C >= 2.
        labels: (n,) integer labels in [0, C).

    Returns:
        (n,) float64 in [-1, 1]; LOW = hard / misclassified, so higher_is_harder=False.
    """
    z = _epoch_logits(logits, "margin")
    _check_min_classes(z.shape[2], 2, "margin")
    y = _check_labels(labels, z.shape[1], z.shape[2], "margin")
    p = _softmax(z[-1])
    return _take_label(p, y) - _rival_max(p, y)


# --------------------------------------------------------------------------- influence


def _head_inputs(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """Validate the linear head's inputs; return (x_aug (n, D+1), probs (n, C), labels)."""
    fn = "influence"
    x = _as_real_array(features, fn, "features")
    w = _as_real_array(weight, fn, "weight")
    b = _as_real_array(bias, fn, "bias")
    _check_ndim(x, 2, fn, "features", "(n, D)")
    _check_ndim(w, 2, fn, "weight", "(C, D)")
    _check_ndim(b, 1, fn, "bias", "(C,)")
    if x.shape[0] < 1:
        raise ValueError(f"{fn}: features must hold at least one sample, got shape {x.shape}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: weight has D={w.shape[1]} columns but features have D={x.shape[1]}")
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"{fn}: bias has {b.shape[0]} entries but weight has C={w.shape[0]} rows")
    _check_finite(x, fn, "features", ("sample", "feature"))
    _check_finite(w, fn, "weight", ("class", "feature"))
    _check_finite(b, fn, "bias", ("class",))
    y = _check_labels(labels, x.shape[0], w.shape[0], fn)
    x_aug = np.concatenate([x.astype(np.float64), np.ones((x.shape[0], 1))], axis=1)
    theta = np.concatenate([w.astype(np.float64), b.astype(np.float64)[:, None]], axis=1)
    return x_aug, _softmax(x_aug @ theta.T), y


def _per_sample_grads(x_aug: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy gradients w.r.t. Theta = [W | b], flattened row-major: g_i = (p_i - e_{y_i}) (x) [x_i, 1]; (n, C*(D+1))."""
    resid = probs.copy()
    resid[np.arange(labels.size), labels] -= 1.0
    return (resid[:, :, None] * x_aug[:, None, :]).reshape(labels.size, -1)


def _chunks(n: int, per_item: int) -> list[slice]:
    """Split range(n) into slices whose temporaries hold at most ~_MAX_BLOCK_ELEMS elements."""
    step = max(1, _MAX_BLOCK_ELEMS // max(1, per_item))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _head_hessian(x_aug: np.ndarray, probs: np.ndarray, damping: float) -> np.ndarray:
    """Damped mean Hessian of the softmax-CE head: (1/n) sum_i (diag p_i - p_i p_i^T) (x) x_i x_i^T + damping I."""
    n, n_classes = probs.shape
    d1 = x_aug.shape[1]
    size = n_classes * d1
    hess = np.zeros((size, size), dtype=np.float64)
    for sl in _chunks(n, size):
        px = (probs[sl, :, None] * x_aug[sl, None, :]).reshape(-1, size)  # rows p_i (x) x_i
        hess -= px.T @ px
    for c in range(n_classes):
        block = slice(c * d1, (c + 1) * d1)
        hess[block, block] += (x_aug * probs[:, c : c + 1]).T @ x_aug
    hess /= n
    hess[np.diag_indices(size)] += damping
    return hess


def _exact_solve_norms(hess: np.ndarray, grads_fn: Callable[[slice], np.ndarray], n: int) -> np.ndarray:
    """||H^{-1} g_i||_2 for every sample via one Cholesky factorisation H = L L^T, H^{-1} = L^{-T} L^{-1}."""
    try:
        chol = np.linalg.cholesky(hess)
    except np.linalg.LinAlgError as exc:  # only reachable through extreme round-off
        raise ValueError(f"influence: damped Hessian is not positive definite ({exc}); increase damping") from exc
    l_inv = np.linalg.solve(chol, np.eye(hess.shape[0]))
    h_inv = l_inv.T @ l_inv
    out = np.empty(n, dtype=np.float64)
    for sl in _chunks(n, hess.shape[0]):
        out[sl] = np.linalg.norm(grads_fn(sl) @ h_inv, axis=1)
    return out


def _head_hvp(v: np.ndarray, x_aug: np.ndarray, probs: np.ndarray, damping: float) -> np.ndarray:
    """Batched Hessian-vector products without materialising H; v (B, C, D+1) -> (B, C, D+1).

    (A_i (x) x_i x_i^T) vec(V) = vec((A_i V x_i) x_i^T) with A_i u = p_i * u - p_i (p_i . u), averaged over i.
    """
    batch, n_classes, d1 = v.shape
    p_t = probs.T  # (C, n)
    u = (v.reshape(-1, d1) @ x_aug.T).reshape(batch, n_classes, -1)  # u[b, :, j] = V_b x_j
    s = p_t * (u - (p_t * u).sum(axis=1, keepdims=True))  # A_j u_j
    hv = (s.reshape(-1, s.shape[-1]) @ x_aug).reshape(v.shape)
    return hv / x_aug.shape[0] + damping * v


def _cg_solve_norms(
    x_aug: np.ndarray,
    probs: np.ndarray,
    damping: float,
    grads_fn: Callable[[slice], np.ndarray],
    max_iter: int,
) -> np.ndarray:
    """||H^{-1} g_i||_2 for every sample by conjugate gradient, batched over samples (one system per sample)."""
    n, n_classes = probs.shape
    shape = (n_classes, x_aug.shape[1])
    out = np.empty(n, dtype=np.float64)
    unconverged = 0
    for sl in _chunks(n, n * n_classes + 2 * shape[0] * shape[1]):
        g = grads_fn(sl).reshape(-1, *shape)
        sol = np.zeros_like(g)
        res = g.copy()
        direction = res.copy()
        rr = np.einsum("bca,bca->b", res, res)
        target = (_CG_RTOL**2) * rr
        active = rr > target
        for _ in range(max_iter):
            if not active.any():
                break
            hd = _head_hvp(direction, x_aug, probs, damping)
            dhd = np.einsum("bca,bca->b", direction, hd)
            alpha = np.where(active, rr / np.where(active, dhd, 1.0), 0.0)
            sol += alpha[:, None, None] * direction
            res -= alpha[:, None, None] * hd
            rr_new = np.einsum("bca,bca->b", res, res)
            beta = np.where(active, rr_new / np.where(active, rr, 1.0), 0.0)
            direction = res + beta[:, None, None] * direction
            rr = rr_new
            active &= rr > target
        unconverged += int(active.sum())
        out[sl] = np.linalg.norm(sol.reshape(sol.shape[0], -1), axis=1)
    if unconverged:
        warnings.warn(
            f"influence: conjugate gradient did not reach relative residual {_CG_RTOL:g} for "
            f"{unconverged} sample(s) within cg_max_iter={max_iter}; scores are approximate",
            RuntimeWarning,
            stacklevel=3,
        )
    return out


def influence(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    damping: float = 1e-3,
    n_total: int | None = None,
    cg_max_iter: int = 100,
    exact_max_params: int = 4096,
) -> np.ndarray:
    """Generalization influence (Yang et al., ICLR 2023) of each sample, restricted to the final linear layer.

    Parameter-change norm of the first-order influence function for a softmax cross-entropy head
    z = W x + b (W (C, D), b (C,)), theta = vec([W | b]) of size P = C(D+1):
        g_i = grad_theta l_i = (p_i - e_{y_i}) (x) [x_i, 1],
        H   = (1/n) sum_i (diag p_i - p_i p_i^T) (x) [x_i,1][x_i,1]^T + damping * I,
        score_i = || (1/n_total) H^{-1} g_i ||_2  ~=  ||theta_{-i} - theta||_2.
    Approximations: the backbone (features) is frozen, only the head is perturbed; removal is a
    single Newton step around the trained head (the usual influence-function linearisation);
    ``damping`` > 0 regularises the (singular, since logits are shift-invariant) Hessian; H is the
    mean over the given samples, while ``n_total`` (default n) is the training-set size used in the
    1/n factor (pass it when ``features`` is a subsample).  Solved exactly (Cholesky) when
    P <= exact_max_params, else by batched conjugate gradient with Hessian-vector products (no H
    in memory; costs O(cg_iters * n^2 * P)), which warns with RuntimeWarning if it does not converge.

    Returns:
        (n,) float64, >= 0; higher = removing the sample moves the model more = more influential/harder.
    """
    x_aug, probs, y = _head_inputs(features, labels, weight, bias)
    n = y.size
    if not np.isscalar(damping) or not np.isfinite(damping) or damping <= 0:
        raise ValueError(f"influence: damping must be a finite number > 0, got {damping!r}")
    n_total = n if n_total is None else n_total
    if isinstance(n_total, bool) or not isinstance(n_total, (int, np.integer)) or n_total < 1:
        raise ValueError(f"influence: n_total must be a positive integer, got {n_total!r}")
    if isinstance(cg_max_iter, bool) or not isinstance(cg_max_iter, (int, np.integer)) or cg_max_iter < 1:
        raise ValueError(f"influence: cg_max_iter must be a positive integer, got {cg_max_iter!r}")
    if not isinstance(exact_max_params, (int, np.integer)) or exact_max_params < 0:
        raise ValueError(f"influence: exact_max_params must be a non-negative integer, got {exact_max_params!r}")

    def grads(sl: slice) -> np.ndarray:
        return _per_sample_grads(x_aug[sl], probs[sl], y[sl])

    n_params = probs.shape[1] * x_aug.shape[1]
    if n_params <= exact_max_params:
        norms = _exact_solve_norms(_head_hessian(x_aug, probs, float(damping)), grads, n)
    else:
        norms = _cg_solve_norms(x_aug, probs, float(damping), grads, int(cg_max_iter))
    return norms / n_total


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score: ``fn`` is called with the arrays named in ``needs``, positionally, in that order."""

    name: str
    fn: Callable[..., np.ndarray]
    needs: tuple[str, ...]
    higher_is_harder: bool = True
    description: str = ""
    revision: int = 1  # raised when the definition changes: workspaces computed under an older one re-score


SCORES: dict[str, ScoreSpec] = {}


def register_score(
    name: str,
    fn: Callable[..., np.ndarray],
    needs: Sequence[str] | str,
    higher_is_harder: bool = True,
    description: str = "",
    *,
    revision: int = 1,
    overwrite: bool = False,
) -> ScoreSpec:
    """Add a score to :data:`SCORES` so :func:`compute_score` can find it; refuses to replace one unless ``overwrite``.

    ``needs`` names the arrays (keys of the dynamics dict, e.g. "true_prob", "logits", "correct",
    "labels") that are passed positionally to ``fn`` in that order.  Raise ``revision`` when ``fn``
    changes what it computes: scores stored under an older revision are then computed again.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_score: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"register_score: fn for {name!r} must be callable, got {fn!r}")
    needs_t = (needs,) if isinstance(needs, str) else tuple(needs)
    if not needs_t or not all(isinstance(k, str) and k for k in needs_t):
        raise ValueError(f"register_score: needs for {name!r} must be non-empty strings, got {needs!r}")
    if not whole(1)(revision):
        raise ValueError(f"register_score: revision for {name!r} must be a whole number >= 1, got {revision!r}")
    if name in SCORES and not overwrite:
        raise ValueError(f"register_score: a score named {name!r} is already registered (pass overwrite=True)")
    spec = ScoreSpec(name, fn, needs_t, bool(higher_is_harder), description, revision)
    SCORES[name] = spec
    return spec


def get_score(name: str) -> ScoreSpec:
    """Look up a registered score by name; unknown names raise ValueError listing the known ones."""
    try:
        return SCORES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown score {name!r}; known scores: {', '.join(sorted(SCORES))}") from None


def compute_score(name: str, dynamics: dict[str, np.ndarray], **kwargs) -> np.ndarray:
    """Compute score ``name`` from a dict of arrays (true_prob (E,n), logits (E,n,C), correct (E,n), labels (n,), ...).

    Only the arrays in the score's ``needs`` are read; ``kwargs`` go to the score function.
    """
    spec = get_score(name)
    missing = [key for key in spec.needs if key not in dynamics]
    if missing:
        raise ValueError(
            f"{name}: dynamics is missing {', '.join(missing)} (needs {', '.join(spec.needs)}; "
            f"got {', '.join(sorted(dynamics)) or 'nothing'})"
        )
    return spec.fn(*(dynamics[key] for key in spec.needs), **kwargs)


register_score("du", du, ("true_prob",), True, "Dynamic Uncertainty: windowed std of true-class probability")
register_score("tdds", tdds, ("logits",), True, "Temporal Dual-Depth Scoring of prediction changes")
register_score("el2n", _el2n_early, ("logits", "labels"), True, "Error L2 norm of softmax minus one-hot label")
register_score("forgetting", forgetting, ("correct",), True, "Number of correct -> incorrect transitions",
               revision=2)  # 2: a row never classified correctly scores E (it scored 0)
register_score("aum", aum, ("logits", "labels"), False, "Area under the logit margin (low = hard)")
register_score("entropy", entropy, ("logits",), True, "Final-epoch predictive entropy")
register_score("margin", margin, ("logits", "labels"), False, "Final-epoch probability margin (low = hard)")
register_score(
    "influence",
    influence,
    ("features", "labels", "weight", "bias"),
    True,
    "Generalization influence on the final linear layer (parameter-change norm)",
)
