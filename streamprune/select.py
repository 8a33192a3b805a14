"""Selection strategies: which rows to keep, as pure functions over per-row arrays (no I/O).

Conventions shared by every strategy:

* ``scores`` is an (N,) float array indexed by row, **higher = harder** (DU, TDDS, EL2N,
  forgetting).  For scores where low = hard (AUM, margin) :func:`select` negates them when given
  ``higher_is_harder=False``; the individual strategies always see "higher = harder".
* NaN marks a row without a score (an invalid or undecodable sample): it is **never kept**.
  :func:`random` takes an explicit ``eligible`` mask instead of scores.
* Ties are broken by row id, the lower row winning, so a selection is a pure function of its
  inputs and ``seed``.
* The realised count equals the requested one exactly; asking for more rows than are eligible
  raises ``ValueError`` with the numbers.

Memory (per eligible row, besides the inputs): ``keep_hardest``/``keep_easiest`` 4-8 B (one
float copy for a partition), ``random`` 8 B, ``ccs``/``balanced``/``influence_budget`` ~24 B
(index arrays for a sort).  The output mask is 1 B per row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

STRATEGIES = ("hard", "easy", "ccs", "balanced", "random", "influence-budget", "hard-clean")
# Options each strategy accepts besides scores/labels/keep_count/seed (typos fail loudly).
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "hard": (), "easy": (), "ccs": ("beta", "n_strata"), "balanced": (), "random": ("eligible",),
    "influence-budget": ("eps",), "hard-clean": ("noise", "drop_count"),
}


# helpers -------------------------------------------------------------------------------------
def _as_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be a 1-d array, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    inf = np.flatnonzero(np.isinf(s))
    if inf.size:
        raise ValueError(f"scores contain inf at {inf.size} rows (first: row {int(inf[0])}); "
                         "use NaN for rows without a score")
    return s


def _check_count(k: int, n_eligible: int, what: str = "eligible rows") -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"keep count must be an integer, got {k!r}")
    k = int(k)
    if k < 0:
        raise ValueError(f"keep count must be >= 0, got {k}")
    if k > n_eligible:
        raise ValueError(f"cannot keep {k} rows: only {n_eligible} {what}")
    return k


def check_keep_fraction(keep_fraction: float) -> float:
    """``keep_fraction`` as a float in (0, 1], else ValueError (checked up front, and by :func:`keep_count_from`)."""
    try:
        f = float(keep_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"keep fraction must be a number in (0, 1], got {keep_fraction!r}") from None
    if isinstance(keep_fraction, bool) or not (0.0 < f <= 1.0):  # NaN fails the comparison too
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    return f


def keep_count_from(n_eligible: int, keep_fraction: float | None = None, keep_count: int | None = None) -> int:
    """The number of rows to keep from exactly one of a fraction of the eligible rows or a count."""
    if (keep_fraction is None) == (keep_count is None):
        raise ValueError("give exactly one of keep_fraction and keep_count")
    if keep_count is not None:
        k = _check_count(keep_count, n_eligible)
    else:
        f = check_keep_fraction(keep_fraction)
        k = min(n_eligible, int(math.floor(f * n_eligible + 0.5)))
    if k == 0:
        raise ValueError(f"the selection would keep no rows (of {n_eligible} eligible)")
    return k


def _top_k(s: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest non-NaN values; among equal values the lower index wins."""
    return _top_k_of(s, ~np.isnan(s), k)


