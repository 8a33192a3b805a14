"""Subset training and seed scores: dynamics, resume after SIGKILL, bad input, paradigms."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import zarr

from streamprune.decode import DecodeConfig
from streamprune.errors import StreamPruneError
from streamprune.scoring import compute_scores, read_score
from streamprune.shards import Catalog, ErrorPolicy, catalog, read_rows
from streamprune.subset import subset, subset_rows
from streamprune.train import TrainConfig, load_labels, train
from streamprune.workspace import Workspace
from helpers import kill_when, run_cli
from shardgen import make_samples, write_shards
from streamprune.tario import write_tar


@pytest.fixture
def vec_ws(tmp_path):
    """A catalogued 8-shard set of 16-d feature vectors (4 classes) with a 50 % subset."""
    shards = write_shards(str(tmp_path / "data"), 8, 60, kind="npy", dim=16)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    return ws


def _dyn(ws, key="train"):
    return zarr.open_group(os.path.join(ws, key, "dynamics.zarr"), mode="r")


def test_train_records_dynamics_and_scores(vec_ws):
    cfg = TrainConfig(model="mlp", epochs=6, batch_size=32, lr=0.05)
    m = train(vec_ws, cfg, DecodeConfig(), scheduler="sync")
    n = len(subset_rows(Workspace(vec_ws)))
    assert m["counts"]["n_valid"] == n and m["counts"]["num_classes"] == 4
    assert m["counts"]["sample_epochs"] == 6 * n
    g = _dyn(vec_ws)
    assert g["logits"].shape == (6, n, 4) and g["true_prob"].shape == (6, n)
    tp = g["true_prob"][:]
    assert np.isfinite(tp).all() and tp[-1].mean() > 0.8  # the model learns the separable classes
    # every score's options are checked before any score is computed
    with pytest.raises(StreamPruneError, match=r"^score tdds: decay must be in \(0, 1\], got 2\.0$"):
        compute_scores(vec_ws, ["du", "tdds"], params={"window": 3, "decay": 2.0})
    assert Workspace(vec_ws).marker("score-du") is None
    markers = compute_scores(vec_ws, ["du", "el2n", "forgetting", "aum"], params={"window": 3})
    du = read_score(Workspace(vec_ws), "du")
    assert du.shape == (n,) and np.isfinite(du).all() and markers[0]["config"]["params"] == {"window": 3}
    for name, harder in (("du", True), ("aum", False)):  # the direction travels with the array
        attrs = dict(zarr.open_array(os.path.join(vec_ws, "scores", f"{name}.zarr"), mode="r").attrs)
        assert attrs == {"score": name, "rows": "subset", "higher_is_harder": harder}
    # A second request re-uses training and the finished scores.
    again = compute_scores(vec_ws, ["du", "tdds"], params={"window": 3})
    assert again[0].get("skipped") and not again[1].get("skipped")
    assert train(vec_ws, cfg, DecodeConfig(), scheduler="sync").get("skipped")


def test_a_score_whose_definition_changed_is_computed_again(vec_ws, monkeypatch):
    """forgetting is at revision 2 (never-learned rows score E, where they scored 0): one computed
    under revision 1 is out of date, named so, and replaced with --force; the other scores stay."""
    import dataclasses

    from streamprune import scores

    train(vec_ws, TrainConfig(model="mlp", epochs=10, batch_size=32), DecodeConfig(), scheduler="sync")
    current = scores.SCORES["forgetting"]
    assert current.revision == 2
    monkeypatch.setitem(scores.SCORES, "forgetting", dataclasses.replace(current, revision=1))
    compute_scores(vec_ws, ["du", "forgetting"])
    monkeypatch.setitem(scores.SCORES, "forgetting", current)
    with pytest.raises(StreamPruneError, match=r"score-forgetting: .* another configuration \(changed: revision "
                                               r"\(unset\) -> 2\); use --force"):
        compute_scores(vec_ws, ["du", "forgetting"])
    assert compute_scores(vec_ws, ["du"])[0].get("skipped")
    again = compute_scores(vec_ws, ["forgetting"], force=True)[0]
    assert again["config"]["revision"] == 2 and not again.get("skipped")
    assert compute_scores(vec_ws, ["du", "forgetting"])[1].get("skipped")
    with pytest.raises(ValueError, match="revision for 'mine' must be a whole number >= 1"):
        scores.register_score("mine", scores.du, ("true_prob",), revision=0)


def test_influence_score_streams_the_cache_and_matches_the_formula(vec_ws):
    import torch

    from streamprune.scores import influence
    from streamprune.train import load_model

    train(vec_ws, TrainConfig(model="mlp", epochs=3, batch_size=32, lr=0.05, chunk_rows=32), DecodeConfig(),
          scheduler="sync")
    compute_scores(vec_ws, ["influence"])
    got = read_score(Workspace(vec_ws), "influence")
    # By hand: penultimate features of every cached row, then the closed form.
    ws = Workspace(vec_ws)
    model, _ = load_model(ws, "train")
    cache = zarr.open_group(os.path.join(vec_ws, "train", "cache.zarr"), mode="r")
    valid = cache["valid"][:]
    with torch.no_grad():
        feats = model.embed(torch.from_numpy(cache["x"][:][valid]).float()).numpy().astype(np.float64)
    want = influence(feats, load_labels(ws)[valid], model.head.weight.detach().double().numpy(),
                     model.head.bias.detach().double().numpy())
    np.testing.assert_allclose(got[valid], want, rtol=1e-4, atol=1e-7)
    assert np.isnan(got[~valid]).all()


def test_cache_memory_option_streams_the_training_rows(vec_ws):
    out = run_cli("score", "-w", vec_ws, "--model", "mlp", "--epochs", "2", "--window", "2", "--input", "vector",
                  "--scheduler", "sync", "--cache-memory", "1KiB")
    assert "train:" in out.stdout
    m = Workspace(vec_ws).marker("train")
    assert m["timings"]["in_memory"] is False
    bad = run_cli("score", "-w", vec_ws, "--model", "mlp", "--cache-memory", "lots", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "--cache-memory must be a size such as 4GiB or 500MB, not 'lots'" in bad.stderr


def test_streaming_cache_and_train_pass_dynamics(vec_ws):
    cfg = TrainConfig(model="mlp", epochs=4, batch_size=32, lr=0.05, memory_budget=1000, chunk_rows=32,
                      dynamics="train")
    m = train(vec_ws, cfg, DecodeConfig(), scheduler="threads")
    assert m["timings"]["in_memory"] is False
    t = m["timings"]  # dynamics from the training pass: no eval passes
    assert t["eval_s"] == 0 and 0 < t["steps_s"] <= t["train_s"] + 0.002 and t["epochs_run"] == 4  # rounded
    tp = _dyn(vec_ws)["true_prob"][:]
    assert np.isfinite(tp).all() and tp[-1].mean() > 0.7


def test_full_training_writes_full_scores(vec_ws):
    cfg = TrainConfig(model="mlp", epochs=3, batch_size=64)
    m = train(vec_ws, cfg, DecodeConfig(), full=True, scheduler="sync")
    t = m["timings"]  # the epochs' time split into training steps and eval passes (dynamics="eval")
    assert t["steps_s"] > 0 and t["eval_s"] > 0 and t["steps_s"] + t["eval_s"] <= t["train_s"] + 0.002  # rounded
    compute_scores(vec_ws, ["el2n"], full=True)
    full = read_score(Workspace(vec_ws), "el2n", full=True)
    assert full.shape == (480,) and np.isfinite(full).all()
    assert zarr.open_array(os.path.join(vec_ws, "scores", "el2n-full.zarr"), mode="r").attrs["rows"] == "all"


def test_full_data_replicas_train_with_other_seeds_on_the_same_cache(vec_ws):
    from streamprune.errors import StreamPruneError
    from streamprune.evaluate import reference_runs, score_sources

    cfg = TrainConfig(model="mlp", epochs=3, batch_size=64, seed=5)
    with pytest.raises(StreamPruneError, match=r"stage 'train-full' has not run .* `streamprune score --full`"):
        train(vec_ws, cfg, DecodeConfig(), full=True, replica=1, scheduler="sync")
    with pytest.raises(StreamPruneError, match="replica training runs are full-data runs"):
        train(vec_ws, cfg, DecodeConfig(), replica=1, scheduler="sync")
    train(vec_ws, cfg, DecodeConfig(), full=True, scheduler="sync")
    m = train(vec_ws, cfg, DecodeConfig(), full=True, replica=1, scheduler="sync")
    assert m["config"]["train"]["seed"] == 6 and m["outputs"]["cache"] == "train-full/cache.zarr"
    assert not os.path.exists(os.path.join(vec_ws, "train-full-r1", "cache.zarr"))  # decoded once, shared
    run0, run1 = _dyn(vec_ws, "train-full")["true_prob"][:], _dyn(vec_ws, "train-full-r1")["true_prob"][:]
    assert run0.shape == run1.shape == (3, 480) and not np.array_equal(run0, run1)
    np.testing.assert_array_equal(load_labels(Workspace(vec_ws), "train-full-r1"),
                                  load_labels(Workspace(vec_ws), "train-full"))
    # the replica is the run a fresh full-data training with seed 6 gives
    other = str(vec_ws) + "-seed6"
    shutil.copytree(os.path.join(vec_ws, "catalog"), os.path.join(other, "catalog"))
    for f in ("streamprune.json", "_stages/catalog.json"):
        os.makedirs(os.path.dirname(os.path.join(other, f)), exist_ok=True)
        shutil.copy(os.path.join(vec_ws, f), os.path.join(other, f))
    train(other, TrainConfig(model="mlp", epochs=3, batch_size=64, seed=6), DecodeConfig(), full=True,
          scheduler="sync")
    np.testing.assert_array_equal(_dyn(other, "train-full")["true_prob"][:], run1)
    for replica in (0, 1):
        compute_scores(vec_ws, ["el2n"], full=True, replica=replica)
    assert os.path.exists(os.path.join(vec_ws, "scores", "el2n-full-r1.zarr"))
    runs = reference_runs(Workspace(vec_ws), "el2n")
    assert len(runs) == 2 and np.isfinite(runs[1]).all() and not np.array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], read_score(Workspace(vec_ws), "el2n", full=True))
    from streamprune.export import score_columns

    assert {"el2n_full", "el2n_full_r1"} <= set(score_columns(Workspace(vec_ws)))  # exported as columns
    assert "full" in score_sources(Workspace(vec_ws), "el2n")
    assert not any(s.startswith("full-r") for s in score_sources(Workspace(vec_ws), "el2n"))


def test_pseudo_labels(vec_ws):
    cfg = TrainConfig(model="mlp", epochs=3, labels="pseudo:4")
    m = train(vec_ws, cfg, DecodeConfig(label_key="cls"), scheduler="sync")
    labels = load_labels(Workspace(vec_ws))
    assert m["counts"]["pseudo_k"] == 4 and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert len(np.unique(labels)) == 4


def test_adversarial_training_changes_dynamics(vec_ws, tmp_path):
    base = TrainConfig(model="mlp", epochs=3, batch_size=64)
    train(vec_ws, base, DecodeConfig(), scheduler="sync")
    clean = _dyn(vec_ws)["true_prob"][:]
    adv = TrainConfig(model="mlp", epochs=3, batch_size=64, adversarial="l2:1.0", pgd_steps=2)
    m = train(vec_ws, adv, DecodeConfig(), scheduler="sync", force=True)
    robust = _dyn(vec_ws)["true_prob"][:]
    assert m["config"]["train"]["adversarial"] == "l2:1.0"
    assert np.isfinite(robust).all() and robust[-1].mean() < clean[-1].mean()  # recorded on attacked inputs


def _digits_ws(tmp_path, fraction):
    """A catalogued demo set (digits, 10 % flipped labels) with a ``fraction`` subset."""
    from streamprune.demo import make_demo

    info = make_demo(str(tmp_path / "demo"), n_shards=4, augment=1)
    ws = str(tmp_path / "ws")
    catalog(info["train"], ws, scheduler="sync")
    subset(ws, fraction=fraction, seed=0)
    return ws


def test_mislabelled_demo_samples_stand_out(tmp_path):
    ws = _digits_ws(tmp_path, 0.6)
    train(ws, TrainConfig(model="cnn", epochs=10, batch_size=64, lr=0.05), DecodeConfig(), scheduler="sync")
    compute_scores(ws, ["el2n", "aum", "forgetting", "du"], params={"window": 5})
    w = Workspace(ws)
    rows = subset_rows(w)
    noisy = np.array([json.loads(s.members["json"])["noisy"] for _, s in read_rows(Catalog(w), rows, ErrorPolicy())])
    assert 0.05 < noisy.mean() < 0.15
    el2n, aum, forg = read_score(w, "el2n"), read_score(w, "aum"), read_score(w, "forgetting")

    def auc(score, positive):  # probability that a noisy sample scores higher than a clean one
        from scipy.stats import mannwhitneyu

        return mannwhitneyu(score[positive], score[~positive]).statistic / (positive.sum() * (~positive).sum())

    assert auc(el2n, noisy) > 0.85
    assert auc(-aum, noisy) > 0.85  # AUM lowest for mislabelled samples
    assert forg[noisy].mean() > forg[~noisy].mean()


@pytest.mark.parametrize("model, kind", [("mlp", "npy"), ("cnn", "png")])  # cnn: BatchNorm's recomputed statistics
def test_training_killed_mid_epoch_resumes_identically(tmp_path, model, kind):
    shards = write_shards(str(tmp_path / "data"), 4, 100, kind=kind, dim=16 if kind == "npy" else 8)
    args = ["--score", "du,el2n", "--epochs", "6", "--model", model, "--batch-size", "16", "--window", "3",
            "--scheduler", "sync", "--fraction", "0.8", "--checkpoint-every", "0"]
    ref, ws = str(tmp_path / "ref"), str(tmp_path / "ws")
    for w in (ref, ws):
        run_cli("catalog", *shards, "-w", w, "--scheduler", "sync")
    run_cli("score", "-w", ref, *args)

    def mid_training():
        ck = [f for d, _, fs in os.walk(os.path.join(ws, "_stages", "train")) for f in fs if f.startswith("ckpt-")]
        return any(f >= "ckpt-0002.pt" for f in ck)

    kill_when(["score", "-w", ws, *args], mid_training)
    assert not os.path.exists(os.path.join(ws, "_stages", "train.json"))
    run_cli("score", "-w", ws, *args)
    for name in ("logits", "true_prob", "correct", "loss"):
        np.testing.assert_array_equal(_dyn(ref)[name][:], _dyn(ws)[name][:])
    for s in ("du", "el2n"):
        np.testing.assert_array_equal(read_score(Workspace(ref), s), read_score(Workspace(ws), s))


def test_full_data_replica_killed_mid_epoch_resumes_identically(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 4, 100, kind="npy", dim=16)
    args = ["--score", "du", "--epochs", "6", "--model", "mlp", "--batch-size", "16", "--window", "3",
            "--scheduler", "sync", "--full", "--full-runs", "2", "--checkpoint-every", "0"]
    ref, ws = str(tmp_path / "ref"), str(tmp_path / "ws")
    for w in (ref, ws):
        run_cli("catalog", *shards, "-w", w, "--scheduler", "sync")
    out = run_cli("score", "-w", ref, *args).stdout
    assert "train (run 2 of 2)" in out and f"-> {ref}/scores/du-full-r1.zarr" in out

    def mid_replica():
        d = os.path.join(ws, "_stages", "train-full-r1")
        return any(f >= "ckpt-0002.pt" for _, _, fs in os.walk(d) for f in fs if f.startswith("ckpt-"))

    kill_when(["score", "-w", ws, *args], mid_replica)
    assert os.path.exists(os.path.join(ws, "_stages", "train-full.json"))
    assert not os.path.exists(os.path.join(ws, "_stages", "train-full-r1.json"))
    out = run_cli("score", "-w", ws, *args).stdout
    assert out.count("train: already done") == 1  # run 1 was finished before the kill, run 2 resumed
    for key in ("train-full", "train-full-r1"):
        np.testing.assert_array_equal(_dyn(ref, key)["true_prob"][:], _dyn(ws, key)["true_prob"][:])
    np.testing.assert_array_equal(zarr.open_array(os.path.join(ref, "scores", "du-full-r1.zarr"))[:],
                                  zarr.open_array(os.path.join(ws, "scores", "du-full-r1.zarr"))[:])
    bad = run_cli("score", "-w", ws, "--full-runs", "2", "--scheduler", "sync", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "Error: --full-runs needs --full and must be at least 1"]


def _bad_label_shards(d):
    os.makedirs(d, exist_ok=True)
    good = make_samples(20, kind="npy", dim=8)
    nolabel = make_samples(5, start=20, kind="npy", dim=8)
    del nolabel[2][1]["cls"]
    broken = make_samples(5, start=40, kind="png")
    broken[3][1]["png"] = b"\x89PNG not really"
    write_tar(os.path.join(d, "a.tar"), good)
    write_tar(os.path.join(d, "b.tar"), nolabel)
    write_tar(os.path.join(d, "c.tar"), broken)
    return [os.path.join(d, n) for n in ("a.tar", "b.tar", "c.tar")]


def test_missing_label_is_one_clear_line(tmp_path):
    shards = _bad_label_shards(str(tmp_path / "data"))
    ws = str(tmp_path / "ws")
    run_cli("catalog", *shards[:2], "-w", ws, "--scheduler", "sync")
    out = run_cli("score", "-w", ws, "--fraction", "1.0", "--epochs", "2", "--model", "mlp", "--scheduler", "sync",
                  "--window", "2", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "b.tar, key s0000022: missing label" in out.stderr


def test_label_out_of_range_and_undecodable_skipped(tmp_path):
    shards = _bad_label_shards(str(tmp_path / "data"))
    ws = str(tmp_path / "ws")
    run_cli("catalog", shards[0], shards[2], "-w", ws, "--scheduler", "sync")
    out = run_cli("score", "-w", ws, "--fraction", "1.0", "--epochs", "2", "--model", "mlp", "--num-classes", "3",
                  "--scheduler", "sync", "--window", "2", "--input", "vector", check=False)
    assert out.returncode == 1 and "label 3 out of range [0, 3)" in out.stderr and out.stderr.count("\n") == 1
    # The png shard has no .npy vectors: with skip, each of its samples is recorded, none dropped silently.
    out = run_cli("score", "-w", ws, "--fraction", "1.0", "--epochs", "2", "--model", "mlp", "--scheduler", "sync",
                  "--window", "2", "--input", "vector", "--on-error", "skip", "--force")
    errors = [json.loads(line) for line in open(os.path.join(ws, "errors.jsonl"))]
    assert sorted(e["key"] for e in errors if e["stage"] == "train") == [f"s{i:07d}" for i in range(40, 45)]
    du = read_score(Workspace(ws), "du")
    assert np.isnan(du).sum() == 5 and np.isfinite(du).sum() == 20
    counts = Workspace(ws).marker("score-du")["counts"]  # over the scored rows only
    assert counts["n"] == 25 and counts["n_valid"] == 20
    assert counts["mean"] == pytest.approx(float(np.nanmean(du)), rel=1e-6)
    assert counts["std"] == pytest.approx(float(np.nanstd(du)), rel=1e-5)


def test_checkpoint_writer_keeps_the_last_snapshot_and_raises_failed_writes(tmp_path):
    """Checkpoints are written in the background from a host snapshot (later training cannot change
    it), the older ones removed; a failed write is raised in the training thread."""
    import torch

    from streamprune.train import _CheckpointWriter, _host_copy, load_torch

    ckpt_dir = str(tmp_path / "ckpt")
    os.makedirs(ckpt_dir)
    w = torch.zeros(3)
    writer = _CheckpointWriter(ckpt_dir, {})
    for epoch in range(3):
        w += 1
        writer.save(epoch, _host_copy({"model": {"w": w}, "opt": [{"m": w * 2}], "epoch": epoch}))
    w += 100  # after the snapshot: not in the checkpoint
    writer.close()
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt-0002.pt"]
    state = load_torch(os.path.join(ckpt_dir, "ckpt-0002.pt"), {})
    assert state["epoch"] == 2 and state["model"]["w"].tolist() == [3.0] * 3 and state["opt"][0]["m"].tolist() == [6.0] * 3
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    writer = _CheckpointWriter(str(blocked), {})
    writer.save(0, {"epoch": 0})
    with pytest.raises(OSError):
        writer.close()
    # an epoch's dynamics (``before``) are written first; if that fails, no checkpoint claims the epoch
    seen = []
    writer = _CheckpointWriter(ckpt_dir, {})
    writer.save(3, {"epoch": 3}, before=lambda: seen.append(sorted(os.listdir(ckpt_dir))))

    def broken():
        raise OSError("disk full")

    writer.save(4, {"epoch": 4}, before=broken)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert seen == [["ckpt-0002.pt"]] and sorted(os.listdir(ckpt_dir)) == ["ckpt-0003.pt"]
    # an epoch between timed checkpoints: its dynamics are written, no checkpoint, the last one stays
    writer = _CheckpointWriter(ckpt_dir, {})
    writer.save(5, None, before=lambda: seen.append(5))
    writer.close()
    assert seen[-1] == 5 and sorted(os.listdir(ckpt_dir)) == ["ckpt-0003.pt"]


def test_a_training_error_is_not_masked_by_a_failed_checkpoint_write(vec_ws, monkeypatch):
    """Training that fails while a background write has failed too reports the training error; and
    the process-wide deterministic switch a CPU run turns on is the caller's again afterwards."""
    import streamprune.train as tr

    def write_fails(*args):
        raise OSError("disk full")

    calls = []

    def step_fails(device):
        calls.append(device)
        if len(calls) == 2:
            raise RuntimeError("out of memory in epoch 1")

    monkeypatch.setattr(tr, "_write_epoch", write_fails)
    monkeypatch.setattr(tr, "sync_device", step_fails)
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="out of memory in epoch 1"):
        train(vec_ws, TrainConfig(model="mlp", epochs=3, batch_size=32), DecodeConfig(), scheduler="sync")
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(tr, "sync_device", lambda device: None)  # with training fine, the write's error is raised
    with pytest.raises(OSError, match="disk full"):
        train(vec_ws, TrainConfig(model="mlp", epochs=3, batch_size=32), DecodeConfig(), scheduler="sync")


