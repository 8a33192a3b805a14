"""Tests for streamprune.index: parameter choice, exact and approximate graphs, on-disk merge, resume."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import kill_python_when
from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.index import (
    auto_nlist,
    auto_params,
    auto_pq_bytes,
    build_index,
    cached_index,
    clear_cache,
    default_chunk_rows,
    ondisk_rows,
    read_graph,
    recall_at_k,
    sample_rows,
    search_rows,
    select_neighbors,
    streamed_kmeans,
    train_size,
    two_level_kmeans,
)
from streamprune.workspace import Workspace

# --------------------------------------------------------------------------- workspace helpers


def clustered(n: int, d: int, n_clusters: int = 50, intrinsic: int = 4, seed: int = 0) -> np.ndarray:
    """Gaussian blobs on random low-dimensional patches: the local structure of real embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)) * 4
    bases = rng.standard_normal((n_clusters, intrinsic, d)) / np.sqrt(intrinsic)
    c = rng.integers(0, n_clusters, n)
    z = rng.standard_normal((n, intrinsic))
    x = centers[c] + np.einsum("ni,nid->nd", z, bases[c]) + 0.05 * rng.standard_normal((n, d))
    return x.astype(np.float32)


def make_workspace(root, x: np.ndarray, *, valid: np.ndarray | None = None, subset: np.ndarray | None = None,
                   chunk: int = 100, embed_config: dict | None = None) -> Workspace:
    """A workspace holding embeddings.zarr (+ embed marker) and a subset (+ subset marker)."""
    ws = Workspace(str(root))
    n = len(x)
    valid = np.ones(n, bool) if valid is None else valid
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="w")
    group.create_array("emb", data=x, chunks=(chunk, x.shape[1]))
    group.create_array("labels", data=np.zeros(n, np.int64), chunks=(chunk,))
    group.create_array("valid", data=valid, chunks=(chunk,))
    ws.begin("embed", embed_config or {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    if subset is not None:
        arr = zarr.create_array(storage.zarr_store(ws.path("subset", "rows.zarr")), shape=(len(subset),),
                                dtype="int64", chunks=(max(1, len(subset)),), fill_value=-1)
        arr[:] = np.sort(subset)
        ws.begin("subset", {"test": 1}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(subset)})
    return ws


def brute_force(x: np.ndarray, query_ok: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference graph by explicit loops: per valid query, the k nearest ``base`` rows other than itself."""
    n = len(x)
    nbr = np.full((n, k), -1, np.int64)
    dist = np.full((n, k), np.inf, np.float32)
    xb = x.astype(np.float64)
    for i in range(n):
        if not query_ok[i]:
            continue
        cand = [j for j in np.flatnonzero(base) if j != i]
        d = np.sqrt(((xb[cand] - xb[i]) ** 2).sum(axis=1))
        order = np.argsort(d, kind="stable")[:k]
        nbr[i, :len(order)] = np.asarray(cand)[order]
        dist[i, :len(order)] = d[order]
    return nbr, dist


def graph_arrays(ws: Workspace, name: str) -> tuple[np.ndarray, np.ndarray]:
    nbr, dist = read_graph(ws, name)
    return nbr[:], dist[:]


# --------------------------------------------------------------------------- pure parameter choice


@pytest.mark.parametrize("n, d, factory", [
    (1_000, 32, "Flat"),
    (50_000, 128, "Flat"),
    (50_001, 128, "IVF894,PQ32"),
    (100_000, 3, "IVF1265,PQ1"),
    (250_000, 128, "IVF2000,PQ32"),
    (999_999, 128, "IVF4000,PQ32"),
    (1_000_000, 128, "IVF8192_HNSW32,PQ32"),  # from 1M: the power of two nearest n / 128 rows per list
    (2_000_000, 768, "IVF16384_HNSW32,PQ64"),
    (9_999_999, 100, "IVF65536_HNSW32,PQ25"),
    (20_000_000, 512, "IVF131072_HNSW32,PQ64"),
    (40_000_000, 128, "IVF262144_HNSW32,PQ32"),
    (1_000_000_000, 1000, "IVF262144_HNSW32,PQ50"),  # at most 2^18 lists
])
def test_auto_params_table_without_rerank(n, d, factory):
    assert auto_params(n, d, refine=False)["factory"] == factory


@pytest.mark.parametrize("n, d, factory", [
    (50_000, 128, "Flat"),
    (250_000, 128, "IVF2000,PQ16"),  # with the exact re-rank (the default): about d/8 bytes
    (2_000_000, 256, "IVF16384_HNSW32,PQ32"),
    (2_000_000, 768, "IVF16384_HNSW32,PQ64"),  # at most 64
    (500_000, 48, "IVF2828,PQ8"),  # narrow widths keep min(d/4, 8) bytes
])
def test_auto_params_table(n, d, factory):
    assert auto_params(n, d)["factory"] == factory


@pytest.mark.parametrize("d, m", [(128, 32), (100, 25), (768, 64), (2048, 64), (1000, 50), (12, 3), (7, 1), (3, 1)])
def test_pq_bytes_table_without_rerank(d, m):
    assert auto_pq_bytes(d, refine=False) == m


@pytest.mark.parametrize("d, m", [(256, 32), (128, 16), (100, 10), (768, 64), (1000, 50), (64, 8), (48, 8), (32, 8),
                                  (12, 3), (3, 1)])
def test_pq_bytes_table(d, m):
    assert auto_pq_bytes(d) == m


@settings(max_examples=200, deadline=None)
@given(st.integers(50_001, 10**10), st.integers(1, 4096))
def test_auto_params_properties(n, d):
    p = auto_params(n, d)
    assert 30 * p["nlist"] <= n
    if n >= 1_000_000 and p["nlist"] < 1 << 18:  # ~128 rows per list: the nearest power of two
        assert 128 / 2 ** 0.5 <= n / p["nlist"] <= 128 * 2 ** 0.5
    assert d % p["m"] == 0 and 1 <= p["m"] <= 64
    t = train_size(n, p["nlist"], d)
    assert min(n, 30 * p["nlist"]) <= t <= max(min(n, 256 * p["nlist"]), 30 * p["nlist"])


def test_plan_sizes_pq_codes_by_rerank():
    from streamprune.index import _plan

    with_rerank = _plan("all", 2_000_000, 256, 2_000_000, 20, "auto", None, None, None, 4096)
    without = _plan("all", 2_000_000, 256, 2_000_000, 20, "auto", 0, None, None, 4096)
    assert (with_rerank.factory, with_rerank.refine, with_rerank.code_size) == ("IVF16384_HNSW32,PQ32", 4, 32)
    assert (without.factory, without.refine, without.code_size) == ("IVF16384_HNSW32,PQ64", 0, 64)


def test_plan_turns_the_rerank_off_for_embeddings_too_big_to_reread(caplog):
    """Every search chunk re-reads the whole embeddings for its re-rank: `--refine` auto keeps it only up to
    RERANK_MAX_BYTES of embeddings (in their stored dtype), then widens the PQ codes instead and says so; an
    explicit --refine is kept."""
    from streamprune.index import RERANK_MAX_BYTES, _plan

    rows = RERANK_MAX_BYTES // 512  # 128-d float32 rows of 512 B: exactly the limit
    at = _plan("all", rows, 128, rows, 20, "auto", None, None, None, 4096, row_bytes=512)
    assert (at.refine, at.code_size) == (4, 16) and not caplog.records
    over = _plan("all", rows + 1, 128, rows + 1, 20, "auto", None, None, None, 4096, row_bytes=512)
    assert (over.refine, over.code_size) == (0, 32)
    assert "no exact re-rank" in caplog.text and "8.0 GiB" in caplog.text and "--refine 4" in caplog.text
    half = _plan("all", 2 * rows, 128, 2 * rows, 20, "auto", None, None, None, 4096, row_bytes=256)  # float16
    assert half.refine == 4
    forced = _plan("all", 2 * rows, 128, 2 * rows, 20, "auto", 4, None, None, 4096, row_bytes=512)
    assert (forced.refine, forced.code_size) == (4, 16)
    given = _plan("all", 2 * rows, 128, 2 * rows, 20, "IVF1024,PQ16", None, None, None, 4096, row_bytes=512)
    assert (given.refine, given.code_size) == (0, 16)


def test_explicit_fast_scan_factory_is_refused_on_disk():
    """Fast-scan inverted lists cannot be merged on disk: one line, before anything is built."""
    from streamprune.index import _plan

    plan = _plan("all", 10**6, 256, 10**6, 20, "IVF1024,PQ128x4fs", None, 2 * 10**6, None, 4096)
    assert (plan.ondisk, plan.code_size) == (False, 64)
    with pytest.raises(StreamPruneError, match=r"'IVF1024,PQ128x4fs' \(fast-scan\) keeps its lists in memory"):
        _plan("all", 10**6, 256, 10**6, 20, "IVF1024,PQ128x4fs", None, 500_000, None, 4096)


def test_refused_plan_with_force_keeps_the_earlier_index(tmp_path):
    """A factory whose plan is refused (fast-scan lists above the on-disk threshold) is refused
    before --force replaces anything: the earlier index's marker stays."""
    x = clustered(600, 8)
    ws = make_workspace(tmp_path / "ws", x, chunk=200)
    build_index(ws, graph="all", k=5, factory="IVF4,Flat", scheduler="sync")
    before = ws.marker("index-all")
    with pytest.raises(StreamPruneError, match=r"\(fast-scan\) keeps its lists in memory"):
        build_index(ws, graph="all", k=5, factory="IVF4,PQ4x4fs", ondisk_threshold=10, scheduler="sync", force=True)
    assert ws.marker("index-all") == before


def test_more_inverted_lists_than_indexed_rows_is_refused_before_force_removes_anything(tmp_path):
    """faiss trains one centroid per list on indexed rows: more lists than the rows an index holds cannot be
    trained, so the factory is refused up front naming both counts, and --force keeps the earlier graph."""
    x = clustered(300, 8)
    ws = make_workspace(tmp_path / "ws", x, subset=np.arange(0, 300, 3), chunk=100)
    built = build_index(ws, graph="both", k=5, factory="IVF64,Flat", scheduler="sync")
    assert built["all"]["counts"]["nlist"] == 64  # 300 rows: 64 lists train
    graph = graph_arrays(ws, "seeds")
    for force in (False, True):
        with pytest.raises(StreamPruneError, match=r"^index-seeds: factory 'IVF128,Flat' has 128 inverted lists but "
                                                   r"only 100 rows are indexed"):
            build_index(ws, graph="seeds", k=5, factory="IVF128,Flat", scheduler="sync", force=force)
    assert ws.marker("index-seeds") == built["seeds"]
    for got, want in zip(graph_arrays(ws, "seeds"), graph):
        np.testing.assert_array_equal(got, want)


def test_sizes():
    assert auto_nlist(250_000) == 2000
    assert ondisk_rows(32) == (4 << 30) // 40
    assert default_chunk_rows(4096) == 65536 and default_chunk_rows(100_000) == 100_000
    assert default_chunk_rows(4096, 20 * 4 + 1) == 49152 and default_chunk_rows(1000, 401) == 10_000
    assert train_size(250_000, 2000, 128) == 128_000  # 64 per list
    assert train_size(10**8, 1 << 16, 128) == (1 << 30) // 512  # the 1 GiB sample budget
    assert train_size(10**9, 1 << 18, 128) == 30 << 18  # never under 30 points per list


def test_select_neighbors_drops_self_and_missing():
    ids = np.array([[3, 0, 7, -1], [5, 2, 9, 4]])
    sq = np.array([[0.0, 1.0, 4.0, np.inf], [9.0, 1.0, 0.25, 16.0]], np.float32)
    nbr, dist = select_neighbors(ids, sq, np.array([3, 9]), 3)
    assert nbr.tolist() == [[0, 7, -1], [2, 5, 4]]
    np.testing.assert_allclose(dist, [[1, 2, np.inf], [1, 3, 4]])
    nbr, dist = select_neighbors(ids[:, :1], sq[:, :1], np.array([3, 0]), 2)  # fewer candidates than k: padded
    assert nbr.tolist() == [[-1, -1], [5, -1]]
    # a candidate whose distance is not finite (NaN or inf, e.g. from a NaN embedding) is no neighbour
    nbr, dist = select_neighbors(np.array([[4, 6, 8]]), np.array([[np.nan, 1.0, np.inf]], np.float32), np.array([0]), 3)
    assert nbr.tolist() == [[6, -1, -1]] and dist[0, 0] == 1.0 and np.isinf(dist[0, 1:]).all()


def test_recall_and_sampling():
    found, truth = np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, 7]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 1 / 3) / 2)
    # a query with fewer true neighbours than k (-1 pads its truth) that finds them all has recall 1
    assert recall_at_k(np.array([[7, 2, 9]]), np.array([[2, 7, -1]])) == 1.0
    mask = np.zeros(10_000, bool)
    mask[::7] = True
    rows = sample_rows(mask, 300, seed=1, block=1000)
    assert len(rows) == 300 and len(set(rows)) == 300 and mask[rows].all() and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, sample_rows(mask, 300, seed=1, block=4096))
    assert len(sample_rows(mask, 10**6, seed=1)) == mask.sum()
    none = sample_rows(mask, 0, seed=1, block=1000)  # no queries asked for: none, as int64 row ids
    assert none.shape == (0,) and none.dtype == np.int64


