"""GPU paths: the torch exact-search engine of the index stage (run on the CPU here) and, where a
CUDA device exists, the GPU-resident training cache and the CUDA encoder."""

from __future__ import annotations

import glob
import os

import faiss
import numpy as np
import pytest
import torch
import zarr

from helpers import kill_python_when
from streamprune import storage
from streamprune.index import (
    TORCH_GPU_FRACTION,
    TORCH_MAX_MACS,
    TorchExactIndex,
    build_index,
    choose_engine,
    read_graph,
    torch_search_device,
)
from streamprune.workspace import Workspace

CUDA = torch.cuda.is_available()


def _workspace(root, x: np.ndarray, valid: np.ndarray, subset: np.ndarray, chunk: int = 100) -> Workspace:
    ws = Workspace(str(root))
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="w")
    group.create_array("emb", data=x, chunks=(chunk, x.shape[1]))
    group.create_array("labels", data=np.zeros(len(x), np.int64), chunks=(chunk,))
    group.create_array("valid", data=valid, chunks=(chunk,))
    ws.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": len(x)})
    arr = zarr.create_array(storage.zarr_store(ws.path("subset", "rows.zarr")), shape=(len(subset),), dtype="int64",
                            chunks=(len(subset),))
    arr[:] = np.sort(subset)
    ws.begin("subset", {"test": 1}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(subset)})
    return ws


def _data(n: int = 1500, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 3 + rng.integers(0, 5, (n, 1))).astype(np.float32)
    valid = rng.random(n) > 0.05
    subset = np.sort(rng.choice(n, n // 5, replace=False))
    return x, valid, subset


def _graph(ws: Workspace, name: str) -> tuple[np.ndarray, np.ndarray]:
    nbr, dist = read_graph(ws, name)
    return nbr[:], dist[:]


def _records(ws: Workspace, key: str, prefix: str) -> int:
    return len(glob.glob(os.path.join(ws.url, "_stages", key, "*", "chunks", f"{prefix}*.json")))


# --------------------------------------------------------------------------- engine choice (pure)


def test_choose_engine():
    gib = 1 << 30
    assert choose_engine("auto", 10**6, 10**6, 512, 80 * gib) == "torch"
    assert choose_engine("auto", 10**6, 10**6, 512, None) == "faiss"  # no GPU
    assert choose_engine("IVF1024,PQ64", 10**6, 10**6, 512, 80 * gib) == "faiss"  # an explicit factory wins
    assert choose_engine("Flat", 1000, 1000, 8, 80 * gib) == "faiss"
    # the vectors (float32, and the float16 copy of the candidate search) must fit a fraction of the free memory
    n_fit = int(TORCH_GPU_FRACTION * 8 * gib / (6 * 512))
    assert choose_engine("auto", n_fit, n_fit, 512, 8 * gib) == "torch"
    assert choose_engine("auto", n_fit + 10, n_fit + 10, 512, 8 * gib) == "faiss"
    # and the work must stay bounded: queries x rows x width
    n = int((TORCH_MAX_MACS / 128) ** 0.5)
    assert choose_engine("auto", n, n, 128, 1 << 62) == "torch"
    assert choose_engine("auto", 2 * n, 2 * n, 128, 1 << 62) == "faiss"


def test_torch_search_device_override(monkeypatch):
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    assert torch_search_device() is None
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "cpu")
    assert torch_search_device() == "cpu"
    monkeypatch.delenv("STREAMPRUNE_INDEX_DEVICE")
    assert torch_search_device() == ("cuda" if CUDA else None)


# --------------------------------------------------------------------------- the torch index


@pytest.mark.parametrize("candidates", ["tf32", "fp16"])
@pytest.mark.parametrize("block_bytes,span", [(1 << 12, 1 << 16), (1 << 30, 1 << 16), (1 << 12, 7)])
def test_torch_exact_index_matches_faiss(block_bytes, span, candidates, monkeypatch):
    """Blocks of queries (block_bytes) inside spans copied to the device at a time (span rows), with
    float32 or centred-and-scaled float16 candidates (re-ranked in float32 either way)."""
    import streamprune.index as index_mod

    monkeypatch.setattr(index_mod, "TORCH_QUERY_SPAN", span)
    x, _, _ = _data(1200, 12)
    emb = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(128, 12), dtype="float32")
    emb[:] = x
    mask = np.zeros(len(x), bool)
    mask[::3] = True
    x[mask] += 100.0  # far from the origin: |x|^2 > 65504, fp16 candidates without the centring overflow
    emb[:] = x
    index = TorchExactIndex(emb, mask, "cpu", block_bytes=block_bytes, candidates=candidates)
    assert (index.ntotal, index.d) == (int(mask.sum()), 12)
    assert index.xm.dtype == (torch.float16 if candidates == "fp16" else torch.float32)
    sq, ids = index.search(x[:300], 9)
    ref_sq, ref_local = faiss.knn(x[:300], x[mask], 9)
    np.testing.assert_array_equal(ids, np.flatnonzero(mask)[ref_local])
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-4, atol=1e-4)
    # more neighbours asked than indexed rows: padded with -1 / inf, like faiss
    sq, ids = index.search(x[:4], 500)
    assert (ids[:, :400] >= 0).all() and (ids[:, 400:] == -1).all() and np.isinf(sq[:, 400:]).all()
    sq, ids = index.search(np.zeros((0, 12), np.float32), 5)
    assert ids.shape == (0, 5)
    # the recall check's queries from the device copy: indexed rows only, in the order asked
    rows = np.flatnonzero(mask)[[7, 0, 399, 7, 150]]
    np.testing.assert_array_equal(index.vectors(rows), x[rows])
    assert index.vectors(np.array([0, 1])) is None and index.vectors(np.array([len(x) + 5])) is None