def test_decode_only_tasks_leave_workers_without_torch(tmp_path):
    """The training cache's tasks and embed's decode-only tasks never import torch in a worker
    (~190 MiB and ~2 s per worker process); the cache equals one built in-process."""
    from streamprune.compute import client_for, shared_local_cluster
    from streamprune.embed import embed

    shards = write_shards(str(tmp_path / "data"), 3, 30)
    ws, ref = str(tmp_path / "ws"), str(tmp_path / "ref")
    for w in (ws, ref):
        catalog(shards, w, scheduler="sync")
        subset(w, fraction=0.5, seed=0)
    cfg = TrainConfig(model="cnn", epochs=1, batch_size=16)
    with shared_local_cluster():
        train(ws, cfg, DecodeConfig(), scheduler="local")
        embed(ws, scheduler="local", encode="client", chunk_rows=32)
        with client_for("local") as client:
            # a lambda travels by value: a function of this module would make the worker import it (and torch)
            assert not any(client.run(lambda: "torch" in __import__("sys").modules).values())
    train(ref, cfg, DecodeConfig(), scheduler="sync")
    for name in ("x", "labels", "valid"):
        a = zarr.open_group(os.path.join(ws, "train", "cache.zarr"), mode="r")[name][:]
        b = zarr.open_group(os.path.join(ref, "train", "cache.zarr"), mode="r")[name][:]
        assert np.array_equal(a, b), name


