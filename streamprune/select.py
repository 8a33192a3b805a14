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

Memory per row, besides the inputs and the 1 B output mask (``scripts/bench_select.py``):
``keep_hardest`` 5 B (one float copy for a partition), ``keep_easiest`` 9 B, ``random`` 14 B
(numpy's draw without replacement holds a permutation of the eligible rows), ``hard_clean`` 2 B
beside its noise ranks (two masks: its drop and keep select by :func:`top_k_in_passes`, without a
copy of the values; the noise ranks' table takes 5 B and is read a chunk at a time),
``influence_budget`` 10 B (one sort order), ``ccs`` 11 B (its drop of the hardest rows partitions a
negated copy), ``balanced`` 4 B.  Only ``influence_budget`` holds a sort order over all rows: ``ccs``
and ``balanced`` find the rows of each stratum or class in a few passes, each holding the row ids of
at most ``max(GROUP_ROWS, N / 16)`` rows (or of one larger stratum or class), and every other
temporary is one chunk of ``CHUNK_ROWS`` rows.  Those figures hold from N = 16 x GROUP_ROWS (67M
rows) on; below, one group or chunk of up to 4M rows adds at most ~130 MB.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

STRATEGIES = ("hard", "easy", "ccs", "balanced", "random", "influence-budget", "hard-clean")
# Options each strategy accepts besides scores/labels/keep_count/seed (typos fail loudly).
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "hard": (), "easy": (), "ccs": ("beta", "n_strata"), "balanced": (), "random": ("eligible",),
    "influence-budget": ("eps",), "hard-clean": ("noise", "drop_count"),
}


CHUNK_ROWS = 1 << 22  # rows per step of a chunked pass
GROUP_ROWS = 1 << 22  # ccs, balanced: at most this many row ids (or N/16) found per pass over the rows


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


def _order_keys(v: np.ndarray) -> np.ndarray:
    """Unsigned integers in the order of the floats ``v`` (no NaN); equal floats, 0.0 and -0.0 too, get equal keys."""
    bits = 8 * v.dtype.itemsize
    keys = (v + v.dtype.type(0)).view(f"u{v.dtype.itemsize}")  # a copy; + 0 turns -0.0 into 0.0
    flip = keys >> keys.dtype.type(bits - 1)  # 1 where negative
    np.negative(flip, out=flip)  # negative: all bits set, to flip them all; others: 0 ...
    flip |= keys.dtype.type(1) << keys.dtype.type(bits - 1)  # ... and the sign bit, to put them above
    keys ^= flip
    return keys


def top_k_in_passes(values: Any, eligible: np.ndarray, k: int, dtype: Any = None) -> np.ndarray:
    """:func:`_top_k_of` without a copy of the eligible values: the same mask, in a few passes over the rows.

    ``values`` is an (N,) float array or anything that gives a slice of rows at a time (read as
    ``dtype``).  The k-th largest value is found 16 bits at a time (radix select over the
    float's bits: 2 passes for float32, 4 for float64), each pass counting the eligible rows
    whose value shares the bits found so far; a last pass marks the rows above it and, among the
    rows equal to it, the lower row ids first.  Beside the 1 B mask, one chunk of ``CHUNK_ROWS``.
    """
    n_eligible = int(np.count_nonzero(eligible))
    k = _check_count(k, n_eligible)
    mask = np.zeros(len(eligible), bool)
    if k == 0:
        return mask
    itemsize = np.dtype(dtype or values.dtype).itemsize
    if itemsize not in (2, 4, 8):  # no unsigned type of its width: one copy of the eligible values
        return _top_k_of(np.asarray(values, dtype), eligible, k)

    def keys_of(a: int) -> np.ndarray:  # of the chunk at row a; meaningless at rows that are not eligible
        return _order_keys(np.asarray(values[a:a + CHUNK_ROWS], dtype))

    kind = np.dtype(f"u{itemsize}").type
    bits = 8 * itemsize
    prefix, rest = kind(0), k  # the threshold's leading bits found so far; rows still to take at or below them
    for done in range(0, bits, 16):
        counts = np.zeros(1 << 16, np.int64)
        for a in range(0, len(eligible), CHUNK_ROWS):
            keys = keys_of(a)[eligible[a:a + CHUNK_ROWS]]
            if done:
                keys = keys[(keys >> kind(bits - done)) == prefix]
            keys >>= kind(bits - done - 16)
            keys &= kind(0xFFFF)  # the next 16 bits: below 2^16, so read as int64 for bincount
            counts += np.bincount(keys.view(np.int64) if itemsize == 8 else keys.astype(np.intp), minlength=1 << 16)
        from_top = np.cumsum(counts[::-1])
        i = int(np.searchsorted(from_top, rest))  # rows of digits above 0xFFFF - i: fewer than rest
        rest -= int(from_top[i - 1]) if i else 0
        prefix = kind((int(prefix) << 16) | (0xFFFF - i))
    for a in range(0, len(eligible), CHUNK_ROWS):
        keys, e = keys_of(a), eligible[a:a + CHUNK_ROWS]
        mask[a:a + CHUNK_ROWS] = e & (keys > prefix)
        if rest:  # ties at the threshold: the lower row ids first
            ties = np.flatnonzero(e & (keys == prefix))[:rest]
            mask[a + ties] = True
            rest -= len(ties)
    return mask


def value_counts(values: np.ndarray, where: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, their counts) of ``values`` (at ``where``), one chunk at a time:
    ``np.unique`` without a sorted copy of the whole array."""
    parts, counts = [], []
    for a in range(0, len(values), CHUNK_ROWS):
        v = values[a:a + CHUNK_ROWS]
        u, c = np.unique(v if where is None else v[where[a:a + CHUNK_ROWS]], return_counts=True)
        parts.append(u)
        counts.append(c)
    if not parts:
        return np.zeros(0, values.dtype), np.zeros(0, np.int64)
    keys, inverse = np.unique(np.concatenate(parts), return_inverse=True)
    total = np.zeros(len(keys), np.int64)
    np.add.at(total, inverse, np.concatenate(counts))
    return keys, total


def rows_by_value(values: np.ndarray, keys: np.ndarray, counts: np.ndarray,
                  where: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, rows)`` for each of the sorted ``keys``: the rows (ascending) where ``values == keys[i]``
    (and ``where``), ``counts[i]`` of them; every value (at ``where``) must be a key or lie outside
    ``[keys[0], keys[-1]]``.  Consecutive keys are taken together in one pass over
    ``values`` while their rows number at most ``max(GROUP_ROWS, N / 16)``: the row ids of one group
    are held at a time, never an (N,) sort order."""
    limit = max(GROUP_ROWS, len(values) // 16)
    b = 0
    while b < len(keys):
        e, total = b + 1, int(counts[b])
        while e < len(keys) and total + int(counts[e]) <= limit:
            total += int(counts[e])
            e += 1
        lo, hi = keys[b], keys[e - 1]
        rows = np.empty(total, np.int64)
        at = 0
        for a in range(0, len(values), CHUNK_ROWS):
            v = values[a:a + CHUNK_ROWS]
            hit = (v >= lo) & (v <= hi)
            if where is not None:
                hit &= where[a:a + CHUNK_ROWS]
            found = np.flatnonzero(hit)
            rows[at:at + len(found)] = found + a
            at += len(found)
        if at != total:
            raise ValueError(f"rows_by_value: {at} rows hold values in [{lo}, {hi}], the counts say {total}")
        order = np.argsort(values[rows], kind="stable")  # by value; rows of one value stay ascending
        rows = rows[order]
        del order
        bounds = np.append(0, np.cumsum(counts[b:e]))
        for i in range(b, e):
            yield i, rows[bounds[i - b]:bounds[i - b + 1]]
        b = e


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


def ccs_strata(values: np.ndarray, n_strata: int, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Equal-width stratum index in [0, n_strata) of each value over [min, max] (max in the top one);
    ``bounds`` gives (min, max) of a larger set the values are part of."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return np.zeros(0, np.int64)
    lo, hi = bounds if bounds is not None else (float(v.min()), float(v.max()))
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
    n_strata = int(n_strata)
    if n_strata < 1:
        raise ValueError(f"ccs: n_strata must be >= 1, got {n_strata}")
    k, n_pool = ccs_keep_count(keep_count, int((~np.isnan(s)).sum()), beta)
    mask = np.zeros(len(s), bool)
    if k == 0:
        return mask
    pool = _top_k(-s, n_pool)  # the easiest rows, i.e. all but the hardest floor(beta * n_eligible)
    lo, hi = float(np.min(s, where=pool, initial=np.inf)), float(np.max(s, where=pool, initial=-np.inf))
    # each pool row's stratum (ccs_strata over the pool's range); n_strata marks the rows outside the pool
    strata = np.full(len(s), n_strata, np.min_scalar_type(n_strata))
    for a in range(0, len(s), CHUNK_ROWS):
        p = pool[a:a + CHUNK_ROWS]
        strata[a:a + CHUNK_ROWS][p] = ccs_strata(s[a:a + CHUNK_ROWS][p], n_strata, (lo, hi))
    del pool
    counts = np.bincount(strata, minlength=n_strata + 1)[:n_strata]
    budgets = ccs_budgets(counts, k)
    rng = np.random.default_rng(seed)
    for b, members in rows_by_value(strata, np.arange(n_strata), counts):
        if budgets[b]:
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
    eligible = ~np.isnan(s)
    k = _check_count(keep_count, int(eligible.sum()))
    mask = np.zeros(len(s), bool)
    if k == 0:
        return mask
    classes, counts = value_counts(labels, eligible)
    quotas = largest_remainder(counts, k)
    for c, rows in rows_by_value(labels, classes, counts, eligible):
        if quotas[c]:  # the class's hardest rows; ties: the lower row
            mask[rows[_top_k_of(s[rows], np.ones(len(rows), bool), int(quotas[c]))]] = True
    return mask


def random(eligible: np.ndarray, keep_count: int, seed: int = 0) -> np.ndarray:
    """Keep ``keep_count`` rows drawn uniformly without replacement among the ``eligible`` rows."""
    eligible = np.asarray(eligible, bool)
    k = _check_count(keep_count, int(eligible.sum()))
    mask = np.zeros(len(eligible), bool)
    mark_nth_true(eligible, np.random.default_rng(seed).choice(int(eligible.sum()), k, replace=False), mask)
    return mask


def mark_nth_true(flags: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
    """Set ``out`` at the rows of the ``positions``-th True values of ``flags``: ``out[np.flatnonzero(flags)
    [positions]] = True`` without the (N,) index array.  ``positions`` (int64) is sorted in place."""
    positions.sort()
    seen = done = 0
    for a in range(0, len(flags), CHUNK_ROWS):
        f = flags[a:a + CHUNK_ROWS]
        count = int(np.count_nonzero(f))
        upto = int(np.searchsorted(positions, seen + count))
        if upto > done:
            out[np.flatnonzero(f)[positions[done:upto] - seen] + a] = True
            done = upto
        seen += count
    if done < len(positions):
        raise IndexError(f"position {int(positions[done])} is beyond the {seen} set flags")


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
    eligible = ~np.isnan(s)
    n_eligible = int(eligible.sum())
    low = float(np.min(s, where=eligible, initial=np.inf))
    if low < 0:
        raise ValueError(f"influence-budget: norms must be >= 0 (row {int(np.flatnonzero(s == low)[0])} has {low})")
    order = np.argsort(s, kind="stable")  # NaN last; ties: the lower row first
    n_remove, total = 0, 0.0
    for a in range(0, n_eligible, CHUNK_ROWS):  # running sums in float64, in the order of one np.cumsum
        part = order[a:min(a + CHUNK_ROWS, n_eligible)]
        sums = np.cumsum(np.concatenate(([total], s[part].astype(np.float64))))[1:]
        n_remove = a + int(np.searchsorted(sums, eps, side="right"))
        if n_remove < a + len(part):
            break
        total = float(sums[-1])
    mask = eligible
    mask[order[:n_remove]] = False
    fraction = (n_eligible - n_remove) / n_eligible if n_eligible else 0.0
    return mask, fraction


# dispatch --------------------------------------------------------------------------------------
def hard_clean(scores: np.ndarray, noise: Any, keep_count: int, drop_count: int) -> np.ndarray:
    """Drop the ``drop_count`` rows most likely mislabelled (highest ``noise``), then keep the hardest.

    The drop is capped so that ``keep_count`` eligible rows remain: the realised count is exact.
    Rows with NaN noise are never dropped; ties break by row id like :func:`keep_hardest`.
    ``noise`` is an (N,) array or anything that gives one slice of rows at a time as floats
    (:class:`~streamprune.extrapolate.label_aware.NoiseRanks`); it is read in float64, chunk by chunk.
    """
    s = _as_scores(scores)
    eligible = ~np.isnan(s)
    n_eligible = int(eligible.sum())
    _check_count(keep_count, n_eligible)
    drop_count = int(max(0, min(drop_count, n_eligible - keep_count)))
    if not hasattr(noise, "shape"):
        noise = np.asarray(noise, np.float64)
    if tuple(noise.shape) != s.shape:
        raise ValueError(f"hard-clean: noise scores have shape {tuple(noise.shape)}, scores {s.shape}")
    if drop_count:  # the candidates are the eligible rows with a noise rank: narrowed in place ...
        candidates = eligible
        for a in range(0, len(s), CHUNK_ROWS):
            candidates[a:a + CHUNK_ROWS] &= np.isfinite(np.asarray(noise[a:a + CHUNK_ROWS], np.float64))
        drop = top_k_in_passes(noise, candidates, min(drop_count, int(candidates.sum())), np.float64)
        # ... and the rows left are the eligible ones that were not dropped, rebuilt in the drop mask's bytes
        eligible = np.logical_not(drop, out=drop)
        del candidates
        for a in range(0, len(s), CHUNK_ROWS):
            eligible[a:a + CHUNK_ROWS] &= ~np.isnan(s[a:a + CHUNK_ROWS])
    return top_k_in_passes(s, eligible, keep_count)


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
