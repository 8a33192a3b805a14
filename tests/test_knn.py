"""Tests for kNN extrapolation (streamprune.extrapolate.knn) and the shared extrapolation I/O (common)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.extrapolate import SOURCES, extrapolate, read_extrapolated, register_method
from streamprune.extrapolate.common import SeedScores, finalize_chunk, lookup, seed_scores, write_chunks
from streamprune.extrapolate.knn import choose_k, extrapolate_knn, k_candidates, knn_predict, knn_weights, pearson
from streamprune.index import build_index
from streamprune.leases import releases_leases
from streamprune.workspace import Workspace
from helpers import kill_python_when
from test_index import clustered, make_workspace

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- helpers


def add_scores(ws: Workspace, name: str, values: np.ndarray, *, full: bool = False, replica: int = 0) -> None:
    """Write scores/<name>.zarr (seed scores aligned with the subset rows; or full-data ones) and its marker."""
    from streamprune.scoring import score_array_path, score_key

    path = score_array_path(name, full, replica)
    arr = zarr.create_array(storage.zarr_store(ws.path(path)), shape=values.shape, dtype="float32",
                            chunks=(max(1, len(values)),), fill_value=np.nan)
    arr[:] = values
    ws.begin("score", {"score": name, "full": full}, {}, key=score_key(name, full, replica)).commit(
        {"score": path}, {"n": len(values)})


def smooth_score(x: np.ndarray) -> np.ndarray:
    return (np.sin(x[:, 0]) + 0.5 * x[:, 1]).astype(np.float32)


def knn_reference(x, valid, seeds, seed_values, k):
    """Explicit loops: each row's k nearest valid seeds (itself excluded), exp(-d)-weighted mean."""
    n = len(x)
    value_of = dict(zip(seeds.tolist(), seed_values.tolist()))
    base = [s for s in seeds if valid[s]]
    score = np.full(n, np.nan)
    source = np.full(n, 255)
    for i in range(n):
        if not valid[i]:
            continue
        if i in value_of and np.isfinite(value_of[i]):
            score[i], source[i] = value_of[i], 0
            continue
        cand = [s for s in base if s != i]
        d = [float(np.sqrt(((x[s].astype(np.float64) - x[i]) ** 2).sum())) for s in cand]
        order = np.argsort(d, kind="stable")[:k]
        num = den = 0.0
        for j in order:
            v = value_of[cand[j]]
            if np.isfinite(v):
                num += np.exp(-d[j]) * v
                den += np.exp(-d[j])
        score[i] = num / den if den > 0 else np.nan
        source[i] = 1
    return score, source