def test_step_profile_is_written_on_request_and_changes_nothing(tmp_path):
    """STREAMPRUNE_PROFILE_STEPS=N profiles N steps after warm-up into train/profile.txt (per-step wall
    and device time, op tables); the dynamics are those of an unprofiled run."""
    shards = write_shards(str(tmp_path / "data"), 2, 60, kind="npy", dim=16)
    args = ["--score", "du", "--epochs", "2", "--model", "mlp", "--batch-size", "8", "--window", "2",
            "--scheduler", "sync", "--fraction", "0.9"]
    ref, ws = str(tmp_path / "ref"), str(tmp_path / "ws")
    for w in (ref, ws):
        run_cli("catalog", *shards, "-w", w, "--scheduler", "sync")
    run_cli("score", "-w", ref, *args)
    run_cli("score", "-w", ws, *args, env={"STREAMPRUNE_PROFILE_STEPS": "4"})
    assert not os.path.exists(os.path.join(ref, "train", "profile.txt"))
    text = open(os.path.join(ws, "train", "profile.txt")).read()
    assert text.startswith("4 steps: ") and "ms per step (wall)" in text and "host ops" in text and "aten::" in text
    for name in ("logits", "loss"):
        np.testing.assert_array_equal(_dyn(ref)[name][:], _dyn(ws)[name][:])


