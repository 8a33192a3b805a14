"""Label disagreement and quantile mapping: brute-force references and properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamprune.extrapolate.label_aware import (
    label_disagreement,
    majority_disagrees,
    noise_ranks,
    quantile_map,
    quantile_mapper,
    within_quantiles,
)


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


def test_quantile_map_leaves_out_nan_reference_values():
    """Seed rows without a measured score (NaN) are not part of the scale the other rows are mapped onto."""
    ref = np.array([0.0, np.nan, 1.0, 2.0, np.nan, 3.0])
    v = np.array([0.3, np.nan, 0.1, 0.2])
    got = quantile_map(v, ref)
    np.testing.assert_array_equal(got, quantile_map(v, ref[np.isfinite(ref)]))
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2, 3]]).all() and got[2] < got[3] < got[0]


def test_quantile_mapper_chunk_by_chunk_equals_average_ranks():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    v = rng.integers(0, 40, 5000).astype(np.float32) / 40  # many ties, like disagreement at small k
    v[rng.random(5000) < 0.1] = np.nan
    ref = rng.exponential(size=300)
    ok = np.isfinite(v)
    q = (rankdata(v[ok]) - 0.5) / ok.sum()  # the reference: scipy's average ranks
    want = np.full(len(v), np.nan)
    want[ok] = np.quantile(np.sort(ref), q)
    for reverse in (False, True):
        mapper = quantile_mapper(v, ref, reverse=reverse)
        got = np.concatenate([mapper(v[s:s + 777]) for s in range(0, len(v), 777)])
        expect = want if not reverse else np.where(ok, 0.0, np.nan)
        if reverse:
            expect[ok] = np.quantile(np.sort(ref), 1.0 - q)
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(got, quantile_map(v, ref, reverse=reverse))


def _brute_majority(own, nl, dist, num_classes):
    out = []
    for i in range(len(own)):
        ok = np.isfinite(dist[i]) & (nl[i] >= 0)
        if own[i] < 0 or not ok.any():
            out.append(False)
            continue
        w = np.exp(-(dist[i][ok] - dist[i][np.isfinite(dist[i])].min()))
        votes = np.zeros(num_classes)
        for c, wi in zip(nl[i][ok], w):
            votes[c] += wi
        out.append(int(np.argmax(votes)) != own[i])
    return np.array(out)


def test_majority_matches_brute_force_with_missing_neighbours():
    rng = np.random.default_rng(5)
    own = rng.integers(-1, 4, 300)
    nl = rng.integers(-1, 4, (300, 9))
    d = np.sort(rng.random((300, 9)) * 3, axis=1)
    d[rng.random((300, 9)) < 0.1] = np.inf
    np.testing.assert_array_equal(majority_disagrees(own, nl, d, 4), _brute_majority(own, nl, d, 4))


def test_hard_clean_with_ties_and_missing_noise_matches_drop_then_keep():
    from streamprune.select import hard_clean, keep_hardest

    rng = np.random.default_rng(11)
    scores = np.round(rng.random(500) * 8)  # ties everywhere
    scores[rng.random(500) < 0.1] = np.nan
    noise = np.round(rng.random(500) * 5) / 5
    noise[rng.random(500) < 0.1] = np.nan
    for keep, drop in ((200, 60), (300, 400), (10, 0)):
        got = hard_clean(scores, noise, keep, drop)
        # reference: drop the top `drop` noisy eligible rows (ties: lower row first), then keep the hardest
        ok = np.flatnonzero(~np.isnan(scores) & ~np.isnan(noise))
        drop = min(drop, int((~np.isnan(scores)).sum()) - keep)
        dropped = ok[np.lexsort((ok, -noise[ok]))][:drop]
        rest = scores.copy()
        rest[dropped] = np.nan
        np.testing.assert_array_equal(got, keep_hardest(rest, keep))
        assert got.sum() == keep and not got[dropped].any()


def test_hard_clean_drops_noise_then_keeps_hardest():
    from streamprune.select import hard_clean, select

    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, np.nan])
    noise = np.array([0.9, 0.1, 0.8, 0.0, 0.0, 1.0])
    keep = hard_clean(scores, noise, keep_count=2, drop_count=2)  # drops rows 0 and 2, keeps 1 and 3
    assert list(np.flatnonzero(keep)) == [1, 3]
    capped = hard_clean(scores, noise, keep_count=4, drop_count=3)  # only 1 may go: the noisiest
    assert keep.sum() == 2 and capped.sum() == 4 and not capped[0]
    assert np.array_equal(select("hard-clean", scores, None, 2, noise=noise, drop_count=2), keep)


def test_hard_clean_reads_noise_in_float64_whatever_its_dtype():
    """Noise is read in float64, chunk by chunk: noise scores that differ only beyond float32's precision still
    rank apart (given as an array or a list), and float32 noise drops the rows float64 noise of the same values
    drops."""
    from streamprune import select as sel

    scores = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    close = [0.5, 0.5 + 1e-12, 0.25, 0.1, 0.0]  # equal in float32: the tie would drop row 0
    for noise in (np.array(close), close):
        assert np.flatnonzero(sel.hard_clean(scores, noise, keep_count=3, drop_count=1)).tolist() == [0, 2, 3]
    rng = np.random.default_rng(4)
    noise32 = rng.normal(size=300).astype(np.float32)
    scores = rng.random(300)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sel, "CHUNK_ROWS", 64)
        got = sel.hard_clean(scores, noise32, keep_count=150, drop_count=40)
    dropped = np.argsort(-noise32.astype(np.float64), kind="stable")[:40]
    assert got.sum() == 150 and not got[dropped].any()
    np.testing.assert_array_equal(got, sel.hard_clean(scores, noise32.astype(np.float64), 150, 40))


def test_hard_clean_without_a_drop_count_drops_nothing():
    """``select('hard-clean', ...)`` without ``drop_count`` keeps what keep-hardest keeps: no row is dropped
    as noisy unless a drop is asked for."""
    from streamprune.select import select

    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    noise = np.array([0.9, 0.8, 0.7, 0.1, 0.0])
    assert np.flatnonzero(select("hard-clean", scores, None, 2, noise=noise)).tolist() == [0, 1]
    assert np.flatnonzero(select("hard-clean", scores, None, 2, noise=noise, drop_count=1)).tolist() == [1, 2]


def test_noise_ranks_rank_seeds_apart_and_use_their_margin():
    # seeds (rows 0-3) have low disagreement (memorised); ranked together with the others they would
    # never be dropped first
    dis = np.array([0.30, 0.0, 0.05, 0.10, 0.9, 0.0, 0.2, 0.1, np.nan, 0.5])
    seed = np.zeros(10, bool)
    seed[:4] = True
    plain = noise_ranks(dis, seed)
    # each population on its own (0, 1) quantile scale; NaN stays NaN
    np.testing.assert_allclose(plain[:4], [0.875, 0.125, 0.375, 0.625])
    np.testing.assert_allclose(plain[[4, 5, 6, 7, 9]], [0.9, 0.1, 0.5, 0.3, 0.7])
    assert np.isnan(plain[8])
    # the top 20 % of each population: one seed (the most disagreeing) and one other row
    top2 = set(np.argsort(-np.nan_to_num(plain, nan=-1), kind="stable")[:2].tolist())
    assert top2 == {0, 4}
    # a seed the subset model never fitted well (lowest AUM) moves up among the seeds only
    margin = np.full(10, np.nan)
    margin[:4] = [5.0, 1.0, -4.0, 3.0]
    ranked = noise_ranks(dis, seed, margin)
    np.testing.assert_array_equal(ranked[4:], plain[4:])  # other rows unchanged
    # mean quantiles 0.5, 0.375, 0.625, 0.5 (disagreement and low margin), ranked again among the seeds
    np.testing.assert_allclose(ranked[:4], [0.5, 0.125, 0.875, 0.5])
    # a seed without a margin keeps its disagreement rank; a seed without disagreement stays NaN
    margin[3] = np.nan
    dis2 = dis.copy()
    dis2[1] = np.nan
    r = noise_ranks(dis2, seed, margin)
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="seed mask"):
        noise_ranks(dis, seed[:5])
    from streamprune.extrapolate.label_aware import noise_table

    for wrong in (3, 5):  # the table takes the seed rows' margins only, one per seed row
        with pytest.raises(ValueError, match=f"{wrong} seed margins for 4 seed rows"):
            noise_table(dis, seed, margin[:wrong])


def test_noise_ranks_of_more_rows_than_16_bit_rank_sums_hold():
    """Past 2^15 rows a rank's doubled value no longer fits 16 bits: the ranks of 70,000 rows (tied
    disagreement, NaN rows, seeds ranked apart) are still each population's average-rank quantiles."""
    rng = np.random.default_rng(8)
    n = 70_000
    dis = (rng.integers(0, 21, n) / 20).astype(np.float32)  # k = 20 neighbours: many ties
    dis[rng.random(n) < 0.02] = np.nan
    seed = rng.random(n) < 0.3
    want = np.where(seed, within_quantiles(dis, seed), within_quantiles(dis, ~seed))
    np.testing.assert_array_equal(noise_ranks(dis, seed), want)


