"""GCN extrapolation: sampler, normalisation, training, layer-wise out-of-core inference, resume."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune.extrapolate import extrapolate, methods
from streamprune.evaluate import pearson
from streamprune.extrapolate.gcn import (GCN, activation_chunk_rows, extrapolate_gcn, load_checkpoint,
                                         predict_in_memory, split_seeds)
from streamprune.extrapolate.sampler import (Features, GraphTable, RowSource, choose_neighbours, edge_weights,
                                             gather_rows, parse_fanout, sample_subgraph)
from streamprune.workspace import Workspace
from helpers import kill_python_when

SMALL = dict(hidden=(32, 16), dropout=0.1, epochs=6, batch_size=32, lr=5e-3)
QUICK = {**SMALL, "epochs": 1, "fanout": (6, 3, 3)}  # where only the inference path matters


# ------------------------------------------------------------------------------ synthetic data
def true_score(emb: np.ndarray) -> np.ndarray:
    """A smooth function of the embedding."""
    return np.sin(emb[:, 0]) + 0.5 * emb[:, 1] ** 2 - 0.3 * emb[:, 2]


def knn(emb: np.ndarray, valid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN among valid rows (self excluded), Euclidean distances ascending."""
    d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    d2[:, ~valid] = np.inf
    np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(np.take_along_axis(d2, idx, axis=1)).astype(np.float32)
    return idx.astype(np.int64), dist


def make_ws(path, n=500, d=6, k=12, n_classes=3, fraction=0.3, invalid=(3, 77, 250), seed=0, chunk=64) -> dict:
    """A workspace with embeddings.zarr, graph/all.zarr, a subset and seed scores 'du', plus markers."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    labels[rng.random(n) < 0.1] = -1
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    emb[~valid] = np.nan  # undecodable rows carry garbage; nothing may read them
    nbrs, dist = knn(np.nan_to_num(emb), valid, k)
    ws = Workspace(str(path))
    g = zarr.open_group(str(path / "embeddings.zarr"), mode="w")
    g.create_array("emb", data=emb, chunks=(chunk, d))
    g.create_array("labels", data=labels.astype(np.int64), chunks=(chunk,))
    g.create_array("valid", data=valid, chunks=(chunk,))
    ws.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    gg = zarr.open_group(str(path / "graph" / "all.zarr"), mode="w")
    gg.create_array("neighbors", data=nbrs, chunks=(chunk, k))
    gg.create_array("distances", data=dist, chunks=(chunk, k))
    ws.begin("index", {"test": 1}, {}, key="index-all").commit({"graph": "graph/all.zarr"}, {"n": n})
    rows = np.sort(rng.choice(n, int(n * fraction), replace=False)).astype(np.int64)
    # graph/seeds.zarr: every row's k nearest valid seed rows, never the row itself (the kNN prior's input)
    is_seed = np.zeros(n, bool)
    is_seed[rows] = True
    s_nbrs, s_dist = knn(np.nan_to_num(emb), valid & is_seed, min(k, int((valid & is_seed).sum()) - 1))
    sg = zarr.open_group(str(path / "graph" / "seeds.zarr"), mode="w")
    sg.create_array("neighbors", data=s_nbrs, chunks=(chunk, s_nbrs.shape[1]))
    sg.create_array("distances", data=s_dist, chunks=(chunk, s_nbrs.shape[1]))
    ws.begin("index", {"test": 1}, {}, key="index-seeds").commit({"graph": "graph/seeds.zarr"}, {"n": n})
    zarr.create_array(str(path / "subset" / "rows.zarr"), data=rows, chunks=(1024,))
    ws.begin("subset", {"test": 1}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(rows)})
    truth = true_score(np.nan_to_num(emb)).astype(np.float32)
    scores = truth[rows] + 0.05 * rng.normal(size=len(rows)).astype(np.float32)
    scores[~valid[rows]] = np.nan
    zarr.create_array(str(path / "scores" / "du.zarr"), data=scores.astype(np.float32), chunks=(1024,))
    ws.begin("score", {"score": "du"}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": len(rows)})
    return {"ws": str(path), "emb": emb, "labels": labels, "valid": valid, "nbrs": nbrs, "dist": dist,
            "rows": rows, "scores": scores, "truth": truth, "k": k}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_ws(tmp_path_factory.mktemp("gcn") / "base")


def clone(base, tmp_path, name="ws") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(base["ws"], dst)
    return dst


def read_out(ws):
    g = zarr.open_group(os.path.join(ws, "extrapolated", "du-gcn.zarr"), mode="r")
    return g["score"][:], g["source"][:]


# ------------------------------------------------------------------------------- pure math
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.integers(0, 2**31 - 1), st.sampled_from(["exp", "sqrt"]))
def test_edge_weights_rows_are_stochastic(n, k, seed, kind):
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    nbrs = rng.integers(-1, 3 * n, (n, k))
    dist = np.sort(rng.random((n, k)).astype(np.float32) * rng.choice([1.0, 1e3]), axis=1)
    nv = rng.random((n, k)) < 0.8
    self_w, w = edge_weights(rows, nbrs, dist, nv, kind)
    edge = (nbrs >= 0) & (nbrs != rows[:, None]) & nv
    assert np.allclose(self_w + w.sum(1), 1.0, atol=1e-5)
    has = edge.any(1)
    assert (w[~edge] == 0).all() and (w[has].max(1) > 0).all()  # no row underflows, even at distance 1000
    # The nearest edge weighs as much as the self-loop.
    assert np.allclose(w[has].max(1), self_w[has], rtol=1e-5)
    assert np.allclose(self_w[~has], 1.0)


def test_edge_weights_sqrt_variant_and_bad_kind():
    d = np.array([[1.0, 4.0]], np.float32)
    _, w_exp = edge_weights(np.array([5]), np.array([[0, 1]]), d, np.ones((1, 2), bool), "exp")
    _, w_sqrt = edge_weights(np.array([5]), np.array([[0, 1]]), d, np.ones((1, 2), bool), "sqrt")
    assert np.isclose(w_exp[0, 1] / w_exp[0, 0], np.exp(-3.0))
    assert np.isclose(w_sqrt[0, 1] / w_sqrt[0, 0], np.exp(-1.0))
    with pytest.raises(StreamPruneError, match="edge weight"):
        edge_weights(np.array([0]), np.array([[1]]), d[:, :1], np.ones((1, 1), bool), "cosine")


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_choose_neighbours_is_unbiased_subset(n, k, fanout, seed):
    rng = np.random.default_rng(seed)
    w = rng.random((n, k)).astype(np.float32) * (rng.random((n, k)) < 0.7)
    got = choose_neighbours(w, fanout, rng)
    taken = got > 0
    assert not (taken & (w == 0)).any()
    assert (taken.sum(1) == np.minimum(fanout, (w > 0).sum(1))).all()
    scale = (w > 0).sum(1) / np.maximum(taken.sum(1), 1)
    assert np.allclose(got[taken], (w * scale[:, None])[taken])


def _random_table(n, k, seed):
    rng = np.random.default_rng(seed)
    nbrs = rng.integers(-1, n, (n, k))
    dist = np.sort(rng.random((n, k)).astype(np.float32) * 3, axis=1)
    valid = rng.random(n) < 0.9
    table = GraphTable({"neighbors": nbrs, "distances": dist}, k, RowSource(valid), "exp", 1 << 30)
    return nbrs, valid, table


def test_graph_table_refuses_a_k_the_graph_lacks_and_a_neighbour_outside_it():
    """A table takes 1..width neighbours per row (the stage checks --k first; a table built directly is
    checked too), and a neighbour id beyond the graph's rows is named with its row instead of being read."""
    nbrs = np.array([[1, 2], [0, 2], [0, 5], [1, -1], [2, 3]])
    dist = np.array([[0.1, 0.2], [0.1, 0.3], [0.2, 0.4], [0.5, np.inf], [0.3, 0.6]], np.float32)
    group, valid = {"neighbors": nbrs, "distances": dist}, RowSource(np.ones(5, bool))
    for k in (0, 3):
        with pytest.raises(StreamPruneError, match=rf"^k={k} but the graph holds 2 neighbours per row$"):
            GraphTable(group, k, valid, "exp", 1 << 30)
    ids, _, w = GraphTable(group, 1, valid, "exp", 1 << 30)(np.arange(5))  # the bad id lies beyond k = 1
    np.testing.assert_array_equal(ids, nbrs[:, :1])
    assert (w > 0).all()
    for memory_limit in (1 << 30, 0):  # held in memory, or read from the arrays per call
        table = GraphTable(group, 2, valid, "exp", memory_limit)
        table(np.array([0, 1]))
        for rows in (lambda: table(np.array([4, 2])), lambda: table.span(0, 5)):
            with pytest.raises(StreamPruneError, match=r"^graph row 2 holds a neighbour id outside \[0, 5\)$"):
                rows()