def _top_k_of(s: np.ndarray, eligible: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest values among the ``eligible`` rows of ``s``; ties: lower index first."""
    n_eligible = int(eligible.sum())
    k = _check_count(k, n_eligible)
    if k == 0:
        return np.zeros(len(s), bool)
    vals = s[eligible]
    vals.partition(n_eligible - k)  # in place: one copy of the eligible values, not two
    threshold = vals[n_eligible - k]
    del vals
    mask = (s > threshold) & eligible
    need = k - int(mask.sum())
    if need:
        mask[np.flatnonzero((s == threshold) & eligible)[:need]] = True
    return mask


# strategies ------------------------------------------------------------------------------------
def keep_hardest(scores: np.ndarray, keep_count: int) -> np.ndarray:
    """Keep the ``keep_count`` highest-scoring rows (ties: lower row id first)."""
    return _top_k(_as_scores(scores), keep_count)


def keep_easiest(scores: np.ndarray, keep_count: int) -> np.ndarray:
    """Keep the ``keep_count`` lowest-scoring rows (ties: lower row id first)."""
    return _top_k(-_as_scores(scores), keep_count)


def ccs_budgets(counts: np.ndarray, budget: int) -> np.ndarray:
    """CCS budget per stratum: strata in increasing count order each take min(count, rest // strata left)."""
    counts = np.asarray(counts, np.int64)
    budget = _check_count(budget, int(counts.sum()), "rows in the strata")
    out = np.zeros(len(counts), np.int64)
    rest = budget
    order = np.argsort(counts, kind="stable")
    for i, s in enumerate(order):
        take = min(int(counts[s]), rest // (len(order) - i))
        out[s] = take
        rest -= take
    return out


def ccs_strata(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Equal-width stratum index in [0, n_strata) of each value over [min, max] (max in the top one)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return np.zeros(0, np.int64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.size, np.int64)
    b = np.floor((v - lo) / (hi - lo) * n_strata).astype(np.int64)
    return np.clip(b, 0, n_strata - 1)


CCS_BETA = 0.1  # ccs drops the hardest 10 % of the eligible rows by default


def ccs_keep_count(keep_count: int, n_eligible: int, beta: float = CCS_BETA) -> tuple[int, int]:
    """(rows to keep, rows sampled from) for ccs: ``keep_count`` checked against the eligible rows
    but the hardest ``floor(beta * n_eligible)``; ValueError when it does not fit."""
    if not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"ccs: beta must be in [0, 1), got {beta}")
    n_drop = int(math.floor(float(beta) * n_eligible))
    k = _check_count(keep_count, n_eligible - n_drop,
                     f"rows left after dropping the hardest {n_drop} (beta={beta}); lower beta or keep fewer")
    return k, n_eligible - n_drop


def ccs(scores: np.ndarray, keep_count: int, seed: int = 0, beta: float = CCS_BETA, n_strata: int = 50) -> np.ndarray:
    """Coverage-centric coreset (Zheng et al., ICLR 2023): drop the hardest ``beta``, then stratified sampling.

    The hardest ``floor(beta * n_eligible)`` rows are dropped as likely label noise; the remaining
    score range is cut into ``n_strata`` equal-width strata, the budget is allocated by
    :func:`ccs_budgets` and each stratum's share is drawn uniformly at random (``seed``).
    """
    s = _as_scores(scores)
    if int(n_strata) < 1:
        raise ValueError(f"ccs: n_strata must be >= 1, got {n_strata}")
    k, n_pool = ccs_keep_count(keep_count, int((~np.isnan(s)).sum()), beta)
    mask = np.zeros(len(s), bool)
    if k == 0:
        return mask
    pool = _top_k(-s, n_pool)  # the easiest rows, i.e. all but the hardest floor(beta * n_eligible)
    idx = np.flatnonzero(pool)
    strata = ccs_strata(s[idx], int(n_strata))
    budgets = ccs_budgets(np.bincount(strata, minlength=int(n_strata)), k)
    order = np.argsort(strata, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(strata, minlength=int(n_strata)))])
    rng = np.random.default_rng(seed)
    for b in range(int(n_strata)):
        if budgets[b]:
            members = idx[order[bounds[b]:bounds[b + 1]]]
            mask[members[rng.choice(len(members), int(budgets[b]), replace=False)]] = True
    return mask


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas proportional to ``counts`` summing to ``total`` (Hamilton's method; ties: lower index)."""
    counts = [int(c) for c in np.asarray(counts).ravel()]
    n = sum(counts)
    total = _check_count(total, n, "rows")
    if n == 0:
        return np.zeros(len(counts), np.int64)
    exact = [c * total for c in counts]  # Python ints: exact at any size
    quotas = [e // n for e in exact]
    left = total - sum(quotas)
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(exact[i] % n), i))
    for i in by_remainder[:left]:
        quotas[i] += 1
    return np.asarray(quotas, np.int64)


def balanced(scores: np.ndarray, labels: np.ndarray, keep_count: int) -> np.ndarray:
    """Keep the same fraction of every class (largest-remainder quotas), the hardest rows within each class.

    Every distinct label value is a class (``-1``, "unknown", included as a class of its own).
    """
    s = _as_scores(scores)
    if labels is None:
        raise ValueError("balanced: labels are required")
    labels = np.asarray(labels)
    if labels.shape != s.shape:
        raise ValueError(f"balanced: labels shape {labels.shape} does not match scores shape {s.shape}")
    idx = np.flatnonzero(~np.isnan(s))
    k = _check_count(keep_count, len(idx))
    mask = np.zeros(len(s), bool)
    if k == 0:
        return mask
    lab = labels[idx]
    order = np.lexsort((-s[idx], lab))  # by class, then hardest first; stable: lower row on ties
    _, counts = np.unique(lab, return_counts=True)
    quotas = largest_remainder(counts, k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = np.concatenate([order[a:a + q] for a, q in zip(starts, quotas)])
    mask[idx[take]] = True
    return mask


def random(eligible: np.ndarray, keep_count: int, seed: int = 0) -> np.ndarray:
    """Keep ``keep_count`` rows drawn uniformly without replacement among the ``eligible`` rows."""
    eligible = np.asarray(eligible, bool)
    idx = np.flatnonzero(eligible)
    k = _check_count(keep_count, len(idx))
    mask = np.zeros(len(eligible), bool)
    mask[idx[np.random.default_rng(seed).choice(len(idx), k, replace=False)]] = True
    return mask


def influence_budget(norms: np.ndarray, eps: float) -> tuple[np.ndarray, float]:
    """Remove the largest set of rows whose summed influence norm is <= ``eps`` (Yang et al., ICLR 2023).

    Rows are removed in increasing order of norm (ties: lower row id first), which maximises the
    number removed under the budget.  Returns the kept mask (NaN rows are neither kept nor
    removed) and the realised keep fraction of the eligible rows.
    """
    s = _as_scores(norms)
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"influence-budget: eps must be >= 0, got {eps}")
    idx = np.flatnonzero(~np.isnan(s))
    vals = s[idx].astype(np.float64)
    if vals.size and vals.min() < 0:
        raise ValueError(f"influence-budget: norms must be >= 0 (row {int(idx[np.argmin(vals)])} has {vals.min()})")
    order = np.argsort(vals, kind="stable")
    n_remove = int(np.searchsorted(np.cumsum(vals[order]), eps, side="right"))
    mask = np.zeros(len(s), bool)
    mask[idx] = True
    mask[idx[order[:n_remove]]] = False
    fraction = (len(idx) - n_remove) / len(idx) if len(idx) else 0.0
    return mask, fraction


# dispatch --------------------------------------------------------------------------------------
def hard_clean(scores: np.ndarray, noise: np.ndarray, keep_count: int, drop_count: int) -> np.ndarray:
    """Drop the ``drop_count`` rows most likely mislabelled (highest ``noise``), then keep the hardest.

    The drop is capped so that ``keep_count`` eligible rows remain: the realised count is exact.
    Rows with NaN noise are never dropped; ties break by row id like :func:`keep_hardest`.
    """
    s = _as_scores(scores)
    eligible = ~np.isnan(s)
    n_eligible = int(eligible.sum())
    _check_count(keep_count, n_eligible)
    drop_count = int(max(0, min(drop_count, n_eligible - keep_count)))
    noise = np.asarray(noise, np.float64)
    if noise.shape != s.shape:
        raise ValueError(f"hard-clean: noise scores have shape {noise.shape}, scores {s.shape}")
    if drop_count:
        candidates = eligible & np.isfinite(noise)  # a mask, not a copy of the noise scores
        drop = _top_k_of(noise, candidates, min(drop_count, int(candidates.sum())))
        s = np.where(drop, np.nan, s)
    return keep_hardest(s, keep_count)


def canonical(strategy: str) -> str:
    """Canonical strategy name ('influence_budget' -> 'influence-budget'), or ValueError listing them."""
    name = str(strategy).strip().lower().replace("_", "-")
    aliases = {"hardest": "hard", "easiest": "easy", "keep-hardest": "hard", "keep-easiest": "easy"}
    name = aliases.get(name, name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return name


def select(strategy: str, scores: np.ndarray | None, labels: np.ndarray | None = None, keep_count: int | None = None,
           seed: int = 0, *, higher_is_harder: bool = True, **opts: Any) -> np.ndarray:
    """Boolean keep mask of ``strategy`` (see :data:`STRATEGIES`); ``higher_is_harder=False`` negates scores."""
    name = canonical(strategy)
    unknown = sorted(set(opts) - set(STRATEGY_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(STRATEGY_OPTIONS[name]) or "none"
        raise ValueError(f"strategy {name} does not take {', '.join(unknown)} (options: {allowed})")
    if name == "influence-budget":
        if "eps" not in opts:
            raise ValueError("influence-budget needs eps (the budget on the summed influence norms removed)")
        return influence_budget(scores, opts["eps"])[0]
    if name == "random":
        eligible = opts.get("eligible")
        if eligible is None:
            if scores is None:
                raise ValueError("random: give scores (NaN = not eligible) or an eligible mask")
            eligible = ~np.isnan(_as_scores(scores))
        return random(eligible, keep_count, seed)
    if keep_count is None:
        raise ValueError(f"strategy {name} needs a keep count")
    s = _as_scores(scores)
    if not higher_is_harder:
        s = -s
    if name == "hard":
        return keep_hardest(s, keep_count)
    if name == "easy":
        return keep_easiest(s, keep_count)
    if name == "ccs":
        return ccs(s, keep_count, seed=seed, **opts)
    if name == "hard-clean":
        if "noise" not in opts:
            raise ValueError("hard-clean needs noise scores (label disagreement)")
        return hard_clean(s, opts["noise"], keep_count, int(opts.get("drop_count", 0)))
    return balanced(s, labels, keep_count)