def test_noise_ranks_when_no_seed_has_a_disagreement():
    """Seed rows none of which has a disagreement get no rank (NaN), quietly; the other rows rank as usual."""
    import warnings

    dis = np.array([np.nan, np.nan, 0.2, 0.7, 0.4])
    seed = np.array([True, True, False, False, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = noise_ranks(dis, seed)
    assert np.isnan(r[:2]).all()
    np.testing.assert_allclose(r[2:], [1 / 6, 5 / 6, 3 / 6])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 5).map(float), st.just(float("nan"))), min_size=1, max_size=80),
       st.integers(0, 2**31), st.integers(1, 90))
def test_within_quantiles_property(values, seed, chunk):
    from scipy.stats import rankdata

    v = np.array(values, np.float32)
    mask = np.random.default_rng(seed).random(len(v)) < 0.6
    out = within_quantiles(v, mask, chunk_rows=chunk)
    sel = np.isfinite(v) & mask
    assert np.isnan(out[~sel]).all()
    if sel.any():
        # average ranks among the masked finite values, on (0, 1); equal values share their quantile
        np.testing.assert_allclose(out[sel], (rankdata(v[sel]) - 0.5) / sel.sum(), rtol=0, atol=1e-12)
        assert 0 < out[sel].min() and out[sel].max() < 1


def test_within_quantiles_chunked_with_mask_matches_average_ranks():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    v = np.round(rng.random(1000) * 10).astype(np.float32)  # many ties
    v[rng.random(1000) < 0.05] = np.nan
    mask = rng.random(1000) < 0.7
    for m in (None, mask):
        sel = np.isfinite(v) & (True if m is None else m)
        ref = np.full(1000, np.nan)
        ref[sel] = (rankdata(v[sel]) - 0.5) / sel.sum()
        for chunk in (7, 64, 1 << 16):  # chunk boundaries must not change any rank
            np.testing.assert_allclose(within_quantiles(v, m, chunk_rows=chunk), ref, rtol=0, atol=1e-12)
    assert np.isnan(within_quantiles(np.array([np.nan, 1.0]), np.array([True, False]))).all()


