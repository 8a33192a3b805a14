"""Tests for streamprune.scores: hand-computed cases, loop-based references and hypothesis properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamprune.scores import (
    SCORES,
    ScoreSpec,
    aum,
    compute_score,
    du,
    el2n,
    entropy,
    forgetting,
    get_score,
    influence,
    margin,
    register_score,
    tdds,
)

FAST = settings(max_examples=40, deadline=None)
FINITE = {"allow_nan": False, "allow_infinity": False}


# --------------------------------------------------------------------------- strategies


@st.composite
def logits_and_labels(draw, min_epochs=1, max_epochs=6, min_classes=2):
    """(E, n, C) logits in [-20, 20] and matching (n,) labels."""
    e = draw(st.integers(min_epochs, max_epochs))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(min_classes, 5))
    z = draw(hnp.arrays(np.float64, (e, n, c), elements=st.floats(-20, 20, **FINITE)))
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return z, y


@st.composite
def prob_series(draw, max_epochs=12):
    """(E, n) probabilities and a window 1 <= J <= E."""
    e = draw(st.integers(1, max_epochs))
    n = draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (e, n), elements=st.floats(0, 1, **FINITE)))
    return x, draw(st.integers(1, e))


# --------------------------------------------------------------------------- loop references


def softmax_ref(v):
    """Softmax of one 1-D vector."""
    m = max(v)
    ex = [math.exp(a - m) for a in v]
    s = sum(ex)
    return [a / s for a in ex]


def du_ref(x, window, ddof):
    """DU with explicit loops over samples and windows."""
    e, n = x.shape
    out = np.zeros(n)
    for i in range(n):
        stds = [np.std(x[k : k + window, i], ddof=ddof) for k in range(e - window + 1)]
        out[i] = sum(stds) / len(stds)
    return out


def tdds_ref(z, window, decay):
    """TDDS with explicit Python loops, following the reference-code formula."""
    e, n, _ = z.shape
    out = np.zeros(n)
    for i in range(n):
        probs = [softmax_ref(z[t, i]) for t in range(e)]
        d = []
        for t in range(e - 1):
            p, q = probs[t + 1], probs[t]
            d.append(sum(abs(pc * (math.log(pc + 1e-8) - math.log(qc + 1e-8))) for pc, qc in zip(p, q)))
        total = 0.0
        for k in range(e - window + 1):
            chunk = d[k : k + window - 1]
            mean = sum(chunk) / len(chunk)
            norm = math.sqrt(sum((v - mean) ** 2 for v in chunk))
            total += decay * (1 - decay) ** (e - window - k) * norm
        out[i] = total
    return out


def forgetting_ref(correct):
    """Forgetting events counted with loops; a sample never correct counts E (Toneva et al.: infinitely
    often, i.e. above every sample that was learned)."""
    e, n = correct.shape
    return np.array([sum(1 for t in range(e - 1) if correct[t, i] and not correct[t + 1, i])
                     if any(correct[:, i]) else e for i in range(n)])


def head_loss(theta, x, y):
    """Cross-entropy of one sample for head parameters theta (C, D+1)."""
    z = theta @ np.append(x, 1.0)
    m = z.max()
    return m + math.log(np.exp(z - m).sum()) - z[y]


def head_grad_hess_ref(theta, x, y):
    """Per-sample gradient and Hessian of the CE head, flattened row-major over (C, D+1)."""
    xa = np.append(x, 1.0)
    p = np.array(softmax_ref(theta @ xa))
    onehot = np.eye(theta.shape[0])[y]
    g = np.kron(p - onehot, xa)
    h = np.kron(np.diag(p) - np.outer(p, p), np.outer(xa, xa))
    return g, h


def influence_ref(features, labels, weight, bias, damping, n_total=None):
    """Brute-force influence: explicit Hessian from per-sample loops, then numpy.linalg.solve."""
    n = len(labels)
    n_total = n if n_total is None else n_total
    theta = np.concatenate([weight, bias[:, None]], axis=1)
    grads, hess = [], np.zeros((theta.size, theta.size))
    for i in range(n):
        g, h = head_grad_hess_ref(theta, features[i], labels[i])
        grads.append(g)
        hess += h / n
    hess += damping * np.eye(theta.size)
    return np.array([np.linalg.norm(np.linalg.solve(hess, g) / n_total) for g in grads])


def random_head(seed, n=25, d=4, c=3, scale=1.0):
    """A small random linear-head problem."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, d)),
        rng.integers(0, c, n),
        scale * rng.normal(size=(c, d)),
        scale * rng.normal(size=c),
    )