def scored_workspace(root, n=500, d=6, seed=0, chunk=50):
    """Embeddings with some invalid rows, a 30 % subset, seed scores (two NaN), the seeds graph."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 0.7).astype(np.float32)
    valid = rng.random(n) > 0.08
    subset = np.sort(rng.choice(n, int(0.3 * n), replace=False))
    ws = make_workspace(root, x, valid=valid, subset=subset, chunk=chunk)
    values = smooth_score(x[subset]) + 0.05 * rng.standard_normal(len(subset)).astype(np.float32)
    values[[3, 17]] = np.nan
    values[~valid[subset]] = np.nan
    add_scores(ws, "du", values.astype(np.float32))
    build_index(ws, graph="seeds", k=20, scheduler="sync", chunk_rows=chunk * 2)
    return ws, x, valid, subset, values


# --------------------------------------------------------------------------- pure math


@FAST
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 8)),
                  elements=st.one_of(st.floats(0, 1e4), st.just(np.inf))))
def test_knn_weights_properties(d):
    w = knn_weights(d)
    assert w.shape == d.shape and (w >= 0).all() and (w <= 1).all()
    finite = np.isfinite(d)
    assert (w[~finite] == 0).all()
    for row_w, row_d, row_ok in zip(w, d, finite):
        if row_ok.any():
            assert row_w[row_ok].max() == pytest.approx(1.0)  # no underflow, however large the distances
            ratio = np.exp(-(row_d[row_ok] - row_d[row_ok].min()))
            np.testing.assert_allclose(row_w[row_ok], ratio, rtol=1e-5, atol=1e-30)


def _predict_loop(scores, dists, k):
    out = []
    for s_row, d_row in zip(scores, dists):
        pairs = [(s, d) for s, d in zip(s_row[:k], d_row[:k]) if np.isfinite(s) and np.isfinite(d)]
        if not pairs:
            out.append(np.nan)
            continue
        dmin = min(d for _, d in pairs)
        w = [np.exp(-(d - dmin)) for _, d in pairs]
        out.append(sum(wi * s for wi, (s, _) in zip(w, pairs)) / sum(w))
    return np.array(out)


@FAST
@given(st.data())
def test_knn_predict_matches_loop(data):
    n, kk = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    scores = data.draw(hnp.arrays(np.float64, (n, kk), elements=st.one_of(st.floats(-5, 5), st.just(np.nan))))
    dists = data.draw(hnp.arrays(np.float64, (n, kk), elements=st.one_of(st.floats(0, 50), st.just(np.inf))))
    k = data.draw(st.integers(1, kk))
    np.testing.assert_allclose(knn_predict(scores, dists, k), _predict_loop(scores, dists, k), rtol=1e-5, atol=1e-6)


def test_knn_predict_far_neighbours_do_not_underflow():
    got = knn_predict(np.array([[1.0, 3.0]]), np.array([[1000.0, 1000.0]]), 2)
    assert got[0] == pytest.approx(2.0)


def test_choose_k_picks_the_informative_neighbourhood():
    rng = np.random.default_rng(0)
    m = 3000
    target = rng.standard_normal(m)
    scores = rng.standard_normal((m, 100)) * 3  # uninformative neighbours beyond the 20th
    scores[:, :20] = target[:, None] + rng.standard_normal((m, 20)) * 2
    dist = np.ones((m, 100))
    k, table = choose_k(scores, dist, target)
    assert k == 20 and sorted(table) == [10, 20, 50, 100]
    assert table[20] > table[10] > table[100] and table[20] > table[50]
    # capped by the graph's k
    k, table = choose_k(scores[:, :30], dist[:, :30], target)
    assert sorted(table) == [10, 20, 30] and k == 20
    assert k_candidates(5) == [5] and k_candidates(100) == [10, 20, 50, 100]


def test_choose_k_ties_go_to_the_smaller_k():
    rng = np.random.default_rng(1)
    target = rng.standard_normal(500)
    scores = np.full((500, 50), np.nan)
    scores[:, :10] = target[:, None] + rng.standard_normal((500, 10))  # beyond 10: no usable score
    k, table = choose_k(scores, np.ones((500, 50)), target)
    assert table[10] == table[20] == table[50] and k == 10
    k, table = choose_k(np.full((5, 20), np.nan), np.ones((5, 20)), np.arange(5.0))  # undefined everywhere
    assert k == 10 and all(np.isnan(v) for v in table.values())


def test_pearson_and_lookup():
    assert pearson(np.array([1, 2, 3, np.nan]), np.array([2, 4, 6.5, 1])) == pytest.approx(0.9986, abs=1e-3)
    assert np.isnan(pearson(np.ones(4), np.arange(4.0)))
    rows, values = np.array([2, 5, 9]), np.array([0.5, np.nan, 1.5], np.float32)
    np.testing.assert_array_equal(lookup(rows, values, np.array([[9, -1], [2, 3], [10, 5]])),
                                  [[1.5, np.nan], [0.5, np.nan], [np.nan, np.nan]])
    assert np.isnan(lookup(np.array([], np.int64), np.array([], np.float32), np.array([1]))).all()


def test_seed_lookup_dense_table_equals_the_binary_search(monkeypatch):
    """SeedScores.lookup reads a dense per-row table (below DENSE_LOOKUP_BYTES) or searches the sorted
    seeds: the same values for seed rows, non-seeds, -1 and ids past the last seed or the graph."""
    from streamprune.extrapolate import common

    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(5000, 700, replace=False))
    values = rng.normal(size=700).astype(np.float32)
    values[::7] = np.nan
    ids = np.concatenate([rows, rng.integers(-1, 6000, 3000), [-1, rows[-1], rows[-1] + 1, 10 ** 9]]).reshape(-1, 2)
    want = lookup(rows, values, ids)
    dense = SeedScores(rows, values, "fp")
    np.testing.assert_array_equal(dense.lookup(ids), want)
    assert dense._dense is not None and len(dense._dense) == rows[-1] + 2
    monkeypatch.setattr(common, "DENSE_LOOKUP_BYTES", 1000)
    searched = SeedScores(rows, values, "fp")
    assert searched._dense is None
    np.testing.assert_array_equal(searched.lookup(ids), want)
    # a sparse subset (10 seeds over 5000 rows) keeps the search unless the table is small anyway
    monkeypatch.setattr(common, "DENSE_LOOKUP_BYTES", 1 << 30)
    monkeypatch.setattr(common, "DENSE_LOOKUP_FREE", 1000)
    sparse = SeedScores(rows[::70], values[::70], "fp")
    assert sparse._dense is None
    np.testing.assert_array_equal(sparse.lookup(ids), lookup(rows[::70], values[::70], ids))
    monkeypatch.setattr(common, "DENSE_LOOKUP_FREE", 1 << 20)
    assert SeedScores(rows[::70], values[::70], "fp")._dense is not None
    assert np.isnan(SeedScores(np.zeros(0, np.int64), np.zeros(0, np.float32), "fp").lookup(np.array([0, 3]))).all()


def test_seed_scores_are_read_again_when_the_score_is_recomputed(tmp_path):
    """seed_scores caches per process: a score re-run since (a new marker) is read again, not served stale."""
    ws = make_workspace(tmp_path / "ws", np.zeros((10, 2), np.float32), subset=np.array([1, 4, 7]))
    add_scores(ws, "du", np.array([0.1, 0.2, 0.3], np.float32))
    np.testing.assert_array_equal(seed_scores(ws, "du").values, np.float32([0.1, 0.2, 0.3]))
    arr = zarr.open_array(storage.zarr_store(ws.path("scores", "du.zarr")), mode="r+")
    arr[:] = np.float32([0.7, 0.8, 0.9])
    ws.begin("score", {"score": "du", "params": {"window": 3}}, {}, key="score-du", force=True).commit(
        {"score": "scores/du.zarr"}, {"n": 3})
    again = seed_scores(Workspace(ws.url), "du")
    np.testing.assert_array_equal(again.values, np.float32([0.7, 0.8, 0.9]))
    assert again.fingerprint == ws.marker("score-du")["fingerprint"]


def test_finalize_chunk_keeps_seeds_and_marks_invalid():
    seeds = SeedScores(np.array([1, 4, 12]), np.array([7.0, np.nan, 9.0], np.float32), "fp")
    score, source = finalize_chunk(0, np.arange(6, dtype=np.float32), np.array([1, 1, 0, 1, 1, 1], bool), seeds, "knn")
    np.testing.assert_array_equal(score, [0, 7, np.nan, 3, 4, 5])  # seed 4 has no measured score: predicted
    assert source.tolist() == [1, 0, 255, 1, 1, 1]


def test_finalize_chunk_an_invalid_seed_row_stays_invalid_with_a_measured_score():
    """A seed row whose embedding is invalid gets NaN / 255, not its measured score."""
    seeds = SeedScores(np.array([1, 2]), np.array([7.0, 8.0], np.float32), "fp")
    score, source = finalize_chunk(0, np.arange(4, dtype=np.float32), np.array([1, 1, 0, 1], bool), seeds, "knn")
    np.testing.assert_array_equal(score, [0, 7, np.nan, 3])
    assert source.tolist() == [1, 0, 255, 1]


def test_seed_lookup_gives_nan_for_every_negative_id():
    """Ids below -1 are not seeds either: the dense table must not read them from its end."""
    seeds = SeedScores(np.array([0, 2, 3]), np.array([1.0, 2.0, 3.0], np.float32), "fp")
    assert seeds._dense is not None
    ids = np.array([[-1, -2, -3, -4], [3, 2, 1, 0]])
    np.testing.assert_array_equal(seeds.lookup(ids), [[np.nan] * 4, [3.0, 2.0, np.nan, 1.0]])
    np.testing.assert_array_equal(lookup(seeds.rows, seeds.values, ids), seeds.lookup(ids))


# --------------------------------------------------------------------------- the stage


def test_knn_stage_equals_brute_force_reference(tmp_path):
    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws")
    for k in (5, 20):
        m = extrapolate_knn(ws, "du", k=k, force=True, chunk_rows=64)
        assert m["counts"]["k"] == k
        score, source = (a[:] for a in read_extrapolated(ws, "du", "knn"))
        ref_score, ref_source = knn_reference(x, valid, subset, values, k)
        np.testing.assert_array_equal(source, ref_source)
        np.testing.assert_allclose(score, ref_score, rtol=1e-5, atol=1e-5)
    # seed rows keep their measured scores exactly
    seed_pos = np.flatnonzero(np.isfinite(values))
    np.testing.assert_array_equal(score[subset[seed_pos]], values[seed_pos])
    assert m["counts"]["n_seed"] == len(seed_pos) and m["counts"]["n_invalid"] == int((~valid).sum())


def test_knn_is_made_again_from_a_rebuilt_seed_graph(tmp_path):
    """The same options over a rebuilt seeds graph are not served the result of the old graph."""
    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=200)
    first = extrapolate_knn(ws, "du", k=5)
    build_index(ws, graph="seeds", k=10, scheduler="sync", force=True)
    again = extrapolate_knn(ws, "du", k=5)
    assert not again.get("skipped") and again["fingerprint"] != first["fingerprint"]


def test_auto_k_uses_seed_scores_only(tmp_path):
    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=1500)
    # full-data scores exist but are unreadable: choose_k must not touch them
    add_scores(ws, "du", np.zeros(1500, np.float32), full=True)
    with open(os.path.join(ws.path("scores", "du-full.zarr"), "zarr.json"), "w") as f:
        f.write("not json")
    m = extrapolate_knn(ws, "du", k="auto", chunk_rows=100)
    c = m["counts"]
    assert c["k"] in (10, 20) and set(c["validation_pearson"]) == {"10", "20"}
    assert c["validation_pearson"][str(c["k"])] == max(c["validation_pearson"].values())
    assert c["validation_pearson"][str(c["k"])] > 0.8  # a smooth score is predictable from neighbours
    assert c["n_validation"] == int(np.isfinite(values).sum())
    ref_score, _ = knn_reference(x, valid, subset, values, c["k"])
    np.testing.assert_allclose(read_extrapolated(ws, "du", "knn")[0][:], ref_score, rtol=1e-5, atol=1e-5)
    assert extrapolate_knn(ws, "du", k="auto", chunk_rows=100)["skipped"]


def test_killed_extrapolation_resumes_identically(tmp_path, monkeypatch):
    from streamprune.extrapolate import knn

    ws, *_ = scored_workspace(tmp_path / "killed", n=1200, chunk=50)
    clean, *_ = scored_workspace(tmp_path / "clean", n=1200, chunk=50)
    code = (f"from streamprune.extrapolate.knn import extrapolate_knn; "
            f"extrapolate_knn({ws.url!r}, 'du', k='auto', chunk_rows=50)")
    env = {"STREAMPRUNE_TASK_DELAY": "0.2"}
    pattern = os.path.join(ws.url, "_stages", "extrapolate-du-knn", "*", "chunks", "rows-*.json")
    kill_python_when(code, lambda: len(glob.glob(pattern)) >= 3, env=env, timeout=120)
    assert ws.marker("extrapolate-du-knn") is None and 3 <= len(glob.glob(pattern)) < 24
    done = {int(os.path.basename(p)[len("rows-"):-len(".json")]) for p in glob.glob(pattern)}
    predicted, predict = [], knn._predict_chunk

    def recorded(ws, start, stop, *args):
        predicted.append(start // 50)
        return predict(ws, start, stop, *args)

    monkeypatch.setattr(knn, "_predict_chunk", recorded)
    resumed = extrapolate_knn(ws, "du", k="auto", chunk_rows=50)
    assert sorted(predicted) == sorted(set(range(24)) - done)  # the recorded chunks are not predicted again
    monkeypatch.undo()
    expected = extrapolate_knn(clean, "du", k="auto", chunk_rows=50)
    assert resumed["counts"] == expected["counts"]
    for got, want in zip(read_extrapolated(ws, "du", "knn"), read_extrapolated(clean, "du", "knn")):
        np.testing.assert_array_equal(got[:], want[:])


def _row_values(ws, start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.float32) + 0.5


def _row_values_killed_at_40(ws, start: int, stop: int) -> np.ndarray:
    if start >= 40:
        raise RuntimeError("killed")
    return _row_values(ws, start, stop)


def test_a_run_resumed_with_other_chunk_rows_writes_every_row(tmp_path):
    """A killed run resumed with another chunking (label-aware's --chunk-rows is not part of its
    configuration) starts its output afresh, and writes again the rows it recorded in the old one."""
    n = 100
    ws = make_workspace(tmp_path / "ws", np.zeros((n, 2), np.float32), subset=np.array([3, 50]))
    add_scores(ws, "du", np.float32([7.0, 8.0]))

    def begin():
        return ws.begin("extrapolate", {"score": "du", "method": "knn"}, {}, key="extrapolate-du-knn")

    @releases_leases  # as a stage function: the lease this thread takes is given back at the end
    def killed_then_resumed():
        killed = begin()
        with pytest.raises(RuntimeError, match="killed"):
            write_chunks(ws, killed, "du", "knn", n, _row_values_killed_at_40, chunk_rows=20)
        assert {"rows-0", "rows-1"} <= killed.done_chunks()
        return write_chunks(ws, begin(), "du", "knn", n, _row_values, chunk_rows=32)

    counts = killed_then_resumed()
    group = zarr.open_group(storage.zarr_store(ws.path("extrapolated", "du-knn.zarr")), mode="r")
    want = np.arange(n, dtype=np.float32) + 0.5
    want[[3, 50]] = 7.0, 8.0
    np.testing.assert_array_equal(group["score"][:], want)
    np.testing.assert_array_equal(group["source"][:], np.where(np.isin(np.arange(n), [3, 50]), 0, 1))
    assert (counts["n"], counts["n_seed"], counts["n_predicted"], counts["n_invalid"]) == (n, 2, 98, 0)


def _row_values_nan_from_60(ws, start: int, stop: int) -> np.ndarray:
    values = np.arange(start, stop, dtype=np.float32)
    values[values >= 60] = np.nan
    return values


def test_write_chunks_counts_keep_unpredicted_and_invalid_rows_apart(tmp_path):
    """A valid row without a prediction counts in n_nan, an invalid row (a seed one included) in n_invalid
    only, and neither is in n_predicted, the mean or the std."""
    n = 100
    valid = np.ones(n, bool)
    valid[[10, 70, 90]] = False
    ws = make_workspace(tmp_path / "ws", np.zeros((n, 2), np.float32), valid=valid, subset=np.array([3, 65, 70]))
    add_scores(ws, "du", np.float32([7.0, 8.0, 9.0]))

    @releases_leases
    def run():
        begun = ws.begin("extrapolate", {"score": "du", "method": "knn"}, {}, key="extrapolate-du-knn")
        return write_chunks(ws, begun, "du", "knn", n, _row_values_nan_from_60, chunk_rows=32)

    counts = run()
    group = zarr.open_group(storage.zarr_store(ws.path("extrapolated", "du-knn.zarr")), mode="r")
    score, source = group["score"][:], group["source"][:]
    want = np.where(np.arange(n) < 60, np.arange(n, dtype=np.float32), np.nan)
    want[[3, 65]] = 7.0, 8.0
    want[~valid] = np.nan
    np.testing.assert_array_equal(score, want)
    assert source[70] == 255 and source[3] == source[65] == 0
    scored = want[np.isfinite(want)]
    assert (counts["n"], counts["n_seed"], counts["n_invalid"], counts["n_nan"]) == (n, 2, 3, 37)
    assert counts["n_predicted"] == len(scored) - 2 == 58
    assert counts["mean"] == pytest.approx(scored.mean()) and counts["std"] == pytest.approx(scored.std())


def test_seed_scores_refuse_subset_rows_out_of_order(tmp_path):
    """Unsorted or repeated subset rows would pair scores with the wrong rows (the lookups search them)."""
    ws = make_workspace(tmp_path / "ws", np.zeros((10, 2), np.float32), subset=np.array([1, 4, 7]))
    add_scores(ws, "du", np.float32([0.1, 0.2, 0.3]))
    rows = zarr.open_array(storage.zarr_store(ws.path("subset", "rows.zarr")), mode="r+")
    for bad in ([4, 1, 7], [1, 4, 4]):
        rows[:] = bad
        with pytest.raises(StreamPruneError, match="subset/rows.zarr is not strictly increasing"):
            seed_scores(Workspace(ws.url), "du")


def test_dispatch_and_registry(tmp_path, monkeypatch):
    from streamprune.extrapolate import common

    monkeypatch.setattr(common, "_METHODS", dict(common._METHODS))  # test-dummy stays out of other tests' registry
    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=200)
    m = extrapolate(ws, "du", "knn", k=5)
    assert m["key"] == "extrapolate-du-knn"
    with pytest.raises(StreamPruneError, match="unknown extrapolation method 'nope'"):
        extrapolate(ws, "du", "nope")
    calls = []
    register_method("test-dummy", lambda w, score, **opts: calls.append((score, opts)) or {"ok": True})
    assert extrapolate(ws, "du", "test-dummy", a=1) == {"ok": True} and calls == [("du", {"a": 1})]
    assert SOURCES["knn"] == 1 and SOURCES["gcn"] == 2
    seeds = seed_scores(ws, "du")
    np.testing.assert_array_equal(seeds.rows, subset)


def test_bad_input(tmp_path):
    x = clustered(300, 4)
    ws = make_workspace(tmp_path / "ws", x, subset=np.arange(0, 300, 3), chunk=50)
    with pytest.raises(StreamPruneError, match="graph 'seeds' has not been built"):
        extrapolate_knn(ws, "du")
    build_index(ws, graph="seeds", k=10, scheduler="sync")
    with pytest.raises(StreamPruneError, match="score 'du' has not been computed"):
        extrapolate_knn(ws, "du")
    add_scores(ws, "du", np.full(100, np.inf, np.float32))
    with pytest.raises(StreamPruneError, match="infinite values"):
        extrapolate_knn(ws, "du")
    add_scores(ws, "forgetting", np.full(100, np.nan, np.float32))  # knn and kernel committed all-NaN outputs
    with pytest.raises(StreamPruneError, match=r"scores/forgetting.zarr has no value: all 100 seed rows are NaN"):
        extrapolate_knn(ws, "forgetting", k=5)
    add_scores(ws, "el2n", np.zeros(99, np.float32))
    with pytest.raises(StreamPruneError, match="99 values but the subset has 100 rows"):
        extrapolate_knn(ws, "el2n", k=5)
    add_scores(ws, "aum", np.zeros(100, np.float32))
    with pytest.raises(StreamPruneError, match="k=20 exceeds the graph's k=10"):
        extrapolate_knn(ws, "aum", k=20)
    with pytest.raises(StreamPruneError, match="--k must be"):
        extrapolate_knn(ws, "aum", k=0)
    with pytest.raises(StreamPruneError, match=r"--chunk-rows must be a whole number >= 1, not True"):
        extrapolate_knn(ws, "aum", chunk_rows=True)  # a bool is not a count (it was taken as 1)
    with pytest.raises(StreamPruneError, match="no knn extrapolation"):
        read_extrapolated(ws, "aum", "knn")
    # embeddings replaced by a different row count behind the graph's back
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="r+")
    del group["emb"], group["valid"]
    group.create_array("emb", data=x[:250], chunks=(50, 4))
    group.create_array("valid", data=np.ones(250, bool), chunks=(50,))
    with pytest.raises(StreamPruneError, match="the graph has 300 rows but embeddings.zarr has 250"):
        extrapolate_knn(ws, "aum", k=5)
    del group["emb"], group["valid"]  # more rows than the graph: as stale, not a graph to read the first 300 of
    group.create_array("emb", data=np.concatenate([x, x[:50]]), chunks=(50, 4))
    group.create_array("valid", data=np.ones(350, bool), chunks=(50,))
    with pytest.raises(StreamPruneError, match="the graph has 300 rows but embeddings.zarr has 350"):
        extrapolate_knn(ws, "aum", k=5)


def test_auto_k_with_fewer_than_three_scored_seeds_takes_the_smallest_k(tmp_path):
    """With only two seeds holding a finite score no correlation can be measured (two points always
    correlate perfectly): --k auto takes the smallest candidate the graph allows, reports every
    candidate's Pearson as NaN and predicts with it."""
    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=200)
    # the two closest valid seeds: each is the other's nearest neighbour, so both get a prediction
    pos = np.flatnonzero(valid[subset] & np.isfinite(values))
    d = np.linalg.norm(x[subset[pos]][:, None] - x[subset[pos]][None], axis=2) + np.eye(len(pos)) * 1e9
    scored = pos[list(np.unravel_index(np.argmin(d), d.shape))]
    few = np.full(len(subset), np.nan, np.float32)
    few[scored] = values[scored]
    add_scores(ws, "el2n", few)
    m = extrapolate_knn(ws, "el2n", k="auto")
    c = m["counts"]
    assert c["k"] == 10 and c["n_validation"] == 2 and c["n_seed"] == 2
    assert set(c["validation_pearson"]) == {"10", "20"} and all(np.isnan(v) for v in c["validation_pearson"].values())
    ref_score, ref_source = knn_reference(x, valid, subset, few, 10)
    score, source = (a[:] for a in read_extrapolated(ws, "el2n", "knn"))
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_allclose(score, ref_score, rtol=1e-5, atol=1e-5)


