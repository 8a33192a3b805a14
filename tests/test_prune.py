"""The prune stage: outputs, the pruned-view helper, resharding (local, S3, killed and resumed, a killed dask
worker, the fast header check against the complete one), bad input."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zarr
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from helpers import count_files, kill_python_when, run_cli, run_killing_a_worker
from shardgen import make_samples, write_shards
from streamprune import select as sel
from streamprune import storage
from streamprune.errors import StreamPruneError
from streamprune import prune as prune_module
from streamprune.prune import (OWNER_FILE, ShardPlanner, _buffer_members, atomic_output, check_members,
                               check_options, headers_ok, iter_headers, load_scores, prune, pruned_dataset, reshard)
from streamprune.shards import catalog
from streamprune.tario import iter_tar, write_tar
from streamprune.workspace import Workspace

NAME = "du-knn-hard-0.5"


# workspace builders -------------------------------------------------------------------------------
def _bytes_members(data: bytes, base: int):
    """Members of ``data`` (bytes [base, base + len(data)) of a shard); headers only."""
    return _buffer_members(memoryview(data), base)


def _file_members(f, start: int, stop: int):
    """Members of a local tar file from byte ``start`` up to the one ending at (or past) ``stop``; headers only."""
    fd = f.fileno()
    return iter_headers(lambda pos, n: os.pread(fd, n, pos), start, stop, os.fstat(fd).st_size)


def fake_upstream(ws: Workspace, n: int, *, seed: int = 0, invalid=(), nan=(), labels: bool = True,
                  embed: bool = True, scores: np.ndarray | None = None) -> dict:
    """Write embeddings.zarr (+ embed marker) and extrapolated/du-knn.zarr (+ marker) as the real stages would."""
    rng = np.random.default_rng(seed)
    score = rng.random(n).astype(np.float32) if scores is None else scores.astype(np.float32)
    score[list(nan)] = np.nan
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    lab = (np.arange(n) % 4).astype(np.int64)
    so = ws.storage_options
    if embed:
        g = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), so), mode="w")
        g.create_array("emb", shape=(n, 4), dtype="float32", chunks=(64, 4))[:] = rng.normal(size=(n, 4))
        if labels:
            g.create_array("labels", shape=(n,), dtype="int64", chunks=(64,))[:] = lab
        g.create_array("valid", shape=(n,), dtype="bool", chunks=(64,))[:] = valid
        ws.begin("embed", {"test": 1}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    e = zarr.open_group(storage.zarr_store(ws.path("extrapolated", "du-knn.zarr"), so), mode="w")
    e.create_array("score", shape=(n,), dtype="float32", chunks=(64,), fill_value=np.nan)[:] = score
    src = np.where(np.isnan(score) | ~valid, 255, 1).astype(np.uint8)
    e.create_array("source", shape=(n,), dtype="uint8", chunks=(64,))[:] = src
    ws.begin("extrapolate", {"test": 1}, {}, key="extrapolate-du-knn").commit(
        {"score": "extrapolated/du-knn.zarr"}, {"n": n})
    return {"score": score, "valid": valid, "labels": lab}


def build(root, n_shards: int = 6, per_shard: int = 20, **kw) -> tuple[str, list[str], dict]:
    shards = write_shards(os.path.join(root, "data"), n_shards, per_shard)
    ws = os.path.join(root, "ws")
    catalog(shards, ws, scheduler="sync")
    up = fake_upstream(Workspace(ws), n_shards * per_shard, **kw)
    return ws, shards, up


def originals(urls) -> dict:
    """key -> {ext: bytes} of every sample of the given shards (plain webdataset, no decoding)."""
    return {s["__key__"]: _payload(s) for s in wds.WebDataset(list(urls), shardshuffle=False)}


def _payload(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def expected_hardest(up: dict, fraction: float) -> np.ndarray:
    s = np.where(up["valid"], up["score"], np.nan)
    k = sel.keep_count_from(int((~np.isnan(s)).sum()), keep_fraction=fraction)
    return np.flatnonzero(sel.keep_hardest(s, k))


def keys_of(rows) -> list[str]:
    return [f"s{int(r):07d}" for r in rows]


def assert_same_samples(samples, want_keys, orig):
    got = [s["__key__"] for s in samples]
    assert len(got) == len(set(got)), "duplicate samples"
    assert sorted(got) == sorted(want_keys)
    for s in samples:
        assert _payload(s) == orig[s["__key__"]], f"bytes differ for {s['__key__']}"


# end to end ---------------------------------------------------------------------------------------
def test_prune_local_end_to_end(tmp_path):
    ws, shards, up = build(str(tmp_path), invalid=(3, 50, 51), nan=(7, 90))
    # Rows 40..59 (shard 2) are all easy: that shard keeps nothing and leaves shards.txt.
    up["score"][40:60] = np.where(np.isnan(up["score"][40:60]), np.nan, -1.0)
    fake_upstream(Workspace(ws), 120, scores=up["score"], invalid=(3, 50, 51), nan=(7, 90))
    out = str(tmp_path / "out")
    m = prune(ws, keep_fraction=0.5, reshard=out, shard_size=20_000, scheduler="sync")
    want = expected_hardest(up, 0.5)
    assert m["counts"]["n_kept"] == len(want) == 58 and m["reshard"]["counts"]["n_samples"] == 58  # 0.5 * 115
    assert m["outputs"]["reshard"] == os.path.join(out, "shards.txt")
    pdir = tmp_path / "ws" / "prune" / NAME

    # shards.txt: the shards keeping at least one sample, in catalog order.
    urls = open(pdir / "shards.txt").read().split()
    assert urls == [s for i, s in enumerate(sorted(shards)) if i != 2]
    # keys.parquet: sorted by row, shard = line of shards.txt.
    table = pd.read_parquet(pdir / "keys.parquet")
    assert table.row.tolist() == want.tolist()
    assert table.key.tolist() == keys_of(want)
    assert [urls[i] for i in table.shard] == [sorted(shards)[r // 20] for r in want]
    # stats.json
    stats = json.loads(open(pdir / "stats.json").read())
    assert stats["n_kept"] == 58 and stats["n_eligible"] == 115 and stats["n_invalid"] == 3
    assert sum(stats["per_shard"]["kept"]) == 58 and len(stats["per_shard"]["kept"]) == len(urls)
    assert sum(c["kept"] for c in stats["per_class"].values()) == 58
    assert stats["realised_keep_fraction"] == pytest.approx(58 / 115)
    assert stats["kept_score_range"][0] >= stats["score_quantiles"]["0.25"]
    assert os.path.exists(tmp_path / "ws" / "_stages" / f"prune-{NAME}.json")

    orig = originals(shards)
    # The helper over the original shards yields exactly the kept samples, bytes untouched.
    assert_same_samples(list(pruned_dataset(str(pdir))), keys_of(want), orig)
    assert_same_samples(list(pruned_dataset(ws, name=NAME)), keys_of(want), orig)
    # A DataLoader with more workers than shards (the recipe of docs/prune.md): each kept sample once.
    import torch

    loader = torch.utils.data.DataLoader(pruned_dataset(str(pdir)), batch_size=None, num_workers=len(urls) + 1)
    assert_same_samples(list(loader), keys_of(want), orig)
    # Plain webdataset over the re-written shards yields the same.
    new_urls = open(tmp_path / "out" / "shards.txt").read().split()
    assert len(new_urls) == m["reshard"]["counts"]["n_shards"] > 3
    assert_same_samples(list(wds.WebDataset(new_urls, shardshuffle=False)), keys_of(want), orig)
    assert_same_samples(list(pruned_dataset(out)), keys_of(want), orig)
    for u in new_urls:
        with tarfile.open(u) as tar:  # a complete tar, members intact
            names = tar.getnames()
        assert names and all(not n.startswith(("/", "..")) for n in names)
        assert os.path.getsize(u) <= 20_000 + 1024 or len({n.split(".")[0] for n in names}) == 1
    assert count_files(out) == len(new_urls) + 2 and not [f for f in os.listdir(out) if f.startswith(".tmp")]
    assert json.load(open(os.path.join(out, OWNER_FILE))) == {"workspace": ws, "name": NAME,
                                                              "fingerprint": m["reshard"]["fingerprint"]}

    # Small row groups: the helper reads only the row groups of the shard it opens.
    prune(ws, keep_fraction=0.5, name="small-groups", row_group_rows=5)
    small = tmp_path / "ws" / "prune" / "small-groups"
    assert pq.ParquetFile(small / "keys.parquet").num_row_groups == len(urls)
    assert_same_samples(list(pruned_dataset(str(small))), keys_of(want), orig)

    again = prune(ws, keep_fraction=0.5, reshard=out, shard_size=20_000, scheduler="sync")
    assert again.get("skipped") and again["reshard"].get("skipped")
    # the user guide names the files prune writes, as they are
    guide = open(os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md")).read()
    written = guide.split("Selects the rows to keep and writes", 1)[1].split(";", 1)[0]
    named = [os.path.basename(p) for p in re.findall(r"`([^`]+)`", written)]
    assert "keys.parquet" in named and all((pdir / f).is_file() for f in named), named


def test_reshard_max_count_and_repeated_keys(tmp_path):
    # Two shards with the same keys: an output tar never holds one key twice.
    d = tmp_path / "data"
    d.mkdir()
    shards = []
    for name in ("a", "b"):
        path = str(d / f"{name}.tar")
        write_tar(path, make_samples(10, start=0, seed=ord(name)))
        shards.append(path)
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    fake_upstream(Workspace(ws), 20)
    out = str(tmp_path / "out")
    m = prune(ws, keep_fraction=1.0, reshard=out, max_count=7, scheduler="threads")
    assert m["reshard"]["counts"]["n_samples"] == 20
    seen = []
    for u in open(os.path.join(out, "shards.txt")).read().split():
        samples = list(wds.WebDataset(u, shardshuffle=False))
        keys = [s["__key__"] for s in samples]
        assert len(keys) == len(set(keys)) and len(keys) <= 7
        seen += [(s["__key__"], s["json"], s["png"]) for s in samples]
    want = [(k, p["json"], p["png"]) for path in shards for k, p in originals([path]).items()]
    assert sorted(seen) == sorted(want)


def test_reshard_leaves_out_a_global_pax_header(tmp_path):
    """A global pax header (git archive writes one first) applies to every member after it: copied
    with the sample it precedes into an output, it would apply to the samples of other shards
    there. The catalogued bytes of a sample start after it, so no output holds one."""
    d = tmp_path / "data"
    d.mkdir()
    plain = str(d / "a.tar")
    write_tar(plain, make_samples(4))
    archived = str(d / "b.tar")
    with tarfile.open(archived, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "commit 1234"}) as tar:
        for key, payload in make_samples(3, start=100):
            for ext, data in payload.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ws = str(tmp_path / "ws")
    catalog([plain, archived], ws, scheduler="sync")
    fake_upstream(Workspace(ws), 7)
    out = str(tmp_path / "out")
    prune(ws, keep_fraction=1.0, reshard=out, scheduler="sync")
    [url] = open(os.path.join(out, "shards.txt")).read().split()
    with tarfile.open(url) as tar:
        tar.getmembers()
        assert tar.pax_headers == {}  # the global records of every header read
    got = {s["__key__"]: _payload(s) for s in wds.WebDataset(url, shardshuffle=False)}
    assert got == originals([plain, archived]) and len(got) == 7


def test_reshard_count_mismatch_publishes_no_shard_list(tmp_path, monkeypatch):
    """A reshard whose tasks report fewer samples than were kept fails before OUT/shards.txt exists:
    readers take that file as the list of complete outputs."""
    ws, _, _ = build(str(tmp_path), n_shards=2, per_shard=10)
    real = prune_module.write_output_shard

    def one_short(*args, **kwargs):
        info = real(*args, **kwargs)
        return {**info, "n_samples": info["n_samples"] - 1}

    monkeypatch.setattr(prune_module, "write_output_shard", one_short)
    out = str(tmp_path / "out")
    with pytest.raises(StreamPruneError, match="were kept"):
        prune(ws, keep_fraction=1.0, reshard=out, scheduler="sync")
    assert not os.path.exists(os.path.join(out, "shards.txt"))
    assert not os.path.exists(os.path.join(ws, "prune", "du-knn-hard-1", "reshard.json"))
    # The failed run's chunk records are not trusted: a plain re-run writes every shard again.
    monkeypatch.setattr(prune_module, "write_output_shard", real)
    m = prune(ws, keep_fraction=1.0, reshard=out, scheduler="sync")
    assert m["reshard"]["counts"]["n_samples"] == 20
    assert len(open(os.path.join(out, "shards.txt")).read().split()) == m["reshard"]["counts"]["n_shards"]


@pytest.mark.slow
def test_reshard_on_a_dask_cluster_equals_local(tmp_path, dask_cluster):
    ws, shards, up = build(str(tmp_path), 4, 20)
    prune(ws, keep_fraction=0.6, reshard=str(tmp_path / "a"), shard_size=15_000, scheduler="sync")
    reshard(ws, "du-knn-hard-0.6", str(tmp_path / "b"), shard_size=15_000, scheduler=dask_cluster, force=True)
    names = open(tmp_path / "a" / "shards.txt").read().split()
    assert len(names) >= 3
    for u in names:
        assert open(u, "rb").read() == open(u.replace(str(tmp_path / "a"), str(tmp_path / "b")), "rb").read()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=8), min_size=1, max_size=6),
       st.integers(1, 120), st.one_of(st.none(), st.integers(1, 6)), st.booleans())
def test_shard_planner_cuts(sources, shard_size, max_count, repeat_keys):
    planner = ShardPlanner(shard_size, max_count)
    sizes, keys, src = [], [], []
    for s, sz in enumerate(sources):
        ks = np.array([f"k{j}" if repeat_keys else f"k{s}-{j}" for j in range(len(sz))], object)
        planner.feed(len(sizes), np.array(sz), ks)
        sizes += sz
        keys += list(ks)
        src += [s] * len(sz)
    starts = planner.starts + [len(sizes)]
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:]))
    for a, b in zip(starts, starts[1:]):
        total = sum(sizes[a:b])
        assert total <= shard_size or b - a == 1
        assert max_count is None or b - a <= max_count
        assert len(set(keys[a:b])) == b - a
        if b < len(sizes):  # greedy: the next sample had a reason not to join
            assert (total + sizes[b] > shard_size or (max_count is not None and b - a >= max_count)
                    or keys[b] in keys[a:b])


# invalid rows, sources, labels ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy,opts", [("hard", {}), ("easy", {}), ("random", {}), ("balanced", {}),
                                           ("ccs", {"beta": 0.0, "n_strata": 5})])
def test_invalid_rows_never_kept(tmp_path, strategy, opts):
    n = 60
    invalid, nan = (1, 2, 30, 59), (5, 6)
    score = np.random.default_rng(1).random(n).astype(np.float32)
    score[list(invalid)] = 1e6 if strategy != "easy" else -1e6  # most attractive to the strategy
    ws = Workspace(str(tmp_path / "ws"))
    catalog(write_shards(str(tmp_path / "data"), 3, 20), ws, scheduler="sync")
    fake_upstream(ws, n, scores=score, invalid=invalid, nan=nan)
    m = prune(ws, strategy=strategy, keep_fraction=1.0, name="all", **opts)
    kept = pd.read_parquet(os.path.join(ws.url, "prune", "all", "keys.parquet")).row.to_numpy()
    assert m["counts"]["n_kept"] == n - 6
    assert not set(kept) & set(invalid + nan)
    m = prune(ws, strategy=strategy, keep_count=10, name="ten", **opts)
    kept = pd.read_parquet(os.path.join(ws.url, "prune", "ten", "keys.parquet")).row.to_numpy()
    assert len(kept) == 10 and not set(kept) & set(invalid + nan)


def test_clear_errors(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 2, 10)
    ws = Workspace(str(tmp_path / "ws"))
    with pytest.raises(StreamPruneError, match="stage 'catalog' has not run"):
        prune(ws, keep_fraction=0.5)
    catalog(shards, ws, scheduler="sync")
    with pytest.raises(StreamPruneError, match=r"run `streamprune extrapolate -w .* --score du --method knn` first"):
        prune(ws, keep_fraction=0.5)
    with pytest.raises(StreamPruneError, match=r"run `streamprune score -w .* --score du` first"):
        load_scores(ws, "du", "seed")
    with pytest.raises(StreamPruneError, match="unknown score source"):
        prune(ws, source="magic", keep_fraction=0.5)
    fake_upstream(ws, 20, invalid=(0, 1), labels=False)
    with pytest.raises(StreamPruneError, match=r"cannot keep 19 rows: only 18 eligible .*2 invalid"):
        prune(ws, keep_count=19)
    with pytest.raises(StreamPruneError, match="exactly one of"):
        prune(ws)
    with pytest.raises(StreamPruneError, match="balanced needs labels"):
        prune(ws, strategy="balanced", keep_fraction=0.5)
    with pytest.raises(StreamPruneError, match="does not take beta"):
        prune(ws, strategy="hard", keep_fraction=0.5, beta=0.3)
    with pytest.raises(StreamPruneError, match="name"):
        prune(ws, keep_fraction=0.5, name="../evil")
    with pytest.raises(StreamPruneError, match="apply to --reshard"):
        prune(ws, keep_fraction=0.5, max_count=3)
    prune(ws, keep_fraction=0.5, name="x")
    with pytest.raises(StreamPruneError, match="another configuration"):
        prune(ws, keep_fraction=0.6, name="x")
    assert prune(ws, keep_fraction=0.6, name="x", force=True)["counts"]["n_kept"] == 11
    with pytest.raises(StreamPruneError, match="stage 'prune-nope' has not run"):
        reshard(ws, "nope", str(tmp_path / "out"))


def test_hard_clean_noise_fraction_is_checked_up_front():
    """--noise-fraction is 'auto' or a fraction in [0, 1): 0 (drop nothing) is allowed."""
    def opts(nf):
        return check_options(score="du", source="knn", strategy="hard-clean", keep_fraction=0.5, noise_fraction=nf)

    assert opts(0)["opts"] == {"noise_fraction": 0} and opts(0.25)["opts"] == {"noise_fraction": 0.25}
    assert opts("auto")["opts"] == {"noise_fraction": "auto"}
    for bad in (1, 1.5, -0.1, "most"):
        with pytest.raises(StreamPruneError, match="--noise-fraction must be 'auto' or a fraction in"):
            opts(bad)


def test_a_count_over_the_eligible_rows_with_force_keeps_the_finished_selection(tmp_path):
    """A refused keep count leaves the workspace as it was, --force or not (the finished marker was removed first)."""
    ws, _, _ = build(str(tmp_path), n_shards=2, per_shard=10)
    done = prune(ws, keep_fraction=0.5, name="x")
    with pytest.raises(StreamPruneError, match="cannot keep 30 rows: only 20 eligible"):
        prune(ws, keep_count=30, name="x", force=True)
    assert Workspace(ws).marker("prune-x")["fingerprint"] == done["fingerprint"]
    # ccs samples from what is left after dropping the hardest floor(beta * 20) = 2
    with pytest.raises(StreamPruneError, match=r"cannot keep 19 rows: only 18 rows left after dropping the hardest 2"):
        prune(ws, strategy="ccs", keep_count=19, name="x", force=True)
    assert Workspace(ws).marker("prune-x")["fingerprint"] == done["fingerprint"]
    assert prune(ws, strategy="ccs", keep_count=18, name="x", force=True)["counts"]["n_kept"] == 18


def test_seed_source_random_without_scores_and_influence(tmp_path):
    shards = write_shards(str(tmp_path / "data"), 2, 10)
    ws = Workspace(str(tmp_path / "ws"))
    catalog(shards, ws, scheduler="sync")
    rows = np.array([1, 4, 9, 12, 17], np.int64)
    zarr.create_array(storage.zarr_store(ws.path("subset", "rows.zarr")), shape=(5,), dtype="int64",
                      chunks=(5,))[:] = rows
    ws.begin("subset", {"test": 1}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": 5})
    zarr.create_array(storage.zarr_store(ws.path("scores", "du.zarr")), shape=(5,), dtype="float32",
                      chunks=(5,))[:] = [0.5, np.nan, 0.1, 0.9, 0.3]
    ws.begin("score", {"test": 1}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": 5})
    s = load_scores(ws, "du", "seed")
    assert np.flatnonzero(~np.isnan(s)).tolist() == [1, 9, 12, 17] and s[12] == pytest.approx(0.9)
    full = np.arange(20, dtype=np.float32)
    zarr.create_array(storage.zarr_store(ws.path("scores", "du-full.zarr")), shape=(20,), dtype="float32",
                      chunks=(8,))[:] = full
    ws.begin("score", {"test": 1}, {}, key="score-du-full").commit({"score": "scores/du-full.zarr"}, {"n": 20})
    np.testing.assert_array_equal(load_scores(ws, "du", "full"), full)
    m = prune(ws, source="seed", keep_count=2)
    assert pd.read_parquet(os.path.join(ws.url, "prune", "du-seed-hard-n2", "keys.parquet")).row.tolist() == [1, 12]
    assert m["counts"]["n_eligible"] == 4
    # random needs no score array: every valid row is eligible.
    m = prune(ws, source="gcn", strategy="random", keep_count=20)
    assert m["counts"]["n_kept"] == 20
    stats = json.load(open(os.path.join(ws.url, "prune", "du-gcn-random-n20", "stats.json")))
    assert not stats["scores_used"] and stats["score_quantiles"] == {}
    # influence-budget: remove the smallest norms while their sum stays <= eps.
    m = prune(ws, source="seed", strategy="influence-budget", eps=0.45)
    kept = pd.read_parquet(os.path.join(ws.url, "prune", "du-seed-influence-budget-eps0.45", "keys.parquet"))
    assert kept.row.tolist() == [1, 12] and m["counts"]["keep_fraction"] == pytest.approx(0.5)


def test_balanced_keeps_the_same_fraction_per_class(tmp_path):
    ws, _, up = build(str(tmp_path), 4, 25, invalid=(0, 4, 8))
    prune(ws, strategy="balanced", keep_fraction=0.3, name="bal")
    stats = json.load(open(os.path.join(ws, "prune", "bal", "stats.json")))
    per = stats["per_class"]
    assert sum(c["kept"] for c in per.values()) == stats["n_kept"] == 29  # 0.3 * 97 = 29.1
    for c in per.values():
        assert abs(c["kept"] - c["eligible"] * 29 / 97) < 1


def _seed_subset(ws: Workspace, rows) -> None:
    """subset/rows.zarr (+ marker) holding ``rows``, as the subset stage writes it."""
    rows = np.asarray(rows, np.int64)
    zarr.create_array(storage.zarr_store(ws.path("subset", "rows.zarr")), shape=rows.shape, dtype="int64",
                      chunks=(max(1, len(rows)),))[:] = rows
    ws.begin("subset", {"test": 1}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(rows)})


def _train_labels(ws: Workspace, key: str, labels) -> None:
    """KEY/labels.npy (+ a finished KEY marker), as training leaves them."""
    os.makedirs(ws.path(key), exist_ok=True)
    np.save(ws.path(key, "labels.npy"), np.asarray(labels, np.int64))
    ws.begin("train", {"test": 1}, {}, key=key).commit({"labels": f"{key}/labels.npy"}, {})


def test_balanced_without_embedding_labels_takes_the_training_labels(tmp_path, caplog):
    """Without labels in embeddings.zarr, balanced takes train-full/labels.npy (every row); one of the wrong
    length is passed over for train/labels.npy, which labels the seed rows only: the others (label -1) are
    kept as a class of their own, with a warning counting them."""
    ws, _, up = build(str(tmp_path), 2, 10, labels=False)
    w = Workspace(ws)
    full = np.where(np.arange(20) < 4, 0, 1)  # 4 rows of class 0, 16 of class 1
    _train_labels(w, "train-full", full)
    prune(ws, strategy="balanced", keep_fraction=0.5, name="full")
    stats = json.load(open(os.path.join(ws, "prune", "full", "stats.json")))
    assert stats["label_source"] == "train-full/labels.npy"
    assert stats["per_class"] == {"0": {"eligible": 4, "kept": 2}, "1": {"eligible": 16, "kept": 8}}
    kept = pd.read_parquet(os.path.join(ws, "prune", "full", "keys.parquet")).row.to_numpy()
    want = [r for c, k in ((0, 2), (1, 8)) for r in np.flatnonzero(full == c)[np.argsort(-up["score"][full == c])[:k]]]
    assert sorted(kept.tolist()) == sorted(int(r) for r in want)

    _train_labels(w, "train-full", full[:19])  # not one label per catalog row: not used
    _seed_subset(w, [0, 1, 2, 3])
    _train_labels(w, "train", [0, 0, 1, 1])
    with caplog.at_level("WARNING", logger="streamprune.prune"):
        prune(ws, strategy="balanced", keep_fraction=0.5, name="seed")
    stats = json.load(open(os.path.join(ws, "prune", "seed", "stats.json")))
    assert stats["label_source"] == "train/labels.npy (seed rows only)"
    assert stats["per_class"] == {"-1": {"eligible": 16, "kept": 8}, "0": {"eligible": 2, "kept": 1},
                                  "1": {"eligible": 2, "kept": 1}}
    assert "16 eligible rows have no label (from train/labels.npy (seed rows only))" in caplog.text


def test_missing_or_mis_sized_score_arrays_are_named(tmp_path):
    """A finished marker whose score array is gone, or holds another number of rows than the catalog (or the
    subset, for seed scores), is refused with the array's path and the command that re-makes it."""
    ws, _, up = build(str(tmp_path), 2, 10)
    w = Workspace(ws)
    ext = w.path("extrapolated", "du-knn.zarr")
    shutil.rmtree(os.path.join(ext, "score"))
    with pytest.raises(StreamPruneError, match=rf"prune: {re.escape(ext)} has no score array .*re-run "
                                               r"`streamprune extrapolate --score du --method knn --force`"):
        prune(ws, keep_fraction=0.5)
    zarr.create_array(storage.zarr_store(os.path.join(ext, "score")), shape=(19,), dtype="float32",
                      chunks=(64,))[:] = up["score"][:19]
    with pytest.raises(StreamPruneError, match="prune: du scores from knn have 19 rows but the catalog has 20"):
        load_scores(w, "du", "knn")
    with pytest.raises(StreamPruneError, match="prune: scores have 19 rows but the catalog has 20; re-run"):
        prune(ws, keep_fraction=0.5)

    _seed_subset(w, [2, 5, 7])
    w.begin("score", {"test": 1}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": 3})
    with pytest.raises(StreamPruneError, match=rf"prune: {re.escape(w.path('scores', 'du.zarr'))} is missing; "
                                               r"re-run `streamprune score --force`"):
        load_scores(w, "du", "seed")
    zarr.create_array(storage.zarr_store(w.path("scores", "du.zarr")), shape=(2,), dtype="float32",
                      chunks=(2,))[:] = [0.1, 0.2]
    with pytest.raises(StreamPruneError, match=r"scores/du.zarr has 2 rows but the subset has 3; "
                                               r"re-run `streamprune score --score du`"):
        load_scores(w, "du", "seed")


def test_an_unfinished_embedding_is_refused(tmp_path):
    """embeddings.zarr without a finished embed stage (a killed embed run) is not read for valid rows or labels."""
    shards = write_shards(str(tmp_path / "data"), 2, 10)
    ws = Workspace(str(tmp_path / "ws"))
    catalog(shards, ws, scheduler="sync")
    fake_upstream(ws, 20, embed=False)
    zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr")), mode="w")
    with pytest.raises(StreamPruneError, match="embeddings.zarr exists but the embed stage has not finished; "
                                               "finish `streamprune embed`"):
        prune(ws, keep_fraction=0.5)


def test_influence_budget_takes_no_keep_fraction_or_count():
    """influence-budget keeps what its eps allows: a keep fraction or count beside it is refused up front."""
    for keep in ({"keep_fraction": 0.5}, {"keep_count": 3}):
        with pytest.raises(StreamPruneError, match="influence-budget keeps what its eps allows; do not give"):
            check_options(score="du", source="seed", strategy="influence-budget", eps=1.0, **keep)
    assert check_options(score="du", source="seed", strategy="influence-budget", eps=1.0)["opts"] == {"eps": 1.0}
    for eps in (-1.0, float("nan"), float("inf"), "1", True):  # refused before any scores are read, in one line
        with pytest.raises(StreamPruneError, match=r"^prune: --eps must be a finite number >= 0, not "):
            check_options(score="du", source="seed", strategy="influence-budget", eps=eps)


def test_pruned_view_lookup_and_its_errors(tmp_path):
    """pruned_dataset finds the only prune set of a workspace (path or Workspace), and otherwise names the sets to
    choose from; a set without shards.txt, or with an empty one, is a clear error; reshard refuses to write into
    the workspace itself."""
    ws, shards, up = build(str(tmp_path), 2, 10)
    orig = originals(shards)
    prune(ws, keep_fraction=0.5, name="a")
    want = keys_of(expected_hardest(up, 0.5))
    assert_same_samples(list(pruned_dataset(ws)), want, orig)
    assert_same_samples(list(pruned_dataset(Workspace(ws))), want, orig)
    prune(ws, keep_count=3, name="b")
    with pytest.raises(StreamPruneError, match=rf"{re.escape(ws)}: no shards.txt here; give the prune directory "
                                               r"\(WS/prune/<name>\) or name= \(a, b\)"):
        pruned_dataset(ws)
    assert_same_samples(list(pruned_dataset(ws, name="b")), keys_of(expected_hardest(up, 0.15)), orig)
    with pytest.raises(StreamPruneError, match="no prune outputs in this workspace"):
        pruned_dataset(str(tmp_path / "data"))
    with pytest.raises(StreamPruneError, match=r"prune/c: no shards.txt \(run `streamprune prune` first\)"):
        pruned_dataset(ws, name="c")
    open(os.path.join(ws, "prune", "b", "shards.txt"), "w").write("\n")
    with pytest.raises(StreamPruneError, match=r"prune/b/shards.txt lists no shards"):
        pruned_dataset(ws, name="b")
    with pytest.raises(StreamPruneError, match="reshard: the output location must not be the workspace itself"):
        reshard(ws, "a", ws + "/")


def test_reshard_inside_the_workspace_is_refused_before_the_selection(tmp_path):
    """OUT = WS/prune/<name> wrote the reshard's shards.txt over the prune set's own, which then listed the
    new tars, not the kept rows of the original shards; any OUT inside the workspace is now refused, by
    prune before its selection runs."""
    ws, _, _ = build(str(tmp_path), 2, 10)
    out = os.path.join(ws, "prune", "a")
    says = rf"^reshard: the output location {re.escape(out)} is inside the workspace {re.escape(ws)}; write the new"
    with pytest.raises(StreamPruneError, match=says):
        prune(ws, keep_fraction=0.5, name="a", reshard=out, scheduler="sync")
    assert Workspace(ws).marker("prune-a") is None and not os.path.exists(out)
    prune(ws, keep_fraction=0.5, name="a")
    before = open(os.path.join(out, "shards.txt")).read()
    with pytest.raises(StreamPruneError, match=says):
        reshard(ws, "a", out + "/", scheduler="sync")
    assert open(os.path.join(out, "shards.txt")).read() == before
    assert not [n for n in os.listdir(out) if n.startswith("pruned-")]
    reshard(ws, "a", str(tmp_path / "out"), scheduler="sync")  # beside the workspace, not in it: fine
    assert os.path.exists(tmp_path / "out" / "shards.txt")


# tar checks ----------------------------------------------------------------------------------------
def _raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data[: list(iter_tar(io.BytesIO(data), read_data=False))[-1].end]  # without the end-of-archive blocks


def _check(data: bytes, key: str, end: int | None = None, via_file: str | None = None) -> None:
    end = len(data) if end is None else end
    if via_file:
        with open(via_file, "wb") as f:
            f.write(data)
        with open(via_file, "rb", buffering=0) as f:
            check_members(_file_members(f, 0, end), 0, end, np.array([0]), np.array([end]), np.array([key], object),
                          "s.tar")
        return
    check_members(_bytes_members(data, 0), 0, end, np.array([0]), np.array([end]), np.array([key], object), "s.tar")


@pytest.mark.parametrize("from_file", [False, True])
def test_check_members_rejects_unsafe_names_and_changed_bytes(tmp_path, from_file):
    via_file = str(tmp_path / "s.tar") if from_file else None
    good = _raw_tar([("a.png", b"x" * 10), ("a.cls", b"1")])
    _check(good, "a", via_file=via_file)
    long = _raw_tar([("d/" + "x" * 150 + ".png", b"x"), ("d/" + "x" * 150 + ".cls", b"1")])  # GNU long names
    _check(long, "d/" + "x" * 150, via_file=via_file)
    with pytest.raises(StreamPruneError, match="catalog has key"):
        _check(long, "d/" + "x" * 149, via_file=via_file)
    corrupt = bytearray(good)
    corrupt[600] ^= 0xFF  # payload bytes are not checked (etag is), header bytes are
    _check(bytes(corrupt), "a", via_file=via_file)
    corrupt[5] ^= 0xFF
    with pytest.raises(StreamPruneError, match="do not parse"):
        _check(bytes(corrupt), "a", via_file=via_file)
    with pytest.raises(StreamPruneError, match="catalog has key b"):
        _check(good, "b", via_file=via_file)
    evil = _raw_tar([("../a.png", b"x")])
    with pytest.raises(StreamPruneError, match="unsafe member name"):
        _check(evil, "../a", via_file=via_file)
    with pytest.raises(StreamPruneError, match="do not parse"):
        _check(b"\1" * 1024, "a", via_file=via_file)
    with pytest.raises(StreamPruneError, match="member boundary"):
        _check(good, "a", end=len(good) - 512, via_file=via_file)


def test_report_flags_a_pruned_set_made_before_its_scores_were_remade(tmp_path):
    """A pruned set whose scores were re-made since is shown under an out-of-date line naming them."""
    from streamprune.report import report

    ws, _, _ = build(str(tmp_path), 2, 10)
    prune(ws, keep_fraction=0.5, name="p")
    report(ws, str(tmp_path / "r1"))
    md = open(os.path.join(tmp_path, "r1", "report.md")).read()
    assert "### p" in md and "Out of date" not in md
    w = Workspace(ws)
    w.begin("extrapolate", {"test": 2}, {}, key="extrapolate-du-knn", force=True).commit(
        {"score": "extrapolated/du-knn.zarr"}, {"n": 20})
    report(ws, str(tmp_path / "r2"))
    after = open(os.path.join(tmp_path, "r2", "report.md")).read().split("### p", 1)[1].lstrip()
    assert after.startswith("**Out of date:** prune-p is out of date (its input 'scores' was re-run since)")


def test_reshard_refuses_a_changed_shard(tmp_path):
    ws, shards, _ = build(str(tmp_path), 2, 10)
    prune(ws, keep_fraction=0.5, name="p")
    write_tar(sorted(shards)[0], make_samples(10, start=500))
    with pytest.raises(StreamPruneError, match="holds input shards"):
        reshard(ws, "p", str(tmp_path / "data"), scheduler="sync")
    with pytest.raises(StreamPruneError, match="changed since `streamprune catalog`"):
        reshard(ws, "p", str(tmp_path / "out"), scheduler="sync")
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tar") or f.startswith(".tmp")]


# output ownership -----------------------------------------------------------------------------------
def tars_in(out: str) -> dict:
    """name -> bytes of every pruned-*.tar in OUT."""
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.startswith("pruned-")}