def _bfs(seeds, nbrs, valid, hops):
    level = [set(seeds.tolist())]
    seen = set(level[0])
    for _ in range(hops):
        nxt = set()
        for r in level[-1]:
            for c in nbrs[r]:
                if c >= 0 and c != r and valid[c] and c not in seen:
                    nxt.add(int(c))
        seen |= nxt
        level.append(nxt)
    return level


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 60), st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1), st.booleans())
def test_sampler_edges_relabel_and_exact_khop(n, k, hops, seed, full):
    nbrs, valid, table = _random_table(n, k, seed)
    rng = np.random.default_rng(seed + 1)
    seeds = rng.choice(n, min(n, 4), replace=False)
    fanouts = (None,) * hops if full else tuple(int(f) for f in rng.integers(1, k + 1, hops))
    sub = sample_subgraph(seeds, table, fanouts, np.random.default_rng(seed + 2))
    # A table without a row count relabels through sorted arrays instead of a dense table: same subgraph.
    other = sample_subgraph(seeds, lambda rows: table(rows), fanouts, np.random.default_rng(seed + 2))
    for f in ("nodes", "prefix", "crow", "col", "val"):
        np.testing.assert_array_equal(getattr(sub, f), getattr(other, f), err_msg=f)
    # Relabelling: unique nodes, seeds first, hop prefixes nested, CSR columns inside each layer's sources.
    assert len(np.unique(sub.nodes)) == len(sub.nodes) and (sub.nodes[:len(seeds)] == seeds).all()
    assert (np.diff(sub.prefix) >= 0).all() and sub.prefix[-1] == len(sub.nodes)
    for layer in range(1, hops + 1):
        crow, col, val, (n_out, n_in) = sub.edges(layer)
        assert len(crow) == n_out + 1 and (col < n_in).all() and (val > 0).all()
        assert np.allclose(sub.adjacency(layer).to_dense().numpy(), _dense(crow, col, val, (n_out, n_in)))
    # Every edge is a graph edge (or the self-loop) between valid rows.
    crow, col, val, _ = sub.edges(1)
    tgt = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    g_t, g_s = sub.nodes[tgt], sub.nodes[col]
    is_self = g_t == g_s
    assert (is_self.sum() == len(crow) - 1)
    assert all(s in set(nbrs[t].tolist()) and valid[s] for t, s in zip(g_t[~is_self], g_s[~is_self]))
    if full:
        # Full fan-out: hop h nodes are exactly the BFS level h, with the exact normalised weights.
        levels = _bfs(seeds, nbrs, valid, hops)
        for h in range(1, hops + 1):
            assert set(sub.nodes[sub.prefix[h - 1]:sub.prefix[h]].tolist()) == levels[h]
        _, self_w, w = table(sub.nodes[:len(crow) - 1])
        assert np.allclose(np.diff(crow), 1 + (w > 0).sum(1))
        assert np.allclose(val[is_self], self_w)


