"""Selection strategies: exact counts, quotas, CCS coverage, uniformity, influence budget, tie-breaking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats as sstats

from streamprune import select as sel

FAST = settings(max_examples=60, deadline=None)


@st.composite
def scored(draw, min_n=1, max_n=60, nan=True, few_values=False):
    """(scores with some NaN, labels) — ``few_values`` draws from a handful of values to force ties."""
    n = draw(st.integers(min_n, max_n))
    if few_values:
        elems = st.sampled_from([0.0, 0.5, 1.0, 2.0])
    else:
        elems = st.floats(-100, 100, allow_nan=False, width=32)
    s = draw(hnp.arrays(np.float32, n, elements=elems))
    if nan:
        holes = draw(hnp.arrays(bool, n, elements=st.booleans()))
        s[holes & (np.arange(n) % 3 == 0)] = np.nan
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(-1, 4)))
    return s, labels


def reference_top(s: np.ndarray, k: int) -> np.ndarray:
    """The k highest non-NaN rows, ties by lower row id, by a full sort."""
    idx = np.flatnonzero(~np.isnan(s))
    order = sorted(idx, key=lambda i: (-float(s[i]), i))
    mask = np.zeros(len(s), bool)
    mask[order[:k]] = True
    return mask


# hard / easy ------------------------------------------------------------------------------------
@FAST
@given(scored(few_values=True), st.data())
def test_keep_hardest_and_easiest_match_full_sort(sk, data):
    s, _ = sk
    ne = int((~np.isnan(s)).sum())
    k = data.draw(st.integers(0, ne))
    np.testing.assert_array_equal(sel.keep_hardest(s, k), reference_top(s, k))
    np.testing.assert_array_equal(sel.keep_easiest(s, k), reference_top(-s, k))


@FAST
@given(scored(), st.data())
def test_hardest_exact_count_and_threshold(sk, data):
    s, _ = sk
    ne = int((~np.isnan(s)).sum())
    k = data.draw(st.integers(0, ne))
    m = sel.keep_hardest(s, k)
    assert m.sum() == k
    assert not (m & np.isnan(s)).any()
    rest = ~m & ~np.isnan(s)
    if k and rest.any():
        assert s[m].min() >= s[rest].max()


def test_ties_broken_by_row_id():
    s = np.array([1.0, 2.0, 2.0, np.nan, 2.0, 1.0, 2.0])
    assert np.flatnonzero(sel.keep_hardest(s, 2)).tolist() == [1, 2]
    assert np.flatnonzero(sel.keep_hardest(s, 5)).tolist() == [0, 1, 2, 4, 6]
    assert np.flatnonzero(sel.keep_easiest(s, 1)).tolist() == [0]
    flat = np.zeros(10)
    assert np.flatnonzero(sel.keep_hardest(flat, 3)).tolist() == [0, 1, 2]
    # The same inputs always give the same mask, whatever the seed.
    for strategy in ("hard", "easy", "balanced"):
        a = sel.select(strategy, s, np.array([0, 1, 0, 1, 0, 1, 0]), 3, seed=1)
        b = sel.select(strategy, s, np.array([0, 1, 0, 1, 0, 1, 0]), 3, seed=2)
        np.testing.assert_array_equal(a, b)


def test_higher_is_harder_false_negates():
    s = np.array([0.1, -3.0, 5.0, np.nan, -1.0])
    hard_low = sel.select("hard", s, None, 2, higher_is_harder=False)
    assert np.flatnonzero(hard_low).tolist() == [1, 4]
    np.testing.assert_array_equal(sel.select("easy", s, None, 2, higher_is_harder=False), sel.keep_hardest(s, 2))


# counts and errors ------------------------------------------------------------------------------
@FAST
@given(scored(min_n=5), st.data(), st.sampled_from(["hard", "easy", "ccs", "balanced", "random"]))
def test_every_strategy_keeps_exactly_the_target(sk, data, strategy):
    s, labels = sk
    ne = int((~np.isnan(s)).sum())
    limit = ne - int(0.1 * ne) if strategy == "ccs" else ne
    assume(limit >= 1)
    k = data.draw(st.integers(1, limit))
    m = sel.select(strategy, s, labels, k, seed=data.draw(st.integers(0, 5)))
    assert m.dtype == bool and m.shape == s.shape
    assert int(m.sum()) == k
    assert not (m & np.isnan(s)).any()


def test_impossible_counts_are_clear_errors():
    s = np.array([1.0, np.nan, 2.0, 3.0])
    for strategy in ("hard", "easy", "balanced", "random"):
        with pytest.raises(ValueError, match="cannot keep 4 rows: only 3 eligible"):
            sel.select(strategy, s, np.zeros(4, int), 4)
    with pytest.raises(ValueError, match="left after dropping the hardest"):
        sel.ccs(np.arange(10.0), 10, beta=0.1)
    with pytest.raises(ValueError, match="unknown strategy"):
        sel.select("hardcore", s, None, 1)
    with pytest.raises(ValueError, match="does not take beta"):
        sel.select("hard", s, None, 1, beta=0.2)
    with pytest.raises(ValueError, match="inf"):
        sel.keep_hardest(np.array([1.0, np.inf]), 1)
    with pytest.raises(ValueError, match="labels are required"):
        sel.select("balanced", s, None, 1)


def test_unsigned_integer_scores_are_ranked_as_numbers():
    """Integer scores are converted before negation: the easiest of unsigned scores 0, 1, 2 is the 0 (negating
    them as uint8 would wrap 0 to the top)."""
    u = np.array([0, 1, 2, 7], np.uint8)
    assert sel.keep_easiest(u, 2).tolist() == [True, True, False, False]
    assert sel.select("hard", u, None, 1, higher_is_harder=False).tolist() == [True, False, False, False]
    assert sel.keep_hardest(u, 1).tolist() == [False, False, False, True]


def test_malformed_arguments_name_what_is_wrong():
    """Each bad argument of the selection functions is a ValueError naming the argument and its value."""
    s = np.array([0.3, 0.1, np.nan, 0.7])
    cases = [
        (lambda: sel.keep_hardest(s.reshape(2, 2), 1), r"scores must be a 1-d array, got shape \(2, 2\)"),
        (lambda: sel.keep_hardest(s, 1.0), r"keep count must be an integer, got 1\.0"),
        (lambda: sel.keep_hardest(s, True), r"keep count must be an integer, got True"),
        (lambda: sel.keep_count_from(10, keep_fraction="half"),
         r"keep fraction must be a number in \(0, 1\], got 'half'"),
        (lambda: sel.ccs(s, 1, beta=1.0), r"ccs: beta must be in \[0, 1\), got 1\.0"),
        (lambda: sel.ccs(s, 1, beta=-0.1), r"ccs: beta must be in \[0, 1\), got -0\.1"),
        (lambda: sel.ccs(s, 1, n_strata=0), "ccs: n_strata must be >= 1, got 0"),
        (lambda: sel.balanced(s, np.zeros(3), 1), r"balanced: labels shape \(3,\) does not match scores shape "
                                                  r"\(4,\)"),
        (lambda: sel.hard_clean(s, np.zeros(5), 1, 1), r"hard-clean: noise scores have shape \(5,\), scores \(4,\)"),
        (lambda: sel.hard_clean(s, np.zeros(4), None, 1), "keep count must be an integer, got None"),
        (lambda: sel.hard_clean(s, np.zeros(4), "2", 1), "keep count must be an integer, got '2'"),
        (lambda: sel.select("influence-budget", s), "influence-budget needs eps"),
        (lambda: sel.select("random", None, None, 1), "random: give scores .* or an eligible mask"),
        (lambda: sel.select("ccs", s, None, None), "strategy ccs needs a keep count"),
        (lambda: sel.select("hard-clean", s, None, 1), "hard-clean needs noise scores"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_keep_count_from():
    assert sel.keep_count_from(10, keep_fraction=0.25) == 3  # 2.5 rounds half up
    assert sel.keep_count_from(10, keep_fraction=1.0) == 10
    assert sel.keep_count_from(10, keep_count=7) == 7
    for kwargs, msg in [({}, "exactly one"), ({"keep_fraction": 0.5, "keep_count": 2}, "exactly one"),
                        ({"keep_fraction": 0.0}, r"\(0, 1\]"), ({"keep_fraction": 1.5}, r"\(0, 1\]"),
                        ({"keep_count": 11}, "only 10 eligible"), ({"keep_count": -1}, ">= 0"),
                        ({"keep_fraction": 0.01}, "no rows"), ({"keep_count": 0}, "no rows")]:
        with pytest.raises(ValueError, match=msg):
            sel.keep_count_from(10, **kwargs)


# balanced ---------------------------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
def test_largest_remainder(counts, data):
    total = data.draw(st.integers(0, sum(counts)))
    q = sel.largest_remainder(np.array(counts), total)
    assert q.sum() == total
    n = sum(counts)
    for c, qi in zip(counts, q):
        assert 0 <= qi <= c
        if n:
            assert abs(qi - c * total / n) < 1


@FAST
@given(scored(min_n=2, few_values=True), st.data())
def test_balanced_quotas_and_hardest_within_class(sk, data):
    s, labels = sk
    ne = int((~np.isnan(s)).sum())
    assume(ne >= 1)
    k = data.draw(st.integers(1, ne))
    m = sel.balanced(s, labels, k)
    elig = ~np.isnan(s)
    classes, counts = np.unique(labels[elig], return_counts=True)
    quotas = sel.largest_remainder(counts, k)
    for c, n_c, q in zip(classes, counts, quotas):
        in_c = labels == c
        assert int((m & in_c).sum()) == q  # the same fraction of every class, rounded to the exact total
        np.testing.assert_array_equal(m & in_c, reference_top(np.where(in_c, s, np.nan), int(q)))


def test_balanced_small_example():
    s = np.array([5, 4, 3, 2, 1, 9, 8, 7, np.nan, 0], float)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    # eligible: 5 in class 0, 4 in class 1; keep 5 -> 2.78 / 2.22 -> quotas 3 and 2
    assert np.flatnonzero(sel.balanced(s, labels, 5)).tolist() == [0, 1, 2, 5, 6]


# CCS ------------------------------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12), st.data())
def test_ccs_budgets_fill_exactly_and_evenly(counts, data):
    counts = np.array(counts)
    budget = data.draw(st.integers(0, int(counts.sum())))
    b = sel.ccs_budgets(counts, budget)
    assert b.sum() == budget and (b <= counts).all() and (b >= 0).all()
    # Water-filling: a stratum below its count got at least as much as any other stratum.
    short = b < counts
    if short.any():
        assert b[short].min() >= b.max() - 1


@FAST
@given(st.integers(60, 400), st.integers(1, 20), st.floats(0, 0.3), st.integers(0, 3), st.data())
def test_ccs_covers_every_stratum_and_drops_the_hardest(n, n_strata, beta, seed, data):
    rng = np.random.default_rng(seed)
    s = rng.exponential(size=n) ** 2  # skewed: strata of very different sizes
    s[rng.random(n) < 0.1] = np.nan
    ne = int((~np.isnan(s)).sum())
    n_drop = int(math.floor(beta * ne))
    budget = data.draw(st.integers(min(n_strata, ne - n_drop), ne - n_drop))
    m = sel.ccs(s, budget, seed=seed, beta=beta, n_strata=n_strata)
    assert int(m.sum()) == budget
    hardest = reference_top(s, n_drop)
    assert not (m & hardest).any()
    pool = ~np.isnan(s) & ~hardest
    strata = np.full(n, -1)
    strata[pool] = sel.ccs_strata(s[pool], n_strata)
    if budget >= n_strata:
        for b in np.unique(strata[pool]):
            assert (m & (strata == b)).any(), f"stratum {b} not represented"
    np.testing.assert_array_equal(m, sel.ccs(s, budget, seed=seed, beta=beta, n_strata=n_strata))


def test_ccs_draw_within_a_stratum_is_seeded_and_uniform():
    # four strata of 10, 20, 30 and 40 rows (score values 0..3), their rows interleaved at random so
    # that a draw biased to low row ids shows; budget 20 -> 5 rows from each stratum
    sizes = [10, 20, 30, 40]
    s = np.random.default_rng(0).permutation(np.repeat(np.arange(4.0), sizes))
    strata = s.astype(int)
    budget, draws = 20, 2000
    m0 = sel.ccs(s, budget, seed=0, beta=0.0, n_strata=4)
    assert [int(m0[strata == b].sum()) for b in range(4)] == [5, 5, 5, 5]
    np.testing.assert_array_equal(m0, sel.ccs(s, budget, seed=0, beta=0.0, n_strata=4))  # same seed, same rows
    hits = np.zeros(len(s))
    masks = set()
    for seed in range(draws):  # fixed seeds: the check is deterministic
        m = sel.ccs(s, budget, seed=seed, beta=0.0, n_strata=4)
        assert m.sum() == budget
        hits += m
        masks.add(m.tobytes())
    assert len(masks) > draws * 0.99  # different seeds, different rows (C(10,5)*C(20,5)*... masks exist)
    for b, size in enumerate(sizes):
        observed = hits[strata == b]
        expected = draws * 5 / size  # each member is drawn with probability budget/size
        # no member favoured: every one near its expected count (binomial sd <= 22 here), and chi-square
        assert np.all(np.abs(observed - expected) < 0.25 * expected), (b, observed, expected)
        assert sstats.chisquare(observed, np.full(size, expected)).pvalue > 1e-4


def test_ccs_strata_edges():
    assert sel.ccs_strata(np.array([0.0, 0.5, 1.0]), 2).tolist() == [0, 1, 1]
    assert sel.ccs_strata(np.array([3.0, 3.0]), 5).tolist() == [0, 0]


# random ---------------------------------------------------------------------------------------
def test_random_is_uniform_over_eligible_rows():
    n, k, draws = 40, 8, 3000
    eligible = np.ones(n, bool)
    eligible[[0, 13, 27]] = False
    hits = np.zeros(n)
    for seed in range(draws):
        m = sel.random(eligible, k, seed)
        assert m.sum() == k and not (m & ~eligible).any()
        hits += m
    observed = hits[eligible]
    expected = np.full(eligible.sum(), draws * k / eligible.sum())
    assert sstats.chisquare(observed, expected).pvalue > 1e-4
    np.testing.assert_array_equal(sel.random(eligible, k, 5), sel.random(eligible, k, 5))
    # Through select, NaN scores are not eligible.
    s = np.where(eligible, 1.0, np.nan)
    np.testing.assert_array_equal(sel.select("random", s, None, k, seed=5), sel.random(eligible, k, 5))


# influence budget --------------------------------------------------------------------------------
@FAST
@given(hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(0, 10, allow_nan=False)),
       st.floats(0, 100), st.data())
def test_influence_budget_is_maximal_under_eps(norms, eps, data):
    norms = norms.copy()
    holes = data.draw(hnp.arrays(bool, len(norms), elements=st.booleans()))
    norms[holes] = np.nan
    m, frac = sel.influence_budget(norms, eps)
    elig = ~np.isnan(norms)
    removed = elig & ~m
    assert not (m & ~elig).any()
    total = math.fsum(norms[removed])
    assert total <= eps * (1 + 1e-12) + 1e-12
    if m.any():  # maximal: removing one more (the smallest left) would exceed eps
        assert total + norms[m].min() > eps * (1 - 1e-12)
    # removed rows are the smallest norms (ties: lower row ids removed first)
    if removed.any() and m.any():
        assert norms[removed].max() <= norms[m].min()
    n_el = int(elig.sum())
    assert frac == pytest.approx(int(m.sum()) / n_el if n_el else 0.0)


def test_influence_budget_example_and_errors():
    m, frac = sel.influence_budget(np.array([3.0, 1.0, 1.0, 5.0, np.nan]), 2.0)
    assert m.tolist() == [True, False, False, True, False] and frac == 0.5
    m, _ = sel.influence_budget(np.array([1.0, 1.0, 1.0]), 1.5)
    assert m.tolist() == [False, True, True]  # tie: the lower row goes first
    with pytest.raises(ValueError, match=">= 0"):
        sel.influence_budget(np.array([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="eps"):
        sel.influence_budget(np.array([1.0]), -1.0)
    assert sel.select("influence_budget", np.array([3.0, 1.0]), eps=1.0).tolist() == [True, False]


# chunked passes ----------------------------------------------------------------------------------
def sorted_reference(strategy: str, s: np.ndarray, labels: np.ndarray, k: int, seed: int, beta: float,
                     n_strata: int, eps: float) -> np.ndarray:
    """What each strategy keeps, computed with (N,) sort orders and index arrays over all rows at once."""
    idx = np.flatnonzero(~np.isnan(s))
    mask = np.zeros(len(s), bool)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        mask[idx[rng.choice(len(idx), k, replace=False)]] = True
    elif strategy == "balanced":
        order = np.lexsort((-s[idx], labels[idx]))
        _, counts = np.unique(labels[idx], return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for a, q in zip(starts, sel.largest_remainder(counts, k)):
            mask[idx[order[a:a + q]]] = True
    elif strategy == "ccs":
        pool = np.flatnonzero(reference_top(-s, len(idx) - int(math.floor(beta * len(idx)))))
        strata = sel.ccs_strata(s[pool], n_strata)
        budgets = sel.ccs_budgets(np.bincount(strata, minlength=n_strata), k)
        for b in range(n_strata):
            if budgets[b]:
                members = pool[strata == b]
                mask[members[rng.choice(len(members), int(budgets[b]), replace=False)]] = True
    else:  # influence-budget: remove the smallest norms while their float64 running sum stays <= eps
        order = idx[np.argsort(s[idx].astype(np.float64), kind="stable")]
        n_remove = int(np.searchsorted(np.cumsum(s[order].astype(np.float64)), eps, side="right"))
        mask[idx] = True
        mask[order[:n_remove]] = False
    return mask


@settings(max_examples=150, deadline=None)
@given(scored(max_n=70, few_values=True), st.integers(1, 9), st.integers(1, 12), st.integers(0, 3),
       st.sampled_from([0.0, 0.1, 0.3]), st.integers(1, 9), st.data())
def test_chunked_passes_keep_what_full_sorts_keep(sk, chunk_rows, group_rows, seed, beta, n_strata, data):
    """ccs, balanced, random and influence-budget find rows a chunk, and a group of strata or classes,
    at a time; with chunks and groups of a few rows they keep exactly what whole-array sorts keep."""
    s, labels = sk
    ne = int((~np.isnan(s)).sum())
    assume(ne >= 1)
    k = data.draw(st.integers(1, ne - int(math.floor(beta * ne))))
    eps = data.draw(st.floats(0, 100))
    norms = np.abs(s)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sel, "CHUNK_ROWS", chunk_rows)
        mp.setattr(sel, "GROUP_ROWS", group_rows)
        got = {"random": sel.random(~np.isnan(s), k, seed), "balanced": sel.balanced(s, labels, k),
               "ccs": sel.ccs(s, k, seed=seed, beta=beta, n_strata=n_strata),
               "influence-budget": sel.influence_budget(norms, eps)[0]}
        keys, counts = sel.value_counts(labels, ~np.isnan(s))
    for name, mask in got.items():
        want = sorted_reference(name, norms if name == "influence-budget" else s, labels, k, seed, beta, n_strata, eps)
        np.testing.assert_array_equal(mask, want, err_msg=name)
    want_keys, want_counts = np.unique(labels[~np.isnan(s)], return_counts=True)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_array_equal(counts, want_counts)


def test_rows_by_value_groups_keys_and_refuses_values_that_are_not_keys(monkeypatch):
    monkeypatch.setattr(sel, "CHUNK_ROWS", 3)
    monkeypatch.setattr(sel, "GROUP_ROWS", 4)
    values = np.array([5, 1, 5, 3, 1, 1, 9, 3, 5, 5, 1])
    keys, counts = sel.value_counts(values)
    assert keys.tolist() == [1, 3, 5, 9] and counts.tolist() == [4, 2, 4, 1]
    found = {int(keys[i]): rows.tolist() for i, rows in sel.rows_by_value(values, keys, counts)}
    assert found == {1: [1, 4, 5, 10], 3: [3, 7], 5: [0, 2, 8, 9], 9: [6]}
    where = values != 5
    keys, counts = sel.value_counts(values, where)
    assert {int(keys[i]): r.tolist() for i, r in sel.rows_by_value(values, keys, counts, where)} == {
        1: [1, 4, 5, 10], 3: [3, 7], 9: [6]}
    with pytest.raises(ValueError):  # 5 lies between the keys 3 and 9 but is not one of them
        list(sel.rows_by_value(values, np.array([1, 3, 9]), np.array([4, 2, 1])))
    out = np.zeros(len(values), bool)
    sel.mark_nth_true(where, np.array([6, 0, 3]), out)
    assert np.flatnonzero(out).tolist() == np.flatnonzero(where)[[0, 3, 6]].tolist()
    with pytest.raises(IndexError, match="beyond the 7 set flags"):
        sel.mark_nth_true(where, np.array([7]), out)