def test_k_over_the_graph_names_the_index_command_that_works(tmp_path):
    """The graph exists with a smaller k, so the index command the error names needs --force: without it
    that command is refused too, and a user following one error only met the next."""
    ws, *_ = scored_workspace(tmp_path / "ws", n=200)
    with pytest.raises(StreamPruneError, match=r"k=50 exceeds the graph's k=20; rebuild it with "
                                               r"`streamprune index --k 50 --force`$"):
        extrapolate_knn(ws, "du", k=50)
    with pytest.raises(StreamPruneError, match=r"changed: k 20 -> 50"):
        build_index(ws, graph="seeds", k=50, scheduler="sync", chunk_rows=100)
    build_index(ws, graph="seeds", k=50, scheduler="sync", chunk_rows=100, force=True)
    assert extrapolate_knn(ws, "du", k=50)["counts"]["k"] == 50


def test_k_over_the_graph_with_force_keeps_the_finished_result(tmp_path):
    """A refused --k leaves the workspace as it was, --force or not (the finished result was removed first)."""
    ws, *_ = scored_workspace(tmp_path / "ws", n=200)
    done = extrapolate_knn(ws, "du", k=5)
    with pytest.raises(StreamPruneError, match="k=50 exceeds the graph's k=20"):
        extrapolate_knn(ws, "du", k=50, force=True)
    assert ws.marker("extrapolate-du-knn")["fingerprint"] == done["fingerprint"]
    read_extrapolated(ws, "du", "knn")