def _dense(crow, col, val, shape):
    out = np.zeros(shape, np.float32)
    for i in range(shape[0]):
        np.add.at(out[i], col[crow[i]:crow[i + 1]], val[crow[i]:crow[i + 1]])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_graph_equals_the_sampled_closure_of_every_row(seed):
    """The whole graph built by row blocks is the full-fan-out subgraph of all rows, array for array
    (invalid rows, missing and self neighbours, blocks that split the rows unevenly)."""
    from streamprune.extrapolate.sampler import whole_graph

    _, _, table = _random_table(203, 6, seed)
    want = sample_subgraph(np.arange(203), table, (None,) * 3)
    for block in (7, 64, 1 << 16):
        got = whole_graph(table, 3, block=block)
        for name in ("nodes", "prefix", "crow", "col", "val"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{name}, block {block}")


def test_gather_rows_matches_numpy(tmp_path):
    data = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(64, 3))
    rows = np.random.default_rng(0).integers(0, 1000, 777)
    assert np.array_equal(gather_rows(arr, rows), data[rows])
    assert gather_rows(arr, np.zeros(0, np.int64)).shape == (0, 3)
    # Groups of whole chunks bounded in bytes, written in place; sharded arrays (8-row inner chunks).
    out = np.zeros((len(np.unique(rows)), 3), np.float32)
    assert np.array_equal(gather_rows(arr, np.unique(rows), out=out, max_bytes=1), data[np.unique(rows)])
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), shape=(1000, 3), chunks=(8, 3), shards=(200, 3),
                                dtype="float32", compressors=None)
    sharded[:] = data
    assert np.array_equal(gather_rows(sharded, rows, max_bytes=500), data[rows])
    src = RowSource(arr, memory_limit=0)
    assert not src.in_memory and np.array_equal(src.take(rows), data[rows])
    assert RowSource(arr, memory_limit=1 << 20).in_memory


def test_small_helpers():
    assert parse_fanout(None, 3, 10) == (10, 10, 10)
    assert parse_fanout((5, None, 99), 3, 10) == (5, 10, 10)
    with pytest.raises(StreamPruneError, match="one value per layer"):
        parse_fanout((5, 5), 3, 10)
    for bad in (0, -1, 2.5, True, (5, -1, 5)):  # a negative fan-out once meant every neighbour, silently
        with pytest.raises(StreamPruneError, match=r"^fanout values must be whole numbers >= 1, not "):
            parse_fanout(bad, 3, 10)
    tr, va = split_seeds(100, 0)
    assert len(va) == 10 and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert np.isclose(pearson([1, 2, 3], [2, 4, 6.5]), 0.99, atol=0.01) and np.isnan(pearson([1, 1], [1, 2]))
    # Activation chunks divide the task's rows; small graphs get whole-task chunks, huge ones small.
    for n, rows in ((500, 64), (200_000, 8192), (10**9, 8192), (10**6, 1000)):
        c = activation_chunk_rows(n, rows, 10, 512)
        assert rows % c == 0 or c == n
    assert activation_chunk_rows(200_000, 8192, 10, 512) == 8192
    assert activation_chunk_rows(10**9, 8192, 10, 512) == 8


def test_building_a_gcn_leaves_no_generated_file_in_the_temp_directory(tmp_path):
    """torch_geometric writes each conv class's propagate() to a file in the temp directory and
    keeps it; a process that builds a GCN removes it once loaded, and the model still works."""
    code = ("import torch\n"
            "from streamprune.extrapolate.gcn import GCN\n"
            "m = GCN(4, (8, 1))\n"
            "GCN(4, (3, 1))  # a second model of the same class: the file is gone already\n"
            "adj = torch.eye(5).to_sparse_csr()\n"
            "print(tuple(m(torch.ones(5, 4), [adj, adj]).shape))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(5, 1)"
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".py"]