# --------------------------------------------------------------------------- DU


def test_du_hand_computed():
    x = np.array([[0.2, 0.5], [0.6, 0.5], [0.5, 0.9]])
    # windows: sample 0 -> [0.2, 0.6], [0.6, 0.5]; sample std of two points = |a - b| / sqrt(2)
    expected = np.array([(0.4 + 0.1) / 2 / math.sqrt(2), (0.0 + 0.4) / 2 / math.sqrt(2)])
    np.testing.assert_allclose(du(x, window=2), expected, rtol=1e-12)
    # population std of two points = |a - b| / 2
    np.testing.assert_allclose(du(x, window=2, ddof=0), [(0.4 + 0.1) / 4, 0.4 / 4], rtol=1e-12)
    # one window covering all epochs = plain sample std
    np.testing.assert_allclose(du(x, window=3), np.std(x, axis=0, ddof=1), rtol=1e-12)


@FAST
@given(prob_series(), st.sampled_from([0, 1]))
def test_du_matches_loop_reference(data, ddof):
    x, window = data
    if ddof >= window:
        with pytest.raises(ValueError, match="ddof"):
            du(x, window=window, ddof=ddof)
        return
    out = du(x, window=window, ddof=ddof)
    assert out.shape == (x.shape[1],) and out.dtype == np.float64
    assert (out >= 0).all()
    np.testing.assert_allclose(out, du_ref(x, window, ddof), rtol=1e-9, atol=1e-12)


@FAST
@given(st.integers(2, 15), st.integers(1, 5), st.floats(0, 1, **FINITE), st.data())
def test_du_constant_is_zero(e, n, value, data):
    window = data.draw(st.integers(2, e))
    assert (du(np.full((e, n), value), window=window) == 0).all()


def test_du_errors():
    with pytest.raises(ValueError, match="need at least window=10 epochs, got E=3"):
        du(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"shape \(E, n\)"):
        du(np.zeros(5), window=2)
    with pytest.raises(ValueError, match="window"):
        du(np.zeros((5, 2)), window=0)
    x = np.full((4, 3), 0.5)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf at epoch 2, sample 1"):
        du(x, window=2)
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        du(x, window=2)


# --------------------------------------------------------------------------- TDDS


def test_tdds_hand_computed():
    # E=3, W=3: one window holding changes d0, d1; norm = |d0 - d1| / sqrt(2); weight = decay * (1-decay)^0.
    p = [[0.5, 0.5], [0.5, 0.5], [0.8, 0.2]]
    z = np.log(np.array(p))[:, None, :]
    d0 = 0.0
    d1 = 0.8 * abs(math.log(0.8 + 1e-8) - math.log(0.5 + 1e-8)) + 0.2 * abs(math.log(0.2 + 1e-8) - math.log(0.5 + 1e-8))
    expected = 0.9 * abs(d0 - d1) / math.sqrt(2)
    np.testing.assert_allclose(tdds(z, window=3, decay=0.9), [expected], rtol=1e-10)
    # W=2 windows hold a single change, whose deviation from its own mean is 0.
    assert tdds(z, window=2) == pytest.approx([0.0])


@FAST
@given(logits_and_labels(min_epochs=2, max_epochs=8), st.data())
def test_tdds_matches_loop_reference(zy, data):
    z, _ = zy
    window = data.draw(st.integers(2, z.shape[0]))
    decay = data.draw(st.sampled_from([0.9, 0.5, 0.1, 1.0]))
    out = tdds(z, window=window, decay=decay)
    assert out.shape == (z.shape[1],) and (out >= 0).all()
    np.testing.assert_allclose(out, tdds_ref(z, window, decay), rtol=1e-8, atol=1e-12)


@FAST
@given(logits_and_labels(min_epochs=2, max_epochs=8), st.data())
def test_tdds_constant_is_zero_and_shift_invariant(zy, data):
    z, _ = zy
    window = data.draw(st.integers(2, z.shape[0]))
    constant = np.broadcast_to(z[:1], z.shape)
    assert (tdds(constant, window=window) == 0).all()
    shift = data.draw(hnp.arrays(np.float64, z.shape[:2], elements=st.floats(-5, 5, **FINITE)))
    np.testing.assert_allclose(tdds(z + shift[..., None], window=window), tdds(z, window=window), atol=1e-7)