def _vector_workspace(tmp_path, flip=0.0, labels=True):
    from shardgen import npy_bytes
    from streamprune.embed import embed
    from streamprune.index import build_index
    from streamprune.shards import catalog
    from streamprune.tario import write_tar

    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    truth, paths = [], []
    for s in range(4):
        samples = []
        for i in range(100):
            y = int(rng.integers(0, 3))
            vec = rng.normal(size=8).astype(np.float32) * 0.6
            vec[y] += 3.0
            noisy = rng.random() < flip
            lab = (y + 1) % 3 if noisy else y
            truth.append(noisy)
            members = {"npy": npy_bytes(vec)}
            if labels:
                members["cls"] = str(lab).encode()
            samples.append((f"k{s}_{i:03d}", members))
        paths.append(str(d / f"v-{s}.tar"))
        write_tar(paths[-1], samples)
    ws = str(tmp_path / "ws")
    catalog(paths, ws, scheduler="sync")
    from streamprune.decode import DecodeConfig

    embed(ws, encoder="features", scheduler="sync",
          decode=DecodeConfig(input="vector", label_key="cls" if labels else "none"))
    build_index(ws, graph="all", k=20, scheduler="sync")
    return ws, np.array(truth)


def test_disagreement_stage_matches_graph_brute_force_and_finds_flips(tmp_path):
    import zarr

    from streamprune.extrapolate.label_aware import compute_disagreement, noise_estimate, read_disagreement
    from streamprune.workspace import Workspace

    ws, noisy = _vector_workspace(tmp_path, flip=0.1)
    compute_disagreement(ws, k=20, chunk_rows=64)
    w = Workspace(ws)
    dis = read_disagreement(w)
    g = zarr.open_group(f"{ws}/graph/all.zarr")
    labels = zarr.open_group(f"{ws}/embeddings.zarr")["labels"][:]
    nb, dist = g["neighbors"][:], g["distances"][:]
    np.testing.assert_allclose(dis, _brute(labels, labels[nb], dist), rtol=1e-6)
    from scipy.stats import mannwhitneyu

    auc = mannwhitneyu(dis[noisy], dis[~noisy]).statistic / (noisy.sum() * (~noisy).sum())
    assert auc > 0.9
    est = noise_estimate(w, k=20)
    assert abs(est.mean() - noisy.mean()) < 0.05 and (est & noisy).sum() > 0.7 * noisy.sum()
    np.testing.assert_array_equal(est, _brute_majority(labels, labels[nb], dist, int(labels.max()) + 1))
    np.testing.assert_array_equal(noise_estimate(w, k=20, chunk_rows=7), est)  # chunking changes nothing


def test_disagreement_stage_ignores_invalid_and_missing_neighbours(tmp_path):
    import zarr

    from streamprune.extrapolate.label_aware import compute_disagreement, noise_estimate, read_disagreement
    from streamprune.workspace import Workspace

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    # rows found invalid (as embed marks rows whose embedding is not finite: their labels stay) that the
    # all-rows graph still lists as neighbours, and neighbour lists padded with -1 / inf
    rng = np.random.default_rng(7)
    emb = zarr.open_group(f"{ws}/embeddings.zarr", mode="r+")
    invalid = np.sort(rng.choice(400, 40, replace=False))
    emb["valid"][invalid] = False
    valid, labels = emb["valid"][:], emb["labels"][:]
    assert (labels[invalid] >= 0).all()
    g = zarr.open_group(f"{ws}/graph/all.zarr", mode="r+")
    nb, dist = g["neighbors"][:], g["distances"][:]
    padded = np.flatnonzero(valid)[:30:3]  # ten valid rows: their last 8 neighbours missing
    nb[padded, -8:], dist[padded, -8:] = -1, np.inf
    lonely = int(np.flatnonzero(valid)[40])  # a valid row without any neighbour
    nb[lonely], dist[lonely] = -1, np.inf
    g["neighbors"][:], g["distances"][:] = nb, dist
    nb, dist = nb[:, :20], dist[:, :20]

    # brute force: a row's own label only when valid; a neighbour counts only when present and valid
    ref = np.full(400, np.nan)
    for i in range(400):
        if not valid[i]:
            continue
        ds = [float(d) for d in dist[i] if math.isfinite(d)]
        num = den = 0.0
        for j, d in zip(nb[i], dist[i]):
            if j < 0 or not math.isfinite(d) or not valid[j]:
                continue
            wgt = math.exp(-(float(d) - min(ds)))
            den += wgt
            num += wgt * (labels[j] != labels[i])
        ref[i] = num / den if den > 0 else np.nan
    # the data tell the difference: many valid rows have invalid neighbours, and counting those changes them
    affected = valid & np.isin(nb, invalid).any(axis=1)
    assert affected.sum() > 100
    counted = _brute(np.where(valid, labels, -1), np.where(nb >= 0, labels[nb], -1), dist)
    assert (np.abs(counted[affected] - ref[affected]) > 1e-4).sum() > 50

    m = compute_disagreement(ws, k=20, chunk_rows=64)
    w = Workspace(ws)
    dis = read_disagreement(w)
    assert np.isnan(dis[invalid]).all() and np.isnan(dis[lonely])  # invalid rows and rows without neighbours
    np.testing.assert_allclose(dis, ref, rtol=1e-6, atol=1e-7)  # NaN where the reference has NaN
    assert m["counts"]["n_valid"] == 400 - 40 - 1
    nl = np.where((nb >= 0) & valid[np.maximum(nb, 0)], labels[np.maximum(nb, 0)], -1)
    est = noise_estimate(w, k=20)
    np.testing.assert_array_equal(est, _brute_majority(np.where(valid, labels, -1), nl, dist, 3))
    assert not est[invalid].any() and not est[lonely]


