"""Evaluation metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from streamprune.evaluate import (agreement, error_jaccard, mean_std, pearson, per_class_accuracy, retained_recall,
                                  spearman, tail_spearman)


def test_pearson_spearman_hand_cases():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = [1,2,3,4], y = [1,3,2,4]: cov 1.0 (sample 4/3), var 1.25 each -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 10, 100, 1000], [1, 2, 3, 4]) == pytest.approx(1.0)  # monotone, nonlinear
    assert pearson([1, np.nan, 3, 4], [1, 5, 3, 4]) == pytest.approx(1.0)  # NaN rows ignored
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_retained_recall():
    kept = np.array([1, 1, 0, 0, 1], bool)
    ref = np.array([1, 0, 1, 0, 1], bool)
    assert retained_recall(kept, ref) == pytest.approx(2 / 3)
    # a share of the reference selection, whatever the size of the method's own
    assert retained_recall(np.ones(5, bool), ref) == 1.0
    assert retained_recall(np.array([1, 0, 0, 0, 0], bool), ref) == pytest.approx(1 / 3)


def test_tail_spearman():
    ref = np.arange(100, dtype=float)
    pred = ref.copy()
    pred[90:] = pred[90:][::-1]  # top decile reversed, bottom intact
    t = tail_spearman(pred, ref)
    assert t["top"] == pytest.approx(-1.0) and t["bottom"] == pytest.approx(1.0)


def test_tail_spearman_keeps_the_rows_at_the_quantile():
    """Rows whose reference equals the tail's quantile belong to the tail (scores with ties, such as
    forgetting counts, have many there)."""
    ref = np.arange(11, dtype=float)  # the 0.3 tails end exactly at 3 and 7: rows 0-3 and 7-10
    pred = ref.copy()
    pred[7] = 100.0  # top tail: ranks 4, 1, 2, 3 against 1, 2, 3, 4
    pred[[0, 3]] = 50.0, -100.0  # bottom tail: ranks 4, 2, 3, 1 against 1, 2, 3, 4
    t = tail_spearman(pred, ref, tail=0.3)
    assert t["top"] == pytest.approx(-0.2) and t["bottom"] == pytest.approx(-0.8)


def test_error_jaccard_agreement_per_class():
    truth = np.array([0, 1, 1, 2, 2, 2])
    a = np.array([0, 0, 1, 2, 1, 2])  # errors at 1, 4
    b = np.array([0, 0, 0, 2, 2, 2])  # errors at 1, 2
    assert error_jaccard(a, b, truth) == pytest.approx(1 / 3)
    assert error_jaccard(truth, truth, truth) == 1.0
    assert agreement(a, b) == pytest.approx(4 / 6)
    assert per_class_accuracy(a, truth, 4)[:3] == [1.0, 0.5, pytest.approx(2 / 3)]
    assert math.isnan(per_class_accuracy(a, truth, 4)[3])


def test_mean_std():
    assert mean_std([0.9, 0.92, 0.94]) == {"mean": pytest.approx(0.92), "std": pytest.approx(0.02), "n": 3}
    assert mean_std([0.5])["std"] == 0.0


def test_oracle_gap_hand_case():
    from streamprune.evaluate import oracle_gap

    g = oracle_gap(10, {10: 0.9, 20: 0.8}, {10: 0.5, 20: 0.7, 50: 0.7})
    assert g["oracle"] == 20 and g["pearson_at_chosen"] == 0.5 and g["gap"] == pytest.approx(0.2)  # tie -> smaller
    assert oracle_gap(20, {}, {10: 0.5, 20: 0.7})["gap"] == pytest.approx(0.0)
    assert oracle_gap(10, {}, {10: float("nan")})["oracle"] is None


def test_cost_counts_every_stage_on_a_methods_path(tmp_path):
    # label-aware runs the label-disagreement stage first, gcn's kNN prior reads the seeds graph
    # and knn may run on the all-rows graph: each path's time counts those stages
    from streamprune.evaluate import cost_table
    from streamprune.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    walls = {"train-full": 100.0, "score-du-full": 10.0, "train": 10.0, "score-du": 1.0, "embed": 2.0,
             "index-seeds": 3.0, "index-all": 4.0, "score-label_disagreement": 5.0}
    configs = {"knn": {"graph": "all"}, "kernel": {}, "gcn": {"prior": "knn"}, "propagate": {},
               "label-aware": {}}
    for method in configs:
        walls[f"extrapolate-du-{method}"] = 0.5
    for key, wall in walls.items():
        method = key.removeprefix("extrapolate-du-")
        ws.write_json({"key": key, "config": configs.get(method, {}), "timings": {"wall_s": wall}}, "_stages",
                      f"{key}.json")
    got = cost_table(ws, "du", list(configs))
    assert got["full_s"] == 110.0
    base = 10.0 + 1.0 + 2.0 + 0.5
    totals = {m: row["total_s"] for m, row in got["methods"].items()}
    assert totals == {"knn": base + 4.0, "kernel": base + 3.0, "gcn": base + 7.0, "propagate": base + 4.0,
                      "label-aware": base + 4.0 + 5.0}
    assert got["methods"]["label-aware"]["parts_s"]["disagreement"] == 5.0
    ws.write_json({"key": "extrapolate-du-gcn", "config": {"prior": "none"}, "timings": {"wall_s": 0.5}}, "_stages",
                  "extrapolate-du-gcn.json")
    assert cost_table(ws, "du", ["gcn"])["methods"]["gcn"]["total_s"] == base + 4.0


def test_test_shards_of_another_input_shape_are_one_line(tmp_path):
    """--test shards whose inputs differ from the training rows' (vectors for an image model, another image size)
    were a torch RuntimeError traceback from the first pruning-curve model; now one line names the shard and key.
    Grayscale test images for a colour model get three channels, as grayscale training rows do."""
    from shardgen import write_shards
    from streamprune.decode import DecodeConfig
    from streamprune.errors import StreamPruneError
    from streamprune.evaluate import _test_data

    vectors = write_shards(str(tmp_path / "vec"), 1, 3, kind="npy")
    images = write_shards(str(tmp_path / "png"), 1, 3, kind="png")  # 8x8 grayscale
    with pytest.raises(StreamPruneError) as err:
        _test_data(vectors, DecodeConfig(), None, (1, 8, 8))
    assert str(err.value) == (f"evaluate --test: shard {vectors[0]}, key s0000000: input shape (8,) differs from "
                              "the training rows' (1, 8, 8)")
    with pytest.raises(StreamPruneError, match=r"key s0000000: input shape \(1, 8, 8\) differs from the training "
                                               r"rows' \(1, 16, 16\)$"):
        _test_data(images, DecodeConfig(), None, (1, 16, 16))
    x, y = _test_data(images, DecodeConfig(), None, (3, 8, 8))
    assert x.shape == (3, 3, 8, 8) and np.array_equal(x[:, 0], x[:, 2]) and y.tolist() == [0, 1, 2]


def test_pruning_curve_shows_its_progress(tmp_path, monkeypatch, capsys):
    """The curve trains one model per source x strategy (and random) x keep x seed, plus the all-rows
    ones: minutes of work, so a progress bar counts them off (a source with too few scores is not counted)."""
    import dataclasses
    import types

    import torch

    import streamprune.evaluate as ev
    import streamprune.train as train
    from streamprune.decode import DecodeConfig
    from streamprune.train import TrainConfig
    from streamprune.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("train", {"train": dataclasses.asdict(TrainConfig()), "decode": dataclasses.asdict(DecodeConfig())},
             {}).commit({}, {})
    n = 40
    labels = np.arange(n) % 4
    rows = types.SimpleNamespace(x=torch.zeros(n, 2), labels=labels, valid=np.ones(n, bool), shape=(2,))
    few = np.full(n, np.nan, np.float32)
    few[:3] = 1.0  # too few scored rows to keep half: no runs for this source
    monkeypatch.setattr(ev, "_rows_data", lambda w: rows)
    monkeypatch.setattr(ev, "_test_data", lambda *a: (np.zeros((5, 2), np.float32), np.arange(5) % 4))
    monkeypatch.setattr(ev, "score_sources", lambda w, s: {"full": np.linspace(0, 1, n), "knn": np.linspace(1, 0, n),
                                                           "gcn": few})
    monkeypatch.setattr(train, "fit_and_predict", lambda x, y, x_test, cfg, c, seed: np.zeros((len(x_test), c)))
    monkeypatch.setenv("STREAMPRUNE_PROGRESS", "1")
    ev.pruning_curve(ws, "du", [0.5], 1, ["unused"], seeds=2, strategies=("hard",))
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    # (full, knn and random) x 2 seeds + 2 all-rows models
    assert any(line.startswith("pruning curve: 100%") and "8/8" in line for line in bar), bar