@pytest.mark.parametrize("budget", [0, 1 << 20])
def test_an_epoch_visits_every_valid_row_once_and_no_invalid_one(tmp_path, budget):
    """train_order + batches, streamed block by block (budget 0) or from memory: one epoch's batches
    hold each valid cached row exactly once, with its own input, and never an invalid row."""
    from streamprune.train import SubsetData

    ws = Workspace(str(tmp_path / "ws"))
    m = 53
    x = np.arange(m * 3, dtype=np.float32).reshape(m, 3)
    valid = np.ones(m, bool)
    valid[[0, 9, 10, 31, 52]] = False
    group = zarr.open_group(ws.path("train", "cache.zarr"), mode="w")
    group.create_array("x", data=x, chunks=(8, 3))
    group.create_array("labels", data=np.where(valid, np.arange(m) % 4, -1), chunks=(8,))
    group.create_array("valid", data=valid, chunks=(8,))
    data = SubsetData(ws, "train", budget)
    assert data.in_memory == bool(budget)
    seen, sizes = [], []
    for idx, idx_t, xb in data.batches(data.train_order(torch.Generator().manual_seed(1)), 5):
        assert np.array_equal(idx_t.numpy(), idx) and np.array_equal(xb.numpy(), x[idx])
        seen.extend(idx.tolist())
        sizes.append(len(idx))
    assert sorted(seen) == np.flatnonzero(valid).tolist()
    # full batches but the last, across the streamed blocks too: as many steps as the cosine
    # schedule (make_optimizer) counts per epoch, so the learning rate ends at its minimum
    assert sizes == [5] * 9 + [3]