def test_disagreement_killed_then_resumed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from helpers import count_files

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    import streamprune.extrapolate.label_aware as la
    from streamprune.extrapolate.label_aware import compute_disagreement, read_disagreement
    from streamprune.workspace import Workspace

    code = ("import time, streamprune.extrapolate.label_aware as la\n"
            "orig = la.label_disagreement\n"
            "def slow(*a):\n    time.sleep(0.3)\n    return orig(*a)\n"
            "la.label_disagreement = slow\n"
            f"la.compute_disagreement({ws!r}, k=20, chunk_rows=32)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    chunks = os.path.join(ws, "_stages", "score-label_disagreement")
    import time

    deadline = time.time() + 120
    while count_files(chunks, ".json") < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, 9)
    proc.wait()
    assert proc.returncode == -9 and not os.path.exists(os.path.join(ws, "_stages", "score-label_disagreement.json"))
    # killed mid-way: the layout and some, not all, of the 13 chunks of 32 rows were recorded
    (fp,) = os.listdir(chunks)
    names = os.listdir(os.path.join(chunks, fp, "chunks"))
    recorded = {int(n[:-5]) for n in names if n.endswith(".json") and not n.startswith((".tmp", "layout"))}
    assert "layout.json" in names and 3 <= len(recorded) < 13, sorted(recorded)
    computed = []
    orig = la._graph_labels

    def spy(graph, labels, valid, r0, r1, k):
        computed.append((r0, r1))
        return orig(graph, labels, valid, r0, r1, k)

    monkeypatch.setattr(la, "_graph_labels", spy)
    compute_disagreement(ws, k=20, chunk_rows=48)  # another chunking: the resume keeps the killed run's (32)
    monkeypatch.undo()
    # only the unrecorded chunks were computed again, each once, in the killed run's chunking
    assert computed == [(c * 32, min(400, c * 32 + 32)) for c in range(13) if c not in recorded]
    w = Workspace(ws)
    assert w.marker("score-label_disagreement")["counts"]["n_valid"] == len(read_disagreement(w))
    resumed = read_disagreement(w)
    assert np.isfinite(resumed).all()
    compute_disagreement(ws, k=20, force=True)  # uninterrupted, the graph's chunking
    np.testing.assert_array_equal(resumed, read_disagreement(w))


def test_disagreement_needs_labels(tmp_path):
    from streamprune.errors import StreamPruneError
    from streamprune.extrapolate.label_aware import compute_disagreement

    ws, _ = _vector_workspace(tmp_path, labels=False)
    with pytest.raises(StreamPruneError, match="label disagreement needs labels"):
        compute_disagreement(ws)


def test_label_aware_force_replaces_the_disagreement_and_a_refused_k_keeps_it(tmp_path):
    """--force with another --k re-makes the disagreement (it was refused, naming --force itself); a k
    over the graph's is refused before --force removes anything."""
    from streamprune.errors import StreamPruneError
    from streamprune.extrapolate import extrapolate
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path)
    subset(ws, fraction=0.3, seed=0)
    w = Workspace(ws)
    add_scores(w, "du", np.random.default_rng(0).random(len(subset_rows(w))).astype(np.float32))
    extrapolate(ws, "du", "label-aware", k=10)
    m = extrapolate(ws, "du", "label-aware", k=15, force=True)
    assert w.marker("score-label_disagreement")["config"]["k"] == 15 and m["config"]["k"] == 15
    with pytest.raises(StreamPruneError, match=r"k=30 but the all-rows graph has only 20 neighbours; re-run "
                                               r"`streamprune index --k 30 --force`$"):
        extrapolate(ws, "du", "label-aware", k=30, force=True)
    assert w.marker("score-label_disagreement")["config"]["k"] == 15
    assert w.marker("extrapolate-du-label-aware")["fingerprint"] == m["fingerprint"]


def test_label_aware_is_made_again_from_a_rebuilt_graph_and_ranks_an_unregistered_score_high_is_hard(tmp_path):
    """A rebuilt all-rows graph makes the disagreement and the label-aware scores again (same options: not
    skipped, not stale); a score no module registered maps high disagreement onto high scores."""
    from scipy.stats import spearmanr

    from streamprune.extrapolate import extrapolate, read_extrapolated
    from streamprune.extrapolate.label_aware import read_disagreement
    from streamprune.index import build_index
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    subset(ws, fraction=0.3, seed=0)
    w = Workspace(ws)
    rows = subset_rows(w)
    add_scores(w, "mine", np.random.default_rng(0).random(len(rows)).astype(np.float32))
    first = extrapolate(ws, "mine", "label-aware", k=10)
    build_index(ws, graph="all", k=12, scheduler="sync", force=True)  # another graph: its rows' neighbours move
    again = extrapolate(ws, "mine", "label-aware", k=10)
    assert not again.get("skipped") and again["fingerprint"] != first["fingerprint"]
    assert w.marker("score-label_disagreement")["inputs"]["graph"] == w.marker("index-all")["fingerprint"]
    others = np.setdiff1d(np.arange(400), rows)
    dis = read_disagreement(w)[others]
    score = read_extrapolated(w, "mine", "label-aware")[0][:][others]
    assert spearmanr(dis, score).statistic > 0.95