def test_reshard_refuses_an_output_of_another_prune_set(tmp_path):
    ws, shards, _ = build(str(tmp_path), 4, 15)
    out = str(tmp_path / "out")
    prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")
    first, listing = tars_in(out), open(os.path.join(out, "shards.txt")).read()
    assert len(first) == 6
    # Another set of the same workspace, then the same set name in another workspace (same
    # catalog and selection, so the same run fingerprint): both refused, OUT untouched.
    ws2 = str(tmp_path / "ws2")
    catalog(shards, ws2, scheduler="sync")
    fake_upstream(Workspace(ws2), 60)
    for other, fraction in ((ws, 0.3), (ws2, 0.5)):
        with pytest.raises(StreamPruneError) as err:
            prune(other, keep_fraction=fraction, reshard=out, max_count=5, scheduler="sync")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"reshard: {out} holds the re-written shards of prune set {NAME!r} "
                                                  f"of workspace {ws};")
        assert "choose another --reshard location (or pass --force to replace them)" in msg
        assert tars_in(out) == first and open(os.path.join(out, "shards.txt")).read() == listing
        assert json.load(open(os.path.join(out, OWNER_FILE)))["workspace"] == ws
    # refused before the selection's work, not after it
    assert not os.path.exists(os.path.join(ws, "prune", "du-knn-hard-0.3")) and not os.path.exists(
        os.path.join(ws2, "prune", NAME))
    assert prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")["reshard"].get("skipped")