# ------------------------------------------------------------------------------- the stage
@pytest.mark.parametrize("prior", ["knn", "none"])
def test_layerwise_equals_full_graph_both_paths(base, tmp_path, prior):
    results = {}
    for name, limit in (("mem", 1 << 30), ("stream", 0)):
        ws = clone(base, tmp_path, name)
        m = extrapolate_gcn(ws, "du", k=8, chunk_rows=64, memory_limit=limit, prior=prior, **QUICK)
        t = m["timings"]
        assert t["layer1"]["in_memory"] == (limit > 0) and t["layer2"]["in_memory"] == (limit > 0)
        model, ckpt = load_checkpoint(Workspace(ws), "du")
        emb_g = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")
        graph_g = zarr.open_group(os.path.join(ws, "graph", "all.zarr"), mode="r")
        valid = RowSource(emb_g["valid"], 1 << 30)
        p = ckpt["prior"]
        assert (p is None) == (prior == "none") and model.residual == (prior == "knn")
        feats = Features(RowSource(emb_g["emb"], 1 << 30), RowSource(emb_g["labels"], 1 << 30, np.int64), valid,
                         ckpt["num_classes"],
                         p and RowSource(zarr.open_array(os.path.join(ws, "gcn", "du", "prior.zarr"), mode="r")),
                         p and (p["mean"], p["std"]) or (0.0, 1.0))
        full = predict_in_memory(model, feats, GraphTable(graph_g, 8, valid, "exp", 1 << 30)) * ckpt["std"] + ckpt["mean"]
        score, source = read_out(ws)
        v = base["valid"]
        seed = np.zeros(len(v), bool)
        seed[base["rows"]] = True
        pred = v & ~seed
        assert np.allclose(score[pred], full[pred], atol=1e-4, rtol=1e-4)
        # Seeds keep their measured scores, invalid rows are NaN / 255.
        s_ok = v[base["rows"]]
        assert np.array_equal(score[base["rows"][s_ok]], base["scores"][s_ok])
        assert (source[base["rows"][s_ok]] == 0).all() and (source[pred] == 2).all()
        assert np.isnan(score[~v]).all() and (source[~v] == 255).all()
        assert m["counts"]["n_seed"] == s_ok.sum() and m["counts"]["n_invalid"] == (~v).sum()
        # Activations are gone after the commit; the model stays.
        assert not os.path.exists(os.path.join(ws, "gcn", "du", "h1.zarr"))
        assert os.path.exists(os.path.join(ws, "gcn", "du", "model.pt"))
        results[name] = score
    assert np.allclose(results["mem"], results["stream"], atol=1e-5, equal_nan=True)
    assert extrapolate_gcn(str(tmp_path / "mem"), "du", k=8, chunk_rows=64, prior=prior, **QUICK).get("skipped")


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["none", "knn"])
def test_streamed_gcn_over_s3_reads_each_array_once(base, tmp_path, s3server, s3bucket, monkeypatch, prior):
    """Streamed training gathers and layer tasks of an s3:// workspace gather rows from this host's
    copies: each chunk of the embeddings, labels, validity, kNN prior and every layer's activations
    is fetched once for its copy, not once per task or gather (with 8 tasks a layer: 760 GETs of
    chunks without the copies, 56 with them), and the predictions equal a local workspace's."""
    from faultproxy import FaultProxy

    local = clone(base, tmp_path, "local")
    extrapolate_gcn(local, "du", k=8, chunk_rows=64, memory_limit=0, prior=prior, **QUICK)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    with FaultProxy(s3server.endpoint_url) as proxy:
        opts = proxy.storage_options(s3server.storage_options)
        s3server.fs().put(base["ws"] + "/", f"{s3bucket}/ws/", recursive=True)
        remote = Workspace(f"s3://{s3bucket}/ws", opts)
        del proxy.seen[:]
        extrapolate_gcn(remote, "du", k=8, chunk_rows=64, memory_limit=0, prior=prior, **QUICK)
        gets = [path for method, path in proxy.seen if method == "GET" and "/c/" in path]
    arrays = ["embeddings.zarr/emb", "embeddings.zarr/labels", "embeddings.zarr/valid", "gcn/du/h1.zarr",
              "gcn/du/h2.zarr"] + (["gcn/du/prior.zarr"] if prior == "knn" else [])
    for name in arrays:
        fetched = [path for path in gets if f"/ws/{name}/c/" in path]
        # the embeddings and activations are read through the copies alone; labels, validity and prior
        # also once whole, in order, by the stage itself (class count, invalid rows, prior scale)
        most = 1 if name in ("embeddings.zarr/emb", "gcn/du/h1.zarr", "gcn/du/h2.zarr") else 2
        assert fetched and max(fetched.count(p) for p in fetched) <= most, (name, len(fetched), len(set(fetched)))
    g = zarr.open_group(storage.zarr_store(remote.path("extrapolated", "du-gcn.zarr"), opts), mode="r")
    score, _ = read_out(local)
    np.testing.assert_allclose(g["score"][:], score, rtol=1e-5, atol=1e-6)
    held = sorted(len(list(home.iterdir())) for home in (tmp_path / "cache" / "arrays").iterdir())
    # labels, validity (and prior) keep their copies; the activations' (h2's replaced h1's) went with them
    assert held == [0] + [1] * (2 + (prior == "knn"))


def test_training_learns_the_smooth_score(base, tmp_path):
    ws = clone(base, tmp_path)
    assert "gcn" in methods()
    # The plain model (no kNN prior) starts from nothing: training must lift it well above epoch 0.
    m = extrapolate(ws, "du", "gcn", k=8, chunk_rows=128, scheduler="threads", fanout=(8, 4, 4), prior="none",
                    **SMALL)
    hist = m["counts"]["history"]
    assert [h["epoch"] for h in hist] == list(range(SMALL["epochs"] + 1))
    assert m["counts"]["epochs_run"] == SMALL["epochs"]
    assert hist[0]["train_loss"] is None and all(h["train_loss"] > 0 for h in hist[1:])
    best = m["counts"]["best_val_pearson"]
    assert best == max(h["val_pearson"] for h in hist) and best > hist[0]["val_pearson"] + 0.1
    score, source = read_out(ws)
    rest = source == 2
    assert rest.sum() > 300
    assert pearson(score[rest], base["truth"][rest]) > 0.5
    assert m["config"]["fanout"] == [8, 4, 4] and m["counts"]["n_train"] + m["counts"]["n_val"] == (
        base["valid"][base["rows"]].sum())