# --------------------------------------------------------------------------- graphs


def test_flat_graph_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    n, k = 600, 7
    x = rng.standard_normal((n, 8)).astype(np.float32)
    valid = rng.random(n) > 0.1
    subset = np.sort(rng.choice(n, 150, replace=False))
    ws = make_workspace(tmp_path / "ws", x, valid=valid, subset=subset)
    markers = build_index(ws, k=k, scheduler="sync", chunk_rows=128)
    in_subset = np.zeros(n, bool)
    in_subset[subset] = True
    for name, base in (("all", valid), ("seeds", valid & in_subset)):
        m = markers[name]
        assert m["counts"]["factory"] == "Flat" and m["counts"]["recall_at_k"] == 1.0
        nbr, dist = graph_arrays(ws, name)
        ref_nbr, ref_dist = brute_force(x, valid, base, k)
        np.testing.assert_array_equal(nbr, ref_nbr)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
        assert not (nbr == np.arange(n)[:, None]).any()  # never itself
        assert (nbr[~valid] == -1).all() and np.isinf(dist[~valid]).all()
        assert not np.isin(nbr, np.flatnonzero(~base)).any()  # only indexed rows as neighbours
        # recall is measured on the rows the graph answers for: every valid row (fewer than
        # recall_queries here), not only the rows the index holds
        gt = np.load(tmp_path / "ws" / "index" / f"{name}.groundtruth.npz")
        np.testing.assert_array_equal(gt["rows"], np.flatnonzero(valid))
    params = json.loads((tmp_path / "ws" / "index" / "params.json").read_text())
    assert params["seeds"]["recall_at_k"] == 1.0 and params["all"]["k"] == k
    # done: a second call is skipped
    assert build_index(ws, k=k, scheduler="sync", chunk_rows=128)["all"]["skipped"]