def test_reshard_force_replaces_another_set_and_the_first_writes_again(tmp_path, caplog):
    ws, _, _ = build(str(tmp_path), 4, 15)
    out = str(tmp_path / "out")
    prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")
    first = tars_in(out)
    m = prune(ws, keep_fraction=0.3, reshard=out, max_count=5, scheduler="sync", force=True)
    assert not m["reshard"].get("skipped") and m["reshard"]["counts"]["n_shards"] == 4
    assert sorted(tars_in(out)) == sorted(first)[:4] and tars_in(out) != {k: first[k] for k in sorted(first)[:4]}
    assert json.load(open(os.path.join(out, OWNER_FILE)))["name"] == "du-knn-hard-0.3"
    # The first set's marker still says done, but OUT is the other set's now.
    with pytest.raises(StreamPruneError, match="prune set 'du-knn-hard-0.3'"):
        prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")
    with caplog.at_level("WARNING", logger="streamprune.prune"):
        m = prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync", force=True)
    assert m.get("skipped") and not m["reshard"].get("skipped")
    assert "names another reshard run; writing the shards again" in caplog.text
    assert tars_in(out) == first
    assert open(os.path.join(out, "shards.txt")).read().split() == [os.path.join(out, f) for f in first]
    assert json.load(open(os.path.join(out, OWNER_FILE))) == {"workspace": ws, "name": NAME,
                                                              "fingerprint": m["reshard"]["fingerprint"]}
    assert prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")["reshard"].get("skipped")