def test_label_aware_extrapolation_keeps_seeds_on_seed_scale(tmp_path):
    from streamprune.decode import DecodeConfig
    from streamprune.extrapolate import extrapolate, read_extrapolated
    from streamprune.scoring import compute_scores, read_score
    from streamprune.subset import subset, subset_rows
    from streamprune.train import TrainConfig, train
    from streamprune.workspace import Workspace

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    subset(ws, fraction=0.3, seed=0)
    train(ws, TrainConfig(model="mlp", epochs=4, batch_size=32), DecodeConfig(input="vector"), scheduler="sync")
    compute_scores(ws, ["du", "aum"], params={"window": 3})
    m = extrapolate(ws, "du", "label-aware", k=20)
    w = Workspace(ws)
    score, source = (a[:] for a in read_extrapolated(w, "du", "label-aware"))
    rows, seed = subset_rows(w), read_score(w, "du")
    np.testing.assert_array_equal(score[rows], seed)  # seeds unchanged
    assert (source[rows] == 0).all() and (np.delete(source, rows) == 3).all()
    others = np.delete(score, rows)
    assert others.min() >= seed.min() and others.max() <= seed.max()  # on the seed scale
    assert m["counts"]["n_predicted"] == 400 - len(rows)

    from scipy.stats import rankdata, spearmanr

    from streamprune.extrapolate.label_aware import read_disagreement

    dis = np.delete(read_disagreement(w), rows)  # the non-seed rows' disagreement
    assert np.isfinite(dis).all() and len(np.unique(dis)) > 50

    def check_mapping(got, seed_values, higher_is_harder):
        # rank order: every pair of rows with strictly different disagreement is ordered alike
        # (reversed for a low-is-hard score); ties among the seed scores may merge neighbours
        order = np.argsort(dis, kind="stable")
        step = np.diff(got[order])[np.diff(dis[order]) > 0]
        assert (step >= 0).all() if higher_is_harder else (step <= 0).all()
        rho = spearmanr(dis, got).statistic
        assert (rho > 0.95) if higher_is_harder else (rho < -0.95), rho
        # reference: each non-seed row's average rank among the non-seed rows only (seed rows keep
        # their measured score and take no part), mapped onto the seed scores' quantiles; reversed
        # when low means hard
        q = (rankdata(dis) - 0.5) / len(dis)
        want = np.quantile(np.sort(seed_values.astype(np.float64)), q if higher_is_harder else 1.0 - q)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    check_mapping(others, seed, True)
    # AUM: low is hard, so the most disagreeing rows get the lowest AUM of the seeds
    extrapolate(ws, "aum", "label-aware", k=20)
    aum_score, aum_source = (a[:] for a in read_extrapolated(w, "aum", "label-aware"))
    aum_seed = read_score(w, "aum")
    np.testing.assert_array_equal(aum_score[rows], aum_seed)
    assert (np.delete(aum_source, rows) == 3).all()
    check_mapping(np.delete(aum_score, rows), aum_seed, False)


def test_label_aware_extrapolation_killed_then_resumed(tmp_path):
    """Killed while writing its chunks, the next run writes the rest; the result equals an
    uninterrupted run's."""
    import glob
    import os

    from helpers import kill_python_when
    from streamprune.decode import DecodeConfig
    from streamprune.extrapolate import extrapolate, read_extrapolated
    from streamprune.scoring import compute_scores
    from streamprune.subset import subset
    from streamprune.train import TrainConfig, train
    from streamprune.workspace import Workspace

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    subset(ws, fraction=0.3, seed=0)
    train(ws, TrainConfig(model="mlp", epochs=4, batch_size=32), DecodeConfig(input="vector"), scheduler="sync")
    compute_scores(ws, ["du"], params={"window": 3})
    code = ("from streamprune.extrapolate import extrapolate; "
            f"extrapolate({ws!r}, 'du', 'label-aware', k=20, chunk_rows=32)")
    pattern = os.path.join(ws, "_stages", "extrapolate-du-label-aware", "*", "chunks", "rows-*.json")
    kill_python_when(code, lambda: len(glob.glob(pattern)) >= 3, env={"STREAMPRUNE_TASK_DELAY": "0.2"}, timeout=120)
    w = Workspace(ws)
    assert w.marker("extrapolate-du-label-aware") is None and 3 <= len(glob.glob(pattern)) < 13
    resumed = extrapolate(ws, "du", "label-aware", k=20, chunk_rows=32)
    assert not resumed.get("skipped") and resumed["counts"]["n_predicted"] > 0
    got = [a[:] for a in read_extrapolated(w, "du", "label-aware")]
    extrapolate(ws, "du", "label-aware", k=20, chunk_rows=32, force=True)
    for have, want in zip(got, read_extrapolated(w, "du", "label-aware")):
        np.testing.assert_array_equal(have, want[:])