def test_evaluate_reports_the_oracle_k_and_gap(tmp_path):
    from streamprune.evaluate import knn_k_oracle

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=800)
    m = extrapolate_knn(ws, "du", k="auto", chunk_rows=100)
    full = np.where(valid, smooth_score(x) ** 3, np.nan)  # a different target: the oracle may pick another k
    non_seed = valid.copy()
    non_seed[subset] = False
    out = knn_k_oracle(ws, "du", full, non_seed, chunk_rows=64)
    table = {}
    for k in (10, 20):
        ref, _ = knn_reference(x, valid, subset, values, k)
        table[k] = pearson(ref[non_seed], full[non_seed])
        assert out["oracle_table"][k] == pytest.approx(table[k], abs=1e-5)
    best = max(table, key=lambda k: (table[k], -k))
    assert out["chosen"] == m["counts"]["k"] and out["oracle"] == best
    assert out["gap"] == pytest.approx(table[best] - table[out["chosen"]], abs=1e-5) and out["gap"] >= 0


def test_evaluate_reports_how_full_data_runs_agree_and_fidelity_against_their_mean(tmp_path):
    from streamprune.evaluate import evaluate, format_evaluation

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=600)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 600})  # the row count evaluate's columns are built on
    extrapolate_knn(ws, "du", k=10, chunk_rows=100)
    rng = np.random.default_rng(3)
    truth = smooth_score(x)
    runs = [np.where(valid, truth + s * rng.standard_normal(len(x)), np.nan).astype(np.float32)
            for s in (0.3, 0.5, 0.8)]
    runs[2][5] = np.nan  # a row one run could not score is left out of the comparison
    for r, arr in enumerate(runs):
        add_scores(ws, "du", arr, full=True, replica=r)
    out = evaluate(ws, "du")
    assert set(out["fidelity"]) == {"seed", "knn"}  # replicas are references, not methods
    non_seed = valid.copy()
    non_seed[subset[np.isfinite(values)]] = False  # seed rows without a score are extrapolated like the rest
    rows = non_seed.copy()
    rows[5] = False
    pairs = [np.corrcoef(runs[a][rows], runs[b][rows])[0, 1] for a, b in ((0, 1), (0, 2), (1, 2))]
    ref = out["reference"]
    assert ref["runs"] == 3 and ref["n_rows"] == int(rows.sum())
    assert ref["retest_pearson"]["mean"] == pytest.approx(np.mean(pairs), abs=1e-6)
    assert ref["retest_pearson"]["min"] == pytest.approx(min(pairs), abs=1e-6)
    assert ref["ceiling_one_run"] == pytest.approx(np.sqrt(np.mean(pairs)), abs=1e-6)
    pred = read_extrapolated(ws, "du", "knn")[0][:]
    mean = np.mean(runs, axis=0)
    f = out["fidelity"]["knn"]
    assert f["pearson_nonseed_vs_mean"] == pytest.approx(np.corrcoef(pred[rows], mean[rows])[0, 1], abs=1e-6)
    assert f["pearson_nonseed_vs_runs"] == pytest.approx(
        np.mean([np.corrcoef(pred[rows], r[rows])[0, 1] for r in runs]), abs=1e-6)
    assert f["pearson_nonseed"] == pytest.approx(np.corrcoef(pred[non_seed], runs[0][non_seed])[0, 1], abs=1e-6)
    assert f["vs_runs_over_retest"] == pytest.approx(f["pearson_nonseed_vs_runs"] / np.mean(pairs), abs=1e-6)
    # the mean of noisy runs is nearer the truth the predictor tracks than any single run
    assert f["pearson_nonseed_vs_mean"] > f["pearson_nonseed_vs_runs"]
    text = format_evaluation(out)
    assert "vs mean of 3" in text and f"Pearson {ref['retest_pearson']['mean']:.3f}" in text


