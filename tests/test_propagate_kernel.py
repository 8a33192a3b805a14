"""Score propagation and kernel-regression extrapolation: math, stages, resume, dask, bad input."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import kill_python_when
from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.extrapolate import extrapolate, methods, read_extrapolated
from streamprune.extrapolate.kernel import (choose_bandwidth, extrapolate_kernel, gaussian_weights, kernel_predict,
                                            median_distance, validation_sample)
from streamprune.extrapolate.knn import knn_weights, pearson
from streamprune.extrapolate.propagate import (extrapolate_propagate, gather, initial_iterate, max_change,
                                               propagate_block, propagate_in_memory, seed_stats)
from streamprune.index import build_index, read_graph
from streamprune.workspace import Workspace
from test_index import make_workspace
from test_knn import add_scores, smooth_score

FAST = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- helpers


def random_graph(rng, n, k, p_missing=0.15):
    """A directed kNN-like table: k distinct other rows per row (some -1), ascending distances in [0, 3)."""
    nbr = np.full((n, k), -1, np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        take = rng.choice(others, min(k, len(others)), replace=False)
        nbr[i, :len(take)] = take
    nbr[rng.random((n, k)) < p_missing] = -1
    dist = np.sort(rng.random((n, k)) * 3, axis=1)
    dist[nbr < 0] = np.inf
    return nbr, dist


def harmonic_reference(nbr, dist, clamp, valid):
    """Closed form: (I - P_RR) f_R = P_RL f_L + P_RX mean over rows R a seed reaches; the rest keep the mean."""
    n = len(clamp)
    seed = valid & np.isfinite(clamp)
    mean = clamp[seed].astype(np.float64).mean()
    ok = (nbr >= 0) & np.isfinite(dist)
    ok &= valid[np.where(nbr >= 0, nbr, 0)]
    w = knn_weights(np.where(ok, dist, np.inf)).astype(np.float64)
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(nbr.shape[1]):
            if ok[i, j] and w[i, j] > 0:
                W[i, nbr[i, j]] += w[i, j]
    # rows with a directed path to a seed
    reach = seed.copy()
    while True:
        new = reach | ((W > 0) & reach[None, :]).any(axis=1)
        new &= valid
        if (new == reach).all():
            break
        reach = new
    f = np.where(valid, mean, np.nan)
    f[seed] = clamp[seed]
    R = np.flatnonzero(reach & ~seed)
    if len(R):
        P = W[R] / W[R].sum(axis=1, keepdims=True)
        fixed = np.setdiff1d(np.flatnonzero(valid), R)
        rhs = P[:, fixed] @ f[fixed]
        f[R] = np.linalg.solve(np.eye(len(R)) - P[:, R], rhs)
    return f, reach


def write_graph(ws, name, x, valid, base, k, chunk, force=False):
    """graph/<name>.zarr by exact search (each valid row's k nearest ``base`` rows but itself) + marker."""
    n = len(x)
    xd = x.astype(np.float64)
    d2 = (xd * xd).sum(1)[:, None] + (xd * xd).sum(1)[None, :] - 2 * xd @ xd.T
    d2 = np.maximum(d2, 0.0)
    d2[:, ~base] = np.inf
    np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(np.take_along_axis(d2, idx, axis=1))
    missing = ~np.isfinite(dist) | ~valid[:, None]
    group = zarr.open_group(storage.zarr_store(ws.path("graph", f"{name}.zarr")), mode="w")
    group.create_array("neighbors", data=np.where(missing, -1, idx).astype(np.int64), chunks=(chunk, k))
    group.create_array("distances", data=np.where(missing, np.inf, dist).astype(np.float32), chunks=(chunk, k))
    run = ws.begin("index", {"graph": name, "k": k}, {}, key=f"index-{name}", force=force)
    run.commit({"graph": f"graph/{name}.zarr"}, {"n": n, "k": k})


def build_ws(root, n=1200, d=3, fraction=0.2, seed=0, chunk=150, k=10):
    """Embeddings (some invalid rows), a subset, smooth seed scores (two NaN) and both graphs (exact)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    valid = rng.random(n) > 0.05
    subset = np.sort(rng.choice(n, int(fraction * n), replace=False))
    ws = make_workspace(root, x, valid=valid, subset=subset, chunk=chunk)
    values = smooth_score(x[subset]) + 0.05 * rng.standard_normal(len(subset)).astype(np.float32)
    values[[3, 17]] = np.nan
    values[~valid[subset]] = np.nan
    add_scores(ws, "du", values.astype(np.float32))
    in_subset = np.zeros(n, bool)
    in_subset[subset] = True
    write_graph(ws, "all", x, valid, valid, k, chunk)
    write_graph(ws, "seeds", x, valid, valid & in_subset, k, chunk)
    return ws, x, valid, subset, values.astype(np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("propkernel") / "base"
    ws, x, valid, subset, values = build_ws(root)
    return {"root": str(root), "x": x, "valid": valid, "subset": subset, "values": values}


def clone(base, tmp_path, name="ws") -> Workspace:
    dst = str(tmp_path / name)
    shutil.copytree(base["root"], dst)
    return Workspace(dst)


def outputs(ws, method):
    return tuple(a[:] for a in read_extrapolated(ws, "du", method))


def stable_counts(marker):
    """The marker's counts (timings live apart, so counts of equal runs are equal)."""
    return marker["counts"]


# --------------------------------------------------------------------------- propagation math


def _block_loop(nv, nr, dist, current, reached, clamp, fill):
    out, out_r = [], []
    for v_row, r_row, d_row, cur, rea, cl in zip(nv, nr, dist, current, reached, clamp):
        if not np.isfinite(cur):
            out.append(np.nan)
            out_r.append(False)
            continue
        pairs = [(v, r, d) for v, r, d in zip(v_row, r_row, d_row) if np.isfinite(v) and np.isfinite(d)]
        w = []
        if pairs:
            dmin = min(d for _, _, d in pairs)
            w = [np.float32(np.exp(-(d - dmin))) for _, _, d in pairs]
        new_r = bool(rea or np.isfinite(cl) or any(r and wi > 0 for (_, r, _), wi in zip(pairs, w)))
        if np.isfinite(cl):
            out.append(cl)
        elif new_r and sum(w) > 0:
            out.append(sum(float(wi) * v for wi, (v, _, _) in zip(w, pairs)) / sum(float(wi) for wi in w))
        else:
            out.append(fill)
        out_r.append(new_r)
    return np.array(out), np.array(out_r)


@FAST
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_propagate_block_matches_loop(n, k, seed):
    rng = np.random.default_rng(seed)
    nv = np.where(rng.random((n, k)) < 0.8, rng.normal(size=(n, k)), np.nan)
    nr = rng.random((n, k)) < 0.5
    dist = np.where(rng.random((n, k)) < 0.9, rng.random((n, k)) * rng.choice([1.0, 500.0]), np.inf)
    current = np.where(rng.random(n) < 0.85, rng.normal(size=n), np.nan)
    reached = rng.random(n) < 0.3
    clamp = np.where(rng.random(n) < 0.3, rng.normal(size=n), np.nan)
    got, got_r = propagate_block(nv, nr, dist, current, reached, clamp, 0.25)
    want, want_r = _block_loop(nv, nr, dist, current, reached, clamp, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_r, want_r)
    seeds = np.isfinite(clamp) & np.isfinite(current)
    np.testing.assert_array_equal(got[seeds], clamp[seeds].astype(np.float32))  # clamped rows unchanged


@FAST
@given(st.integers(2, 15), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_propagation_equals_harmonic_solution(n, k, seed):
    # Distances below 1 keep every edge weight >= 1/e of the row's nearest: no near-singular graph,
    # whose fixed point a float32 iterate cannot approach (the step would round to zero first).
    rng = np.random.default_rng(seed)
    nbr, dist = random_graph(rng, n, k)
    dist = dist / 3
    valid = rng.random(n) < 0.9
    clamp = np.where(rng.random(n) < 0.4, rng.normal(size=n), np.nan)
    clamp[rng.integers(n)] = 1.5
    valid[np.flatnonzero(np.isfinite(clamp))[0]] = True
    res = propagate_in_memory(nbr, dist, clamp, valid, tol=1e-6, max_iter=20000)  # 1e-6: above float32 ulp cycles
    want, reach = harmonic_reference(nbr, dist, clamp, valid)
    assert res.converged
    np.testing.assert_array_equal(res.reached, reach)
    np.testing.assert_array_equal(np.isnan(res.values), ~valid)
    np.testing.assert_allclose(res.values[valid], want[valid], atol=1e-4)
    seed_rows = valid & np.isfinite(clamp)
    np.testing.assert_array_equal(res.values[seed_rows], clamp[seed_rows].astype(np.float32))


def test_unreached_component_keeps_the_seed_mean():
    # rows 0-2 form a cycle holding two seeds; rows 3-5 a cycle without any; row 6 has no neighbour
    nbr = np.array([[1, 2], [2, 0], [0, 1], [4, 5], [5, 3], [3, 4], [-1, -1]])
    dist = np.where(nbr >= 0, 1.0, np.inf)
    clamp = np.array([1.0, 3.0, np.nan, np.nan, np.nan, np.nan, np.nan])
    res = propagate_in_memory(nbr, dist, clamp, np.ones(7, bool), tol=1e-6, max_iter=100)
    assert res.converged and res.reached.tolist() == [True] * 3 + [False] * 4
    assert res.values[2] == pytest.approx(2.0) and (res.values[3:] == np.float32(2.0)).all()
    # stopping rule: a far row newly reached keeps the iteration going even when values barely move
    chain = np.array([[1], [2], [3], [-1]])
    res = propagate_in_memory(chain, np.ones((4, 1)), np.array([np.nan, np.nan, np.nan, 0.0]), np.ones(4, bool),
                              tol=10.0, max_iter=50)
    assert res.reached.all() and res.iterations == 4 and res.converged


def test_small_helpers():
    assert seed_stats(np.array([1.0, 3.0])) == (2.0, 1.0)
    f, r = initial_iterate(np.array([1, 1, 0, 1], bool), np.array([5.0, np.nan, 7.0, np.nan]), 0.5)
    np.testing.assert_array_equal(f, [5.0, 0.5, np.nan, 0.5])
    assert r.tolist() == [True, False, False, False]
    assert max_change(np.array([1.0, 2.0, 9.0, np.nan]), np.array([1.5, 2.0, 0.0, 1.0]),
                      np.array([np.nan, np.nan, 1.0, np.nan])) == 0.5
    assert max_change(np.array([np.nan]), np.array([np.nan]), np.array([np.nan])) == 0.0
    np.testing.assert_array_equal(gather(np.array([1.0, 2.0]), np.array([[1, -1, 5]]), np.nan), [[2.0, np.nan, np.nan]])


# --------------------------------------------------------------------------- kernel math


@FAST
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_kernel_limits(n, k, seed):
    rng = np.random.default_rng(seed)
    scores = np.where(rng.random((n, k)) < 0.85, rng.normal(size=(n, k)), np.nan)
    # distinct distances, at least 0.01 apart, with some missing neighbours
    dist = np.sort(rng.permutation(np.arange(k * 5))[:k] * 0.01 + rng.random() * 50)[None, :].repeat(n, 0)
    dist = np.where(rng.random((n, k)) < 0.9, dist, np.inf)
    usable = np.isfinite(scores) & np.isfinite(dist)
    mean = np.array([row[u].mean() if u.any() else np.nan for row, u in zip(scores, usable)])
    nearest = np.array([row[u][np.argmin(d[u])] if u.any() else np.nan for row, d, u in zip(scores, dist, usable)])
    np.testing.assert_allclose(kernel_predict(scores, dist, 1e9), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel_predict(scores, dist, 1e-6), nearest, rtol=1e-6, atol=1e-7)


@FAST
@given(st.integers(1, 6), st.integers(1, 8), st.floats(0.01, 100), st.integers(0, 2**31 - 1))
def test_kernel_matches_formula(n, k, h, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, k))
    dist = np.sort(rng.random((n, k)) * 3, axis=1)
    w = np.exp(-(dist / h) ** 2 / 2)
    want = np.where(w.sum(1) > 0, (w * scores).sum(1) / np.where(w.sum(1) > 0, w.sum(1), 1), np.nan)
    got = kernel_predict(scores, dist, h)
    ok = w.sum(1) > 1e-250  # where the naive formula itself does not underflow
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()  # the stable form never underflows


def test_gaussian_weights_far_and_missing():
    w = gaussian_weights(np.array([[1000.0, 1000.5, np.inf]]), 0.1)
    assert w[0, 0] == 1.0 and w[0, 2] == 0.0 and 0 <= w[0, 1] < 1
    assert np.isnan(kernel_predict(np.array([[np.nan, 1.0]]), np.array([[1.0, np.inf]]), 1.0))[0]
    assert median_distance(np.ones((2, 2)), np.array([[0.0, 0.0], [0.0, 2.0]])) == 2.0
    # a median of 0 (duplicates of the seeds) falls back to the smallest positive distance, not the largest
    assert median_distance(np.ones((2, 3)), np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 2.0]])) == 0.5
    assert median_distance(np.full((1, 2), np.nan), np.ones((1, 2))) == 1.0
    # neighbours without a seed score (NaN) are no part of the bandwidth's unit
    assert median_distance(np.array([[1.0, np.nan, np.nan]]), np.array([[0.5, 3.0, 4.0]])) == 0.5