def test_exact_knn_with_torch_equals_faiss():
    """The torch engine's recall check (float64 on the engine's device) finds faiss's exact neighbours."""
    from streamprune.index import exact_knn, iter_blocks

    x, _, _ = _data(1500, 16)
    emb = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(200, 16), dtype="float32")
    emb[:] = x
    mask = np.ones(len(x), bool)
    mask[::5] = False
    rows = np.arange(0, 1500, 7)
    ref_ids, ref_dist = exact_knn(x[rows], rows, iter_blocks(emb, mask), 10)
    ids, dist = exact_knn(x[rows], rows, iter_blocks(emb, mask), 10, device="cpu")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5)
    assert not np.isin(ids, np.flatnonzero(~mask)).any() and not (ids == rows[:, None]).any()


def test_build_index_torch_engine_equals_faiss_exact(tmp_path, monkeypatch):
    x, valid, subset = _data()
    faiss_ws = _workspace(tmp_path / "faiss", x, valid, subset)
    torch_ws = _workspace(tmp_path / "torch", x, valid, subset)
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    build_index(faiss_ws, k=7, scheduler="sync", chunk_rows=300)
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "cpu")
    markers = build_index(torch_ws, k=7, scheduler="sync", chunk_rows=300)
    for name in ("seeds", "all"):
        m = markers[name]
        assert m["counts"]["engine"] == "torch" and m["counts"]["factory"] == "Flat"
        assert m["counts"]["recall_at_k"] == 1.0
        assert m["outputs"]["index"] is None
        assert not os.path.exists(torch_ws.path(f"index/{name}.faissindex"))
        (n1, d1), (n2, d2) = _graph(faiss_ws, name), _graph(torch_ws, name)
        np.testing.assert_array_equal(n1, n2)
        np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
    # done is done: a second call skips, whatever the engine
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    assert build_index(torch_ws, k=7, scheduler="sync", chunk_rows=300)["all"]["skipped"]