def test_hard_clean_prune_drops_the_same_share_of_seed_and_other_rows(tmp_path):
    import json

    from streamprune.decode import DecodeConfig
    from streamprune.extrapolate import extrapolate
    from streamprune.prune import prune
    from streamprune.scoring import compute_scores
    from streamprune.subset import subset, subset_rows
    from streamprune.train import TrainConfig, train
    from streamprune.workspace import Workspace

    ws, noisy = _vector_workspace(tmp_path, flip=0.1)
    subset(ws, fraction=0.3, seed=0)
    train(ws, TrainConfig(model="mlp", epochs=8, batch_size=32), DecodeConfig(input="vector"), scheduler="sync")
    compute_scores(ws, ["du"], params={"window": 3})
    extrapolate(ws, "du", "label-aware", k=20)
    m = prune(ws, score="du", source="label-aware", strategy="hard-clean", keep_fraction=0.5, noise_fraction=0.1,
              name="hc", scheduler="sync")
    w = Workspace(ws)
    stats = json.loads(open(f"{ws}/prune/hc/stats.json").read())
    info = stats["hard_clean"]
    rows = subset_rows(w)
    seed = np.zeros(400, bool)
    seed[rows] = True
    assert info["seed_signal"] == "disagreement+aum" and info["seed_rows_ranked_apart"] == len(rows)
    assert info["drop_target"] == info["dropped"] == 40
    assert w.marker("score-aum") is not None  # computed from the recorded logits
    # the AUM that ranked the seeds is one of its inputs: an AUM made again since makes it out of date
    assert m["inputs"]["seed_margin"] == w.marker("score-aum")["fingerprint"]
    assert m["counts"]["n_kept"] == 200
    # which rows were dropped: recompute the ranks and check both populations lose ~10 %
    from streamprune.extrapolate.label_aware import noise_ranks, read_disagreement
    from streamprune.extrapolate.common import seed_scores

    aum = seed_scores(w, "aum")
    margin = np.full(400, np.nan)
    margin[aum.rows] = aum.values
    ranks = noise_ranks(read_disagreement(w), seed, margin)
    dropped = np.argsort(-np.nan_to_num(ranks, nan=-1), kind="stable")[:40]
    share_seed = seed[dropped].sum() / seed.sum()
    share_other = (~seed[dropped]).sum() / (~seed).sum()
    assert abs(share_seed - 0.1) <= 0.02 and abs(share_other - 0.1) <= 0.02
    import pandas as pd

    from streamprune.shards import Catalog

    kept_keys = set(pd.read_parquet(f"{ws}/prune/hc/keys.parquet").key)
    keys = Catalog(w).keys()
    assert not any(keys[r] in kept_keys for r in dropped)  # no dropped row was kept
    # the drop removes most of the flipped rows of both populations
    assert noisy[dropped].sum() >= 0.6 * noisy.sum()


def test_hard_clean_prune_makes_or_remakes_the_label_disagreement_it_ranks_by(tmp_path):
    """hard-clean ranks rows by label disagreement: without one it computes it (k = min(20, the graph's k)); one
    made from embeddings and a graph re-made since is recomputed from the current graph with the k it was made
    with: the run goes on instead of being refused for an out-of-date input, and ranks by the new values."""
    import zarr

    from streamprune.decode import DecodeConfig
    from streamprune.embed import embed
    from streamprune.extrapolate import extrapolate
    from streamprune.extrapolate.label_aware import compute_disagreement, read_disagreement
    from streamprune.index import build_index
    from streamprune.prune import prune
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    w = Workspace(ws)
    subset(ws, fraction=0.3, seed=0)
    add_scores(w, "du", np.random.default_rng(0).random(len(subset_rows(w))).astype(np.float32))

    def seeds_and_knn(force=False):
        build_index(ws, graph="seeds", k=10, scheduler="sync", force=force)
        extrapolate(ws, "du", "knn", k=10, force=force)

    def hard_clean(name):
        return prune(ws, score="du", source="knn", strategy="hard-clean", keep_fraction=0.5, noise_fraction=0.1,
                     name=name, scheduler="sync")

    def current_disagreement(k):
        dm = w.marker("score-label_disagreement")
        assert dm["config"]["k"] == k and w.outdated("score-label_disagreement") is None
        g, labels = zarr.open_group(f"{ws}/graph/all.zarr"), zarr.open_group(f"{ws}/embeddings.zarr")["labels"][:]
        nb, dist = g["neighbors"][:, :k], g["distances"][:, :k]
        np.testing.assert_allclose(read_disagreement(w), _brute(labels, labels[nb], dist), rtol=1e-6)
        return dm

    seeds_and_knn()
    assert w.marker("score-label_disagreement") is None
    assert hard_clean("a")["inputs"]["disagreement"] == current_disagreement(20)["fingerprint"]
    compute_disagreement(ws, k=10, force=True)
    old = read_disagreement(w)
    embed(ws, encoder="features", normalize=True, scheduler="sync", force=True, decode=DecodeConfig(input="vector"))
    build_index(ws, graph="all", k=20, scheduler="sync", force=True)
    seeds_and_knn(force=True)
    assert w.outdated("score-label_disagreement") is not None
    m = hard_clean("b")
    assert m["inputs"]["disagreement"] == current_disagreement(10)["fingerprint"]
    assert not np.allclose(read_disagreement(w), old, equal_nan=True)  # the new graph did change it


def test_seed_margin_needs_a_training_run_with_two_classes(tmp_path):
    from streamprune.prune import seed_margin_marker
    from streamprune.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    assert seed_margin_marker(ws) is None  # no train stage: seeds rank by disagreement alone
    run = ws.begin("train", {"model": "mlp"}, {}, key="train")
    run.commit(outputs={}, counts={"num_classes": 1})
    assert seed_margin_marker(ws) is None  # one class: no margin to measure


def test_hard_clean_reports_the_drop_its_keep_count_allows(tmp_path):
    """A noise fraction larger than the rows the keep count leaves to drop: stats and marker say how many
    rows were dropped as likely mislabelled (what the keep count allowed), beside the target."""
    import json

    from streamprune.extrapolate import extrapolate
    from streamprune.index import build_index
    from streamprune.prune import prune
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    w = Workspace(ws)
    subset(ws, fraction=0.3, seed=0)
    add_scores(w, "du", np.random.default_rng(0).random(len(subset_rows(w))).astype(np.float32))
    build_index(ws, graph="seeds", k=10, scheduler="sync")
    extrapolate(ws, "du", "knn", k=10)
    m = prune(ws, score="du", source="knn", strategy="hard-clean", keep_fraction=0.9, noise_fraction=0.5, name="hc",
              scheduler="sync")
    stats = json.loads(open(f"{ws}/prune/hc/stats.json").read())
    n = stats["n_eligible"]
    assert stats["hard_clean"]["drop_target"] == round(0.5 * n) > n - stats["n_kept"]
    assert stats["hard_clean"]["dropped"] == m["counts"]["hard_clean_dropped"] == n - stats["n_kept"] > 0