@pytest.mark.parametrize("mode", ["crop", "crop-flip"])
def test_augment_batch_is_a_per_sample_crop_and_flip(mode):
    """The batched augmentation (one gather, flip folded into the column index) against a per-sample
    reference that draws the same numbers: pad by 1/8, crop at (dy, dx), then flip when drawn; on
    uint8 it equals augmenting the scaled floats, so the cache can be augmented before scaling."""
    import torch
    import torch.nn.functional as F

    from streamprune.train import augment_batch

    x = torch.randint(0, 256, (9, 3, 16, 12), dtype=torch.uint8)
    out = augment_batch(x, mode, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    pad = 2
    dy, dx = torch.randint(0, 2 * pad + 1, (9,), generator=g), torch.randint(0, 2 * pad + 1, (9,), generator=g)
    flip = torch.rand(9, generator=g) < 0.5 if mode == "crop-flip" else torch.zeros(9, dtype=torch.bool)
    assert 0 < int(flip.sum()) < 9 or mode == "crop"
    for i in range(9):
        ref = F.pad(x[i], (pad, pad, pad, pad))[:, dy[i]:dy[i] + 16, dx[i]:dx[i] + 12]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref), i
    scaled = augment_batch(x.float() / 255, mode, torch.Generator().manual_seed(5))
    assert torch.equal(scaled, out.float() / 255)
    assert augment_batch(x, "none", g) is x