def _killed_torch_build(tmp_path, records: int):
    """Two workspaces over the same data; the first one's torch-engine build SIGKILLed once ``records``
    search chunks are recorded.  Returns (killed, clean)."""
    x, valid, subset = _data(3000, 8)
    killed = _workspace(tmp_path / "killed", x, valid, subset)
    clean = _workspace(tmp_path / "clean", x, valid, subset)
    code = ("from streamprune.index import build_index; "
            f"build_index({str(killed.url)!r}, graph='all', k=6, scheduler='sync', chunk_rows=200)")
    env = {"STREAMPRUNE_TASK_DELAY": "0.2", "STREAMPRUNE_INDEX_DEVICE": "cpu"}
    kill_python_when(code, lambda: _records(killed, "index-all", "search-") >= records, env=env, timeout=120)
    return killed, clean


def test_torch_engine_kill_and_resume(tmp_path, monkeypatch):
    killed, clean = _killed_torch_build(tmp_path, 3)
    assert killed.marker("index-all") is None
    done_before = _records(killed, "index-all", "search-")
    assert 3 <= done_before < 15
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "cpu")
    m = build_index(killed, graph="all", k=6, scheduler="sync", chunk_rows=200)["all"]
    build_index(clean, graph="all", k=6, scheduler="sync", chunk_rows=200)
    assert m["counts"]["engine"] == "torch" and m["counts"]["recall_at_k"] == 1.0
    for u, v in zip(_graph(killed, "all"), _graph(clean, "all")):
        np.testing.assert_array_equal(u, v)


def test_engine_change_on_resume_restarts_the_search(tmp_path, monkeypatch):
    """A run begun by the torch engine and resumed without it (no GPU now) redoes every phase with faiss."""
    killed, clean = _killed_torch_build(tmp_path, 2)
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    m = build_index(killed, graph="all", k=6, scheduler="sync", chunk_rows=200)["all"]
    build_index(clean, graph="all", k=6, scheduler="sync", chunk_rows=200)
    assert m["counts"]["engine"] == "faiss"
    assert os.path.exists(killed.path("index/all.faissindex"))
    for u, v in zip(_graph(killed, "all"), _graph(clean, "all")):
        np.testing.assert_array_equal(u, v)