def test_reshard_refuses_tars_without_an_owner_record(tmp_path):
    ws, _, _ = build(str(tmp_path), 4, 15)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pruned-000007.tar").write_bytes(b"someone else's")
    with pytest.raises(StreamPruneError, match=f"reshard: {out} already holds pruned-\\*.tar files that no reshard "
                                               f"claims \\(no {OWNER_FILE}\\); choose another --reshard location"):
        prune(ws, keep_fraction=0.5, reshard=str(out), max_count=5, scheduler="sync")
    assert os.listdir(out) == ["pruned-000007.tar"] and (out / "pruned-000007.tar").read_bytes() == b"someone else's"
    m = prune(ws, keep_fraction=0.5, reshard=str(out), max_count=5, scheduler="sync", force=True)
    assert sorted(os.listdir(out)) == [*(f"pruned-{i:06d}.tar" for i in range(6)), "shards.txt", OWNER_FILE]
    assert m["reshard"]["counts"]["n_samples"] == 30


def test_reshard_done_but_outputs_gone_writes_again_and_the_cli_says_so(tmp_path):
    ws, _, _ = build(str(tmp_path), 4, 15)
    out = str(tmp_path / "out")
    args = ["prune", "-w", ws, "--keep-fraction", "0.5", "--reshard", out, "--max-count", "5", "--scheduler", "sync"]
    run_cli(*args)
    first = tars_in(out)
    assert "selection and reshard already done with this configuration; nothing to do" in run_cli(*args).stdout
    os.remove(os.path.join(out, "shards.txt"))
    os.remove(os.path.join(out, "pruned-000002.tar"))
    proc = run_cli(*args)
    assert "prune: selection already done with this configuration; re-wrote the shards" in proc.stdout
    assert "nothing to do" not in proc.stdout and "has no shards.txt; writing the shards again" in proc.stderr
    assert tars_in(out) == first
    shutil.rmtree(out)  # OUT gone altogether, record included
    run_cli(*args)
    assert tars_in(out) == first and os.path.exists(os.path.join(out, OWNER_FILE))
    proc = run_cli("prune", "-w", ws, "--keep-fraction", "0.3", "--reshard", out, "--scheduler", "sync", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"Error: reshard: {out} holds the re-written shards of prune set {NAME!r} of workspace {ws}; "
        "choose another --reshard location (or pass --force to replace them)")