def test_evaluate_and_report_a_method_that_predicted_no_row(tmp_path):
    """A method whose output is all NaN, beside full-data runs that do not agree at all, gives NaN
    figures in the evaluation and the report, not a traceback."""
    from streamprune.evaluate import evaluate, format_evaluation
    from streamprune.extrapolate.common import output_path
    from streamprune.report import report

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=400)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 400})
    extrapolate_knn(ws, "du", k=10, chunk_rows=100)
    group = zarr.open_group(storage.zarr_store(ws.path(output_path("du", "knn")), None), mode="r+")
    group["score"][:] = np.nan
    rows = np.flatnonzero(valid)
    rows = rows[np.isin(rows, subset, invert=True)][:64]
    a, b = np.full(400, np.nan, np.float32), np.full(400, np.nan, np.float32)
    a[rows] = np.tile([1, -1], 32)  # +-1 patterns of period 2 and 4: Pearson exactly 0
    b[rows] = np.tile([1, 1, -1, -1], 16)
    add_scores(ws, "du", a, full=True, replica=0)
    add_scores(ws, "du", b, full=True, replica=1)
    out = evaluate(ws, "du")
    assert out["reference"]["retest_pearson"]["mean"] == 0.0
    f = out["fidelity"]["knn"]
    assert np.isnan(f["pearson_nonseed"]) and np.isnan(f["vs_runs_over_retest"])
    assert all(np.isnan(v) for v in out["selection_quality"]["knn"]["retained_recall"].values())
    assert "knn                  nan" in format_evaluation(out)
    report(ws, str(tmp_path / "r"))
    assert "## Evaluation" in open(os.path.join(tmp_path, "r", "report.md")).read()