@pytest.mark.parametrize("prior", [False, True])
def test_resident_training_is_sampled_training_without_the_sampler(base, prior):
    """Resident training (closure on the device, one forward per step) takes the same SGD steps as
    sampled training with full fan-out: with dropout 0 the histories and weights agree."""
    from streamprune.extrapolate.gcn import choose_training, fit_gcn

    ws = Workspace(base["ws"])
    emb_g = zarr.open_group(os.path.join(ws.url, "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 30, bool)
    lut = np.where(np.isfinite(base["scores"]), base["scores"], 0)
    prior_src = RowSource(np.interp(np.arange(len(valid.data)), base["rows"], lut).astype(np.float32)) if prior else None
    feats = Features(RowSource(emb_g["emb"], 1 << 30, np.float32), RowSource(emb_g["labels"], 1 << 30, np.int64),
                     valid, 3, prior_src)
    table = GraphTable(zarr.open_group(os.path.join(ws.url, "graph", "all.zarr"), mode="r"), 8, valid, "exp", 1 << 30)
    ok = np.isfinite(base["scores"]) & base["valid"][base["rows"]]
    args = (feats, table, base["rows"][ok], base["scores"][ok])
    kw = dict(widths=(16, 8, 1), dropout=0.0, epochs=3, batch_size=32, lr=5e-3, seed=3)
    a = fit_gcn(*args, training="sampled", **kw)
    b = fit_gcn(*args, training="resident", **kw)
    assert a.training == "sampled" and b.training == "resident"
    va = [h["val_pearson"] for h in a.history]
    vb = [h["val_pearson"] for h in b.history]
    np.testing.assert_allclose(va, vb, atol=1e-4)
    np.testing.assert_allclose([h["train_loss"] for h in a.history[1:]], [h["train_loss"] for h in b.history[1:]],
                               rtol=1e-4)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), atol=1e-4, err_msg=name)
    assert b.pred is None and set(b.timings) == {"graph_s", "features_s", "aggregate_s"}
    # Over the whole graph (when inference will be a whole-graph forward): the same steps, and every
    # row's prediction from the kept weights, as a whole-graph forward of them gives.
    c = fit_gcn(*args, training="resident", whole_graph=True, **kw)
    np.testing.assert_allclose([h["val_pearson"] for h in c.history], vb, atol=1e-4)
    for (name, pa), pc in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        np.testing.assert_allclose(pa.numpy(), pc.numpy(), atol=1e-4, err_msg=name)
    assert c.pred.shape == (table.n,) and "forward_s" in c.timings
    np.testing.assert_allclose(c.pred, predict_in_memory(c.model, feats, table), rtol=1e-4, atol=1e-5)
    # sampled training ignores whole_graph
    assert fit_gcn(*args, training="sampled", whole_graph=True, **{**kw, "epochs": 1}).pred is None
    # auto: resident only on CUDA with full fan-out; a sampled fan-out cannot be resident.
    cpu = torch.device("cpu")
    never = lambda: pytest.fail("the closure's size is not needed here")  # noqa: E731
    assert choose_training("auto", True, cpu, never) == "sampled"
    assert choose_training("resident", True, cpu, never) == "resident"
    with pytest.raises(StreamPruneError, match="every neighbour"):
        choose_training("resident", False, cpu, never)
    with pytest.raises(StreamPruneError, match="training must be one of"):
        fit_gcn(*args, training="fast", **kw)


def test_knn_prior_is_leave_one_out_and_the_residual_gcn_improves_on_it(base, tmp_path):
    from streamprune.extrapolate.knn import extrapolate_knn

    ws = clone(base, tmp_path)
    m = extrapolate(ws, "du", "gcn", k=8, chunk_rows=128, scheduler="threads", fanout=(8, 4, 4), **SMALL)
    assert m["config"]["prior"] == "knn"
    prior = zarr.open_array(os.path.join(ws, "gcn", "du", "prior.zarr"), mode="r")[:]
    _, ckpt = load_checkpoint(Workspace(ws), "du")
    k = ckpt["prior"]["k"]
    # Every row's prior is the exp(-d)-weighted mean of its k nearest *other* seeds, by hand.
    lut = np.full(len(prior), np.nan)
    lut[base["rows"]] = base["scores"]
    sg = zarr.open_group(os.path.join(ws, "graph", "seeds.zarr"), mode="r")
    nb, d = sg["neighbors"][:, :k], sg["distances"][:, :k].astype(np.float64)
    assert not (nb == np.arange(len(nb))[:, None]).any()
    s_, ok = lut[nb], np.isfinite(lut[nb])
    w = np.where(ok, np.exp(-(d - np.where(ok, d, np.inf).min(1, keepdims=True))), 0.0)
    by_hand = (w * np.where(ok, s_, 0)).sum(1) / w.sum(1)
    np.testing.assert_allclose(prior, by_hand, rtol=1e-5, atol=1e-6)
    # The GCN's non-seed predictions track the truth at least as well as plain kNN extrapolation.
    extrapolate_knn(ws, "du", k=k)
    kn = zarr.open_group(os.path.join(ws, "extrapolated", "du-knn.zarr"), mode="r")["score"][:]
    score, source = read_out(ws)
    rest = source == 2
    assert pearson(score[rest], base["truth"][rest]) >= pearson(kn[rest], base["truth"][rest]) - 0.01
    assert m["counts"]["best_val_pearson"] >= m["counts"]["history"][0]["val_pearson"]


def test_killed_inference_resumes_to_same_scores(base, tmp_path):
    ref_ws = clone(base, tmp_path, "ref")
    extrapolate_gcn(ref_ws, "du", k=8, chunk_rows=64, **QUICK)
    ws = clone(base, tmp_path, "killed")
    code = (f"from streamprune.extrapolate.gcn import extrapolate_gcn; "
            f"extrapolate_gcn({ws!r}, 'du', k=8, chunk_rows=64, **{QUICK!r})")

    def records(prefix: str = "") -> list[str]:
        return sorted(f for _, _, fs in os.walk(os.path.join(ws, "_stages")) for f in fs
                      if f.startswith(prefix) and f.endswith(".json"))

    # Killed once two chunks of layer 2 are recorded: training and layer 1 are done, layer 3 is not.
    kill_python_when(code, lambda: len(records("h2-")) >= 2, env={"STREAMPRUNE_TASK_DELAY": "0.1"}, timeout=120)
    chunks = records()
    assert "train.json" in chunks and not any(c.startswith("rows-") for c in chunks)
    assert not os.path.exists(os.path.join(ws, "_stages", "extrapolate-du-gcn.json"))
    m = extrapolate_gcn(ws, "du", k=8, chunk_rows=64, **QUICK)
    assert "train_s" not in m["timings"]  # the checkpoint of the killed run was reused
    assert m["timings"]["layer2"]["rows_per_s"] > 0
    a, sa = read_out(ws)
    b, sb = read_out(ref_ws)
    assert np.array_equal(sa, sb)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", ["knn", "none"])