# hard-clean without (N,) float64 arrays: the same rows as the whole-array code it replaced -----------------------
def _reference_quantiles(v):
    """within_quantiles of all finite values, as the (N,) float64 ranking did it."""
    v = np.asarray(v) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v, np.float64)
    ok = np.isfinite(v)
    srt = np.sort(v[ok])
    out = np.full(v.shape, np.nan)
    out[ok] = ((np.searchsorted(srt, v[ok], "left") + 1 + np.searchsorted(srt, v[ok], "right")) / 2.0 - 0.5) / len(srt)
    return out


def _reference_noise_ranks(d, seed, margin=None):
    """noise_ranks as it was: each population ranked into an (N,) float64 array."""
    out = np.full(len(d), np.nan)
    other = np.flatnonzero(~seed)
    out[other] = _reference_quantiles(d[other])  # NaN rows are left out of the ranks, as within_quantiles' mask did
    rows = np.flatnonzero(seed)
    q = _reference_quantiles(d[rows])
    if margin is not None:
        qm = _reference_quantiles(-np.asarray(margin)[rows].astype(np.float64))
        q = np.where(np.isnan(qm), q, (q + qm) / 2)
    out[rows] = _reference_quantiles(q)
    return out


def _reference_top_k(s, eligible, k):
    """select._top_k_of: one copy of the eligible values, partitioned."""
    if k == 0:
        return np.zeros(len(s), bool)
    vals = s[eligible]
    vals.partition(len(vals) - k)
    threshold = vals[len(vals) - k]
    mask = (s > threshold) & eligible
    mask[np.flatnonzero((s == threshold) & eligible)[:k - int(mask.sum())]] = True
    return mask


def _reference_hard_clean(scores, noise, keep_count, drop_count):
    """select.hard_clean as it was: a float64 copy of the candidates' noise partitioned, then keep_hardest."""
    s = np.asarray(scores)
    eligible = ~np.isnan(s)
    drop_count = int(max(0, min(drop_count, int(eligible.sum()) - keep_count)))
    noise = np.asarray(noise, np.float64)
    if drop_count:
        candidates = eligible & np.isfinite(noise)
        s = np.where(_reference_top_k(noise, candidates, min(drop_count, int(candidates.sum()))), np.nan, s)
    return _reference_top_k(s, ~np.isnan(s), keep_count)


_tied = st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, 3.0, -2.0, math.nan])


@st.composite
def _hard_clean_case(draw):
    n = draw(st.integers(1, 60))
    column = st.lists(_tied, min_size=n, max_size=n).map(np.array)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scores, dis = draw(column).astype(dtype), np.abs(draw(column)).astype(np.float32)
    seed = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    margin = None
    if draw(st.booleans()):
        margin = np.full(n, np.nan, np.float32)
        margin[seed] = draw(column)[seed]
    eligible = int((~np.isnan(scores)).sum())
    keep = draw(st.integers(0, eligible))
    return scores, dis, seed, margin, keep, draw(st.integers(0, n + 2))


@settings(max_examples=300, deadline=None)
@given(_hard_clean_case(), st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_hard_clean_keeps_what_the_whole_array_code_kept(case, chunk_rows, group_rows, higher_is_harder):
    """The noise table (rank sums, 5 B a row) and the radix-select drop and keep give exactly the rows that the
    (N,) float64 noise ranks and a partitioned copy gave: ties, NaN scores and noise, seed rows with and
    without a margin, chunks of a few rows."""
    from streamprune import select as sel
    from streamprune.extrapolate import label_aware
    from streamprune.extrapolate.label_aware import noise_table

    scores, dis, seed, margin, keep, drop = case
    ranks = _reference_noise_ranks(dis, seed, margin)
    want = _reference_hard_clean(scores if higher_is_harder else -scores, ranks, keep, drop)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sel, "CHUNK_ROWS", chunk_rows)
        mp.setattr(sel, "GROUP_ROWS", group_rows)
        mp.setattr(label_aware, "RANK_ROWS", group_rows)
        table = noise_table(dis, seed, None if margin is None else margin[seed])
        np.testing.assert_array_equal(table[:], ranks)  # bit for bit, NaN where no rank
        for a in range(0, len(dis), chunk_rows):
            np.testing.assert_array_equal(table[a:a + chunk_rows], ranks[a:a + chunk_rows])
        np.testing.assert_array_equal(noise_ranks(dis, seed, margin), ranks)
        got = sel.select("hard-clean", scores, None, keep, higher_is_harder=higher_is_harder, noise=table,
                         drop_count=drop)
        from_array = sel.hard_clean(scores if higher_is_harder else -scores, ranks, keep, drop)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(from_array, want)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([np.float16, np.float32, np.float64]), st.integers(1, 12), st.data())
def test_top_k_in_passes_matches_a_partitioned_copy(dtype, chunk_rows, data):
    """Radix select over the float's bits: the k largest eligible values, ties (0.0 and -0.0 equal) to the lower
    row, at any magnitude and sign."""
    from streamprune import select as sel

    width = np.finfo(dtype).bits
    values = data.draw(st.lists(st.one_of(st.floats(width=width, allow_infinity=False), _tied), min_size=1,
                                max_size=60))
    s = np.array(values, dtype)
    eligible = np.array(data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s)))) & ~np.isnan(s)
    k = data.draw(st.integers(0, int(eligible.sum())))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sel, "CHUNK_ROWS", chunk_rows)
        got = sel.top_k_in_passes(s, eligible, k)
    np.testing.assert_array_equal(got, _reference_top_k(s, eligible, k))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_top_k_in_passes_takes_zero_and_negative_zero_as_one_value(dtype):
    """-0.0 == 0.0: a tie broken by row id, not by the sign bit."""
    from streamprune import select as sel

    s = np.array([-0.0, 0.0, -0.0, 0.0, 1.0, -1.0, np.nan], dtype)
    eligible = ~np.isnan(s)
    for k in range(int(eligible.sum()) + 1):
        np.testing.assert_array_equal(sel.top_k_in_passes(s, eligible, k), _reference_top_k(s, eligible, k))
    assert np.flatnonzero(sel.top_k_in_passes(s, eligible, 2)).tolist() == [0, 4]