def test_choose_bandwidth_prefers_the_informative_scale():
    rng = np.random.default_rng(0)
    m, k = 2000, 20
    target = rng.standard_normal(m)
    dist = np.sort(rng.random((m, k)) + 1.0, axis=1)
    dist[:, 0] = 0.2  # the nearest seed carries the signal, the others are noise
    scores = rng.standard_normal((m, k)) * 2
    scores[:, 0] = target + 0.3 * rng.standard_normal(m)
    h, mult, table, med = choose_bandwidth(scores, dist, target)
    assert med == pytest.approx(np.median(dist))
    assert mult == min(table) and h == pytest.approx(mult * med)
    assert table[mult] == max(table.values()) > table[max(table)]
    # no defined correlation anywhere: the multiple closest to 1
    h, mult, table, _ = choose_bandwidth(np.ones((5, 3)), np.ones((5, 3)), np.arange(5.0))
    assert mult == 1.0 and all(np.isnan(v) for v in table.values())


def test_choose_bandwidth_ties_go_to_the_smaller_multiple():
    """One neighbour per row: every bandwidth predicts the same, so all tie and the smallest multiple wins."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal(50)
    scores = (target + 0.5 * rng.standard_normal(50))[:, None]
    h, mult, table, med = choose_bandwidth(scores, rng.random((50, 1)) + 0.5, target)
    assert len(set(table.values())) == 1 and np.isfinite(table[mult])
    assert mult == min(table) == 0.1 and h == pytest.approx(0.1 * med)


# --------------------------------------------------------------------------- the stages


def test_propagate_stage_equals_in_memory_and_predicts(base, tmp_path):
    ws = clone(base, tmp_path)
    x, valid, subset, values = base["x"], base["valid"], base["subset"], base["values"]
    m = extrapolate_propagate(ws, "du", chunk_rows=400)
    c = m["counts"]
    nbr, dist = (a[:] for a in read_graph(ws, "all"))
    clamp = np.full(len(x), np.nan)
    clamp[subset] = values
    ref = propagate_in_memory(nbr, dist, clamp, valid)
    score, source = outputs(ws, "propagate")
    np.testing.assert_allclose(score[valid], ref.values[valid], rtol=1e-6, atol=1e-6)
    assert c["iterations"] == ref.iterations and c["converged"] == ref.converged
    assert c["delta"] == pytest.approx(ref.deltas[-1]) and len(c["history"]) == c["iterations"]
    assert c["n_unreached"] == int((valid & ~ref.reached).sum()) == 0
    measured = np.isfinite(values) & valid[subset]
    np.testing.assert_array_equal(score[subset[measured]], values[measured])
    assert (source[subset[measured]] == 0).all() and (source[~valid] == 255).all() and np.isnan(score[~valid]).all()
    others = valid.copy()
    others[subset[measured]] = False
    assert (source[others] == 4).all()
    assert c["n_seed"] == int(measured.sum()) and c["n_invalid"] == int((~valid).sum())
    p = pearson(score[others], smooth_score(x)[others])
    assert p > 0.8, p
    assert extrapolate_propagate(ws, "du", chunk_rows=400)["skipped"]
    assert not os.path.exists(os.path.join(ws.url, "_stages", "extrapolate-du-propagate"))  # scratch removed
    # max_iter stops early, and is reported as not converged
    m = extrapolate_propagate(ws, "du", chunk_rows=400, max_iter=2, force=True)
    assert m["counts"]["iterations"] == 2 and not m["counts"]["converged"]


def test_propagate_ignores_the_measured_scores_of_invalid_seed_rows(base, tmp_path):
    """A seed row whose embedding is invalid but whose score is finite (the subset model scored it) takes no
    part: not in the seed mean or std, not clamped, and its output row stays NaN / 255."""
    ws = clone(base, tmp_path)
    x, valid, subset = base["x"], base["valid"], base["subset"]
    values = smooth_score(x[subset])
    bad = ~valid[subset]
    assert bad.sum() >= 3
    values[bad] = 50.0  # far off the others: a mean or a neighbour that used them would show
    add_scores(ws, "el2n", values)
    m = extrapolate_propagate(ws, "el2n", chunk_rows=400)
    use = values[~bad]
    assert m["counts"]["seed_mean"] == pytest.approx(use.mean()) and m["counts"]["seed_std"] == pytest.approx(use.std())
    assert m["counts"]["n_seeds"] == len(use)
    nbr, dist = (a[:] for a in read_graph(ws, "all"))
    clamp = np.full(len(x), np.nan)
    clamp[subset] = values
    ref = propagate_in_memory(nbr, dist, clamp, valid)
    score, source = (a[:] for a in read_extrapolated(ws, "el2n", "propagate"))
    np.testing.assert_allclose(score[valid], ref.values[valid], rtol=1e-6, atol=1e-6)
    assert np.isnan(score[subset[bad]]).all() and (source[subset[bad]] == 255).all()


def test_kernel_stage_uses_seed_scores_only(base, tmp_path):
    ws = clone(base, tmp_path)
    x, valid, subset, values = base["x"], base["valid"], base["subset"], base["values"]
    # full-data scores exist but hold garbage and are unreadable: the bandwidth must not touch them
    add_scores(ws, "du", np.full(len(x), 1e6, np.float32), full=True)
    with open(os.path.join(ws.path("scores", "du-full.zarr"), "zarr.json"), "w") as f:
        f.write("not json")
    m = extrapolate_kernel(ws, "du", chunk_rows=128)
    c = m["counts"]
    scores, dist, targets = validation_sample(Workspace(base["root"]), "du")
    h, mult, table, med = choose_bandwidth(scores, dist, targets)  # from the clean workspace
    assert c["bandwidth"] == pytest.approx(h) and c["bandwidth_multiple"] == mult
    assert c["median_distance"] == pytest.approx(med) and c["n_validation"] == int(np.isfinite(values).sum())
    assert c["validation_pearson"] == {str(k): v for k, v in table.items()}
    assert c["validation_pearson"][str(mult)] > 0.8
    score, source = outputs(ws, "kernel")
    nbr, gdist = (a[:] for a in read_graph(ws, "seeds"))
    seed_value = np.full(len(x), np.nan)
    seed_value[subset] = values
    want = kernel_predict(np.where(nbr >= 0, seed_value[np.maximum(nbr, 0)], np.nan), gdist, h)
    pred = source == 5
    np.testing.assert_allclose(score[pred], want[pred], rtol=1e-6, atol=1e-6)
    measured = np.isfinite(values) & valid[subset]
    np.testing.assert_array_equal(score[subset[measured]], values[measured])
    assert (source[~valid] == 255).all() and c["n_seed"] == int(measured.sum())
    p = pearson(score[pred], smooth_score(x)[pred])
    assert p > 0.8, p
    # a fixed bandwidth skips the validation
    m = extrapolate_kernel(ws, "du", bandwidth=0.3, chunk_rows=128, force=True)
    assert m["counts"]["bandwidth"] == 0.3 and m["counts"]["n_validation"] == 0
    np.testing.assert_allclose(outputs(ws, "kernel")[0][pred],
                               kernel_predict(np.where(nbr >= 0, seed_value[np.maximum(nbr, 0)], np.nan), gdist,
                                              0.3)[pred], rtol=1e-6, atol=1e-6)


def test_propagate_and_kernel_are_made_again_from_a_rebuilt_graph(base, tmp_path):
    """The same options over a rebuilt graph are not served the result of the old graph."""
    ws = clone(base, tmp_path)
    x, valid = base["x"], base["valid"]
    first = {"propagate": extrapolate_propagate(ws, "du", max_iter=2), "kernel": extrapolate_kernel(ws, "du")}
    in_subset = np.isin(np.arange(len(x)), base["subset"])
    write_graph(ws, "all", x, valid, valid, 6, 150, force=True)
    write_graph(ws, "seeds", x, valid, valid & in_subset, 6, 150, force=True)
    again = {"propagate": extrapolate_propagate(ws, "du", max_iter=2), "kernel": extrapolate_kernel(ws, "du")}
    for method, marker in again.items():
        assert not marker.get("skipped") and marker["fingerprint"] != first[method]["fingerprint"], method


def test_kernel_rerun_of_a_finished_run_is_skipped(base, tmp_path):
    """The same kernel run again returns the finished marker marked skipped and leaves its output as it
    was (here overwritten by hand: a real re-run would have rewritten it); another bandwidth is refused."""
    ws = clone(base, tmp_path)
    done = extrapolate_kernel(ws, "du", bandwidth=0.3, chunk_rows=400)
    score = zarr.open_array(storage.zarr_store(ws.path("extrapolated", "du-kernel.zarr", "score")), mode="r+")
    score[:] = -1.0
    again = extrapolate_kernel(ws, "du", bandwidth=0.3, chunk_rows=400)
    assert again["skipped"] and again["fingerprint"] == done["fingerprint"] and again["counts"] == done["counts"]
    assert (outputs(ws, "kernel")[0] == -1.0).all()
    with pytest.raises(StreamPruneError, match=r"extrapolate-du-kernel: .* another configuration "
                                               r"\(changed: bandwidth 0.3 -> 0.5\)"):
        extrapolate_kernel(ws, "du", bandwidth=0.5, chunk_rows=400)


def test_dispatch(base, tmp_path):
    ws = clone(base, tmp_path)
    assert {"propagate", "kernel"} <= set(methods())
    assert extrapolate(ws, "du", "kernel", bandwidth="auto")["key"] == "extrapolate-du-kernel"
    m = extrapolate(ws, "du", "propagate", tol=1e-2, max_iter=3)
    assert m["key"] == "extrapolate-du-propagate" and m["config"]["tol"] == 1e-2


def _progress(ws):
    files = glob.glob(os.path.join(ws.url, "_stages", "extrapolate-du-propagate", "*", "chunks", "progress.json"))
    if not files:
        return None
    try:
        with open(files[0]) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _mid_iteration(ws):
    """True once iteration >= 2 is complete and some chunk of the next one has been recorded."""
    prog = _progress(ws)
    if prog is None or prog["iter"] < 2:
        return False
    for path in glob.glob(os.path.join(os.path.dirname(_progress_path(ws)), "it-*.json")):
        try:
            with open(path) as f:
                if json.load(f)["iter"] == prog["iter"] + 1:
                    return True
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    return False


def _progress_path(ws):
    return glob.glob(os.path.join(ws.url, "_stages", "extrapolate-du-propagate", "*", "chunks", "progress.json"))[0]


def test_killed_propagation_resumes_identically(base, tmp_path):
    ws, clean = clone(base, tmp_path, "killed"), clone(base, tmp_path, "clean")
    code = (f"from streamprune.extrapolate.propagate import extrapolate_propagate; "
            f"extrapolate_propagate({ws.url!r}, 'du', tol=0.03, chunk_rows=300)")
    kill_python_when(code, lambda: _mid_iteration(ws), env={"STREAMPRUNE_TASK_DELAY": "0.1"}, timeout=120)
    assert ws.marker("extrapolate-du-propagate") is None
    killed_at = _progress(ws)["iter"]
    resumed = extrapolate_propagate(ws, "du", tol=0.03, chunk_rows=300)
    expected = extrapolate_propagate(clean, "du", tol=0.03, chunk_rows=300)
    assert resumed["counts"]["iterations"] > killed_at + 1
    assert stable_counts(resumed) == stable_counts(expected)
    for got, want in zip(outputs(ws, "propagate"), outputs(clean, "propagate")):
        np.testing.assert_array_equal(got, want)


def test_killed_kernel_resumes_identically(base, tmp_path):
    ws, clean = clone(base, tmp_path, "killed"), clone(base, tmp_path, "clean")
    code = (f"from streamprune.extrapolate.kernel import extrapolate_kernel; "
            f"extrapolate_kernel({ws.url!r}, 'du', chunk_rows=100)")
    pattern = os.path.join(ws.url, "_stages", "extrapolate-du-kernel", "*", "chunks", "rows-*.json")
    kill_python_when(code, lambda: len(glob.glob(pattern)) >= 3, env={"STREAMPRUNE_TASK_DELAY": "0.2"}, timeout=120)
    assert ws.marker("extrapolate-du-kernel") is None and 3 <= len(glob.glob(pattern)) < 12
    resumed = extrapolate_kernel(ws, "du", chunk_rows=100)
    expected = extrapolate_kernel(clean, "du", chunk_rows=100)
    assert stable_counts(resumed) == stable_counts(expected)
    for got, want in zip(outputs(ws, "kernel"), outputs(clean, "kernel")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_dask_cluster_and_threads_equal_sync(base, tmp_path, dask_cluster):
    runs = {name: clone(base, tmp_path, name) for name in ("sync", "threads", "dask")}
    for fn, opts in ((extrapolate_propagate, {"max_iter": 6}), (extrapolate_kernel, {})):
        markers = {name: fn(ws, "du", chunk_rows=300, scheduler=dask_cluster if name == "dask" else name, **opts)
                   for name, ws in runs.items()}
        assert stable_counts(markers["threads"]) == stable_counts(markers["dask"]) == stable_counts(markers["sync"])
    for method in ("propagate", "kernel"):
        want = outputs(runs["sync"], method)
        for name in ("threads", "dask"):
            for got, ref in zip(outputs(runs[name], method), want):
                np.testing.assert_array_equal(got, ref)


def test_propagate_k_over_the_graph_with_force_keeps_the_finished_result(base, tmp_path):
    """A refused k leaves the workspace as it was, --force or not (the finished result was removed first)."""
    ws = clone(base, tmp_path)
    done = extrapolate_propagate(ws, "du", max_iter=3)
    with pytest.raises(StreamPruneError, match="k=11 exceeds the graph's k=10"):
        extrapolate_propagate(ws, "du", max_iter=3, k=11, force=True)
    assert ws.marker("extrapolate-du-propagate")["fingerprint"] == done["fingerprint"]
    outputs(ws, "propagate")


def test_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, subset=np.arange(0, 200, 4), chunk=50)

    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    with pytest.raises(StreamPruneError, match="graph 'all' has not been built") as e:
        extrapolate_propagate(ws, "du")
    one_line(e)
    with pytest.raises(StreamPruneError, match="graph 'seeds' has not been built") as e:
        extrapolate_kernel(ws, "du")
    one_line(e)
    build_index(ws, graph="both", k=5, scheduler="sync")
    with pytest.raises(StreamPruneError, match="score 'du' has not been computed") as e:
        extrapolate_propagate(ws, "du")
    one_line(e)
    with pytest.raises(StreamPruneError, match="score 'du' has not been computed"):
        extrapolate_kernel(ws, "du")
    add_scores(ws, "du", np.full(50, np.nan, np.float32))  # no seed has a score: refused by every method
    for method in (extrapolate_propagate, extrapolate_kernel):
        with pytest.raises(StreamPruneError, match=r"scores/du.zarr has no value: all 50 seed rows are NaN") as e:
            method(ws, "du")
        one_line(e)
    add_scores(ws, "el2n", np.zeros(50, np.float32))
    for bad in ({"tol": -1.0}, {"tol": float("nan")}, {"max_iter": 0}, {"max_iter": 2.5}, {"k": 0},
                {"chunk_rows": 0}):
        with pytest.raises(StreamPruneError, match="must be"):
            extrapolate_propagate(ws, "el2n", **bad)
    with pytest.raises(StreamPruneError, match="k=9 exceeds the graph's k=5"):
        extrapolate_propagate(ws, "el2n", k=9)
    for bad in (0.0, -1.0, float("inf"), "wide", True):
        with pytest.raises(StreamPruneError, match="--bandwidth must be 'auto' or a distance > 0"):
            extrapolate_kernel(ws, "el2n", bandwidth=bad)
    add_scores(ws, "aum", np.zeros(49, np.float32))
    with pytest.raises(StreamPruneError, match="49 values but the subset has 50 rows"):
        extrapolate_kernel(ws, "aum")
    # constant seed scores: no change at all; iterations only until every row is reached
    m = extrapolate_propagate(ws, "el2n")
    assert m["counts"]["converged"] and all(h["delta"] == 0 for h in m["counts"]["history"])
    np.testing.assert_array_equal(read_extrapolated(ws, "el2n", "propagate")[0][:], np.zeros(200, np.float32))