def test_whole_graph_inference_equals_chunked_and_resumes(base, tmp_path, prior):
    """The GPU path (one whole-graph forward, then chunked writes) computes what layer-wise chunked
    inference computes; killed while writing its chunks, a re-run writes the rest and matches."""
    ref_ws = clone(base, tmp_path, "ref")
    m_ref = extrapolate_gcn(ref_ws, "du", k=8, chunk_rows=64, prior=prior, inference="chunked", **QUICK)
    assert m_ref["counts"]["inference"] == "chunked" and "layer1" in m_ref["timings"]
    ws = clone(base, tmp_path, "whole")
    kw = dict(k=8, chunk_rows=64, prior=prior, inference="whole", **QUICK)
    code = f"from streamprune.extrapolate.gcn import extrapolate_gcn; extrapolate_gcn({ws!r}, 'du', **{kw!r})"

    def rows_done() -> int:
        return sum(f.startswith("rows-") for _, _, fs in os.walk(os.path.join(ws, "_stages")) for f in fs)

    kill_python_when(code, lambda: rows_done() >= 2, env={"STREAMPRUNE_TASK_DELAY": "0.1"}, timeout=120)
    n_chunks = -(-len(base["valid"]) // 64)
    assert 2 <= rows_done() < n_chunks
    assert not os.path.exists(os.path.join(ws, "_stages", "extrapolate-du-gcn.json"))
    m = extrapolate_gcn(ws, "du", **kw)
    assert m["counts"]["inference"] == "whole" and "layer1" not in m["timings"]
    assert m["timings"]["whole_graph"]["rows_per_s"] > 0
    a, sa = read_out(ws)
    b, sb = read_out(ref_ws)
    assert np.array_equal(sa, sb)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(StreamPruneError, match="inference must be one of"):
        extrapolate_gcn(ws, "du", inference="fast", **QUICK)


def test_whole_graph_training_killed_while_writing_resumes_to_same_scores(base, tmp_path):
    """Resident training over the whole graph hands its forward to the writes; killed while writing,
    the re-run keeps the checkpoint, recomputes that forward from it and matches an unbroken run."""
    kw = dict(k=8, chunk_rows=64, training="resident", inference="whole",
              **{k: v for k, v in QUICK.items() if k != "fanout"})
    ref_ws = clone(base, tmp_path, "ref")
    m_ref = extrapolate_gcn(ref_ws, "du", **kw)
    assert m_ref["timings"]["whole_graph"]["from_training"] and m_ref["counts"]["training"] == "resident"
    ws = clone(base, tmp_path, "killed")
    code = f"from streamprune.extrapolate.gcn import extrapolate_gcn; extrapolate_gcn({ws!r}, 'du', **{kw!r})"

    def rows_done() -> int:
        return sum(f.startswith("rows-") for _, _, fs in os.walk(os.path.join(ws, "_stages")) for f in fs)

    kill_python_when(code, lambda: rows_done() >= 2, env={"STREAMPRUNE_TASK_DELAY": "0.1"}, timeout=120)
    assert 2 <= rows_done() < -(-len(base["valid"]) // 64)
    m = extrapolate_gcn(ws, "du", **kw)
    assert "train_s" not in m["timings"] and not m["timings"]["whole_graph"]["from_training"]
    a, sa = read_out(ws)
    b, sb = read_out(ref_ws)
    assert np.array_equal(sa, sb)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_whole_graph_inference_with_sampled_training_keeps_features_in_memory(base, tmp_path):
    """Whole-graph inference forced on the CPU with training left to auto: training resolves to
    sampled (not whole-graph), so its features stay in memory and inference builds its own forward."""
    from streamprune.extrapolate.gcn import load_checkpoint

    ws = clone(base, tmp_path)
    kw = {k: v for k, v in QUICK.items() if k != "fanout"}
    m = extrapolate_gcn(ws, "du", k=8, chunk_rows=64, inference="whole", **kw)
    assert m["counts"]["training"] == "sampled" and not m["timings"]["whole_graph"]["from_training"]
    assert "resident" not in m["timings"] and load_checkpoint(Workspace(ws), "du")[1]["features_in_memory"]


def test_resident_training_bounds_its_steps_per_epoch(base):
    """Past ``resident_steps`` batches per epoch, resident training takes bigger steps: exactly the
    SGD of sampled training at that batch and the square-root-scaled learning rate."""
    from streamprune.extrapolate.gcn import fit_gcn

    emb_g = zarr.open_group(os.path.join(base["ws"], "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 30, bool)
    feats = Features(RowSource(emb_g["emb"], 1 << 30, np.float32), RowSource(emb_g["labels"], 1 << 30, np.int64),
                     valid, 3)
    table = GraphTable(zarr.open_group(os.path.join(base["ws"], "graph", "all.zarr"), mode="r"), 8, valid, "exp",
                       1 << 30)
    ok = np.isfinite(base["scores"]) & base["valid"][base["rows"]]
    args = (feats, table, base["rows"][ok], base["scores"][ok])
    kw = dict(widths=(16, 8, 1), dropout=0.0, epochs=3, seed=3)
    b = fit_gcn(*args, training="resident", batch_size=16, lr=2e-3, resident_steps=3, **kw)
    assert b.n_train > 3 * 16
    assert b.step_batch == -(-b.n_train // 3) and b.step_lr == pytest.approx(2e-3 * (b.step_batch / 16) ** 0.5)
    a = fit_gcn(*args, training="sampled", batch_size=b.step_batch, lr=b.step_lr, **kw)
    assert a.step_batch == b.step_batch
    np.testing.assert_allclose([h["val_pearson"] for h in a.history], [h["val_pearson"] for h in b.history],
                               atol=1e-4)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), atol=1e-4, err_msg=name)
    # below the bound (and with no bound) resident training keeps the given batch
    c = fit_gcn(*args, training="resident", batch_size=16, lr=2e-3, resident_steps=None, **kw)
    assert (c.step_batch, c.step_lr) == (16, 2e-3)


@pytest.mark.slow
def test_cluster_workers_let_go_of_their_activation_copies(base, tmp_path, s3server, s3bucket, monkeypatch):
    """On a dask cluster that outlives the stage, each worker process holds its host's copy of the
    activations it gathered from: the stage tells every worker to let go, so the copies go with the
    activations instead of staying on the workers' disks until a later run."""
    from dask.distributed import LocalCluster

    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))  # before the workers start: they inherit it
    s3server.fs().put(base["ws"] + "/", f"{s3bucket}/ws/", recursive=True)
    remote = Workspace(f"s3://{s3bucket}/ws", s3server.storage_options)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        extrapolate_gcn(remote, "du", k=8, chunk_rows=128, memory_limit=0, scheduler=cluster.scheduler_address,
                        prior="none", **QUICK)
        copies = {home.name: sorted(p.name for p in home.iterdir() if p.is_dir())
                  for home in (tmp_path / "cache" / "arrays").iterdir()}
    from streamprune.index import _rows_home

    act = os.path.basename(_rows_home(remote, "gcn/du/activations"))
    assert act in copies and copies[act] == [], copies  # the workers made copies there, and let go of them
    assert sum(len(v) > 0 for v in copies.values()) == 2  # labels and validity keep theirs


@pytest.mark.slow
def test_distributed_scheduler_streams(base, tmp_path, dask_cluster):
    ws = clone(base, tmp_path)
    m = extrapolate_gcn(ws, "du", k=8, chunk_rows=128, scheduler=dask_cluster, **QUICK)
    assert m["timings"]["layer1"]["in_memory"] is False
    ref = clone(base, tmp_path, "ref")
    extrapolate_gcn(ref, "du", k=8, chunk_rows=128, **QUICK)
    np.testing.assert_allclose(read_out(ws)[0], read_out(ref)[0], rtol=1e-5, atol=1e-6)


def test_layer_tasks_on_worker_processes_leave_no_generated_file(base, tmp_path):
    """Streamed inference on a cluster builds a GCNConv in each worker process; none leaves
    torch_geometric's rendered propagate() behind in the temp directory."""
    ws, tmp = clone(base, tmp_path), tmp_path / "tmp"
    tmp.mkdir()
    code = ("from dask.distributed import LocalCluster\n"
            "from streamprune.extrapolate.gcn import extrapolate_gcn\n"
            "with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=':0') as c:\n"
            f"    m = extrapolate_gcn({ws!r}, 'du', k=8, chunk_rows=128, scheduler=c.scheduler_address, **{QUICK!r})\n"
            "print(m['timings']['layer1']['in_memory'])\n")
    env = {**os.environ, "TMPDIR": str(tmp), "STREAMPRUNE_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"  # the layers ran as tasks on the workers
    assert not [p.name for p in tmp.rglob("*.py")]


# ------------------------------------------------------------------------------- bad input
def test_missing_graph_and_bad_parameters(base, tmp_path):
    ws = clone(base, tmp_path)
    with pytest.raises(StreamPruneError, match="k=20 but graph/all.zarr holds 12"):
        extrapolate_gcn(ws, "du", k=20, **SMALL)
    with pytest.raises(StreamPruneError, match="edge weight"):
        extrapolate_gcn(ws, "du", weight="cosine", **SMALL)
    with pytest.raises(StreamPruneError, match="score 'tdds' has not been computed"):
        extrapolate_gcn(ws, "tdds", **SMALL)
    shutil.rmtree(os.path.join(ws, "graph", "all.zarr"))
    with pytest.raises(StreamPruneError, match=r"graph .*graph/all.zarr is missing"):
        extrapolate_gcn(ws, "du", **SMALL)
    os.remove(os.path.join(ws, "_stages", "index-all.json"))
    with pytest.raises(StreamPruneError, match="stage 'index-all' has not run"):
        extrapolate_gcn(ws, "du", **SMALL)


@pytest.mark.parametrize("kwargs,says", [
    ({"hidden": ()}, r"hidden widths must be positive integers, got \[\]"),
    ({"hidden": (64, 0)}, r"hidden widths must be positive integers, got \[64, 0\]"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1\.0"),
    ({"batch_size": 0}, "batch size must be >= 1, not 0"),
    ({"lr": 0.0}, r"learning rate must be > 0, got 0\.0"),
    ({"lr": float("nan")}, "learning rate must be > 0, got nan"),
    ({"training": "fast"}, "--training must be one of .*, got 'fast'"),
    ({"seed": -1}, r"^--gcn-seed must be a whole number from 0 to 2\^63-1, not -1$"),
])
def test_bad_parameters_are_refused_before_any_work(tmp_path, kwargs, says):
    """Each out-of-range GCN parameter is named with its value before the workspace is read or written."""
    ws = str(tmp_path / "ws")
    with pytest.raises(StreamPruneError, match=says):
        extrapolate_gcn(ws, "du", **kwargs)
    assert not os.path.exists(ws)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_leaves_the_finished_result(base, tmp_path):
    """A re-run with other options and --force on --device cuda, on a machine without CUDA, is refused
    before --force removes anything; the finished result stays, and is still skipped as it was."""
    ws = clone(base, tmp_path)
    done = extrapolate_gcn(ws, "du", k=8, **QUICK)
    before = read_out(ws)
    with pytest.raises(StreamPruneError, match="--device cuda requested but CUDA is not available"):
        extrapolate_gcn(ws, "du", k=8, device="cuda", force=True, **{**QUICK, "epochs": 2})
    assert Workspace(ws).marker("extrapolate-du-gcn")["fingerprint"] == done["fingerprint"]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(read_out(ws), before))
    assert extrapolate_gcn(ws, "du", k=8, device="cuda", **QUICK).get("skipped")


def test_too_few_seed_scores(tmp_path):
    d = make_ws(tmp_path / "ws", n=60, fraction=0.1, k=5, invalid=(3,))
    values = np.full(len(d["rows"]), np.nan, np.float32)
    zarr.create_array(str(tmp_path / "ws" / "scores" / "du.zarr"), data=values, overwrite=True)
    with pytest.raises(StreamPruneError, match=r"scores/du.zarr has no value: all \d+ seed rows are NaN"):
        extrapolate_gcn(d["ws"], "du", k=5, **SMALL)
    values[:3] = 1.0  # three scored seeds: too few to train on
    zarr.create_array(str(tmp_path / "ws" / "scores" / "du.zarr"), data=values, overwrite=True)
    with pytest.raises(StreamPruneError, match=r"only \d seed rows have a valid embedding and a finite score"):
        extrapolate_gcn(d["ws"], "du", k=5, **SMALL)


def test_gcn_module_forward_shapes():
    import torch

    model = GCN(5, (4, 3, 1), dropout=0.0)
    nbrs, valid, table = _random_table(30, 4, 0)
    sub = sample_subgraph(np.array([0, 1, 2]), table, (None, None, None))
    x = torch.randn(len(sub.nodes), 5)
    out = model(x, [sub.adjacency(i + 1) for i in range(3)])
    assert out.shape == (3, 1)


@pytest.mark.parametrize("widths,residual", [((4, 3, 1), False), ((4, 3, 1), True), ((4, 1), True), ((1,), False)])
def test_forward_aggregated_equals_forward(widths, residual):
    """Resident training's step (first aggregation computed once) is the model's forward, gradients too."""
    torch.manual_seed(0)
    model = GCN(5, widths, dropout=0.0, residual=residual)
    _, _, table = _random_table(40, 4, 1)
    sub = sample_subgraph(np.array([0, 3, 7, 9]), table, (None,) * len(widths))
    x = torch.randn(len(sub.nodes), 5)
    adjs = [sub.adjacency(i + 1) for i in range(len(widths))]
    ax = torch.sparse.mm(adjs[0], x[:adjs[0].shape[1]])
    base = x[:adjs[-1].shape[0], -1:] if residual else None
    want = model(x, adjs)
    want.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = model.forward_aggregated(ax, adjs, base)
    got.sum().backward()
    assert got.shape == want.shape == (4, 1)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), g.numpy(), rtol=1e-4, atol=1e-6)