def test_hard_clean_prune_on_a_low_is_hard_score_with_a_set_or_estimated_noise_fraction(tmp_path):
    """hard-clean on the seed rows' AUM (low = hard; rows without a score are not eligible): a noise fraction
    drops round(fraction x eligible rows) of the eligible rows with the highest noise ranks, then keeps the
    lowest AUM of the rest (ties: the lower row).  ``auto`` (the default) drops as many eligible rows as the
    exp(-d)-weighted majority of their k neighbours (k of the label disagreement) says are mislabelled, and
    reports that count as a share of the eligible rows."""
    import json

    import pandas as pd
    import zarr

    from streamprune.extrapolate.label_aware import compute_disagreement, noise_ranks, read_disagreement
    from streamprune.prune import prune
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    w = Workspace(ws)
    compute_disagreement(ws, k=5)  # of the graph's 20 neighbours
    subset(ws, fraction=0.3, seed=0)
    rows = subset_rows(w)
    rng = np.random.default_rng(2)
    aum = np.round(rng.normal(size=len(rows)), 1).astype(np.float32)  # ties
    aum[::10] = np.nan  # seed rows without a score
    add_scores(w, "aum", aum)
    scores = np.full(400, np.nan)
    scores[rows] = aum
    eligible = np.isfinite(scores)
    n_eligible = int(eligible.sum())
    seed = np.zeros(400, bool)
    seed[rows] = True
    g = zarr.open_group(f"{ws}/graph/all.zarr")
    labels = zarr.open_group(f"{ws}/embeddings.zarr")["labels"][:]
    nb, dist = g["neighbors"][:], g["distances"][:]
    majority_other = _brute_majority(labels, labels[nb[:, :5]], dist[:, :5], 3)
    assert (majority_other & ~eligible).sum() > 10  # flagged rows outside the eligible ones must not count
    assert (majority_other & eligible).sum() != (_brute_majority(labels, labels[nb], dist, 3) & eligible).sum()

    def expected(drop, keep):
        noise = noise_ranks(read_disagreement(w), seed)
        cand = np.flatnonzero(eligible & np.isfinite(noise))
        dropped = cand[np.lexsort((cand, -noise[cand]))][:drop]
        rest = np.flatnonzero(eligible & ~np.isin(np.arange(400), dropped))
        return set(dropped.tolist()), set(rest[np.lexsort((rest, scores[rest]))][:keep].tolist())

    assert round(0.045 * n_eligible) != int(0.045 * n_eligible)  # the set fraction is rounded, not floored
    for name, opts, drop in (("set", {"noise_fraction": 0.045}, round(0.045 * n_eligible)),
                             ("auto", {}, int((majority_other & eligible).sum()))):  # auto: the default
        m = prune(ws, score="aum", source="seed", strategy="hard-clean", keep_count=50, name=name, scheduler="sync",
                  **opts)
        info = json.loads(open(f"{ws}/prune/{name}/stats.json").read())["hard_clean"]
        assert info["noise_fraction"] == opts.get("noise_fraction", "auto")
        assert info["drop_target"] == info["dropped"] == drop > 0
        assert info["noise_estimate"] == round(drop / n_eligible, 6)
        assert info["seed_signal"] == "disagreement" and m["inputs"]["seed_margin"] is None  # no training run
        dropped, kept = expected(drop, 50)
        got = set(pd.read_parquet(f"{ws}/prune/{name}/keys.parquet").row.tolist())
        assert got == kept and not got & dropped


def test_label_aware_gives_seed_rows_without_a_measured_score_a_mapped_one(tmp_path):
    """A seed row whose measured score is NaN has nothing to keep: like every other valid row it gets its
    disagreement rank (among the rows without a measured score) mapped onto the measured seed scores."""
    from scipy.stats import rankdata

    from streamprune.extrapolate import extrapolate, read_extrapolated
    from streamprune.extrapolate.label_aware import read_disagreement
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace
    from test_knn import add_scores

    ws, _ = _vector_workspace(tmp_path, flip=0.1)
    subset(ws, fraction=0.3, seed=0)
    w = Workspace(ws)
    rows = subset_rows(w)
    measured = np.random.default_rng(1).random(len(rows)).astype(np.float32)
    measured[::6] = np.nan
    add_scores(w, "mine", measured)
    m = extrapolate(ws, "mine", "label-aware", k=20)
    score, source = (a[:] for a in read_extrapolated(w, "mine", "label-aware"))
    kept = rows[np.isfinite(measured)]
    np.testing.assert_array_equal(score[kept], measured[np.isfinite(measured)])
    mapped = np.setdiff1d(np.arange(400), kept)  # the other rows and the seed rows without a measured score
    assert (source[rows[::6]] == 3).all() and np.isfinite(score[mapped]).all()
    dis = read_disagreement(w)[mapped]
    q = (rankdata(dis) - 0.5) / len(dis)
    want = np.quantile(np.sort(measured[np.isfinite(measured)].astype(np.float64)), q)
    np.testing.assert_allclose(score[mapped], want, rtol=1e-6, atol=1e-6)
    assert m["counts"]["n_predicted"] == len(mapped) and m["counts"]["n_nan"] == 0