def test_tdds_errors():
    with pytest.raises(ValueError, match="need at least window=10 epochs, got E=4"):
        tdds(np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match="window must be >= 2"):
        tdds(np.zeros((4, 2, 3)), window=1)
    with pytest.raises(ValueError, match="decay"):
        tdds(np.zeros((4, 2, 3)), window=2, decay=0.0)
    with pytest.raises(ValueError, match=r"\(E, n, C\)"):
        tdds(np.zeros((4, 3)), window=2)
    z = np.zeros((4, 2, 3))
    z[3, 0, 2] = -np.inf
    with pytest.raises(ValueError, match="NaN/inf at epoch 3, sample 0, class 2"):
        tdds(z, window=2)


# --------------------------------------------------------------------------- EL2N


def test_el2n_hand_computed():
    confident = np.array([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0]])
    assert el2n(confident, np.array([0, 1])) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert el2n(confident, np.array([2, 0])) == pytest.approx([math.sqrt(2)] * 2, rel=1e-12)
    uniform = np.zeros((1, 4))  # p = 1/4 each: ||p - e_y||^2 = (3/4)^2 + 3 (1/4)^2 = 3/4
    assert el2n(uniform, np.array([3])) == pytest.approx([math.sqrt(0.75)])


@FAST
@given(logits_and_labels(), st.data())
def test_el2n_properties(zy, data):
    z, y = zy
    out = el2n(z, y)
    assert out.shape == y.shape and out.dtype == np.float64
    assert ((out >= 0) & (out <= math.sqrt(2) + 1e-12)).all()
    per_epoch = np.stack([el2n(z[e], y) for e in range(z.shape[0])])
    np.testing.assert_allclose(out, per_epoch.mean(axis=0), rtol=1e-12)
    subset = data.draw(st.lists(st.integers(0, z.shape[0] - 1), min_size=1, max_size=4))
    np.testing.assert_allclose(el2n(z, y, epochs=subset), per_epoch[subset].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(el2n(z, y, epochs=-1), per_epoch[-1], rtol=1e-12)


def test_el2n_errors():
    z = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"label 4 at sample 1 is out of range \[0, 4\)"):
        el2n(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="label -1"):
        el2n(z, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integer"):
        el2n(z, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        el2n(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="epoch 5 is out of range"):
        el2n(z, np.array([0, 1, 2]), epochs=[5])
    with pytest.raises(ValueError, match="no epoch"):
        el2n(z, np.array([0, 1, 2]), epochs=[])
    z[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf at epoch 1, sample 2, class 0"):
        el2n(z, np.array([0, 1, 2]))


def test_epoch_selection_by_mask_and_its_errors():
    """el2n over a boolean epoch mask equals el2n over the epochs it marks; a mask of another length, epochs that
    are not integers, a slice selecting none, and el2n_epochs given with epochs are refused naming the problem."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(4, 6, 3))
    y = rng.integers(0, 3, 6)
    mask = np.array([True, False, True, False])
    np.testing.assert_allclose(el2n(z, y, epochs=mask), el2n(z[[0, 2]], y))
    np.testing.assert_allclose(el2n(z, y, epochs=mask), (el2n(z[0], y) + el2n(z[2], y)) / 2)
    with pytest.raises(ValueError, match=r"el2n: boolean epochs mask must have shape \(4,\), got \(3,\)"):
        el2n(z, y, epochs=np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"el2n: epochs must be None, an int, a slice or a 1-D integer sequence, "
                                         r"got \[0\.5, 1\.0\]"):
        el2n(z, y, epochs=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"el2n: epochs selects no epoch \(E=4\)"):
        el2n(z, y, epochs=slice(3, 1))
    with pytest.raises(ValueError, match=r"el2n: epochs selects no epoch \(E=4\)"):
        el2n(z, y, epochs=np.zeros(4, bool))
    with pytest.raises(ValueError, match="el2n: give el2n_epochs or epochs, not both"):
        get_score("el2n").fn(z, y, el2n_epochs=2, epochs=[0])


def test_malformed_score_inputs_name_the_argument():
    """Logits that are not real numbers or hold no class, a window that is not an integer, bad influence solver
    limits and a score name that is not a string are refused naming the argument and the value."""
    features, labels, weight, bias = random_head(5)
    y = np.array([0, 1])
    cases = [
        (lambda: el2n(np.zeros((2, 2, 3), complex), y), "el2n: logits must be a real numeric array, got dtype "
                                                         "complex128"),
        (lambda: el2n(np.zeros((2, 2, 0)), y), r"el2n: logits need at least one epoch and one class, got shape "
                                               r"\(2, 2, 0\)"),
        (lambda: tdds(np.zeros((4, 2, 3)), window=2.0), r"tdds: window must be an integer, got 2\.0"),
        (lambda: influence(features, labels, weight, bias, cg_max_iter=0),
         "influence: cg_max_iter must be a positive integer, got 0"),
        (lambda: influence(features, labels, weight, bias, exact_max_params=-1),
         "influence: exact_max_params must be a non-negative integer, got -1"),
        (lambda: register_score("", du, ("true_prob",)), "register_score: name must be a non-empty string, got ''"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


# --------------------------------------------------------------------------- forgetting


def test_forgetting_hand_computed():
    correct = np.array(
        [
            [1, 0, 1, 0],
            [0, 0, 1, 1],
            [1, 0, 1, 0],
            [1, 0, 1, 1],
            [0, 0, 1, 0],
            [0, 0, 1, 1],
            [1, 0, 0, 0],
        ],
        dtype=bool,
    )
    # sample 0: 1,0,1,1,0,0,1 -> forgets at 0->1 and 3->4; sample 1 is never learned -> E = 7, the
    # hardest; sample 3 alternates: 0,1,0,1,0,1,0 -> 3
    out = forgetting(correct)
    np.testing.assert_array_equal(out, [2, 7, 1, 3])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(forgetting(correct.astype(np.int8)), out)


@FAST
@given(hnp.arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 6))))
def test_forgetting_matches_loop_reference(correct):
    out = forgetting(correct)
    assert out.shape == (correct.shape[1],) and out.dtype == np.int64
    np.testing.assert_array_equal(out, forgetting_ref(correct))
    learned = correct.any(axis=0)
    assert (out[learned] <= correct.shape[0] // 2).all() and (out[~learned] == correct.shape[0]).all()


@FAST
@given(st.integers(1, 10), st.integers(1, 5))
def test_forgetting_always_right_is_zero_never_learned_is_hardest(e, n):
    assert (forgetting(np.full((e, n), True)) == 0).all()
    assert (forgetting(np.full((e, n), False)) == e).all()


def test_forgetting_errors():
    with pytest.raises(ValueError, match="0/1"):
        forgetting(np.array([[0, 2], [1, 1]]))
    with pytest.raises(ValueError, match="NaN/inf at epoch 1, sample 0"):
        forgetting(np.array([[0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"\(E, n\)"):
        forgetting(np.array([True, False]))


# --------------------------------------------------------------------------- AUM


def test_aum_hand_computed_and_sign():
    z = np.array([[2.0, 0.0, 1.0]])
    np.testing.assert_allclose(aum(z, np.array([0])), [1.0])  # 2 - max(0, 1)
    np.testing.assert_allclose(aum(z, np.array([1])), [-2.0])  # 0 - max(2, 1)
    z3 = np.array([[[2.0, 0.0, 1.0]], [[0.0, 3.0, 1.0]]])
    np.testing.assert_allclose(aum(z3, np.array([0])), [(1.0 + -3.0) / 2])


@FAST
@given(logits_and_labels(), st.floats(-50, 50, **FINITE))
def test_aum_properties(zy, shift):
    z, y = zy
    out = aum(z, y)
    assert out.shape == y.shape
    np.testing.assert_allclose(aum(z + shift, y), out, atol=1e-9)
    final = z[-1]
    top = final.argmax(axis=1)
    rows = np.arange(y.size)
    wins = final[rows, top] > np.sort(final, axis=1)[:, -2]  # unique argmax
    assert (np.sign(aum(final, y))[wins & (top == y)] > 0).all()
    assert (np.sign(aum(final, y))[top != y] <= 0).all()


def test_aum_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        aum(np.zeros((2, 3, 1)), np.zeros(3, dtype=int))


# --------------------------------------------------------------------------- entropy


@FAST
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 8), st.floats(-30, 30, **FINITE))
def test_entropy_uniform_is_log_c(e, n, c, value):
    np.testing.assert_allclose(entropy(np.full((e, n, c), value)), np.full(n, math.log(c)), rtol=1e-12, atol=1e-15)


@FAST
@given(logits_and_labels(min_classes=1))
def test_entropy_properties(zy):
    z, _ = zy
    out = entropy(z)
    c = z.shape[2]
    assert out.shape == (z.shape[1],)
    assert ((out >= 0) & (out <= math.log(c) + 1e-12)).all()
    np.testing.assert_array_equal(out, entropy(z[-1]))  # only the final epoch counts
    expected = [-sum(p * math.log(p) for p in softmax_ref(v) if p > 0) for v in z[-1]]
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12)


def test_entropy_confident_is_zero_and_nan_raises():
    assert entropy(np.array([[200.0, 0.0, 0.0]])) == pytest.approx([0.0], abs=1e-12)
    with pytest.raises(ValueError, match="NaN/inf at epoch 0, sample 0, class 1"):
        entropy(np.array([[0.0, np.nan]]))


# --------------------------------------------------------------------------- margin


def test_margin_hand_computed():
    z = np.log(np.array([[0.5, 0.3, 0.2]]))
    np.testing.assert_allclose(margin(z, np.array([0])), [0.2], rtol=1e-12)
    np.testing.assert_allclose(margin(z, np.array([2])), [-0.3], rtol=1e-12)
    early = np.array([[[9.0, -9.0, 0.0]]])
    np.testing.assert_allclose(margin(np.concatenate([early, z[None]]), np.array([0])), [0.2], rtol=1e-12)


@FAST
@given(logits_and_labels())
def test_margin_properties(zy):
    z, y = zy
    out = margin(z, y)
    assert out.shape == y.shape
    assert ((out >= -1) & (out <= 1)).all()
    logit_margin = aum(z[-1], y)
    clear = np.abs(logit_margin) > 1e-6  # margin and logit margin agree in sign unless both ~0
    np.testing.assert_array_equal(np.sign(out[clear]), np.sign(logit_margin[clear]))


def test_margin_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        margin(np.zeros((3, 1)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="out of range"):
        margin(np.zeros((3, 2)), np.array([0, 1, 2]))


# --------------------------------------------------------------------------- influence


def test_reference_grad_and_hessian_match_finite_differences():
    features, labels, weight, bias = random_head(0, n=1)
    theta = np.concatenate([weight, bias[:, None]], axis=1)
    x, y = features[0], labels[0]
    g, h = head_grad_hess_ref(theta, x, y)
    eps = 1e-5
    num_g = np.zeros(theta.size)
    num_h = np.zeros((theta.size, theta.size))
    for k in range(theta.size):
        step = np.zeros(theta.size)
        step[k] = eps
        up, down = theta + step.reshape(theta.shape), theta - step.reshape(theta.shape)
        num_g[k] = (head_loss(up, x, y) - head_loss(down, x, y)) / (2 * eps)
        num_h[k] = (head_grad_hess_ref(up, x, y)[0] - head_grad_hess_ref(down, x, y)[0]) / (2 * eps)
    np.testing.assert_allclose(g, num_g, atol=1e-8)
    np.testing.assert_allclose(h, num_h, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_exact_matches_brute_force(seed):
    features, labels, weight, bias = random_head(seed)
    out = influence(features, labels, weight, bias, damping=1e-2)
    assert out.shape == labels.shape and out.dtype == np.float64 and (out >= 0).all()
    ref = influence_ref(features, labels, weight, bias, 1e-2)
    np.testing.assert_allclose(out, ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(
        influence(features, labels, weight, bias, damping=1e-2, n_total=1000),
        influence_ref(features, labels, weight, bias, 1e-2, n_total=1000),
        rtol=1e-8,
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_influence_cg_matches_exact(seed):
    features, labels, weight, bias = random_head(seed, n=40, d=5, c=4)
    exact = influence(features, labels, weight, bias, damping=1e-2, exact_max_params=10_000)
    cg = influence(features, labels, weight, bias, damping=1e-2, exact_max_params=0, cg_max_iter=200)
    np.testing.assert_allclose(cg, exact, rtol=1e-4, atol=1e-8)


def test_influence_cg_warns_when_not_converged():
    features, labels, weight, bias = random_head(4, n=20, d=6, c=4)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        influence(features, labels, weight, bias, damping=1e-4, exact_max_params=0, cg_max_iter=1)


def test_influence_errors():
    features, labels, weight, bias = random_head(5)
    with pytest.raises(ValueError, match="damping"):
        influence(features, labels, weight, bias, damping=0.0)
    with pytest.raises(ValueError, match="D=4"):
        influence(features[:, :3], labels, weight, bias)
    with pytest.raises(ValueError, match="bias"):
        influence(features, labels, weight, bias[:2])
    with pytest.raises(ValueError, match="out of range"):
        influence(features, labels + 3, weight, bias)
    with pytest.raises(ValueError, match="n_total"):
        influence(features, labels, weight, bias, n_total=0)
    bad = features.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="features contains NaN/inf at sample 7, feature 2"):
        influence(bad, labels, weight, bias)
    bad_w = weight.copy()
    bad_w[1, 0] = np.inf
    with pytest.raises(ValueError, match="weight contains NaN/inf at class 1, feature 0"):
        influence(features, labels, bad_w, bias)


# --------------------------------------------------------------------------- NaN across scores


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y: el2n(z, y),
        lambda z, y: aum(z, y),
        lambda z, y: entropy(z),
        lambda z, y: margin(z, y),
        lambda z, y: tdds(z, window=2),
    ],
    ids=["el2n", "aum", "entropy", "margin", "tdds"],
)
def test_logit_scores_reject_nan(call):
    z = np.zeros((3, 2, 3))
    z[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        call(z, np.array([0, 1]))


# --------------------------------------------------------------------------- registry


def make_dynamics(seed=0, e=12, n=5, c=3):
    """A consistent random dynamics dict."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(e, n, c))
    labels = rng.integers(0, c, n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return {
        "logits": logits,
        "labels": labels,
        "true_prob": probs[:, np.arange(n), labels],
        "correct": logits.argmax(axis=-1) == labels,
    }


def test_registry_contents():
    assert {"du", "tdds", "el2n", "forgetting", "aum", "entropy", "margin", "influence"} <= set(SCORES)
    for name, spec in SCORES.items():
        assert isinstance(spec, ScoreSpec) and spec.name == name and spec.description
    assert not SCORES["aum"].higher_is_harder and not SCORES["margin"].higher_is_harder
    assert all(SCORES[k].higher_is_harder for k in ("du", "tdds", "el2n", "forgetting", "entropy", "influence"))
    assert SCORES["influence"].needs == ("features", "labels", "weight", "bias")
    assert SCORES["du"].needs == ("true_prob",)


def test_compute_score_matches_direct_calls():
    dyn = make_dynamics()
    z, y = dyn["logits"], dyn["labels"]
    np.testing.assert_array_equal(compute_score("du", dyn, window=4), du(dyn["true_prob"], window=4))
    np.testing.assert_array_equal(compute_score("tdds", dyn), tdds(z))
    np.testing.assert_array_equal(compute_score("el2n", dyn, epochs=[0, 1]), el2n(z, y, epochs=[0, 1]))
    np.testing.assert_array_equal(compute_score("forgetting", dyn), forgetting(dyn["correct"]))
    np.testing.assert_array_equal(compute_score("aum", dyn), aum(z, y))
    np.testing.assert_array_equal(compute_score("entropy", dyn), entropy(z))
    np.testing.assert_array_equal(compute_score("margin", dyn), margin(z, y))
    features, labels, weight, bias = random_head(6)
    head = {"features": features, "labels": labels, "weight": weight, "bias": bias}
    np.testing.assert_array_equal(compute_score("influence", head), influence(features, labels, weight, bias))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown score 'nope'; known scores: .*du.*el2n"):
        get_score("nope")
    with pytest.raises(ValueError, match="missing labels"):
        compute_score("el2n", {"logits": np.zeros((2, 3, 4))})
    with pytest.raises(ValueError, match="already registered"):
        register_score("du", du, ("true_prob",))


def test_register_user_score():
    def final_loss(logits, labels):
        return -np.log(np.exp(logits[-1]) / np.exp(logits[-1]).sum(-1, keepdims=True))[np.arange(labels.size), labels]

    try:
        spec = register_score("final_loss", final_loss, ("logits", "labels"), description="last-epoch CE")
        assert get_score("final_loss") is spec and spec.higher_is_harder
        dyn = make_dynamics(1)
        np.testing.assert_allclose(compute_score("final_loss", dyn), final_loss(dyn["logits"], dyn["labels"]))
        register_score("final_loss", final_loss, "logits", higher_is_harder=False, overwrite=True)
        assert SCORES["final_loss"].needs == ("logits",) and not SCORES["final_loss"].higher_is_harder
        with pytest.raises(ValueError, match="needs"):
            register_score("bad", final_loss, ())
        with pytest.raises(ValueError, match="callable"):
            register_score("bad", 3, ("logits",))
    finally:
        SCORES.pop("final_loss", None)
        SCORES.pop("bad", None)


def test_el2n_score_over_the_first_k_epochs():
    """The registered el2n score: all epochs by default; el2n_epochs=K averages the first K (early
    training, as Paul et al.); K outside [1, E] is refused, and check_scores refuses it before training."""
    from streamprune.errors import StreamPruneError
    from streamprune.scoring import check_scores

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 20, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 20)
    fn = get_score("el2n").fn
    np.testing.assert_allclose(fn(logits, labels), el2n(logits, labels))
    np.testing.assert_allclose(fn(logits, labels, el2n_epochs=2), el2n(logits[:2], labels))
    np.testing.assert_allclose(fn(logits, labels, el2n_epochs=1), el2n(logits[0], labels))
    assert not np.allclose(fn(logits, labels, el2n_epochs=2), fn(logits, labels))
    for bad in (0, 7, 2.5, True):
        with pytest.raises(ValueError, match=r"el2n_epochs must be a whole number of epochs in \[1, E=6\]"):
            fn(logits, labels, el2n_epochs=bad)
    check_scores(["el2n", "du"], {"window": 3, "el2n_epochs": 6}, 6)
    with pytest.raises(StreamPruneError, match="el2n_epochs must be"):
        check_scores(["el2n"], {"el2n_epochs": 7}, 6)


# --------------------------------------------------------------------------- edges pinned by mutation testing


def test_nan_message_names_the_first_offending_entry():
    """With several NaN/inf entries the message names the first in row-major order, not any other."""
    x = np.full((4, 3), 0.5)
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"^du: true_prob contains NaN/inf at epoch 1, sample 2 \(value nan\)$"):
        du(x, window=2)


def test_huge_logits_do_not_overflow():
    """Softmax and log-softmax are shifted by the row maximum: logits of 1000 (exp overflows float64) still
    give the scores of a fully confident prediction, not NaN."""
    z = np.array([[[1000.0, 0.0, -1000.0]], [[0.0, 1000.0, 0.0]], [[-1000.0, 0.0, 1000.0]]])
    y = np.array([0])
    assert el2n(z, y, epochs=0) == pytest.approx([0.0], abs=1e-12)
    assert el2n(z, y, epochs=1) == pytest.approx([math.sqrt(2)], rel=1e-12)
    assert entropy(z) == pytest.approx([0.0], abs=1e-12)
    assert margin(z, y) == pytest.approx([-1.0], abs=1e-12)
    np.testing.assert_allclose(tdds(z, window=3), tdds_ref(z, 3, 0.9), rtol=1e-10)
    assert tdds(z, window=3) == pytest.approx([0.0], abs=1e-6)  # two equal changes: one class to another
    assert aum(z, y) == pytest.approx([(1000.0 - 1000.0 - 2000.0) / 3])


def test_float32_logits_are_scored_in_float64():
    """float32 dynamics (as recorded) are scored in float64: the same values as the float64 copy."""
    rng = np.random.default_rng(11)
    z = (rng.normal(size=(3, 50, 10)) * 8).astype(np.float32)
    y = rng.integers(0, 10, 50)
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(el2n(z, y), el2n(z64, y), rtol=1e-14)
    np.testing.assert_allclose(margin(z, y), margin(z64, y), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(tdds(z, window=2), tdds(z64, window=2), rtol=1e-13)
    p = (rng.random((12, 50)) * 0.01 + 0.5).astype(np.float32)  # small moves around 0.5
    np.testing.assert_allclose(du(p, window=4), du(p.astype(np.float64), window=4), rtol=1e-12)


def test_parameter_edges_are_refused():
    """A window one epoch longer than the run, a negative ddof, a decay above 1, epochs just outside [-E, E),
    logits with no epoch, bool labels, a correctness value outside {0, 1} and damping 0 are each refused
    naming the parameter (not scored, nor failing later with another error)."""
    x = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"^du: need at least window=4 epochs, got E=3"):
        du(x, window=4)
    with pytest.raises(ValueError, match=r"^tdds: need at least window=4 epochs, got E=3"):
        tdds(np.zeros((3, 2, 2)), window=4)
    with pytest.raises(ValueError, match=r"^du: window must be an integer, got True$"):
        du(x, window=True)
    with pytest.raises(ValueError, match=r"^du: ddof must be a finite number >= 0, got -0\.5$"):
        du(x, window=2, ddof=-0.5)
    with pytest.raises(ValueError, match=r"^tdds: decay must be in \(0, 1\], got 1\.5$"):
        tdds(np.zeros((3, 2, 2)), window=2, decay=1.5)
    z = np.random.default_rng(0).normal(size=(4, 3, 2))
    y = np.array([0, 1, 1])
    for bad in (4, -5):
        with pytest.raises(ValueError, match=rf"^el2n: epoch {bad} is out of range for E=4$"):
            el2n(z, y, epochs=[bad])
    np.testing.assert_array_equal(el2n(z, y, epochs=[-4]), el2n(z, y, epochs=[0]))
    with pytest.raises(ValueError, match=r"^el2n: logits need at least one epoch and one class, got shape "
                                         r"\(0, 3, 2\)$"):
        el2n(np.zeros((0, 3, 2)), y)
    with pytest.raises(ValueError, match=r"^aum: labels must be an integer array, got dtype bool$"):
        aum(z, np.array([True, False, True]))
    for value in (-1, 0.5):
        with pytest.raises(ValueError, match=r"^forgetting: correct must be boolean or 0/1"):
            forgetting(np.array([[1, 0], [value, 1]]))
    with pytest.raises(ValueError, match=r"^el2n: epochs must be None, an int, a slice or a 1-D integer sequence"):
        el2n(z, y, epochs=np.array([[0, 1]]))
    features, labels, weight, bias = random_head(5)
    with pytest.raises(ValueError, match=r"^influence: damping must be a finite number > 0, got 0\.0$"):
        influence(features, labels, weight, bias, damping=0.0)
    with pytest.raises(ValueError, match=r"^influence: n_total must be a positive integer, got True$"):
        influence(features, labels, weight, bias, n_total=True)
    with pytest.raises(ValueError, match=r"^influence: features must hold at least one sample, got shape \(0, 4\)$"):
        influence(features[:0], labels[:0], weight, bias)
    with pytest.raises(ValueError, match=r"^unknown score \['du'\]; known scores: "):
        get_score(["du"])


def test_influence_in_many_blocks_matches_brute_force(monkeypatch):
    """With temporaries capped at a few elements, the Hessian, the exact solve and conjugate gradient run
    over many blocks of samples (the path of large subsets) and give the brute-force scores."""
    from streamprune import scores

    features, labels, weight, bias = random_head(2, n=23)
    ref = influence_ref(features, labels, weight, bias, 1e-2)
    monkeypatch.setattr(scores, "_MAX_BLOCK_ELEMS", 40)  # exact path: 2 samples per block; CG: 1
    assert len(scores._chunks(23, 15)) == 12
    np.testing.assert_allclose(influence(features, labels, weight, bias, damping=1e-2), ref, rtol=1e-8, atol=1e-12)
    cg = influence(features, labels, weight, bias, damping=1e-2, exact_max_params=0, cg_max_iter=200)
    np.testing.assert_allclose(cg, ref, rtol=1e-5, atol=1e-10)


def test_influence_is_exact_up_to_exact_max_params():
    """P = C (D + 1) parameters equal to exact_max_params are still solved exactly (no CG warning even with one
    CG iteration allowed); one parameter fewer allowed goes to CG."""
    features, labels, weight, bias = random_head(7, n=20, d=4, c=3)  # P = 15
    ref = influence_ref(features, labels, weight, bias, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = influence(features, labels, weight, bias, exact_max_params=15, cg_max_iter=1)
    np.testing.assert_allclose(exact, ref, rtol=1e-8, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        influence(features, labels, weight, bias, exact_max_params=14, cg_max_iter=1)


def test_score_stage_options_reach_only_the_scores_that_take_them():
    """score_kwargs passes a score the options its function takes and that are set (None = unset); check_scores
    names the score once in its message, refuses a bare string, and accepts unset options."""
    from streamprune.errors import StreamPruneError
    from streamprune.scoring import check_scores, score_kwargs

    params = {"window": 3, "ddof": None, "decay": 0.5, "el2n_epochs": None}
    assert score_kwargs(get_score("du"), params) == {"window": 3}
    assert score_kwargs(get_score("tdds"), params) == {"window": 3, "decay": 0.5}
    assert score_kwargs(get_score("el2n"), params) == {}
    check_scores(["du", "tdds", "el2n"], params, 6)
    with pytest.raises(StreamPruneError, match=r"^score du: need at least window=7 epochs, got E=6 "):
        check_scores(["du"], {"window": 7}, 6)
    with pytest.raises(StreamPruneError, match=r"^give a list of at least one score name"):
        check_scores("du")


def test_influence_cg_reaches_its_tolerance_on_an_ill_conditioned_head():
    """A large-logit head with little damping is ill-conditioned: CG must still run to its 1e-10 relative
    residual (a looser stop leaves errors of 1e-5 here), matching the exact solve to 1e-8."""
    features, labels, weight, bias = random_head(1, n=60, d=12, c=6, scale=3.0)
    exact = influence(features, labels, weight, bias, damping=1e-4, exact_max_params=10_000)
    cg = influence(features, labels, weight, bias, damping=1e-4, exact_max_params=0, cg_max_iter=2000)
    np.testing.assert_allclose(cg, exact, rtol=1e-8)