def test_dense_feature_reads_equal_the_gather(tmp_path):
    """The GPU paths read runs of rows as zarr slices (take_dense / device_features): the same
    features as the gather, for the whole range, dense and sparse increasing rows, unsorted and
    repeated rows, and across chunk and block edges, with a prior column and invalid rows."""
    from streamprune.extrapolate.gcn import device_features, take_dense

    rng = np.random.default_rng(0)
    n, d, chunk = 1000, 6, 64
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    g.create_array("emb", data=rng.standard_normal((n, d)).astype(np.float32), chunks=(chunk, d))
    g.create_array("labels", data=rng.integers(-1, 4, n), chunks=(chunk,))
    g.create_array("valid", data=rng.random(n) > 0.1, chunks=(chunk,))
    g.create_array("prior", data=np.where(rng.random(n) > 0.2, rng.random(n), np.nan).astype(np.float32),
                   chunks=(chunk,))
    feats = Features(RowSource(g["emb"]), RowSource(g["labels"], 0, np.int64), RowSource(g["valid"], 1 << 20, bool), 4,
                     RowSource(g["prior"]), (0.5, 0.25))
    cases = {"all": np.arange(n), "middle": np.arange(130, 777), "dense": np.sort(rng.choice(n, 700, replace=False)),
             "sparse": np.sort(rng.choice(n, 60, replace=False)), "unsorted": rng.permutation(n)[:300],
             "repeats": np.sort(rng.integers(0, n, 400)), "one": np.array([5]),
             "closure": np.concatenate([np.arange(0, n, 5), np.setdiff1d(np.arange(n), np.arange(0, n, 5))[:600]])}
    for name, rows in cases.items():
        want = feats.take(rows)
        np.testing.assert_array_equal(take_dense(feats, rows), want, err_msg=name)
        np.testing.assert_array_equal(device_features(feats, rows, "cpu", block=128).numpy(), want, err_msg=name)