_PLAIN = ["k1", "k2", "d.v1/sub/k3", "dir/k4"]
_NAMES = _PLAIN + ["x" * 120, "../up", "/abs", "a\\b", "d/.hidden", "k.5", "ü6é"]
_EXTS = ["bin", "cls", "seg.png", "a/b", ".."]


@st.composite
def _tar_samples(draw):
    """Tar bytes of consecutive samples (plain, GNU long-name or pax headers, odd names), their starts and keys."""
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT]))
    n = draw(st.integers(1, 5))
    keys = draw(st.lists(st.sampled_from(_PLAIN if draw(st.booleans()) else _NAMES), min_size=n, max_size=n))
    buf = io.BytesIO()
    starts, names = [], []
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key in keys:
            starts.append(tar.offset)
            exts = _EXTS[:3] if draw(st.booleans()) else _EXTS
            for ext in draw(st.lists(st.sampled_from(exts), min_size=1, max_size=3, unique=True)):
                data = draw(st.binary(max_size=700))
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                try:
                    tar.addfile(info, io.BytesIO(data))
                except ValueError:  # a name the format cannot hold
                    return None
                names.append(info.name)
        end = tar.offset
    data = bytearray(buf.getvalue()[:end])
    if draw(st.booleans()):  # damage one byte, maybe of a header
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    catalog_keys = [draw(st.sampled_from([k, k, k, "other"])) for k in keys]  # sometimes the wrong key
    return bytes(data), np.array(starts, np.int64), np.array(catalog_keys, object)


@settings(max_examples=150, deadline=None)
@given(_tar_samples())
def test_fast_header_check_never_accepts_what_the_full_check_rejects(case):
    assume(case is not None)  # names the tar format cannot hold: drawn again
    data, starts, keys = case
    ends = np.append(starts[1:], len(data))
    fast = headers_ok(np.frombuffer(data, np.uint8), starts, keys)
    try:
        check_members(_bytes_members(data, 0), 0, len(data), starts, ends, keys, "s.tar")
        full = True
    except StreamPruneError:
        full = False
    assert full or not fast


