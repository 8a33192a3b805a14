"""Label disagreement and quantile mapping: brute-force references and properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamprune.extrapolate.label_aware import label_disagreement, majority_disagrees, quantile_map


def _brute(own, nl, dist):
    out = []
    for i in range(len(own)):
        if own[i] < 0:
            out.append(math.nan)
            continue
        ds = [d for d, lab in zip(dist[i], nl[i]) if math.isfinite(d)]
        dmin = min(ds) if ds else 0.0
        num = den = 0.0
        for d, lab in zip(dist[i], nl[i]):
            if not math.isfinite(d) or lab < 0:
                continue
            w = math.exp(-(d - dmin))
            den += w
            num += w * (lab != own[i])
        out.append(num / den if den > 0 else math.nan)
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 2**31))
def test_disagreement_matches_brute_force(n, k, seed):
    rng = np.random.default_rng(seed)
    own = rng.integers(-1, 4, n)
    nl = rng.integers(-1, 4, (n, k))
    dist = np.sort(rng.gamma(2.0, 5.0, (n, k)), axis=1)
    dist[rng.random((n, k)) < 0.1] = np.inf
    np.testing.assert_allclose(label_disagreement(own, nl, dist), _brute(own, nl, dist), rtol=1e-12, atol=1e-12)


def test_disagreement_hand_case_and_large_distances():
    own = np.array([0, 1])
    nl = np.array([[0, 1], [1, 1]])
    d = np.array([[1000.0, 1000.0 + math.log(3)], [5.0, 6.0]])  # exp(-d) underflows without the shift
    out = label_disagreement(own, nl, d)
    assert out[0] == pytest.approx((1 / 3) / (1 + 1 / 3)) and out[1] == 0.0


def test_majority():
    own = np.array([0, 0, 2])
    nl = np.array([[1, 1, 0], [0, 0, 1], [-1, -1, -1]])
    d = np.zeros((3, 3))
    assert list(majority_disagrees(own, nl, d, 3)) == [True, False, False]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=60), st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_quantile_map_monotone_on_reference_scale(values, reference):
    v, ref = np.array(values), np.array(reference)
    out = quantile_map(v, ref)
    assert out.min() >= ref.min() - 1e-12 and out.max() <= ref.max() + 1e-12
    order = np.argsort(v, kind="stable")
    assert np.all(np.diff(out[order]) >= -1e-12)  # monotone non-decreasing in the input
    for a, b in zip(v, out):  # equal inputs, equal outputs
        assert np.all(out[v == a] == b)
    rev = quantile_map(v, ref, reverse=True)
    assert np.all(np.diff(rev[order]) <= 1e-12)


def test_quantile_map_reproduces_reference_distribution():
    ref = np.random.default_rng(0).exponential(size=1000)
    out = quantile_map(np.random.default_rng(1).normal(size=1000), ref)
    np.testing.assert_allclose(np.sort(out), np.quantile(np.sort(ref), (np.arange(1000) + 0.5) / 1000))
    assert math.isnan(quantile_map(np.array([np.nan, 1.0]), ref)[0])