def test_training_stops_after_patience_epochs_without_a_gain(base, tmp_path):
    """With a learning rate too small to move the validation Pearson, training stops after
    ``patience`` epochs (history: epoch 0 and those epochs); patience 0 trains every epoch; a bad
    patience is one clear error."""
    from streamprune.extrapolate.gcn import fit_gcn

    ws = Workspace(base["ws"])
    emb_g = zarr.open_group(os.path.join(ws.url, "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 30, bool)
    feats = Features(RowSource(emb_g["emb"], 1 << 30, np.float32), RowSource(emb_g["labels"], 1 << 30, np.int64),
                     valid, 3)
    table = GraphTable(zarr.open_group(os.path.join(ws.url, "graph", "all.zarr"), mode="r"), 8, valid, "exp", 1 << 30)
    ok = np.isfinite(base["scores"]) & base["valid"][base["rows"]]
    args = (feats, table, base["rows"][ok], base["scores"][ok])
    kw = dict(widths=(16, 8, 1), dropout=0.0, epochs=7, batch_size=32, lr=1e-12, seed=3, fanout=(4, 4, 4))
    stalled = fit_gcn(*args, patience=2, **kw)
    assert [h["epoch"] for h in stalled.history] == [0, 1, 2]
    full = fit_gcn(*args, patience=0, **kw)
    assert [h["epoch"] for h in full.history] == list(range(8))
    learning = fit_gcn(*args, patience=2, **{**kw, "lr": 5e-3, "epochs": 4})
    assert learning.history[-1]["epoch"] > 2 and learning.best_val_pearson > learning.history[0]["val_pearson"] + 0.01
    assert learning.history[-1]["epoch"] == len(learning.history) - 1
    for bad in (-1, 1.5, True):
        with pytest.raises(StreamPruneError, match="--patience must be a whole number of epochs >= 0"):
            fit_gcn(*args, patience=bad, **kw)
    with pytest.raises(StreamPruneError, match="--patience must be a whole number of epochs >= 0"):
        extrapolate_gcn(str(tmp_path / "none"), "du", patience=-1)