def test_fast_header_check_covers_plain_shards(tmp_path):
    # The shards of the test set (GNU headers, plain keys) never need the complete check.
    path = write_shards(str(tmp_path), 1, 12)[0]
    cat_members = list(iter_tar(open(path, "rb"), read_data=False))
    starts = np.array([m.offset for m in cat_members if m.name.endswith(".png")], np.int64)
    keys = np.array([m.name[:-4] for m in cat_members if m.name.endswith(".png")], object)
    end = cat_members[-1].end
    block = np.frombuffer(open(path, "rb").read()[:end], np.uint8)
    assert headers_ok(block, starts, keys)
    assert not headers_ok(block, starts, np.array(["s0000000"] + list(keys[1:])[::-1], object))
    damaged = block.copy()
    damaged[starts[3] + 130] ^= 1  # a size digit: the checksum no longer matches
    assert not headers_ok(damaged, starts, keys)


def test_reshard_with_a_small_copy_buffer_and_durable_output(tmp_path, monkeypatch):
    # Samples larger than the buffer go through the one-sample path (headers one by one, kernel
    # copy); the output is the same bytes, durable or not.
    ws, _, _ = build(str(tmp_path), 4, 15)
    prune(ws, keep_fraction=0.7, reshard=str(tmp_path / "a"), shard_size=15_000, scheduler="sync")
    ref = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(tmp_path / "a" / "shards.txt").read().split()}
    sizes = sorted(len(b) for b in ref.values())
    monkeypatch.setattr(prune_module, "READ_BLOCK", 2048)  # about a third of a sample: every sample is "large"
    m = reshard(ws, "du-knn-hard-0.7", str(tmp_path / "b"), shard_size=15_000, scheduler="threads", force=True,
                durable=True)
    got = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(tmp_path / "b" / "shards.txt").read().split()}
    assert got == ref and len(ref) >= 3 and sizes[0] > 2048
    assert json.load(open(os.path.join(ws, "prune", "du-knn-hard-0.7", "reshard.json")))["durable"] is True
    monkeypatch.setattr(prune_module, "READ_BLOCK", 20_000)  # a few samples per buffer: many batches per tar
    reshard(ws, "du-knn-hard-0.7", str(tmp_path / "c"), shard_size=15_000, scheduler="sync", force=True)
    got = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(tmp_path / "c" / "shards.txt").read().split()}
    assert got == ref and m["counts"]["n_samples"] == 42


