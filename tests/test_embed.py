"""Embedding pass: identical across schedulers and after SIGKILL + resume; bad input; encoders."""

import json
import os

import numpy as np
import pytest
import zarr

from streamprune.decode import DecodeConfig
from streamprune.embed import embed, open_embeddings
from streamprune.errors import StreamPruneError
from streamprune.shards import catalog
from streamprune.subset import subset
from streamprune.train import TrainConfig, train
from streamprune.workspace import Workspace
from helpers import count_files, kill_when, run_cli
from shardgen import make_samples, write_shards
from streamprune.tario import write_tar


def _trained(tmp_path, name="ws", shards=None):
    shards = shards or write_shards(str(tmp_path / "data"), 6, 40)
    ws = str(tmp_path / name)
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    train(ws, TrainConfig(model="cnn", epochs=2, batch_size=32), DecodeConfig(), scheduler="sync")
    return ws, shards


def _emb(ws):
    g = zarr.open_group(os.path.join(ws, "embeddings.zarr"), mode="r")
    return g["emb"][:], g["labels"][:], g["valid"][:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed-ref")
    ws, shards = _trained(tmp)
    m = embed(ws, chunk_rows=32, scheduler="sync")
    return ws, shards, m, _emb(ws)


def test_embeddings_shape_labels_and_chunks(reference):
    ws, _, m, (emb, labels, valid) = reference
    assert emb.shape == (240, 128) and emb.dtype == np.float32 and valid.all()
    assert np.array_equal(labels, np.arange(240) % 4)
    assert m["counts"] == {"n": 240, "n_valid": 240, "dim": 128, "errors": 0}
    assert zarr.open_group(os.path.join(ws, "embeddings.zarr"))["emb"].chunks == (32, 128)
    # The penultimate layer of the trained model, eval mode, inputs scaled to [0, 1].
    from streamprune.train import SubsetData, load_model

    model, _ = load_model(Workspace(ws))
    data = SubsetData(Workspace(ws), "train", 1 << 30)
    rows = zarr.open_array(os.path.join(ws, "subset", "rows.zarr"))[:]
    import torch

    with torch.no_grad():
        direct = model.embed(data.to_float(data.x[:5])).numpy()
    np.testing.assert_allclose(emb[rows[:5]], direct, rtol=1e-5, atol=1e-6)


def test_identical_on_dask_worker_processes(reference, tmp_path, dask_cluster):
    ws, _, _, ref = reference
    ws2 = str(tmp_path / "copy")
    import shutil

    shutil.copytree(ws, ws2, ignore=shutil.ignore_patterns("embeddings.zarr", "embed.json"))
    embed(ws2, chunk_rows=32, scheduler=dask_cluster)
    for a, b in zip(ref, _emb(ws2)):
        assert np.array_equal(a, b)  # bitwise


def test_killed_and_resumed_is_identical(reference, tmp_path):
    ws, _, _, ref = reference
    ws2 = str(tmp_path / "copy")
    import shutil

    shutil.copytree(ws, ws2, ignore=shutil.ignore_patterns("embeddings.zarr", "embed.json"))
    chunks = os.path.join(ws2, "_stages", "embed")
    kill_when(["embed", "-w", ws2, "--chunk-rows", "32", "--scheduler", "sync"],
              lambda: count_files(chunks, ".json") >= 4, env={"STREAMPRUNE_TASK_DELAY": "0.3"})
    assert not os.path.exists(os.path.join(ws2, "_stages", "embed.json"))
    out = run_cli("embed", "-w", ws2, "--chunk-rows", "32", "--scheduler", "sync")
    assert "240 of 240 rows" in out.stdout
    for a, b in zip(ref, _emb(ws2)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("scheduler", ["local", "threads"])
def test_encode_in_client_equals_workers_and_resumes(reference, tmp_path, scheduler):
    """The GPU layout (tasks decode, this process encodes and writes each chunk as it arrives) gives
    the workers' embeddings; killed after some chunks, it resumes to the same result."""
    import shutil

    from helpers import kill_python_when

    ws, _, _, ref = reference
    ws2 = str(tmp_path / "client")
    shutil.copytree(ws, ws2, ignore=shutil.ignore_patterns("embeddings.zarr", "embed.json"))
    chunks = os.path.join(ws2, "_stages", "embed")
    code = (f"from streamprune.embed import embed; "
            f"embed({ws2!r}, chunk_rows=32, scheduler={scheduler!r}, encode='client')")
    kill_python_when(code, lambda: count_files(chunks, ".json") >= 4, env={"STREAMPRUNE_TASK_DELAY": "0.3"},
                     timeout=120)
    assert not os.path.exists(os.path.join(ws2, "_stages", "embed.json"))
    m = embed(ws2, chunk_rows=32, scheduler=scheduler, encode="client")
    assert m["counts"] == {"n": 240, "n_valid": 240, "dim": 128, "errors": 0}
    assert m["timings"]["path"] == "client" and m["timings"]["client_s"] > 0  # the resumed chunks, here
    assert m["timings"]["encode_queue_s"] > 0 and m["timings"]["encode_wait_s"] >= 0  # host vs device split
    emb, labels, valid = _emb(ws2)
    np.testing.assert_allclose(emb, ref[0], rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, ref[1]) and np.array_equal(valid, ref[2])
    with pytest.raises(StreamPruneError, match="encode must be one of"):
        embed(ws2, encode="gpu")


def test_features_encoder_float16_and_normalize(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 3, 30, kind="npy", dim=12)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    embed(ws, encoder="features", dtype="float16", normalize=True, scheduler="threads",
          decode=DecodeConfig(input="vector"))
    g = open_embeddings(Workspace(ws))
    emb = g["emb"][:]
    assert emb.dtype == np.float16 and emb.shape == (90, 12)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_features_encoder_needs_vectors_and_some_sample_must_decode(tmp_path):
    """--encoder features over images is refused (it needs .npy vectors); a catalog whose samples all fail to
    decode (skipped) is refused rather than embedded as all-invalid rows; neither writes embeddings."""
    ws = str(tmp_path / "ws")
    catalog(write_shards(str(tmp_path / "data"), 1, 6), ws, scheduler="sync")
    with pytest.raises(StreamPruneError, match=r"embed --encoder features needs samples with an \.npy vector "
                                               r"\(use --input vector\)"):
        embed(ws, encoder="features", scheduler="sync")
    assert not os.path.exists(os.path.join(ws, "embeddings.zarr"))

    bad = make_samples(6, kind="npy")
    for _, members in bad:
        members["npy"] = b"not an array"
    os.makedirs(tmp_path / "bad")
    write_tar(str(tmp_path / "bad" / "s.tar"), bad)
    ws2 = str(tmp_path / "ws2")
    catalog([str(tmp_path / "bad" / "s.tar")], ws2, scheduler="sync")
    with pytest.raises(StreamPruneError, match="embed: no decodable sample in the catalog"):
        embed(ws2, encoder="features", decode=DecodeConfig(input="vector"), on_error="skip", scheduler="sync")
    assert not os.path.exists(os.path.join(ws2, "embeddings.zarr"))


def test_user_factory_encoder(tmp_path, monkeypatch):
    (tmp_path / "myenc.py").write_text(
        "import torch\n"
        "def make(input_shape, num_classes):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(7, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    shards = write_shards(str(tmp_path / "data"), 2, 20)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    m = embed(ws, encoder="myenc:make", scheduler="sync", decode=DecodeConfig())
    assert m["counts"]["dim"] == 7 and open_embeddings(Workspace(ws))["emb"].shape == (40, 7)


@pytest.mark.parametrize("encode", ["workers", "client"])
def test_undecodable_rows_flagged_invalid(tmp_path, encode):
    d = tmp_path / "data"
    shards = write_shards(str(d), 3, 20)
    bad = make_samples(10, start=500)
    bad[4][1]["png"] = b"garbage"
    write_tar(str(d / "shard-000003.tar"), bad)
    ws = str(tmp_path / "ws")
    catalog(shards + [str(d / "shard-000003.tar")], ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    train(ws, TrainConfig(model="cnn", epochs=1, batch_size=32), DecodeConfig(), scheduler="sync", on_error="skip")
    with pytest.raises(StreamPruneError, match=r"shard-000003\.tar, key s0000504: undecodable image"):
        embed(ws, scheduler="sync", encode=encode)
    embed(ws, scheduler="sync", on_error="skip", encode=encode)
    emb, labels, valid = _emb(ws)
    assert valid.sum() == 69 and not valid[64] and labels[64] == -1 and (emb[64] == 0).all()
    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    assert any(e["stage"] == "embed" and e["key"] == "s0000504" for e in errors)
    st = json.loads(run_cli("status", "-w", ws, "--json").stdout)
    assert st["errors"]["by_stage"]["embed"] == 1


def test_resumed_run_records_each_chunk_under_its_own_id(tmp_path, monkeypatch):
    """A run stopped after its first chunk resumes with the others, recording each under its own id:
    the rejected rows of the chunks done before the stop and after it all reach errors.jsonl."""
    import streamprune.embed as embed_mod

    samples = make_samples(96, kind="npy", dim=8)
    for i in (3, 40, 70):  # one undecodable row in each of the three chunks of 32 rows
        samples[i][1]["npy"] = b"garbage"
    os.makedirs(tmp_path / "data")
    write_tar(str(tmp_path / "data" / "s.tar"), samples)
    ws = str(tmp_path / "ws")
    catalog([str(tmp_path / "data" / "s.tar")], ws, scheduler="sync")
    real = embed_mod._embed_task

    def stop_at_the_second_chunk(*args):
        if args[2] == 32:
            raise RuntimeError("stopped")
        return real(*args)

    options = dict(encoder="features", decode=DecodeConfig(input="vector"), chunk_rows=32, scheduler="sync",
                   on_error="skip")
    monkeypatch.setattr(embed_mod, "_embed_task", stop_at_the_second_chunk)
    with pytest.raises(RuntimeError, match="stopped"):
        embed(ws, **options)
    monkeypatch.setattr(embed_mod, "_embed_task", real)
    m = embed(ws, **options)
    assert m["counts"]["n_valid"] == 93 and m["counts"]["errors"] == 3
    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    assert sorted(e["key"] for e in errors if e["stage"] == "embed") == ["s0000003", "s0000040", "s0000070"]
    assert np.flatnonzero(~_emb(ws)[2]).tolist() == [3, 40, 70]


def test_embed_needs_training(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 1, 5)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    out = run_cli("embed", "-w", ws, check=False)
    assert out.returncode == 1 and "run `streamprune score` first" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("args, says", [
    (["embed", "--chunk-rows", "0"], "--chunk-rows must be a whole number >= 1, not 0"),
    (["embed", "--chunk-rows", "-5"], "--chunk-rows must be a whole number >= 1, not -5"),
    (["embed", "--batch-size", "0"], "--batch-size must be a whole number >= 1, not 0"),
    (["embed", "--encoder", "bogus"], "unknown encoder 'bogus'"),
    (["score", "--model", "foo.bar:baz", "--epochs", "2"], "cannot import model factory 'foo.bar:baz'"),
    (["score", "--image-size", "0", "--epochs", "2"], "--image-size must be a whole number of pixels >= 1, not 0"),
    (["index", "--graph", "seeds", "--factory", "Bogus"], "index: faiss cannot build 'Bogus'"),
])
def test_bad_option_with_force_keeps_the_earlier_results(reference, tmp_path, args, says):
    """An option the stage refuses is refused in one line before --force removes anything: every
    marker of the workspace stays as it was (here: train, embed and the seeds index)."""
    import shutil

    from streamprune.index import build_index

    ws = str(tmp_path / "ws")
    shutil.copytree(reference[0], ws)
    if args[0] == "index":
        build_index(ws, graph="seeds", k=5, scheduler="sync")
    before = {name: open(os.path.join(ws, "_stages", name)).read() for name in os.listdir(os.path.join(ws, "_stages"))}
    proc = run_cli(*args, "-w", ws, "--force", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert says in proc.stderr, proc.stderr
    assert {name: open(os.path.join(ws, "_stages", name)).read() for name in os.listdir(os.path.join(ws, "_stages"))} == before


def test_subset_encoder_refuses_samples_decoded_to_another_shape(reference, tmp_path):
    """The subset model over samples decoded at another size than it was trained on is refused before
    anything is written, naming both shapes (--force or not: the earlier embeddings stay)."""
    import re
    import shutil

    from streamprune.train import load_model

    ws = str(tmp_path / "ws")
    shutil.copytree(reference[0], ws)
    trained = tuple(load_model(Workspace(ws))[1]["input_shape"])
    assert trained[1:] == (8, 8)  # the shards' 8x8 images
    before = Workspace(ws).marker("embed")
    for force in (False, True):
        with pytest.raises(StreamPruneError, match=re.escape(f"embed: samples decode to shape {trained[:1] + (4, 4)} "
                                                             f"but the subset model was trained on {trained}")):
            embed(ws, decode=DecodeConfig(image_size=4), chunk_rows=32, scheduler="sync", force=force)
    assert Workspace(ws).marker("embed") == before
    np.testing.assert_array_equal(_emb(ws)[0], reference[3][0])


def test_float16_overflow_is_an_invalid_row(tmp_path):
    """A vector finite in float32 but beyond float16's range would be stored as inf: the row is
    rejected like any NaN/inf embedding, not kept as valid."""
    from shardgen import npy_bytes

    samples = make_samples(8, kind="npy", dim=4)
    samples[5][1]["npy"] = npy_bytes(np.array([1e5, 0, 0, 0], np.float32))
    os.makedirs(tmp_path / "data")
    write_tar(str(tmp_path / "data" / "s.tar"), samples)
    ws = str(tmp_path / "ws")
    catalog([str(tmp_path / "data" / "s.tar")], ws, scheduler="sync")
    options = dict(encoder="features", dtype="float16", decode=DecodeConfig(input="vector"), scheduler="sync")
    with pytest.raises(StreamPruneError, match=r"key s0000005: embedding contains NaN/inf"):
        embed(ws, **options)
    m = embed(ws, on_error="skip", force=True, **options)
    emb, labels, valid = _emb(ws)
    assert m["counts"]["n_valid"] == 7 and np.flatnonzero(~valid).tolist() == [5]
    assert np.isfinite(emb.astype(np.float32)).all() and labels[5] == -1


def test_pseudo_labels_need_no_label_member(tmp_path):
    """Trained on pseudo-labels, the model never read a label: embedding reads none either, so
    samples without a .cls stay valid (they were trained on) and get their cluster as label."""
    samples = make_samples(60, kind="npy", dim=8)
    for _, members in samples[::3]:
        del members["cls"]
    os.makedirs(tmp_path / "data")
    write_tar(str(tmp_path / "data" / "s.tar"), samples)
    ws = str(tmp_path / "ws")
    catalog([str(tmp_path / "data" / "s.tar")], ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    train(ws, TrainConfig(model="mlp", epochs=1, labels="pseudo:3"), DecodeConfig(input="vector"), scheduler="sync")
    m = embed(ws, scheduler="sync")
    emb, labels, valid = _emb(ws)
    assert m["counts"]["n_valid"] == 60 and valid.all() and set(labels.tolist()) <= {0, 1, 2}


def test_untrained_builtin_encoder_is_the_same_network_everywhere(tmp_path):
    """``--encoder mlp`` builds an untrained network in every worker process: its weights must not
    depend on the process's random state, or chunks (and a resumed run) would use other networks."""
    shards = write_shards(str(tmp_path / "data"), 2, 16, kind="npy", dim=8)
    out = []
    for name in ("a", "b"):
        ws = str(tmp_path / name)
        catalog(shards, ws, scheduler="sync")
        embed(ws, encoder="mlp", decode=DecodeConfig(input="vector"), chunk_rows=16, scheduler="sync")
        out.append(_emb(ws)[0])
    assert np.array_equal(out[0], out[1])