def test_report_without_an_extrapolation_has_no_scatter_plot(tmp_path):
    """Seed and full-data scores but no extrapolated ones: the report shows the distributions, and no
    scatter of extrapolated against full-data scores (there is nothing to plot)."""
    from streamprune.report import report

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=200)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 200})
    add_scores(ws, "du", smooth_score(x).astype(np.float32), full=True)
    out = report(ws, str(tmp_path / "r"))
    assert sorted(os.path.basename(f) for f in out["files"]) == ["report.md", "scores_hist.png"]


def test_report_to_object_storage_leaves_no_local_copy(tmp_path, monkeypatch, s3server, s3bucket):
    """A report written to s3:// is drawn in a temporary folder, uploaded, and the folder removed."""
    import tempfile

    from streamprune.report import report

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=300)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 300})
    extrapolate_knn(ws, "du", k=10, chunk_rows=100)
    add_scores(ws, "du", np.where(valid, smooth_score(x), np.nan).astype(np.float32), full=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = report(Workspace(ws.url, s3server.storage_options), f"s3://{s3bucket}/report")
    fs = s3server.fs()
    assert sorted(os.path.basename(p) for p in fs.ls(f"{s3bucket}/report")) == ["report.md", "scatter.png",
                                                                               "scores_hist.png"]
    assert "## Extrapolated vs full-data scores" in fs.cat_file(out["report"][5:]).decode()
    assert os.listdir(scratch) == []


def test_report_flags_an_evaluation_made_before_a_rerun(tmp_path):
    """evaluate records the markers it read; a report after one of them was re-run shows the
    figures under an out-of-date line naming it (an evaluation from before the record: no flag)."""
    from streamprune.evaluate import evaluate, evaluation_outdated
    from streamprune.report import report

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=400)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 400})
    extrapolate_knn(ws, "du", k=10, chunk_rows=100)
    add_scores(ws, "du", np.where(valid, smooth_score(x), np.nan).astype(np.float32), full=True)
    out = evaluate(ws, "du")
    assert "extrapolate-du-knn" in out["inputs"] and evaluation_outdated(out, ws.markers()) == []
    report(ws, str(tmp_path / "r1"))
    md = open(os.path.join(tmp_path, "r1", "report.md")).read()
    assert "Out of date" not in md and "## Evaluation" in md
    extrapolate_knn(ws, "du", k=5, chunk_rows=100, force=True)
    assert evaluation_outdated(out, ws.markers()) == ["extrapolate-du-knn"]
    report(ws, str(tmp_path / "r2"))
    md = open(os.path.join(tmp_path, "r2", "report.md")).read()
    assert "**Out of date:** these figures are out of date: extrapolate-du-knn changed" in md
    assert evaluation_outdated({k: v for k, v in out.items() if k != "inputs"}, ws.markers()) == []
    # another score's results are not what an evaluation of du read: they do not make it stale
    out = evaluate(ws, "du")
    add_scores(ws, "el2n", values)
    extrapolate_knn(ws, "el2n", k=10, chunk_rows=100)
    assert evaluation_outdated(out, ws.markers()) == []