def test_zero_recall_queries_skip_the_recall_check_and_the_tuning(tmp_path):
    """recall_queries=0 skips measuring recall (none is reported, no ground truth is written) and an IVF
    index's nprobe tuning (nprobe 32); the graph is the exact one all the same."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    valid = rng.random(500) > 0.1
    ws = make_workspace(tmp_path / "ws", x, valid=valid)
    m = build_index(ws, graph="all", k=5, scheduler="sync", recall_queries=0)["all"]
    assert m["counts"]["recall_at_k"] is None and m["counts"]["recall_queries"] == 0
    assert not os.path.exists(ws.path("index", "all.groundtruth.npz"))
    ref_nbr, ref_dist = brute_force(x, valid, valid, 5)
    nbr, dist = graph_arrays(ws, "all")
    np.testing.assert_array_equal(nbr, ref_nbr)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
    ivf = build_index(ws, graph="all", k=5, factory="IVF4,Flat", scheduler="sync", recall_queries=0, force=True)
    assert ivf["all"]["counts"]["nprobe"] == 32 and ivf["all"]["counts"]["recall_at_k"] is None
    np.testing.assert_array_equal(graph_arrays(ws, "all")[0], ref_nbr)  # 32 probes of 4 lists: every row


def test_duplicates_and_fewer_rows_than_k(tmp_path):
    base = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    x = np.concatenate([base, base])  # row i and i + 20 are identical
    ws = make_workspace(tmp_path / "ws", x, subset=np.array([0, 3, 20]), chunk=8)
    markers = build_index(ws, k=5, scheduler="sync", chunk_rows=16)
    # exact search finds every true neighbour, also where a row has fewer than k of them (seeds)
    assert markers["seeds"]["counts"]["recall_at_k"] == 1.0 and markers["all"]["counts"]["recall_at_k"] == 1.0
    nbr, dist = graph_arrays(ws, "all")
    assert (nbr[:20, 0] == np.arange(20, 40)).all() and (nbr[20:, 0] == np.arange(20)).all()
    assert (dist[:, 0] < 1e-3).all() and not (nbr == np.arange(40)[:, None]).any()
    nbr, dist = graph_arrays(ws, "seeds")
    assert nbr[0].tolist()[:2] == [20, 3] and nbr[0, 2:].tolist() == [-1, -1, -1]  # 2 other seeds, then none
    assert np.isinf(dist[0, 2:]).all()
    assert sorted(nbr[5, :3].tolist()) == [0, 3, 20] and (nbr[5, 3:] == -1).all()


def test_ivfpq_refine_reaches_recall(tmp_path):
    n, d, k = 20_000, 32, 10
    x = clustered(n, d, intrinsic=8)
    ws = make_workspace(tmp_path / "ws", x, chunk=2500)
    m = build_index(ws, graph="all", k=k, factory="IVF256,PQ8", scheduler="sync", chunk_rows=5000,
                    recall_queries=500)["all"]
    c = m["counts"]
    assert c["refine"] == 4 and c["nprobe"] in (16, 32, 64, 128, 256)
    assert c["recall_at_k"] >= 0.95
    # independent check on other rows against numpy
    nbr, _ = read_graph(ws, "all")
    rows = np.arange(7, n, 97)
    truth = np.stack([np.argsort(((x - x[i]) ** 2).sum(1))[1:k + 1] for i in rows])
    assert recall_at_k(nbr.get_orthogonal_selection((rows,)), truth) >= 0.95
    # refine recovers what PQ loses: the same index without re-ranking is clearly worse
    index = cached_index(ws, "all", m["fingerprint"], False, {"nprobe": c["nprobe"]})
    raw, _ = search_rows(index, x[rows], rows, k, 0, None)
    clear_cache()
    assert recall_at_k(raw, truth) < c["recall_at_k"] - 0.1


def test_streamed_kmeans_matches_in_memory_within_bounded_memory(monkeypatch):
    import tracemalloc

    import faiss

    import streamprune.index as index_mod

    n, d, nlist = 60_000, 32, 1024
    x = clustered(n, d, n_clusters=200, intrinsic=8, seed=3)
    # zarr decodes the chunks of one gather slab at once: keep slabs (256 KiB) small against the sample
    monkeypatch.setattr(index_mod, "SLAB_BYTES", 256 << 10)
    emb = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(n, d), chunks=(1024, d), dtype="float32")
    emb[:] = x
    rows = np.arange(0, n, dtype=np.int64)
    memory = 1 << 20  # the sample is 7.7 MB
    tracemalloc.start()
    streamed = streamed_kmeans(emb, rows, nlist, 10, 1, memory=memory)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    in_memory = two_level_kmeans(x, nlist, 10, 1)
    assert streamed.shape == in_memory.shape == (nlist, d) and np.isfinite(streamed).all()
    err_s = faiss.knn(x, streamed, 1)[0].mean()
    err_m = faiss.knn(x, in_memory, 1)[0].mean()
    assert err_s <= 1.03 * err_m  # the same algorithm: the same quantisation error, give or take
    assert err_s < 0.75 * faiss.knn(x, x[:nlist], 1)[0].mean()  # and clearly better than random centroids
    assert len(np.unique(streamed.round(4), axis=0)) > 0.95 * nlist
    # numpy allocations (tracemalloc sees them): memory + a slab, a fraction of the sample
    assert peak < x.nbytes / 3, peak


def test_streamed_kmeans_disk_full_is_one_line(monkeypatch):
    import errno
    import tempfile

    import streamprune.index as index_mod

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def tell(self):
            return 0

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: FullDisk())
    x = clustered(4000, 8, seed=2)
    emb = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(1000, 8), dtype="float32")
    emb[:] = x
    with pytest.raises(StreamPruneError, match=r"index: the training sample's spill file in .*no space left on "
                                               r"device \(ENOSPC\); free space"):
        index_mod.streamed_kmeans(emb, np.arange(4000), 64, 5, 0, memory=32 << 10)


def test_streamed_training_builds_the_same_quality_graph(tmp_path, monkeypatch):
    import streamprune.index as index_mod

    n, d, k = 40_000, 16, 10
    x = clustered(n, d, intrinsic=6, seed=11)
    opts = dict(graph="all", k=k, factory="IVF1024,PQ4", scheduler="sync", chunk_rows=10_000, recall_queries=400)
    mem = make_workspace(tmp_path / "mem", x, chunk=5000)
    m_mem = build_index(mem, **opts)["all"]["counts"]
    calls = []
    real = index_mod.streamed_kmeans
    monkeypatch.setattr(index_mod, "streamed_kmeans", lambda *a, **kw: calls.append(kw["memory"]) or real(*a, **kw))
    monkeypatch.setattr(index_mod, "TRAIN_MEMORY", 512 << 10)  # the 40k x 16 sample is 2.5 MB: streamed
    streamed = make_workspace(tmp_path / "streamed", x, chunk=5000)
    m_str = build_index(streamed, **opts)["all"]["counts"]
    assert calls == [512 << 10]
    assert streamed.read_json("index", "params.json")["all"]["train_streamed"] is True
    assert mem.read_json("index", "params.json")["all"]["train_streamed"] is False
    assert m_str["recall_at_k"] >= 0.95 and m_str["recall_at_k"] >= m_mem["recall_at_k"] - 0.02
    assert m_str["nprobe"] <= 2 * m_mem["nprobe"]


def test_ondisk_merge_equals_in_memory(tmp_path):
    n, d = 6000, 16
    x = clustered(n, d, seed=5)
    opts = dict(graph="all", k=8, factory="IVF32,PQ4", refine=0, nprobe=8, scheduler="sync", chunk_rows=1000,
                recall_queries=200)
    mem = make_workspace(tmp_path / "mem", x, chunk=500)
    disk = make_workspace(tmp_path / "disk", x, chunk=500)
    m_mem = build_index(mem, **opts)["all"]
    m_disk = build_index(disk, ondisk_threshold=1000, **opts)["all"]
    assert not m_mem["counts"]["ondisk"] and m_disk["counts"]["ondisk"]
    assert (tmp_path / "disk" / "index" / "all.ivfdata").stat().st_size > 0
    assert not (tmp_path / "disk" / "index" / "all.shards").exists()
    a_nbr, a_dist = graph_arrays(mem, "all")
    b_nbr, b_dist = graph_arrays(disk, "all")
    np.testing.assert_array_equal(a_nbr, b_nbr)
    np.testing.assert_array_equal(a_dist, b_dist)
    assert m_disk["counts"]["recall_at_k"] == m_mem["counts"]["recall_at_k"]


def test_dask_cluster_matches_sync(tmp_path, dask_cluster):
    x = clustered(3000, 16, seed=2)
    subset = np.arange(0, 3000, 4)
    a = make_workspace(tmp_path / "a", x, subset=subset, chunk=250)
    b = make_workspace(tmp_path / "b", x, subset=subset, chunk=250)
    build_index(a, k=6, scheduler="sync", chunk_rows=500)
    build_index(b, k=6, scheduler=dask_cluster, chunk_rows=500)
    for name in ("seeds", "all"):
        for u, v in zip(graph_arrays(a, name), graph_arrays(b, name)):
            np.testing.assert_array_equal(u, v)


def test_s3_workspace_ondisk(tmp_path, s3server, s3bucket, monkeypatch):
    x = clustered(3000, 8, seed=4)
    opts = dict(graph="all", k=5, factory="IVF16,PQ2", nprobe=4, refine=2, scheduler="sync", chunk_rows=1000,
                recall_queries=100, ondisk_threshold=1000)
    local = make_workspace(tmp_path / "local", x, chunk=500)
    build_index(local, **opts)
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    _remote_embeddings(remote, x, 500)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    m = build_index(remote, **opts)["all"]
    assert m["counts"]["ondisk"] and remote.exists("index", "all.ivfdata")
    for u, v in zip(graph_arrays(local, "all"), graph_arrays(remote, "all")):
        np.testing.assert_array_equal(u, v)
    # a host that did not build it (an empty local cache) fetches the inverted lists beside the index file
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "other-host"))
    clear_cache()
    try:
        index = cached_index(remote, "all", m["fingerprint"], True, {"nprobe": 4})
        rows = np.arange(0, 3000, 300)
        emb = zarr.open_group(storage.zarr_store(local.path("embeddings.zarr")), mode="r")["emb"]
        nbr, _ = search_rows(index, x[rows], rows, 5, 2, emb)
    finally:
        clear_cache()
    np.testing.assert_array_equal(nbr, graph_arrays(local, "all")[0][rows])


def _remote_embeddings(ws: Workspace, x: np.ndarray, chunk: int, config: dict | None = None) -> None:
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="w")
    group.create_array("emb", data=x, chunks=(chunk, x.shape[1]))
    group.create_array("valid", data=np.ones(len(x), bool), chunks=(chunk,))
    ws.begin("embed", config or {"test": 1}, {}, force=True).commit({"embeddings": "embeddings.zarr"}, {"n": len(x)})


def test_s3_workspace_rerank_fetches_the_embeddings_once(tmp_path, s3server, s3bucket, monkeypatch):
    """The exact re-rank of an s3:// workspace reads a local copy of embeddings.zarr: each of its
    chunks is fetched once by the stage, not once per search chunk, and the graph is the same as a
    local workspace's.  A later embed run (same config, other vectors) is not served the old copy."""
    from faultproxy import FaultProxy

    x = clustered(4000, 8, seed=5)
    opts = dict(graph="all", k=5, factory="IVF16,PQ2", nprobe=4, refine=2, scheduler="sync", chunk_rows=500,
                recall_queries=100)
    local = make_workspace(tmp_path / "local", x, chunk=500)
    build_index(local, **opts)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    with FaultProxy(s3server.endpoint_url) as proxy:
        remote = Workspace(f"s3://{s3bucket}/ws", proxy.storage_options(s3server.storage_options))
        _remote_embeddings(remote, x, 500)
        del proxy.seen[:]
        m = build_index(remote, **opts)["all"]
        fetched = [path for method, path in proxy.seen if method == "GET" and "/embeddings.zarr/emb/c/" in path]
    assert m["timings"]["local_copy_s"] >= 0
    assert len(fetched) == len(set(fetched)) == len(x) // 500  # 8 search chunks, each chunk of rows read once
    for u, v in zip(graph_arrays(local, "all"), graph_arrays(remote, "all")):
        np.testing.assert_array_equal(u, v)
    # An embed run again with the same config (its fingerprint unchanged) and other vectors, and the
    # graph built again: the copy of the earlier embed run is not used.
    y = clustered(4000, 8, seed=6)
    other = make_workspace(tmp_path / "other", y, chunk=500)
    build_index(other, **opts)
    _remote_embeddings(remote, y, 500)
    storage.remove(remote.path("_stages", "index-all.json"), remote.storage_options)
    build_index(remote, **opts)
    for u, v in zip(graph_arrays(other, "all"), graph_arrays(remote, "all")):
        np.testing.assert_array_equal(u, v)