def test_profile_counts_each_kernel_once():
    """The profile's device time sums the kernels (device events) only: the host op that launched a
    kernel carries the same time as its self device time, and annotations span other events."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from streamprune.train import device_seconds

    op = SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=250.0, is_user_annotation=False)
    kernel = SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=250.0, is_user_annotation=False)
    note = SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=900.0, is_user_annotation=True)
    assert device_seconds([op, kernel, note, kernel]) == pytest.approx(500e-6)


def test_fused_optimizer_takes_the_default_steps():
    """On CUDA make_optimizer asks for the fused update (one launch for all parameters); the same
    options fused and not take the same steps (checked where fused kernels exist on the CPU too),
    and a CPU model keeps the default implementation."""
    from streamprune.train import make_optimizer

    cpu = make_optimizer(torch.nn.Linear(4, 3), TrainConfig(epochs=2, batch_size=4), 16)[0]
    assert cpu.param_groups[0]["fused"] is None
    weights = []
    for fused in (None, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(30, 20)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
        for _ in range(5):
            loss = model(torch.randn(8, 30)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append(model.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_optimizer_state_loads_into_the_other_implementation(optimizer, layout):
    """A checkpoint of the default optimizer resumes as the fused one (a CPU run's checkpoint on a
    GPU) and back, and the next step is the step the writer would have taken.  channels_last: the
    checkpoint's contiguous state meets a model in channels_last (as on CUDA); the fused kernels
    walk state and parameter as flat memory, so the state must take the parameter's strides."""
    from streamprune.train import load_optimizer_state, make_optimizer

    def run(fused_resume: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 3)
        opt, _ = make_optimizer(model, TrainConfig(optimizer=optimizer, epochs=2, batch_size=4), 16)
        x = torch.randn(2, 3, 6, 6)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        saved = {k: v for k, v in opt.state_dict().items()}
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        opt2, _ = make_optimizer(model, TrainConfig(optimizer=optimizer, epochs=2, batch_size=4), 16)
        load_optimizer_state(opt2, saved, fused_resume)
        assert opt2.param_groups[0]["fused"] is (True if fused_resume else None)
        for p in model.parameters():
            assert all(v.stride() == p.stride() for v in opt2.state[p].values() if v.shape == p.shape)
        opt2.zero_grad()
        model(x).square().mean().backward()
        opt2.step()
        return model.weight.detach().clone()

    torch.testing.assert_close(run(True), run(False))


USER_HEAD_MODEL = """
import torch
from torch import nn


class DropHead(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Linear(d, 8)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, k))  # a head that is not one nn.Linear
        self.embed_dim = 8

    def embed(self, x):
        return torch.relu(self.body(x.flatten(1)))

    def forward(self, x):
        return self.head(self.embed(x))


def make(input_shape, num_classes):
    return DropHead(int(torch.tensor(input_shape).prod()), num_classes)
"""


def test_user_model_whose_head_is_not_a_linear_layer_trains(vec_ws, tmp_path, monkeypatch):
    """The eval pass sizes its logits by the number of classes, not by the head's ``out_features``."""
    import sys

    (tmp_path / "headmodels.py").write_text(USER_HEAD_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "headmodels", raising=False)
    m = train(vec_ws, TrainConfig(model="headmodels:make", epochs=2, batch_size=64), DecodeConfig(), scheduler="sync")
    assert m["counts"]["num_classes"] == 4
    assert _dyn(vec_ws)["logits"].shape[2] == 4 and np.isfinite(_dyn(vec_ws)["true_prob"][:]).all()
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match="score influence: needs a model whose head is one nn.Linear"):
        compute_scores(vec_ws, ["influence"])


def test_pseudo_labels_have_k_classes_whatever_num_classes_says(vec_ws):
    """With pseudo:K the model has K outputs; a --num-classes that disagrees is one line, not an
    IndexError from the loss (K > num_classes) or unused outputs (K < num_classes)."""
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match="--num-classes 3 .* pseudo:5"):
        TrainConfig(model="mlp", epochs=1, labels="pseudo:5", num_classes=3)
    m = train(vec_ws, TrainConfig(model="mlp", epochs=1, labels="pseudo:5", num_classes=5), DecodeConfig(),
              scheduler="sync")
    assert m["counts"]["num_classes"] == 5 and _dyn(vec_ws)["logits"].shape[2] == 5


def test_a_device_this_machine_lacks_is_one_line_and_keeps_the_finished_run_with_force(vec_ws):
    """--device is refused before --force removes the previous run (it was part of the configuration)."""
    from dataclasses import replace

    from streamprune.errors import StreamPruneError

    cfg = TrainConfig(model="mlp", epochs=2, batch_size=32)
    done = train(vec_ws, cfg, DecodeConfig(), scheduler="sync")
    bad = [("tpu", "--device must be auto, cpu or cuda")]
    if not torch.cuda.is_available():
        bad.append(("cuda", "CUDA is not available"))
    for device, why in bad:
        with pytest.raises(StreamPruneError, match=why):
            train(vec_ws, replace(cfg, device=device), DecodeConfig(), scheduler="sync", force=True)
        assert Workspace(vec_ws).marker("train")["fingerprint"] == done["fingerprint"]