def test_search_records_of_another_engine_are_not_trusted_after_a_second_interruption(tmp_path, monkeypatch):
    """torch run killed, then a faiss run that lays the graph out again (wiping it) fails after one
    chunk: the next faiss run must search again the chunks only the torch run had recorded."""
    import streamprune.index as index_mod
    from streamprune.errors import StreamPruneError

    killed, clean = _killed_torch_build(tmp_path, 3)
    monkeypatch.setenv("STREAMPRUNE_INDEX_DEVICE", "none")
    real, calls = index_mod._search_task, []

    def one_then_fail(*args):
        if calls:
            raise StreamPruneError("killed")
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(index_mod, "_search_task", one_then_fail)
    with pytest.raises(StreamPruneError, match="killed"):
        build_index(killed, graph="all", k=6, scheduler="sync", chunk_rows=200)
    monkeypatch.setattr(index_mod, "_search_task", real)
    m = build_index(killed, graph="all", k=6, scheduler="sync", chunk_rows=200)["all"]
    build_index(clean, graph="all", k=6, scheduler="sync", chunk_rows=200)
    assert m["counts"]["engine"] == "faiss" and m["counts"]["recall_at_k"] == 1.0
    for u, v in zip(_graph(killed, "all"), _graph(clean, "all")):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_training_cache_on_gpu_and_encoder(tmp_path):
    from shardgen import write_shards
    from streamprune.decode import DecodeConfig
    from streamprune.embed import embed
    from streamprune.shards import catalog
    from streamprune.subset import subset
    from streamprune.train import SubsetData, TrainConfig, train

    paths = write_shards(str(tmp_path / "shards"), 2, 40, kind="png", dim=16)
    ws = Workspace(str(tmp_path / "ws"))
    catalog(paths, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    m = train(ws, TrainConfig(model="cnn", epochs=2, batch_size=16, device="cuda"), DecodeConfig(), scheduler="sync")
    assert m["timings"]["gpu_cache"] is True and m["timings"]["device"].startswith("cuda")
    data = SubsetData(ws, "train", 1 << 30, device=torch.device("cuda"))
    assert data.on_gpu and data.x.is_cuda
    assert torch.equal(data.x.cpu(), torch.from_numpy(data.x_arr[:]))
    e = embed(ws, device="cuda", scheduler="sync", chunk_rows=32)
    assert e["counts"]["n_valid"] == 80 and e["timings"]["path"] == "client"
    # the chunks queued on the GPU (outputs awaited by the writer thread) hold what the CPU computes
    import shutil

    cpu_ws = str(tmp_path / "cpu")
    shutil.copytree(ws.url, cpu_ws)
    shutil.rmtree(os.path.join(cpu_ws, "embeddings.zarr"))
    os.remove(os.path.join(cpu_ws, "_stages", "embed.json"))
    embed(cpu_ws, device="cpu", scheduler="sync", chunk_rows=32)
    gpu_e, cpu_e = (zarr.open_group(os.path.join(w, "embeddings.zarr"), mode="r")["emb"][:] for w in (ws.url, cpu_ws))
    cos = (gpu_e * cpu_e).sum(1) / (np.linalg.norm(gpu_e, axis=1) * np.linalg.norm(cpu_e, axis=1) + 1e-12)
    assert cos.min() > 0.99, cos.min()  # bf16 autocast on the GPU



@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fused_adamw_resumes_a_host_checkpoint():
    """A checkpoint's AdamW state (step counters on the host, as a CPU run or the host snapshot
    writes them) loads into the fused optimizer on CUDA, and it steps."""
    from streamprune.train import TrainConfig, _host_copy, load_optimizer_state, make_optimizer

    cfg = TrainConfig(optimizer="adamw", epochs=2, batch_size=4)
    cpu_model = torch.nn.Linear(6, 3)
    cpu_opt, _ = make_optimizer(cpu_model, cfg, 16)
    cpu_model(torch.randn(8, 6)).square().mean().backward()
    cpu_opt.step()
    saved = _host_copy(cpu_opt.state_dict())
    model = torch.nn.Linear(6, 3).cuda()
    opt, _ = make_optimizer(model, cfg, 16)
    assert opt.param_groups[0]["fused"] is True
    load_optimizer_state(opt, saved, True)
    model(torch.randn(8, 6, device="cuda")).square().mean().backward()
    opt.step()
    assert all(s["step"].is_cuda for s in opt.state.values())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_training_step_inputs_do_not_synchronise():
    """A training step's inputs on the GPU (positions, gathered cache rows, augmentation, labels)
    are queued without waiting for the device, so the host can run ahead of the GPU; and the
    augmentation on the device equals the one on the host for the same generator."""
    from streamprune.train import augment_batch

    dev = torch.device("cuda")
    cache = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (4096,), device=dev)
    block = torch.from_numpy(np.random.default_rng(0).permutation(4096)).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in range(0, 4096, 512):
            idx = block[b:b + 512]
            xb = augment_batch(cache[idx], "crop-flip", torch.Generator().manual_seed(b)).float().div_(255.0)
            yb = labels[idx]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert xb.shape == (512, 3, 32, 32) and yb.shape == (512,)
    host = augment_batch(cache[idx].cpu(), "crop-flip", torch.Generator().manual_seed(b))
    assert torch.equal(host, augment_batch(cache[idx], "crop-flip", torch.Generator().manual_seed(b)).cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA,
                                                                                      reason="needs a CUDA device"))])