def test_local_copy_of_remote_embeddings_cut_short_is_made_again(tmp_path, s3server, s3bucket, monkeypatch):
    """A copy killed before it was finished (no completion mark) is replaced by a whole one; a
    finished one is reused as it is."""
    from streamprune.index import local_embeddings, open_embeddings

    x = clustered(1000, 8, seed=8)
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    _remote_embeddings(remote, x, 300)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    emb, _, marker = open_embeddings(remote, "test")
    first = local_embeddings(remote, emb, marker)
    np.testing.assert_array_equal(first[:], x)
    copy_dir = os.path.dirname(str(first.store.root))
    zarr.open_array(first.store.root, mode="r+")[0:300] = 0  # a partial copy: rows missing ...
    os.remove(os.path.join(copy_dir, "done"))  # ... and never marked done
    again = local_embeddings(remote, emb, marker)
    np.testing.assert_array_equal(again[:], x)
    zarr.open_array(again.store.root, mode="r+")[0:1] = 7  # a finished copy is read, not fetched again
    assert local_embeddings(remote, emb, marker)[0, 0] == 7


def test_local_rows_copy_follows_the_array_write_it_was_made_from(tmp_path, s3server, s3bucket, monkeypatch):
    """local_rows: a remote array's copy is a read-only memmap of the whole array, reused while its version
    stands, made again when cut short, replaced (and the old one removed) for a new write of the array; an
    array without a version, or a local workspace's, is returned as it is."""
    from streamprune.index import local_rows

    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    rel = "gcn/du/h1.zarr"

    def write(x: np.ndarray) -> zarr.Array:
        arr = zarr.create_array(storage.zarr_store(remote.path(rel), remote.storage_options), shape=x.shape,
                                chunks=(7, x.shape[1]), shards=(21, x.shape[1]), dtype="float32", overwrite=True)
        arr[:] = x
        return arr

    x = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    arr = write(x)
    first = local_rows(remote, arr, rel, "write-1", group="acts")
    assert isinstance(first, np.memmap) and not first.flags.writeable
    np.testing.assert_array_equal(first, x)
    copy_dir = os.path.dirname(first.filename)
    os.remove(os.path.join(copy_dir, "done"))  # a copy never marked done is made again
    np.lib.format.open_memmap(first.filename, mode="r+")[:] = 0
    np.testing.assert_array_equal(local_rows(remote, arr, rel, "write-1", group="acts"), x)
    np.lib.format.open_memmap(first.filename, mode="r+")[0, 0] = 7  # a finished copy is read, not fetched again
    assert local_rows(remote, arr, rel, "write-1", group="acts")[0, 0] == 7
    y = x + 1
    arr = write(y)
    second = local_rows(remote, arr, rel, "write-2", group="acts")
    np.testing.assert_array_equal(second, y)
    assert os.path.dirname(second.filename) != copy_dir and not os.path.exists(copy_dir)  # no process holds it
    assert local_rows(remote, arr, rel, None) is arr
    local = zarr.create_array(zarr.storage.LocalStore(str(tmp_path / "h1.zarr")), shape=(4, 2), dtype="float32")
    assert local_rows(Workspace(str(tmp_path / "lws")), local, rel, "write-1") is local