def test_supervised_training_without_labels_is_one_line(vec_ws):
    """--label-key none decodes no labels: supervised training on them would train every row on
    class 0 (with --num-classes) and score nothing."""
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match="--label-key none .* --labels pseudo:K"):
        train(vec_ws, TrainConfig(model="mlp", epochs=1, num_classes=4), DecodeConfig(label_key="none"),
              scheduler="sync")
    assert not os.path.exists(os.path.join(vec_ws, "train", "cache.zarr"))


@pytest.mark.parametrize("option, says", [
    ({"optimizer": "adam"}, "--optimizer must be sgd or adamw, not 'adam'"),
    ({"augment": "flip"}, "--augment must be none, crop or crop-flip, not 'flip'"),
    ({"dynamics": "test"}, "--dynamics must be eval or train, not 'test'"),
    ({"checkpoint_seconds": -1}, "--checkpoint-every must be >= 0 seconds"),
    ({"checkpoint_seconds": float("nan")}, "--checkpoint-every must be >= 0 seconds"),
    ({"labels": "pseudo:1"}, "--labels must be 'supervised' or 'pseudo:K', not 'pseudo:1'"),
    ({"labels": "pseudo:many"}, "--labels must be 'supervised' or 'pseudo:K', not 'pseudo:many'"),
    ({"labels": "kmeans"}, "--labels must be 'supervised' or 'pseudo:K', not 'kmeans'"),
    ({"seed": 2**64}, "--seed must be a whole number from -2^63 to 2^63-1, not 18446744073709551616"),
    ({"seed": 1.5}, "--seed must be a whole number from -2^63 to 2^63-1, not 1.5"),
])
def test_training_options_out_of_their_range_are_named(option, says):
    """Each training option outside what it accepts is refused in one line naming the option and the value."""
    with pytest.raises(StreamPruneError) as err:
        TrainConfig(model="mlp", **option)
    assert str(err.value) == says


def test_every_accepted_seed_seeds_each_epoch_as_before():
    """An epoch's shuffle seed is seed * 100003 + epoch as torch reads it: a seed whose product overflowed
    torch's 64 bits (a traceback once training began) now wraps, and every seed that worked keeps its stream."""
    from streamprune.train import epoch_seed

    def stream(s: int) -> list[float]:
        return torch.rand(3, generator=torch.Generator().manual_seed(s)).tolist()

    for seed in (0, 7, -5, 2**40):
        assert stream(epoch_seed(seed, 3)) == stream(seed * 100003 + 3)
    for seed in (10**15, 2**63 - 1, -2**63):
        assert 0 <= epoch_seed(seed, 29) < 2**64
        TrainConfig(model="mlp", seed=seed)


def test_labels_of_a_single_class_are_refused(tmp_path):
    """A subset whose labels are all one class has no margin to learn: refused naming the class count."""
    shards = write_shards(str(tmp_path / "data"), 2, 20, kind="npy", dim=8, classes=1)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=0)
    with pytest.raises(StreamPruneError, match=r"^train: found only 1 class among the labels; need at least 2$"):
        train(ws, TrainConfig(model="mlp", epochs=1), DecodeConfig(input="vector"), scheduler="sync")
    assert Workspace(ws).marker("train") is None


def test_score_chunks_stay_within_their_memory_whatever_the_classes(vec_ws, monkeypatch):
    from streamprune import scoring
    from streamprune.scoring import SCORE_CHUNK_BYTES, score_chunk_rows

    # 30 epochs of 1,000-class logits (120 kB a row): whole zarr chunks of logits, within the budget
    rows = score_chunk_rows(30, 1000, ("logits", "labels"), 2097)
    assert rows % 2097 == 0 and rows * 30 * 1000 * 4 <= SCORE_CHUNK_BYTES
    assert score_chunk_rows(30, 10, ("true_prob",), 209715) == scoring.SCORE_CHUNK_ROWS  # small rows: the cap
    assert score_chunk_rows(10**6, 10**4, ("logits",), 5) == 1  # one row over the budget: one at a time
    # labels are not read from the dynamics, so they take none of the budget
    assert score_chunk_rows(30, 1000, ("logits", "labels"), 1) == SCORE_CHUNK_BYTES // (4 * 30 * 1000)
    # Scores computed in chunks of a few rows equal the score functions over the whole dynamics.
    from streamprune.scores import get_score

    train(vec_ws, TrainConfig(model="mlp", epochs=6, batch_size=32, lr=0.05), DecodeConfig(), scheduler="sync")
    monkeypatch.setattr(scoring, "SCORE_CHUNK_BYTES", 6 * 4 * 4 * 7)  # 7 rows of 6 epochs x 4 classes
    seen = []
    real = scoring.score_chunk_rows
    monkeypatch.setattr(scoring, "score_chunk_rows", lambda *a: seen.append((a, real(*a))) or seen[-1][1])
    compute_scores(vec_ws, ["el2n", "aum"])
    g = _dyn(vec_ws)
    assert len(seen) == 2 and all(1 <= r <= 7 for _, r in seen)
    assert [a for a, _ in seen] == [(6, 4, ("logits", "labels"), g["logits"].chunks[1])] * 2  # rows per zarr chunk
    # an explicit chunk is used as given
    monkeypatch.setattr(scoring, "score_chunk_rows", lambda *a: pytest.fail("chunk was given"))
    compute_scores(vec_ws, ["forgetting"], chunk=5)
    from streamprune.scores import forgetting

    np.testing.assert_array_equal(read_score(Workspace(vec_ws), "forgetting"), forgetting(g["correct"][:]))
    labels = np.load(os.path.join(vec_ws, "train", "labels.npy"))
    for name in ("el2n", "aum"):
        spec = get_score(name)
        arrays = {"labels": labels, **{k: g[k][:] for k in spec.needs if k != "labels"}}
        want = spec.fn(*(arrays[k] for k in spec.needs))
        np.testing.assert_allclose(read_score(Workspace(vec_ws), name), want, rtol=1e-5, atol=1e-6)