def test_gcn_resident_training_and_whole_graph_inference(tmp_path, device):
    """The GPU's GCN paths: resident training and whole-graph inference (the model trained on the
    device, checkpointed on the host, run on the device again) predict what a whole-graph forward
    of the same checkpoint on the CPU predicts.  CUDA picks both paths by itself (auto); the CPU
    run forces them, so the check also runs where there is no GPU."""
    from test_gcn import QUICK, make_ws, read_out
    from streamprune.extrapolate.gcn import extrapolate_gcn, load_checkpoint, predict_in_memory
    from streamprune.extrapolate.sampler import Features, GraphTable, RowSource

    base = make_ws(tmp_path / "base")
    kw = {k: v for k, v in QUICK.items() if k != "fanout"}  # full fan-out: resident training is possible
    forced = {} if device == "cuda" else {"training": "resident", "inference": "whole"}
    m = extrapolate_gcn(base["ws"], "du", k=8, chunk_rows=64, device=device, **kw, **forced)
    assert m["counts"]["training"] == "resident" and m["counts"]["inference"] == "whole"
    # the whole graph was built and read once: by training, whose forward of the kept weights is the output
    assert m["timings"]["whole_graph"]["from_training"] and m["timings"]["whole_graph"]["features_s"] == 0
    assert set(m["timings"]["resident"]) == {"graph_s", "features_s", "aggregate_s", "forward_s"}
    score, source = read_out(base["ws"])
    model, ckpt = load_checkpoint(Workspace(base["ws"]), "du")
    assert all(p.device.type == "cpu" for p in model.parameters())
    emb_g = zarr.open_group(os.path.join(base["ws"], "embeddings.zarr"), mode="r")
    valid = RowSource(emb_g["valid"], 1 << 30)
    p = ckpt["prior"]
    feats = Features(RowSource(emb_g["emb"], 1 << 30), RowSource(emb_g["labels"], 1 << 30, np.int64), valid,
                     ckpt["num_classes"],
                     p and RowSource(zarr.open_array(os.path.join(base["ws"], "gcn", "du", "prior.zarr"), mode="r")),
                     p and (p["mean"], p["std"]) or (0.0, 1.0))
    graph_g = zarr.open_group(os.path.join(base["ws"], "graph", "all.zarr"), mode="r")
    cpu = predict_in_memory(model, feats, GraphTable(graph_g, 8, valid, "exp", 1 << 30), "cpu")
    cpu = cpu * ckpt["std"] + ckpt["mean"]
    pred = base["valid"] & (source != 0)
    assert pred.sum() > 300
    np.testing.assert_allclose(score[pred], cpu[pred], rtol=1e-3, atol=1e-3)


def test_tf32_scope_is_safe_across_threads():
    """Searches in several threads keep TF32 on while any runs and restore the caller's setting after
    the last (a per-thread save-and-restore left it on, or cut it off under another search)."""
    import threading

    from streamprune.index import tf32_matmul

    flag = torch.backends.cuda.matmul
    old = flag.allow_tf32
    try:
        flag.allow_tf32 = False
        inside, release, seen = threading.Barrier(3), threading.Event(), []

        def search():
            with tf32_matmul():
                inside.wait()
                release.wait()
                seen.append(flag.allow_tf32)

        threads = [threading.Thread(target=search) for _ in range(2)]
        for t in threads:
            t.start()
        inside.wait()  # both inside
        assert flag.allow_tf32
        release.set()
        for t in threads:
            t.join()
        assert seen == [True, True] and flag.allow_tf32 is False
    finally:
        flag.allow_tf32 = old


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_checkpoint_rng_state_carries_the_cuda_stream():
    """A CUDA run's checkpoint carries the device's generator (dropout there draws from it): after a
    restore, the device draws what it drew after the save; a CPU run's checkpoint has no CUDA stream."""
    from streamprune.train import _host_copy, _rng_state, _set_rng_state

    dev = torch.device("cuda")
    torch.manual_seed(3)
    torch.rand(5, device=dev)
    state = _host_copy(_rng_state(dev))
    expected_cuda, expected_cpu = torch.rand(7, device=dev).cpu(), torch.rand(7)
    torch.rand(11, device=dev), torch.rand(11)
    _set_rng_state(state, dev)
    assert torch.equal(torch.rand(7, device=dev).cpu(), expected_cuda)
    assert torch.equal(torch.rand(7), expected_cpu)
    assert "cuda_rng" not in _rng_state(torch.device("cpu"))