def test_processes_of_one_host_share_one_local_copy(tmp_path, s3server, s3bucket):
    """Processes asking for the local copy at once (a host's dask workers) wait for one copy: the
    embeddings are fetched once, and each process reads them whole."""
    import subprocess
    import sys

    from faultproxy import FaultProxy

    x = clustered(3000, 16, seed=9)
    with FaultProxy(s3server.endpoint_url) as proxy:
        opts = proxy.storage_options(s3server.storage_options)
        remote = Workspace(f"s3://{s3bucket}/ws", opts)
        _remote_embeddings(remote, x, 100)
        del proxy.seen[:]
        code = ("import json, sys, numpy as np\n"
                "from streamprune.index import local_embeddings, open_embeddings\n"
                "from streamprune.workspace import Workspace\n"
                f"ws = Workspace({remote.url!r}, json.loads(sys.argv[1]))\n"
                "emb, _, marker = open_embeddings(ws, 'test')\n"
                "print(float(np.asarray(local_embeddings(ws, emb, marker)[:], np.float64).sum()))\n")
        env = {**os.environ, "STREAMPRUNE_CACHE": str(tmp_path / "cache")}
        procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(opts)], stdout=subprocess.PIPE, text=True,
                                  env=env) for _ in range(3)]
        sums = [float(p.communicate(timeout=120)[0]) for p in procs]
        fetched = [path for method, path in proxy.seen if method == "GET" and "/embeddings.zarr/emb/c/" in path]
    assert all(p.returncode == 0 for p in procs)
    assert sums == [pytest.approx(float(x.astype(np.float64).sum()), rel=1e-9)] * 3
    assert len(fetched) == len(set(fetched)) == 30  # 30 chunks of 100 rows, fetched by one process