def test_checkpoint_rng_state_round_trips_on_the_cpu():
    """The host generator a checkpoint carries restores the stream it saved (dropout on the CPU)."""
    import torch

    from streamprune.train import _rng_state, _set_rng_state

    cpu = torch.device("cpu")
    torch.manual_seed(5)
    state = _rng_state(cpu)
    assert set(state) == {"rng"}
    expected = torch.rand(9)
    torch.rand(4)
    _set_rng_state(state, cpu)
    assert torch.equal(torch.rand(9), expected)


@pytest.mark.parametrize("streamed", [False, True])
def test_eval_pass_measures_the_model_not_batchnorm_statistics_that_lag_it(tmp_path, streamed):
    """A small subset trains few steps an epoch, and BatchNorm's moving averages lag the weights: the
    eval-mode model was near chance after its first epoch (accuracy 0.13 here, 0.33 streamed) while it
    fitted its batches.  The statistics are recomputed after each epoch, so the eval pass, the saved
    model and the embeddings measure the trained weights."""
    from streamprune.train import load_model

    ws = _digits_ws(tmp_path, 0.2)
    stream = {"memory_budget": 1000, "chunk_rows": 64} if streamed else {}
    m = train(ws, TrainConfig(model="cnn", epochs=2, batch_size=64, lr=0.05, **stream), DecodeConfig(),
              scheduler="sync")
    assert m["timings"]["in_memory"] is not streamed
    correct = _dyn(ws)["correct"][:]
    assert correct.shape[1] > 500 and correct[0].mean() > 0.4 and correct[1].mean() > 0.5
    # the saved model is the one the eval pass measured: its buffers hold the recomputed statistics
    model, _ = load_model(Workspace(ws))
    x = torch.from_numpy(zarr.open_group(os.path.join(ws, "train", "cache.zarr"), mode="r")["x"][:]).float() / 255
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert np.array_equal(pred == load_labels(Workspace(ws)), correct[-1])


def test_recomputing_batchnorm_statistics_leaves_training_unchanged(tmp_path, monkeypatch):
    """Train mode normalises by each batch's own statistics, so the recomputation changes no step: the
    training pass's dynamics (``--dynamics train``) are those of a run without it, bit for bit."""
    import streamprune.train as T

    ref, ws = _digits_ws(tmp_path / "ref", 0.1), _digits_ws(tmp_path / "ws", 0.1)
    cfg = TrainConfig(model="cnn", epochs=2, batch_size=64, lr=0.05, dynamics="train")
    train(ref, cfg, DecodeConfig(), scheduler="sync")
    with_it = {name: _dyn(ref)[name][:] for name in ("logits", "loss")}
    calls = []
    monkeypatch.setattr(T, "recalibrate_bn", lambda *a, **k: calls.append(1) or 0)
    train(ws, cfg, DecodeConfig(), scheduler="sync")
    assert calls == [1, 1]
    for name, values in with_it.items():
        np.testing.assert_array_equal(values, _dyn(ws)[name][:])


def test_recalibrate_bn_averages_the_batches_statistics_and_restores_the_model():
    """Each BatchNorm layer's running mean / variance become the equal-weight averages of the batches'
    means / unbiased variances; momentum and mode are restored, other layers stay in eval mode (dropout
    draws nothing), and a model without BatchNorm is left alone."""
    from streamprune.train import RecentInputs, recalibrate_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.3),
                                torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    model.train()
    batches = [torch.randn(5, 2, 2, 2) * (i + 1) + i for i in range(3)]
    rng = torch.get_rng_state()
    assert recalibrate_bn(model, batches, lambda t: t, torch.device("cpu"), False) == 1
    assert torch.equal(rng, torch.get_rng_state()) and model.training and model[1].momentum == 0.3
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert recalibrate_bn(torch.nn.Linear(2, 2), batches, lambda t: t, torch.device("cpu"), False) == 0
    # the inputs kept: the most recent batches, within the row and byte bounds, and always the last one
    recent = RecentInputs(rows=10, nbytes=1 << 20)
    for i in range(4):
        recent.add(torch.full((4, 2), float(i)))
    assert [float(b[0, 0]) for b in recent.batches] == [2.0, 3.0]
    recent = RecentInputs(rows=100, nbytes=64)
    recent.add(torch.zeros(3, 4))
    recent.add(torch.ones(5, 4))
    assert [len(b) for b in recent.batches] == [5]
    # a batch that views a larger block (streamed batches) is copied, so that the block is not kept alive
    block, gathered = torch.zeros(100, 2), torch.ones(4, 2)
    recent = RecentInputs()
    recent.add(block[10:14])
    recent.add(gathered)
    assert recent.batches[0].untyped_storage().nbytes() == 4 * 2 * 4
    assert recent.batches[1].data_ptr() == gathered.data_ptr()
