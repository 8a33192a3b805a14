"""Hash-based subset: uniform, reproducible, stable when shards are appended."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamprune.shards import catalog
from streamprune.subset import in_subset, key_uniform, subset, subset_rows
from streamprune.workspace import Workspace
from shardgen import write_shards


@settings(max_examples=30, deadline=None, derandomize=True)  # 30 random draws at 3 SE fail ~8 % of runs by chance
@given(fraction=st.floats(0.02, 0.98), seed=st.integers(-(2**31), 2**31))
def test_fraction_within_three_standard_errors(fraction, seed):
    n = 20000
    keys = [f"k{i}" for i in range(n)]
    realised = in_subset(keys, fraction, seed).mean()
    se = np.sqrt(fraction * (1 - fraction) / n)
    assert abs(realised - fraction) < 3 * se + 1e-12


def test_reproducible_and_seed_dependent():
    keys = [f"sample-{i}" for i in range(5000)]
    a = in_subset(keys, 0.2, 7)
    assert np.array_equal(a, in_subset(keys, 0.2, 7))
    assert not np.array_equal(a, in_subset(keys, 0.2, 8))
    # Nested: a smaller fraction with the same seed is a subset of a larger one.
    assert not (in_subset(keys, 0.1, 7) & ~a).any()
    u = key_uniform(keys, 7)
    assert u.min() >= 0 and u.max() < 1


def test_fraction_bounds():
    """fraction is in (0, 1]: 1 keeps every key; 0, a negative, above 1 or NaN is refused naming --fraction."""
    from streamprune.errors import StreamPruneError

    keys = [f"sample-{i}" for i in range(1000)]
    assert in_subset(keys, 1.0, 3).all()
    assert in_subset(keys, 1e-9, 3).sum() == 0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(StreamPruneError, match=r"^--fraction must be in \(0, 1\], got "):
            in_subset(keys, bad, 3)


def test_fraction_one_keeps_a_key_whose_hash_rounds_to_one(monkeypatch):
    """The top 2^10 of 2^64 hashes read as exactly 1.0 in float64: fraction 1 keeps those keys too."""
    import streamprune.subset as subset_mod

    monkeypatch.setattr(subset_mod, "key_uniform", lambda keys, seed: np.array([0.5, 1.0]))
    assert in_subset(["a", "b"], 1.0, 0).tolist() == [True, True]
    assert in_subset(["a", "b"], 0.75, 0).tolist() == [True, False]
    assert float(np.float64(np.uint64(2**64 - 1)) / 2.0**64) == 1.0  # what makes such a key


@pytest.mark.parametrize("seed", [0, 7, -3])
def test_key_uniform_is_the_keyed_blake2b_of_each_key(seed):
    """Membership must not change between versions: u(key) is the keyed 64-bit BLAKE2b of the key
    (seed as the 8-byte little-endian key) read little-endian over 2^64, however it is computed."""
    import hashlib

    keys = ["", "a", "sample-000001", "ключ/äöü", "x" * 300] + [f"{i:06d}" for i in range(200)]
    salt = seed.to_bytes(8, "little", signed=True)
    want = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little") / 2.0 ** 64
            for k in keys]
    assert key_uniform(keys, seed).tolist() == want
    assert key_uniform([], seed).shape == (0,)


def test_subset_stage_stable_when_shards_appended(tmp_path):
    d = str(tmp_path / "data")
    first = write_shards(d, 5, 40)
    ws = str(tmp_path / "ws")
    catalog(first, ws, scheduler="sync")
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match="^read subset: stage .subset. has not run"):  # not a storage error
        subset_rows(Workspace(ws))
    m = subset(ws, fraction=0.3, seed=3)
    rows_a = subset_rows(Workspace(ws))
    counts = {"n_subset": len(rows_a), "n_samples": 200, "realised_fraction": len(rows_a) / 200}
    assert {k: m["counts"][k] for k in counts} == counts
    assert np.all(np.diff(rows_a) > 0)
    assert len(rows_a) and np.array_equal(rows_a, np.flatnonzero(in_subset([f"s{i:07d}" for i in range(200)], 0.3, 3)))
    more = write_shards(d, 3, 40, first=5)
    catalog(first + more, ws, scheduler="sync")
    m2 = subset(ws, fraction=0.3, seed=3)  # the catalog changed, so subset re-runs without --force
    assert not m2.get("skipped")
    rows_b = subset_rows(Workspace(ws))
    # Appended shards sort after the old ones here, so old rows keep their ids and membership.
    assert np.array_equal(rows_b[rows_b < 200], rows_a)
    assert subset(ws, fraction=0.3, seed=3).get("skipped")


def test_a_seed_outside_64_bits_is_refused_before_force_replaces_the_subset(tmp_path):
    """The key hash salts with the seed's 8 bytes: a larger seed was an OverflowError traceback, raised after
    --force had already dropped the finished subset."""
    from streamprune.errors import StreamPruneError

    ws = str(tmp_path / "ws")
    catalog(write_shards(str(tmp_path / "data"), 2, 20), ws, scheduler="sync")
    done = subset(ws, fraction=0.5, seed=-3)
    for seed in (2**63, -(2**63) - 1, 1.5):
        with pytest.raises(StreamPruneError, match=rf"^--seed must be a whole number from -2\^63 to 2\^63-1, "
                                                   rf"not {seed}$"):
            subset(ws, fraction=0.5, seed=seed, force=True)
    assert subset(ws, fraction=0.5, seed=-3)["fingerprint"] == done["fingerprint"]
    for fraction in (0.0, 1.5):  # refused before --force drops the finished subset too
        with pytest.raises(StreamPruneError, match=r"^--fraction must be in \(0, 1\]"):
            subset(ws, fraction=fraction, seed=-3, force=True)
    assert subset(ws, fraction=0.5, seed=-3).get("skipped")
    subset(ws, fraction=0.5, seed=2**63 - 1, force=True)  # the bounds themselves are seeds


@pytest.mark.parametrize("change", [{"seed": 4}, {"fraction": 0.6}])
def test_another_seed_or_fraction_is_another_subset(tmp_path, change):
    """Seed and fraction are the subset's configuration: changing either is refused without --force (not
    answered with the old rows), and with --force gives the rows of the new choice."""
    from streamprune.errors import StreamPruneError

    ws = str(tmp_path / "ws")
    catalog(write_shards(str(tmp_path / "data"), 2, 50), ws, scheduler="sync")
    subset(ws, fraction=0.3, seed=3)
    new = {"fraction": 0.3, "seed": 3, **change}
    with pytest.raises(StreamPruneError, match="another configuration"):
        subset(ws, **new)
    m = subset(ws, **new, force=True)
    want = np.flatnonzero(in_subset([f"s{i:07d}" for i in range(100)], new["fraction"], new["seed"]))
    assert not m.get("skipped") and np.array_equal(subset_rows(Workspace(ws)), want)


def test_subset_writes_in_chunks(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 4, 50)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    subset(ws, fraction=0.5, seed=1, chunk_rows=16)
    keys = [f"s{i:07d}" for i in range(200)]
    assert np.array_equal(subset_rows(Workspace(ws)), np.flatnonzero(in_subset(keys, 0.5, 1)))
    assert len(os.listdir(os.path.join(ws, "subset", "rows.zarr", "c"))) > 1


def test_shard_groups():
    from streamprune.subset import shard_groups

    assert shard_groups(np.array([3, 3, 3, 10, 1, 1]), 5) == [[0, 1], [2, 3], [4, 5]]
    assert shard_groups(np.array([7]), 5) == [[0]] and shard_groups(np.array([], np.int64), 5) == []


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_subset_in_parallel_tasks_equals_one_pass(tmp_path, monkeypatch, where, request):
    """Keys hashed in many tasks (finishing in any order, on threads or worker processes) give the
    same sorted rows as one in-process pass, written in chunks as the tasks finish."""
    from streamprune import subset as subset_mod

    shards = write_shards(str(tmp_path / "data"), 9, 37)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    keys = [f"s{i:07d}" for i in range(9 * 37)]
    want = np.flatnonzero(in_subset(keys, 0.4, 5))
    monkeypatch.setattr(subset_mod, "TASK_ROWS", 60)  # two shards per task: 5 tasks
    scheduler = request.getfixturevalue("dask_cluster") if where == "cluster" else "threads"
    m = subset(ws, fraction=0.4, seed=5, chunk_rows=16, scheduler=scheduler)
    assert m["timings"]["tasks"] == 5 and m["counts"]["n_subset"] == len(want)
    assert np.array_equal(subset_rows(Workspace(ws)), want)


def test_subset_killed_then_resumed_is_identical(tmp_path, monkeypatch):
    """Killed after some of its writes, the stage resumes after the last recorded one (it does not
    hash those tasks again) and gives the rows of an uninterrupted run, also when a write after the
    last record had landed (here: rows appended by hand)."""
    import zarr

    from helpers import count_files, kill_python_when
    from streamprune import subset as subset_mod

    shards = write_shards(str(tmp_path / "data"), 12, 30)
    ref, ws = str(tmp_path / "ref"), str(tmp_path / "ws")
    for w in (ref, ws):
        catalog(shards, w, scheduler="sync")
    code = ("import streamprune.subset as s; s.TASK_ROWS = 30; "
            f"s.subset({ws!r}, fraction=0.5, seed=2, chunk_rows=8, scheduler='sync')")
    records = os.path.join(ws, "_stages", "subset")
    kill_python_when(code, lambda: count_files(records, ".json") >= 3, env={"STREAMPRUNE_TASK_DELAY": "0.2"})
    assert Workspace(ws).marker("subset") is None
    arr = zarr.open_array(os.path.join(ws, "subset", "rows.zarr"), mode="r+")
    n = arr.shape[0]
    arr.resize((n + 20,))
    arr[n:] = -7  # an unrecorded write: dropped on resume
    monkeypatch.setattr(subset_mod, "TASK_ROWS", 30)
    m = subset(ws, fraction=0.5, seed=2, chunk_rows=8)
    want = subset(ref, fraction=0.5, seed=2, chunk_rows=8)
    assert m["timings"]["tasks"] == 12 and 3 <= m["timings"]["tasks_resumed"] < 12
    assert want["timings"]["tasks_resumed"] == 0
    assert m["counts"] == want["counts"]
    got = subset_rows(Workspace(ws))
    assert np.array_equal(got, subset_rows(Workspace(ref)))
    keys = [f"s{i:07d}" for i in range(12 * 30)]
    assert np.array_equal(got, np.flatnonzero(in_subset(keys, 0.5, 2)))
    assert not os.path.exists(records)  # records go once the marker is written