def test_a_host_keeps_one_copy_per_workspace_and_none_that_a_process_reads_is_removed(tmp_path, s3server, s3bucket,
                                                                                        monkeypatch):
    """A new embed run's copy replaces the workspace's older ones, except one that another process
    still reads; that one goes with the next copy made after the process has ended."""
    import subprocess
    import sys

    from streamprune.index import local_embeddings, open_embeddings

    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    copies = lambda: sorted(glob.glob(str(tmp_path / "cache" / "embeddings" / "*" / "*" / "done")))  # noqa: E731

    def embed_and_copy(seed: int) -> np.ndarray:
        x = clustered(500, 8, seed=seed)
        _remote_embeddings(remote, x, 100)
        emb, _, marker = open_embeddings(remote, "test")
        np.testing.assert_array_equal(local_embeddings(remote, emb, marker)[:], x)
        return x

    embed_and_copy(10)
    first = copies()
    embed_and_copy(11)
    assert len(copies()) == 1 and copies() != first  # the first run's copy is gone
    # another process reads the current copy and keeps it open
    code = ("import json, sys, time\n"
            "from streamprune.index import local_embeddings, open_embeddings\n"
            "from streamprune.workspace import Workspace\n"
            f"ws = Workspace({remote.url!r}, json.loads(sys.argv[1]))\n"
            "emb, _, marker = open_embeddings(ws, 'test')\n"
            "local_embeddings(ws, emb, marker)\n"
            "print('reading', flush=True)\n"
            "sys.stdin.read()\n")
    reader = subprocess.Popen([sys.executable, "-c", code, json.dumps(s3server.storage_options)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert reader.stdout.readline().strip() == "reading"
        held = copies()
        embed_and_copy(12)
        assert len(copies()) == 2 and set(held) <= set(copies())  # not removed from under its reader
    finally:
        reader.communicate("", timeout=60)
    x = embed_and_copy(13)
    assert len(copies()) == 1 and not set(held) & set(copies())
    emb, _, marker = open_embeddings(remote, "test")
    np.testing.assert_array_equal(local_embeddings(remote, emb, marker)[:], x)


def test_s3_workspace_rerank_without_local_room_reads_remotely(tmp_path, s3server, s3bucket, monkeypatch, caplog):
    """No room on the local disk for a copy: the re-rank reads the remote embeddings (one warning)."""
    import streamprune.index as index_mod

    x = clustered(2000, 8, seed=7)
    opts = dict(graph="all", k=5, factory="IVF16,PQ2", nprobe=4, refine=2, scheduler="sync", chunk_rows=500,
                recall_queries=100)
    local = make_workspace(tmp_path / "local", x, chunk=500)
    build_index(local, **opts)
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    _remote_embeddings(remote, x, 500)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    full = shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20)  # 1 MiB free
    monkeypatch.setattr(index_mod.shutil, "disk_usage", lambda path: full)
    with caplog.at_level("WARNING", logger="streamprune.index"):
        build_index(remote, **opts)
    assert [r.message for r in caplog.records].count(next(r.message for r in caplog.records
                                                           if "no room for a local copy" in r.message)) == 1
    assert not glob.glob(str(tmp_path / "cache" / "embeddings" / "*" / "*" / "embeddings.zarr"))
    for u, v in zip(graph_arrays(local, "all"), graph_arrays(remote, "all")):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- crash and resume


def _records(root, key: str, prefix: str) -> int:
    return len(glob.glob(os.path.join(str(root), "_stages", key, "*", "chunks", f"{prefix}*.json")))


def test_killed_search_resumes_identically_and_width_change_is_refused(tmp_path):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    valid = rng.random(3000) > 0.05
    killed = make_workspace(tmp_path / "killed", x, valid=valid, chunk=100)
    clean = make_workspace(tmp_path / "clean", x, valid=valid, chunk=100)
    call = "build_index(%r, graph='all', k=6, scheduler='sync', chunk_rows=200)"
    code = "from streamprune.index import build_index; " + call % str(killed.url)
    kill_python_when(code, lambda: _records(killed.url, "index-all", "search-") >= 3,
                     env={"STREAMPRUNE_TASK_DELAY": "0.2"}, timeout=120)
    assert killed.marker("index-all") is None
    done_before = _records(killed.url, "index-all", "search-")
    assert 3 <= done_before < 15
    shutil.copytree(killed.url, tmp_path / "widened")

    m = build_index(killed, graph="all", k=6, scheduler="sync", chunk_rows=200)["all"]
    build_index(clean, graph="all", k=6, scheduler="sync", chunk_rows=200)
    assert m["counts"]["recall_at_k"] == 1.0
    for u, v in zip(graph_arrays(killed, "all"), graph_arrays(clean, "all")):
        np.testing.assert_array_equal(u, v)

    # the embeddings were replaced by wider ones behind the marker's back: a clear error, not a crash
    widened = Workspace(str(tmp_path / "widened"))
    group = zarr.open_group(storage.zarr_store(widened.path("embeddings.zarr")), mode="r+")
    del group["emb"]
    group.create_array("emb", data=np.concatenate([x, x[:, :1]], axis=1), chunks=(100, 9))
    with pytest.raises(StreamPruneError, match="width 8 but embeddings.zarr has width 9"):
        build_index(widened, graph="all", k=6, scheduler="sync", chunk_rows=200)


# --------------------------------------------------------------------------- bad input


def test_missing_embeddings_and_bad_options(tmp_path):
    ws = Workspace(str(tmp_path / "empty"))
    with pytest.raises(StreamPruneError, match="stage 'embed' has not run"):
        build_index(ws, scheduler="sync")
    ws.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": 10})
    with pytest.raises(StreamPruneError, match="embeddings.zarr is missing"):
        build_index(ws, graph="all", scheduler="sync")

    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, chunk=50)
    with pytest.raises(StreamPruneError, match="stage 'subset' has not run"):
        build_index(ws, graph="seeds", scheduler="sync")
    with pytest.raises(StreamPruneError, match="--graph must be"):
        build_index(ws, graph="some", scheduler="sync")
    with pytest.raises(StreamPruneError, match="--k must be"):
        build_index(ws, graph="all", k=0, scheduler="sync")
    with pytest.raises(StreamPruneError, match="--k must be a whole number >= 1, not True"):
        build_index(ws, graph="all", k=True, scheduler="sync")  # a bool is not a count
    with pytest.raises(StreamPruneError, match="faiss cannot build 'IVF10,PQ7' for width 16"):
        build_index(ws, graph="all", factory="IVF10,PQ7", scheduler="sync")
    with pytest.raises(StreamPruneError, match="no inverted lists to put on disk"):
        build_index(ws, graph="all", ondisk_threshold=10, scheduler="sync", force=True)
    with pytest.raises(StreamPruneError, match="has not been built"):
        read_graph(ws, "all")

    bad = make_workspace(tmp_path / "bad", x, chunk=50)
    group = zarr.open_group(storage.zarr_store(bad.path("embeddings.zarr")), mode="r+")
    del group["valid"]
    group.create_array("valid", data=np.ones(199, bool), chunks=(50,))
    with pytest.raises(StreamPruneError, match="valid has shape"):
        build_index(bad, graph="all", scheduler="sync")

    none_valid = make_workspace(tmp_path / "nv", x, valid=np.zeros(200, bool), chunk=50)
    with pytest.raises(StreamPruneError, match="no valid rows to index"):
        build_index(none_valid, graph="all", scheduler="sync")


def test_embeddings_of_another_form_and_a_lost_graph_are_named(tmp_path):
    """An emb array that is not an (N, D) float16/float32 matrix is refused naming what it holds, before anything is
    built; a graph whose arrays are gone after it finished is named rather than read; only two graphs exist."""
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    for data, says in ((x[:, 0], r"emb must be \(N, D\), got shape \(200,\)"),
                       (x.astype(np.int64), "emb must be float16 or float32, got int64"),
                       (x.astype(np.float64), "emb must be float16 or float32, got float64")):
        ws = make_workspace(tmp_path / str(data.dtype), x, chunk=50)
        group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="r+")
        del group["emb"]
        group.create_array("emb", data=data, chunks=(50,) + data.shape[1:])
        with pytest.raises(StreamPruneError, match=rf"^index-all: {re.escape(ws.path('embeddings.zarr'))}/{says}$"):
            build_index(ws, graph="all", k=5, scheduler="sync")
        assert ws.marker("index-all") is None and not os.path.exists(ws.path("graph"))

    ws = make_workspace(tmp_path / "lost", x, chunk=50)
    build_index(ws, graph="all", k=5, scheduler="sync")
    shutil.rmtree(ws.path("graph", "all.zarr", "neighbors"))
    with pytest.raises(StreamPruneError, match=rf"^graph {re.escape(ws.path('graph', 'all.zarr'))} is missing or "
                                               "incomplete"):
        read_graph(ws, "all")
    with pytest.raises(StreamPruneError, match=r"^graph must be one of seeds, all; got 'both'$"):
        read_graph(ws, "both")


@pytest.mark.parametrize("bad", [-1, 300])
def test_subset_rows_outside_the_embeddings_are_refused(tmp_path, bad):
    """A subset row below 0 or at/after the last embedding row is refused naming it (a negative row
    would otherwise make the last row a seed)."""
    ws = make_workspace(tmp_path / "ws", clustered(300, 8), subset=np.array([bad, 5, 100]))
    with pytest.raises(StreamPruneError, match=rf"^index-seeds: subset row {bad} is outside the 300 rows of "):
        build_index(ws, graph="seeds", k=5, scheduler="sync")


# --------------------------------------------------------------------------- gathers


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gather_sq_distances_matches_numpy(monkeypatch, dtype):
    import streamprune.index as index_mod

    monkeypatch.setattr(index_mod, "SLAB_BYTES", 4096)  # slabs of 60 rows: many slabs, dense and sparse
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(dtype)
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(10, 16), dtype=dtype)
    arr[:] = x
    q = rng.standard_normal((50, 16)).astype(np.float32)
    ids = rng.integers(-1, 1000, (50, 9))
    ids[:25, :] = rng.integers(0, 120, (25, 9))  # the first slabs densely, the rest sparsely
    ids[3] = -1
    got = index_mod.gather_sq_distances(q, ids, arr)
    want = ((q[:, None, :].astype(np.float64) - x.astype(np.float64)[ids]) ** 2).sum(-1)
    want[ids < 0] = np.inf
    np.testing.assert_allclose(got, want, rtol=1e-5)
    rows = np.sort(rng.choice(1000, 77, replace=False))
    np.testing.assert_array_equal(index_mod.gather_rows(arr, rows), x[rows].astype(np.float32))