def test_evaluation_with_hard_clean_is_current_when_it_made_the_seed_margin(tmp_path, monkeypatch):
    """hard-clean computes the subset model's AUM (score-aum) on first use; an evaluation that made it
    must not read as out of date because of it."""
    import streamprune.evaluate as ev
    import streamprune.prune as prune

    ws, x, valid, subset, values = scored_workspace(tmp_path / "ws", n=400)
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 400})
    extrapolate_knn(ws, "du", k=10, chunk_rows=100)
    add_scores(ws, "du", np.where(valid, smooth_score(x), np.nan).astype(np.float32), full=True)

    def margin(w):  # what it does without training here: the AUM marker, made once
        if w.marker("score-aum") is None:
            add_scores(w, "aum", values)
        return w.marker("score-aum")

    def curve(w, score, keeps, epochs, test_shards, **kw):  # the curve asks for the margin, as hard-clean does
        prune.seed_margin_marker(w)
        return {}

    monkeypatch.setattr(prune, "seed_margin_marker", margin)
    monkeypatch.setattr(ev, "pruning_curve", curve)
    out = ev.evaluate(ws, "du", pruning_curve_keeps=[0.5], test_shards=["unused"], strategies=("hard-clean",))
    assert "score-aum" in out["inputs"] and ev.evaluation_outdated(out, ws.markers()) == []