# crash and resume -----------------------------------------------------------------------------------
def test_reshard_killed_then_resumed_is_identical(tmp_path):
    ref_ws, shards, _ = build(str(tmp_path / "ref"), 6, 20)
    ref_out = str(tmp_path / "ref_out")
    prune(ref_ws, keep_fraction=0.5, reshard=ref_out, shard_size=12_000, scheduler="sync")
    ref_tars = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(os.path.join(ref_out, "shards.txt")).read().split()}
    assert len(ref_tars) >= 8

    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    fake_upstream(Workspace(ws), 120)
    out = str(tmp_path / "out")
    code = (f"from streamprune.prune import prune; prune({ws!r}, keep_fraction=0.5, reshard={out!r}, "
            f"shard_size=12_000, scheduler='sync')")
    chunks = os.path.join(ws, "_stages", f"reshard-{NAME}")
    kill_python_when(code, lambda: count_files(chunks, ".json") >= 3, env={"STREAMPRUNE_TASK_DELAY": "0.3"},
                     timeout=120)
    assert not os.path.exists(os.path.join(ws, "_stages", f"reshard-{NAME}.json"))
    assert not os.path.exists(os.path.join(out, "shards.txt"))
    finals = [f for f in os.listdir(out) if f.startswith("pruned-")]
    assert 3 <= len(finals) < len(ref_tars)
    for f in finals:  # nothing partial under a final name
        assert open(os.path.join(out, f), "rb").read() == ref_tars[f]
    # What a power loss can do to tars that were recorded but never fsynced (durable=False): one
    # comes back empty, one is gone.  The resumed run checks recorded tars and rewrites those.
    finals = sorted(finals)
    open(os.path.join(out, finals[0]), "wb").close()
    os.remove(os.path.join(out, finals[1]))

    m = prune(ws, keep_fraction=0.5, reshard=out, shard_size=12_000, scheduler="sync")
    assert m.get("skipped") and not m["reshard"].get("skipped")
    got = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(os.path.join(out, "shards.txt")).read().split()}
    assert got == ref_tars
    assert sorted(os.listdir(out)) == sorted([*ref_tars, "shards.txt", OWNER_FILE])  # no temp files, no extras
    keys = [s["__key__"] for s in wds.WebDataset(open(os.path.join(out, "shards.txt")).read().split(),
                                                 shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 60


@pytest.mark.slow
def test_reshard_survives_a_sigkilled_dask_worker(tmp_path):
    # A LocalCluster of its own (run_killing_a_worker): the killed worker must not disturb other tests.
    ws, _, _ = build(str(tmp_path), 6, 20)
    ref_out = str(tmp_path / "ref")
    prune(ws, keep_fraction=0.5, reshard=ref_out, shard_size=12_000, scheduler="sync")
    ref = {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in open(os.path.join(ref_out, "shards.txt")).read().split()}
    out = str(tmp_path / "out")
    records = os.path.join(ws, "_stages", f"reshard-{NAME}")

    def leave_a_partial_tar() -> None:  # what a worker killed in the middle of writing a tar leaves behind
        open(os.path.join(out, ".tmp-0123456789ab-pruned-000001.tar.partial"), "wb").write(b"partial")

    run = run_killing_a_worker(
        "streamprune.prune", lambda: count_files(records, ".json"),
        lambda address: reshard(ws, NAME, out, shard_size=12_000, scheduler=address, force=True),
        min_records=2, after_kill=leave_a_partial_tar)
    m = run["result"]
    assert 2 <= run["records"] < len(ref)  # killed mid-run
    assert run["killed_pid"] not in run["pids_after"] and run["rerun"] >= 1  # the task it held ran again elsewhere
    assert m["counts"]["n_shards"] == len(ref)
    urls = open(os.path.join(out, "shards.txt")).read().split()
    assert [u.rsplit("/", 1)[1] for u in urls] == sorted(ref)
    assert {u.rsplit("/", 1)[1]: open(u, "rb").read() for u in urls} == ref  # same bytes as a clean run
    assert sorted(os.listdir(out)) == sorted([*ref, "shards.txt", OWNER_FILE])  # no temporary files left


# object storage ------------------------------------------------------------------------------------
def test_prune_on_s3(tmp_path, s3server, s3bucket):
    fs = s3server.fs()
    local = write_shards(str(tmp_path / "data"), 4, 15)
    for p in local:
        fs.put_file(p, f"{s3bucket}/data/{os.path.basename(p)}")
    so = s3server.storage_options
    ws = Workspace(f"s3://{s3bucket}/ws", so)
    catalog([f"s3://{s3bucket}/data/"], ws, scheduler="threads")
    up = fake_upstream(ws, 60, invalid=(2,), nan=(9,))
    out = f"s3://{s3bucket}/pruned"
    m = prune(ws, keep_fraction=0.5, reshard=out, shard_size=40_000, scheduler="threads")
    want = keys_of(expected_hardest(up, 0.5))
    assert m["reshard"]["counts"]["n_samples"] == len(want) == 29
    orig = originals(local)

    # Helper over the original s3:// shards.
    ds = pruned_dataset(f"s3://{s3bucket}/ws/prune/{NAME}", storage_options=so)
    assert_same_samples(list(ds), want, orig)
    # Plain webdataset over the re-written objects, through presigned http urls (curl).
    new = fs.cat_file(f"{s3bucket}/pruned/shards.txt").decode().split()
    assert len(new) == m["reshard"]["counts"]["n_shards"] >= 2 and all(u.startswith(f"s3://{s3bucket}/pruned/pruned-") for u in new)
    signed = [fs.sign(u, expiration=600) for u in new]
    assert_same_samples(list(wds.WebDataset(signed, shardshuffle=False)), want, orig)
    assert_same_samples(list(pruned_dataset(out, storage_options=so)), want, orig)
    assert not [k for k in fs.ls(f"{s3bucket}/pruned") if ".tmp" in k]

    # An output that fails half-way (single PUT or multipart) never appears under its name.
    for size in (1000, 6 << 20):
        url = f"s3://{s3bucket}/pruned/pruned-999999.tar"
        with pytest.raises(RuntimeError):
            with atomic_output(url, so, block_size=5 << 20) as f:
                f.write(b"x" * size)
                raise RuntimeError("killed")
        assert not s3server.fs().exists(url)
    with atomic_output(url, so, block_size=5 << 20) as f:
        f.write(b"y" * (6 << 20))
    assert s3server.fs().size(url) == 6 << 20


def test_read_1d_converts_chunk_by_chunk_and_names_values_that_do_not_fit(tmp_path):
    arr = zarr.create_array(str(tmp_path / "labels.zarr"), shape=(10,), chunks=(4,), dtype="int64")
    arr[:] = np.arange(10) - 1
    out = storage.read_1d(arr, np.int32, "label disagreement", chunk_rows=3)
    assert out.dtype == np.int32 and out.tolist() == list(range(-1, 9))
    arr[7] = 1 << 40
    with pytest.raises(StreamPruneError, match=r"^label disagreement: values in \S*labels\.zarr \(rows 6 to 8\) exceed int32$"):
        storage.read_1d(arr, np.int32, "label disagreement", chunk_rows=3)


def test_prune_from_a_method_a_plugin_registered(tmp_path, monkeypatch):
    """A method added as docs/extending.md shows writes extrapolated/<score>-<method>.zarr under its
    marker; prune --from <method> reads it like a built-in's once the method is registered."""
    from streamprune.extrapolate import common

    ws, _, up = build(str(tmp_path))
    w = Workspace(ws)
    shutil.copytree(os.path.join(ws, "extrapolated", "du-knn.zarr"), os.path.join(ws, "extrapolated", "du-mine.zarr"))
    w.begin("extrapolate", {"test": 1}, {}, key="extrapolate-du-mine").commit(
        {"score": "extrapolated/du-mine.zarr"}, {"n": 120})
    monkeypatch.setattr(common, "_METHODS", dict(common._METHODS))
    with pytest.raises(StreamPruneError, match="unknown score source 'mine'; choose one of knn, gcn"):
        prune(ws, source="mine", keep_fraction=0.5, scheduler="sync")
    common.register_method("mine", lambda *a, **k: None)
    with pytest.raises(StreamPruneError, match="unknown score source 'other'; choose one of .*, mine"):
        prune(ws, source="other", keep_fraction=0.5, scheduler="sync")
    m = prune(ws, source="mine", keep_fraction=0.5, scheduler="sync")
    want = expected_hardest(up, 0.5)
    assert m["counts"]["n_kept"] == len(want)
    assert pd.read_parquet(tmp_path / "ws" / "prune" / "du-mine-hard-0.5" / "keys.parquet").row.tolist() == want.tolist()


def test_low_is_hard_scores_keep_their_lowest_rows(tmp_path):
    """AUM is low for hard rows: keep-hardest keeps its lowest values; higher_is_harder overrides the
    score's own direction."""
    ws, _, up = build(str(tmp_path))
    w = Workspace(ws)
    shutil.copytree(os.path.join(ws, "extrapolated", "du-knn.zarr"), os.path.join(ws, "extrapolated", "aum-knn.zarr"))
    w.begin("extrapolate", {"test": 1}, {}, key="extrapolate-aum-knn").commit(
        {"score": "extrapolated/aum-knn.zarr"}, {"n": 120})
    prune(ws, score="aum", keep_fraction=0.25, scheduler="sync")
    kept = pd.read_parquet(tmp_path / "ws" / "prune" / "aum-knn-hard-0.25" / "keys.parquet").row.to_numpy()
    lowest = np.flatnonzero(sel.keep_hardest(-up["score"], len(kept)))
    assert len(kept) == 30 and np.array_equal(np.sort(kept), lowest)
    assert up["score"][kept].max() < np.median(up["score"])
    m2 = prune(ws, score="aum", keep_fraction=0.25, name="aum-high", higher_is_harder=True, scheduler="sync")
    kept_high = pd.read_parquet(tmp_path / "ws" / "prune" / "aum-high" / "keys.parquet").row.to_numpy()
    assert m2["counts"]["n_kept"] == 30 and np.array_equal(np.sort(kept_high), expected_hardest(up, 0.25))


# behaviour pinned by deliberate breaks of the selection and reshard code ----------------------------------
def _uneven_workspace(root) -> tuple[str, list[str], dict]:
    """Three shards of 10, 5 and 7 samples; every row of the middle one is easy (keeps nothing)."""
    d = os.path.join(root, "data")
    os.makedirs(d)
    shards = []
    for name, n, start in (("a", 10, 0), ("b", 5, 10), ("c", 7, 15)):
        shards.append(os.path.join(d, f"{name}.tar"))
        write_tar(shards[-1], make_samples(n, start=start))
    ws = os.path.join(root, "ws")
    catalog(shards, ws, scheduler="sync")
    score = np.random.default_rng(3).random(22).astype(np.float32) + 1
    score[10:15] = 0
    up = fake_upstream(Workspace(ws), 22, scores=score, invalid=(1,), nan=(2, 16))
    return ws, shards, up


def test_stats_count_rows_classes_and_shards(tmp_path):
    ws, shards, up = _uneven_workspace(str(tmp_path))
    m = prune(ws, keep_fraction=0.5, name="p")
    stats = json.loads(open(os.path.join(ws, "prune", "p", "stats.json")).read())
    assert open(os.path.join(ws, "prune", "p", "shards.txt")).read().split() == [shards[0], shards[2]]
    assert stats["n_rows"] == 22 and stats["n_invalid"] == 1 and stats["n_no_score"] == 2
    assert stats["n_eligible"] == 19 and stats["n_kept"] == m["counts"]["n_kept"] == 10
    assert stats["kept_fraction_of_all_rows"] == pytest.approx(10 / 22)
    assert m["counts"]["n_shards"] == stats["n_shards_kept"] == 2 and stats["n_shards_dropped"] == 1
    kept = pd.read_parquet(os.path.join(ws, "prune", "p", "keys.parquet")).row.to_numpy()
    assert stats["per_shard"]["total"] == [10, 7]  # aligned with shards.txt: the dropped shard's 5 left out
    assert stats["per_shard"]["kept"] == [int((kept < 10).sum()), int((kept >= 15).sum())]
    eligible = np.ones(22, bool)
    eligible[[1, 2, 16]] = False
    assert stats["per_class"] == {str(c): {"eligible": int((eligible & (up["labels"] == c)).sum()),
                                           "kept": int((up["labels"][kept] == c).sum())} for c in range(4)}


def test_keys_stay_in_row_order_past_the_read_ahead(tmp_path):
    # More shards than the keys writer reads ahead: keys.parquet and shards.txt stay in catalog order.
    ws, shards, _ = build(str(tmp_path), n_shards=11, per_shard=2)
    prune(ws, keep_fraction=1.0, name="all")
    table = pd.read_parquet(os.path.join(ws, "prune", "all", "keys.parquet"))
    assert table.row.tolist() == list(range(22)) and table.key.tolist() == keys_of(range(22))
    assert table.shard.tolist() == [r // 2 for r in range(22)]
    assert open(os.path.join(ws, "prune", "all", "shards.txt")).read().split() == sorted(shards)


def test_pruned_view_of_shards_that_repeat_keys(tmp_path):
    # Two shards with the same keys in one row group of keys.parquet: a key kept in one shard only is
    # yielded from that shard only.
    d = tmp_path / "data"
    d.mkdir()
    shards = []
    for name in ("a", "b"):
        shards.append(str(d / f"{name}.tar"))
        write_tar(shards[-1], make_samples(6, seed=ord(name)))
    ws = str(tmp_path / "ws")
    catalog(shards, ws, scheduler="sync")
    score = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1], np.float32)
    fake_upstream(Workspace(ws), 12, scores=score)
    prune(ws, keep_fraction=0.5, name="p")
    got = sorted((s["__url__"], s["__key__"]) for s in pruned_dataset(ws, name="p"))
    assert got == sorted((shards[r // 6], f"s{r % 6:07d}") for r in np.flatnonzero(score))


def test_reshard_tars_end_with_the_end_of_archive_and_their_counted_bytes(tmp_path):
    ws, _, _ = build(str(tmp_path), 2, 10)
    out = str(tmp_path / "out")
    m = prune(ws, keep_fraction=0.5, reshard=out, max_count=3, scheduler="sync")["reshard"]
    urls = open(os.path.join(out, "shards.txt")).read().split()
    assert len(urls) == m["counts"]["n_shards"] == 4
    for u in urls:
        data = open(u, "rb").read()
        members = list(iter_tar(io.BytesIO(data), read_data=False))
        assert data.endswith(b"\0" * 1024) and members[-1].end == len(data) - 1024
    assert m["counts"]["bytes"] == sum(os.path.getsize(u) for u in urls)


def _rewrite_keeping_size_and_mtime(path: str, samples) -> None:
    """Rewrite a shard with other bytes of the same length and put back its modification time."""
    st = os.stat(path)
    write_tar(path, samples)
    assert os.path.getsize(path) == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("block", [None, 2048])  # a sample per buffer batch, or larger than the buffer
def test_reshard_checks_member_names_of_a_shard_changed_in_place(tmp_path, monkeypatch, block):
    # A key renamed in place (same length, same size and mtime): the shard's stat matches the catalog,
    # the member headers do not.
    ws, shards, _ = build(str(tmp_path), 2, 10)
    prune(ws, keep_fraction=1.0, name="p")
    samples = make_samples(10)
    samples[4] = ("s0000099", samples[4][1])
    _rewrite_keeping_size_and_mtime(sorted(shards)[0], samples)
    if block:
        monkeypatch.setattr(prune_module, "READ_BLOCK", block)
    with pytest.raises(StreamPruneError, match=r"member 's0000099\.\w+' where the catalog has key s0000004"):
        reshard(ws, "p", str(tmp_path / "out"), scheduler="sync")
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tar")]


def test_reshard_refuses_a_shard_whose_size_or_etag_alone_changed(tmp_path):
    ws, shards, _ = build(str(tmp_path), 2, 10)
    prune(ws, keep_fraction=1.0, name="p")
    first = sorted(shards)[0]
    original, catalogued = open(first, "rb").read(), os.stat(first)
    # Other payload bytes, same headers and size: only the etag (mtime) tells.
    samples = make_samples(10)
    samples[2] = (samples[2][0], {**samples[2][1], "cls": b"9"})
    write_tar(first, samples)
    assert os.path.getsize(first) == len(original) and open(first, "rb").read() != original
    with pytest.raises(StreamPruneError, match=r"changed since `streamprune catalog` \(size/etag"):
        reshard(ws, "p", str(tmp_path / "out"), scheduler="sync")
    # Other payload bytes and a block appended, the old mtime put back: only the size tells.
    with open(first, "ab") as f:
        f.write(b"\0" * 512)
    os.utime(first, ns=(catalogued.st_atime_ns, catalogued.st_mtime_ns))
    with pytest.raises(StreamPruneError, match=r"changed since `streamprune catalog` \(size/etag"):
        reshard(ws, "p", str(tmp_path / "out2"), scheduler="sync")


def _failing_after(monkeypatch, n_ok: int) -> None:
    """write_output_shard succeeds ``n_ok`` times, then fails (an interrupted reshard)."""
    real = prune_module.write_output_shard
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_ok:
            raise OSError("disk gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, "write_output_shard", flaky)


def test_a_failed_reshard_over_finished_outputs_hides_their_shard_list(tmp_path, monkeypatch):
    ws, _, _ = build(str(tmp_path), 4, 15)
    out = str(tmp_path / "out")
    prune(ws, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync")
    _failing_after(monkeypatch, 2)
    with pytest.raises(OSError, match="disk gone"):
        prune(ws, keep_fraction=0.3, reshard=out, max_count=5, scheduler="sync", force=True)
    # Two tars are the new set's now: the old list would name a mix of both sets.
    assert not os.path.exists(os.path.join(out, "shards.txt"))


def test_an_interrupted_reshard_resumed_after_another_set_replaced_out(tmp_path, monkeypatch):
    # The interrupted run's chunk records describe tars the other set replaced with tars of the same
    # sizes (same sample count, same padded sizes): they are written again, not trusted.
    ws, shards, _ = build(str(tmp_path), 4, 15)
    ws2 = str(tmp_path / "ws2")
    catalog(shards, ws2, scheduler="sync")
    fake_upstream(Workspace(ws2), 60, seed=7)
    prune(ws, keep_fraction=0.5)
    out = str(tmp_path / "out")
    with monkeypatch.context() as mp:
        _failing_after(mp, 3)
        with pytest.raises(OSError, match="disk gone"):
            reshard(ws, NAME, out, max_count=5, scheduler="sync")
    prune(ws2, keep_fraction=0.5, reshard=out, max_count=5, scheduler="sync", force=True)
    other = tars_in(out)
    reshard(ws, NAME, out, max_count=5, scheduler="sync", force=True)
    got = tars_in(out)
    ref = str(tmp_path / "ref")
    reshard(ws, NAME, ref, max_count=5, scheduler="sync", force=True)
    want = tars_in(ref)
    assert sorted(other) == sorted(want) and other != want
    assert [len(other[k]) for k in sorted(other)[:3]] == [len(want[k]) for k in sorted(want)[:3]]
    assert got == want


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsynced descriptor through /proc")
def test_durable_reshard_syncs_each_tar_before_its_rename_and_out_before_its_shard_list(tmp_path, monkeypatch):
    ws, _, _ = build(str(tmp_path), 2, 10)
    prune(ws, keep_fraction=0.5, name="p")
    out = str(tmp_path / "out")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    m = reshard(ws, "p", out, max_count=3, scheduler="sync", durable=True)
    tars = [os.path.basename(u) for u in open(os.path.join(out, "shards.txt")).read().split()]
    assert len(tars) == m["counts"]["n_shards"] == 4
    for t in tars:
        [(i, tmp)] = [(i, e[1]) for i, e in enumerate(events) if e[0] == "replace" and e[2] == t]
        assert ("fsync", tmp) in events[:i]
    [listed] = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == "shards.txt"]
    assert ("fsync", "out") in events[:listed]


def test_chunk_records_of_a_resumed_reshard_describe_their_own_tars(tmp_path, monkeypatch):
    # A later resume trusts a record for the tar of the same number (after checking its size only).
    ws, _, _ = build(str(tmp_path), 4, 15)
    prune(ws, keep_fraction=0.5, name="p")
    out = str(tmp_path / "out")
    for _ in range(2):  # interrupted twice: the second run writes shards 2 and 3 only
        with monkeypatch.context() as mp:
            _failing_after(mp, 2)
            with pytest.raises(OSError, match="disk gone"):
                reshard(ws, "p", out, max_count=5, scheduler="sync")
    stage = os.path.join(ws, "_stages", "reshard-p")
    [run_dir] = os.listdir(stage)  # the records of this configuration's runs
    chunks = os.path.join(stage, run_dir, "chunks")
    records = {f: json.load(open(os.path.join(chunks, f))) for f in os.listdir(chunks)}
    assert sorted(records) == [f"{i}.json" for i in range(4)]
    for f, info in records.items():
        assert info["url"] == prune_module.output_url(out, int(f.split(".")[0]))
        assert info["bytes"] == os.path.getsize(info["url"])


def test_fast_header_check_refuses_what_it_cannot_vouch_for():
    """headers_ok is True only where check_members would pass: a member running past its sample's end (the
    buffer may hold the next run of samples from elsewhere in the shard there), a symlink member, or '..'
    after the key's prefix make it False, and the complete check refuses each."""
    inner = _raw_tar([("k2.bin", b"x" * 100)])  # a valid tar header inside the first sample's payload
    block = _raw_tar([("k1.bin", inner)])
    starts, keys = np.array([0, 512], np.int64), np.array(["k1", "k2"], object)
    assert not headers_ok(np.frombuffer(block, np.uint8), starts, keys)
    with pytest.raises(StreamPruneError, match="member boundary"):  # the first sample alone, as a run of its own
        check_members(_bytes_members(block[:512], 0), 0, 512, starts[:1], np.array([512]), keys[:1], "s.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("k1.cls"), io.BytesIO(b""))
        link = tarfile.TarInfo("k1.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    symlink = buf.getvalue()[:1024]
    escape = _raw_tar([("k1.x/../../evil", b"x")])
    for data in (symlink, escape):
        assert not headers_ok(np.frombuffer(data, np.uint8), np.array([0]), np.array(["k1"], object))
        with pytest.raises(StreamPruneError):
            _check(data, "k1")


def test_reshard_through_a_copy_buffer_that_fills_within_a_source_shard(tmp_path, monkeypatch):
    # Three samples per buffer, output shards of about ten: the buffer is written out and refilled
    # several times per source shard, with gaps between the kept runs it holds.
    ws, _, _ = build(str(tmp_path), 4, 15)
    prune(ws, keep_fraction=0.7, reshard=str(tmp_path / "a"), shard_size=60_000, scheduler="sync")
    ref = tars_in(str(tmp_path / "a"))
    monkeypatch.setattr(prune_module, "READ_BLOCK", 20_000)
    reshard(ws, "du-knn-hard-0.7", str(tmp_path / "b"), shard_size=60_000, scheduler="sync", force=True)
    assert tars_in(str(tmp_path / "b")) == ref and len(ref) >= 2


def test_a_refused_report_leaves_no_empty_folder(tmp_path):
    """`streamprune report` before any score is refused in one line, and leaves no empty WS/report behind."""
    from streamprune.report import report

    ws = Workspace(str(tmp_path / "ws"))
    ws.begin("catalog", {}, {}).commit({}, {"n_samples": 0})
    with pytest.raises(StreamPruneError, match="no du scores"):
        report(ws)
    assert not os.path.exists(ws.path("report"))