def test_marker_of_another_version_is_rebuilt_with_force(tmp_path):
    """--force over an index marker of another streamprune version builds the index again (the
    stage's own marker was read with the version check, which refused even with --force)."""
    x = clustered(600, 8)
    ws = make_workspace(tmp_path / "ws", x, chunk=200)
    m = build_index(ws, graph="all", k=5, scheduler="sync")["all"]
    with open(ws.path("_stages", "index-all.json"), "w") as f:
        json.dump(dict(m, version="0.0.1"), f)
    with pytest.raises(StreamPruneError, match="written by streamprune 0.0.1"):
        build_index(ws, graph="all", k=5, scheduler="sync")
    again = build_index(ws, graph="all", k=5, scheduler="sync", force=True)["all"]
    assert not again.get("skipped") and again["version"] != "0.0.1"
    assert again["counts"]["recall_at_k"] == 1.0


def test_ondisk_add_interrupted_after_the_merge_resumes(tmp_path, monkeypatch):
    """A run stopped after the on-disk merge but before the add phase was recorded resumes (the
    shard indexes were removed before the record, so the resumed merge found them missing)."""
    from streamprune.workspace import StageRun

    x = clustered(3000, 16, seed=5)
    opts = dict(graph="all", k=8, factory="IVF16,PQ4", refine=0, nprobe=8, scheduler="sync", chunk_rows=500,
                recall_queries=100, ondisk_threshold=600)
    ws = make_workspace(tmp_path / "ws", x, chunk=250)
    clean = make_workspace(tmp_path / "clean", x, chunk=250)
    real = StageRun.mark_chunk

    def stop_at_built(self, chunk, info=None, errors=()):
        if chunk == "built":
            raise KeyboardInterrupt  # as a kill right before the record
        return real(self, chunk, info, errors)

    monkeypatch.setattr(StageRun, "mark_chunk", stop_at_built)
    with pytest.raises(KeyboardInterrupt):
        build_index(ws, **opts)
    monkeypatch.setattr(StageRun, "mark_chunk", real)
    m = build_index(ws, **opts)["all"]
    assert m["counts"]["ondisk"] and not (tmp_path / "ws" / "index" / "all.shards").exists()
    build_index(clean, **opts)
    for u, v in zip(graph_arrays(ws, "all"), graph_arrays(clean, "all")):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- behaviour pinned by a mutation audit


def test_select_neighbors_ties_keep_candidate_order_and_rounding_below_zero_is_distance_zero():
    """Equal distances keep the candidates' order also past the few candidates a plain sort keeps in
    order, and a squared distance rounded below zero (a duplicate row) is distance 0, not NaN."""
    ids = np.random.default_rng(0).permutation(np.arange(1, 201))[None, :]
    sq = np.where(ids % 2 == 0, 1.0, 2.0).astype(np.float32)
    nbr, dist = select_neighbors(ids, sq, np.array([0]), 120)
    want = np.concatenate([ids[0][ids[0] % 2 == 0], ids[0][ids[0] % 2 == 1]])[:120]
    assert nbr[0].tolist() == want.tolist()
    nbr, dist = select_neighbors(np.array([[5, 6]]), np.array([[-1e-6, 4.0]], np.float32), np.array([0]), 2)
    assert nbr.tolist() == [[5, 6]] and dist.tolist() == [[0.0, 2.0]]


def test_recall_skips_queries_without_true_neighbours():
    """A query with no true neighbour (a seed whose graph holds no other seed) is not scored: it
    neither lowers nor raises the mean; with none scored the recall is NaN."""
    found, truth = np.array([[1, 2], [5, 6]]), np.array([[2, 1], [-1, -1]])
    assert recall_at_k(found, truth) == 1.0
    assert np.isnan(recall_at_k(found[1:], truth[1:]))


def test_exact_knn_over_blocks_is_exact():
    """The ground truth over several blocks of rows: each query's k nearest other rows, also when they
    all lie in the query's own block (each block and the merge must keep k + 1, one being the query)."""
    from streamprune.index import exact_knn

    n, k = 120, 5
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = np.arange(n) ** 1.5  # no ties; the nearest rows are the adjacent ones
    blocks = [(np.arange(s, min(n, s + 40)), x[s:s + 40]) for s in range(0, n, 40)]
    q = np.array([0, 20, 39, 40, 119])
    nbr, dist = exact_knn(x[q], q, blocks, k)
    ref_nbr, ref_dist = brute_force(x, np.isin(np.arange(n), q), np.ones(n, bool), k)
    np.testing.assert_array_equal(nbr, ref_nbr[q])
    np.testing.assert_allclose(dist, ref_dist[q], rtol=1e-5)


def test_an_index_without_inverted_lists_is_trained_on_a_sample(tmp_path):
    """A factory that needs training but has no inverted lists (plain PQ) trains on up to 65,536 rows."""
    assert train_size(600, 0, 8) == 600 and train_size(10**6, 0, 8) == 1 << 16
    ws = make_workspace(tmp_path / "ws", clustered(600, 8), chunk=200)
    m = build_index(ws, graph="all", k=5, factory="PQ4x4", scheduler="sync")["all"]
    assert m["counts"]["factory"] == "PQ4x4" and ws.read_json("index", "params.json")["all"]["n_train"] == 600


def test_search_params_reach_the_inverted_lists_and_their_hnsw_quantizer():
    """nprobe goes to the IVF, and an HNSW quantizer searches at least 2·nprobe (never under 64)."""
    import faiss

    from streamprune.index import make_index, set_search_params

    index = make_index(8, "IVF256_HNSW32,Flat")
    ivf = faiss.extract_index_ivf(index)
    for nprobe, ef in ((48, 96), (16, 64)):
        set_search_params(index, {"nprobe": nprobe})
        assert ivf.nprobe == nprobe and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == ef


def test_refine_one_reranks_with_exact_distances():
    """refine=1 re-ranks k candidates with exact distances (only refine=0 keeps the PQ's distances)."""
    import faiss

    from streamprune.index import make_index

    x = clustered(2000, 16, seed=3)
    emb = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(500, 16), dtype="float32")
    emb[:] = x
    index = make_index(16, "IVF8,PQ2x4")
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)))
    faiss.extract_index_ivf(index).nprobe = 8
    rows = np.arange(0, 2000, 40)
    for refine, exact in ((1, True), (0, False)):
        nbr, dist = search_rows(index, x[rows], rows, 5, refine, emb)
        assert (nbr >= 0).all() and not (nbr == rows[:, None]).any()
        true = np.sqrt(((x[rows][:, None, :].astype(np.float64) - x[nbr]) ** 2).sum(-1))
        assert np.allclose(dist, true, rtol=1e-4, atol=1e-4) == exact