def test_one_seed_pruning_table_shows_no_spread():
    """With one seed there is no standard deviation to show: no '±0.0000' that reads as zero variance."""
    from streamprune.evaluate import format_evaluation

    acc = {"accuracy": {"mean": 0.9, "std": 0.0}}
    pc = {"seeds": 1, "keeps": [0.5], "all_rows": acc, "runs": {"knn/hard": {"0.5": acc}}}
    base = {"score": "du", "n": 10, "n_seed": 2, "fidelity": {}}
    text = format_evaluation({**base, "pruning_curve": pc})
    assert "1 seed: no spread" in text and "±" not in text.split("1 seed: no spread")[1] and "0.9000" in text
    text3 = format_evaluation({**base, "pruning_curve": {**pc, "seeds": 3}})
    assert "mean ± std over 3 seeds" in text3 and "0.9000±0.0000" in text3


def test_pruning_table_columns_line_up():
    """The all-rows accuracy sits under the keep column (not under the labels), and a long selection label
    widens the label column instead of pushing its row's values out of line."""
    from streamprune.evaluate import format_evaluation

    acc = {"accuracy": {"mean": 0.9, "std": 0.01}}
    long_label = "label-aware/hard-clean-with-a-long-name"
    pc = {"seeds": 3, "keeps": [0.3, 0.5], "all_rows": acc,
          "runs": {"knn/hard": {"0.3": acc, "0.5": acc}, long_label: {"0.3": acc, "0.5": acc}}}
    text = format_evaluation({"score": "du", "n": 10, "n_seed": 2, "fidelity": {}, "pruning_curve": pc})
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("selection"))
    first_keep_end = head.index("keep 0.3") + len("keep 0.3")
    all_rows = next(line for line in lines if line.startswith("all rows (no pruning)"))
    assert all_rows.endswith("0.9000±0.0100") and len(all_rows) == first_keep_end
    for label in ("knn/hard", long_label):
        row = next(line for line in lines if line.startswith(label + " "))
        assert len(row) == len(head) and row[first_keep_end - len("0.9000±0.0100"):first_keep_end] == "0.9000±0.0100"


def test_validation_rows_above_the_cap_are_a_fixed_sorted_sample():
    """k is chosen on at most max_rows seed rows: above it, a fixed random sample (sorted, drawn only from seeds
    with a finite score that the graph holds); at the cap, every such row."""
    from streamprune.extrapolate.knn import validation_rows

    rows = np.arange(0, 100, 2)
    values = np.ones(len(rows), np.float32)
    values[::5] = np.nan
    seeds = SeedScores(rows, values, "fp")
    eligible = rows[np.isfinite(values) & (rows < 90)]
    np.testing.assert_array_equal(validation_rows(seeds, 90, max_rows=len(eligible)), eligible)
    got = validation_rows(seeds, 90, max_rows=7)
    assert len(got) == 7 and (np.diff(got) > 0).all() and np.isin(got, eligible).all()
    np.testing.assert_array_equal(validation_rows(seeds, 90, max_rows=7), got)
    assert not np.array_equal(validation_rows(seeds, 90, max_rows=7, seed=1), got)


def test_validation_leaves_each_seed_out_when_the_graph_holds_it(tmp_path):
    """Leave-one-out k selection: a graph that lists a seed row among its own neighbours (distance
    0, first) must give the table of the graph without it, for every k the shorter lists can give."""
    from streamprune.extrapolate.knn import validation_table

    w, *_ = scored_workspace(tmp_path / "ws", n=400)
    k0, table0, used0 = validation_table(w, "du")
    g = zarr.open_group(w.path("graph", "seeds.zarr"), mode="r+")
    nbr, dist = g["neighbors"][:], g["distances"][:]
    rows = np.arange(len(nbr))[:, None]
    g["neighbors"][:] = np.concatenate([rows, nbr[:, :-1]], axis=1)  # itself first, the last one dropped
    g["distances"][:] = np.concatenate([np.zeros_like(dist[:, :1]), dist[:, :-1]], axis=1)
    _, table1, used1 = validation_table(w, "du")
    assert used1 == used0 > 50
    shorter = [k for k in table0 if k < nbr.shape[1]]
    assert shorter and all(table1[k] == pytest.approx(table0[k], abs=1e-12) for k in shorter)
    assert max(table0.values()) < 0.999  # not a graph where any k would predict perfectly


@pytest.mark.parametrize("method", ["knn", "kernel", "gcn", "label-aware", "propagate"])
def test_chunk_rows_is_refused_before_the_workspace_is_read(tmp_path, method):
    from streamprune.extrapolate import extrapolate

    for bad in (True, 0, 2.5):
        with pytest.raises(StreamPruneError, match=rf"^--chunk-rows must be a whole number >= 1, not {bad!r}$"):
            extrapolate(str(tmp_path / "nothing-here"), "du", method, chunk_rows=bad)


@pytest.mark.parametrize("method", ["label-aware", "propagate"])
def test_k_is_refused_before_the_workspace_is_read(tmp_path, method):
    # `extrapolate --method knn,label-aware --k auto` hands 'auto' to every method that takes --k
    from streamprune.extrapolate import extrapolate
    from streamprune.extrapolate.label_aware import compute_disagreement

    for bad in ("auto", True, 0, -3, 2.5):
        with pytest.raises(StreamPruneError, match=rf"^--k must be a whole number >= 1, not {bad!r}$"):
            extrapolate(str(tmp_path / "nothing-here"), "du", method, k=bad)
        if method == "label-aware":
            with pytest.raises(StreamPruneError, match=rf"^--k must be a whole number >= 1, not {bad!r}$"):
                compute_disagreement(str(tmp_path / "nothing-here"), k=bad)