def test_explicit_nprobe_is_searched_with_and_reported_recall_is_the_graphs(tmp_path):
    """An explicit nprobe is used and recorded (no tuning), and the recall reported is that of the
    written graph on the ground-truth rows, to 4 decimals."""
    x = np.random.default_rng(2).standard_normal((800, 16)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, chunk=200)
    m = build_index(ws, graph="all", k=5, factory="IVF16,Flat", nprobe=2, scheduler="sync")["all"]
    params = ws.read_json("index", "params.json")["all"]
    assert m["counts"]["nprobe"] == params["nprobe"] == 2 and params["nprobe_table"] == {}
    gt = np.load(ws.path("index", "all.groundtruth.npz"))
    nbr, _ = read_graph(ws, "all")
    recall = recall_at_k(nbr.get_orthogonal_selection((gt["rows"],)), gt["ids"])
    assert m["counts"]["recall_at_k"] == round(recall, 4) < 0.9  # 2 of 16 lists: clearly inexact


def test_tuning_and_recall_queries_split_the_rows_and_tuning_can_probe_every_list(tmp_path, monkeypatch):
    """With fewer valid rows than tuning plus recall queries, half tune nprobe and the other half, none
    of them a tuning query, measure recall; nprobe may go up to every list."""
    import streamprune.index as index_mod

    x = np.random.default_rng(1).standard_normal((600, 128)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, chunk=200)
    tuned = []
    real = index_mod.search_rows
    monkeypatch.setattr(index_mod, "search_rows", lambda index, q, rows, *a: tuned.append(rows) or real(index, q,
                                                                                                        rows, *a))
    monkeypatch.setattr(index_mod, "_search_phase", lambda *a, **kw: None)  # only the tuning searches here
    monkeypatch.setattr(index_mod, "_recall", lambda *a, **kw: None)
    m = build_index(ws, graph="all", k=5, factory="IVF32,Flat", scheduler="sync")["all"]
    table = ws.read_json("index", "params.json")["all"]["nprobe_table"]
    assert list(table) == ["16", "32"] and table["16"] < 0.95 and m["counts"]["nprobe"] == 32
    gt_rows = np.load(ws.path("index", "all.groundtruth.npz"))["rows"]
    assert m["counts"]["recall_queries"] == len(gt_rows) == 300
    assert all(len(np.intersect1d(rows, gt_rows)) == 0 and len(rows) == 300 for rows in tuned)


def test_tuning_stops_where_more_probes_find_no_more_neighbours(tmp_path):
    """Without the re-rank, PQ codes cap recall below the target at any nprobe: the tuning stops once doubling
    nprobe gains less than NPROBE_PLATEAU and keeps the cheaper one, instead of searching with every probe it
    tried (nprobe 1024 searched ~60x longer than 16 for the same recall at 400k rows)."""
    from streamprune.index import NPROBE_PLATEAU

    ws = make_workspace(tmp_path / "ws", clustered(6000, 32), chunk=1000)
    m = build_index(ws, graph="all", k=10, factory="IVF64,PQ4", refine=0, scheduler="sync")["all"]
    table = ws.read_json("index", "params.json")["all"]["nprobe_table"]
    assert list(table) == ["16", "32"] and table["32"] - table["16"] < NPROBE_PLATEAU and table["16"] < 0.95
    assert m["counts"]["nprobe"] == 16


def test_cached_index_is_loaded_again_for_a_rewritten_file_or_other_search_parameters(tmp_path):
    """A worker keeps the index it loaded, but not past a rewrite of the file (an index built again
    under the same stage fingerprint) nor for other search parameters."""
    import faiss

    from streamprune.index import make_index, write_index

    ws = Workspace(str(tmp_path / "ws"))
    x = clustered(400, 8)
    path = ws.path("index", "all.faissindex")

    def write(n_rows: int, mtime_s: int) -> None:
        index = make_index(8, "IVF4,Flat")
        index.train(x)
        index.add_with_ids(x[:n_rows], np.arange(n_rows))
        write_index(ws, index, "index/all.faissindex")
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))  # a version tag of its own, however fast

    clear_cache()
    try:
        write(100, 1_000_000)
        first = cached_index(ws, "all", "fp", False, {"nprobe": 1})
        assert cached_index(ws, "all", "fp", False, {"nprobe": 1}) is first
        other = cached_index(ws, "all", "fp", False, {"nprobe": 3})
        assert faiss.extract_index_ivf(other).nprobe == 3
        write(300, 2_000_000)
        assert cached_index(ws, "all", "fp", False, {"nprobe": 3}).ntotal == 300
    finally:
        clear_cache()


def _interrupt_search_records(monkeypatch, after: int) -> None:
    """Stop a run (as a kill would) when it is about to record its search chunk number ``after + 1``."""
    from streamprune.workspace import StageRun

    real = StageRun.mark_chunk
    recorded = []

    def mark_chunk(self, chunk, info=None, errors=()):
        if str(chunk).startswith("search-"):
            if len(recorded) == after:
                raise KeyboardInterrupt
            recorded.append(chunk)
        return real(self, chunk, info, errors)

    monkeypatch.setattr(StageRun, "mark_chunk", mark_chunk)


def test_each_resumed_search_runs_exactly_the_chunks_not_recorded(tmp_path, monkeypatch):
    """Each resumed run searches only the chunks no earlier run recorded and records them under their
    own ids: a second interruption neither redoes finished chunks nor loses any."""
    import streamprune.index as index_mod
    from streamprune.workspace import StageRun

    x = np.random.default_rng(5).standard_normal((1000, 8)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, chunk=100)
    opts = dict(graph="all", k=4, scheduler="sync", chunk_rows=100)
    real_mark, real_task = StageRun.mark_chunk, index_mod._search_task
    searched = []
    monkeypatch.setattr(index_mod, "_search_task", lambda *a: searched.append(a[5]) or real_task(*a))
    for run, want in ((1, [0, 100, 200, 300]), (2, [300, 400, 500, 600])):
        _interrupt_search_records(monkeypatch, 3)
        with pytest.raises(KeyboardInterrupt):
            build_index(ws, **opts)
        monkeypatch.setattr(StageRun, "mark_chunk", real_mark)
        assert searched == want, run  # the last one searched, written, and stopped before its record
        del searched[:]
    m = build_index(ws, **opts)["all"]
    assert searched == [600, 700, 800, 900] and m["counts"]["recall_at_k"] == 1.0
    ref_nbr, ref_dist = brute_force(x, np.ones(1000, bool), np.ones(1000, bool), 4)
    np.testing.assert_array_equal(graph_arrays(ws, "all")[0], ref_nbr)


def test_search_records_of_a_wiped_graph_layout_are_not_trusted(tmp_path, monkeypatch):
    """A run stopped with the torch engine and resumed where only faiss searches writes a new graph;
    the chunks the torch run recorded were wiped with its layout and are searched again."""
    from streamprune.workspace import StageRun

    x = np.random.default_rng(6).standard_normal((800, 8)).astype(np.float32)
    ws = make_workspace(tmp_path / "ws", x, chunk=100)
    opts = dict(graph="all", k=4, scheduler="sync", chunk_rows=100)
    real_mark = StageRun.mark_chunk
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "cpu")
    _interrupt_search_records(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build_index(ws, **opts)
    monkeypatch.setattr(StageRun, "mark_chunk", real_mark)
    assert _records(ws.url, "index-all", "search-") == 3
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    m = build_index(ws, **opts)["all"]
    assert m["counts"]["engine"] == "faiss"
    ref_nbr, ref_dist = brute_force(x, np.ones(800, bool), np.ones(800, bool), 4)
    nbr, dist = graph_arrays(ws, "all")
    np.testing.assert_array_equal(nbr, ref_nbr)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)
