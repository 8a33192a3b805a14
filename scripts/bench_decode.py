"""Benchmark: the product's read + decode path against bare PNG decoding, on the same cores.

Embedding every row and building the training cache are decode-bound on a GPU box, so the rate at
which the product turns catalogued tar rows into arrays bounds both stages.  In one run on one
machine this reports rows/s and the ratio to bare decoding (each process decodes in-memory PNG
bytes, nothing else) for:

* ``in-process``: :func:`streamprune.decode.decode_rows` in this process, all rows of a shard range
  (embed's access pattern) and the subset's rows (the training cache's), against one bare process;
* ``tasks``: embed's reader tasks (:func:`streamprune.decode_tasks.decode_range`, results shipped to
  this process and dropped, 2 in flight per worker as embed submits them) and the training cache's
  tasks (:func:`streamprune.decode_tasks.cache_rows`, written to zarr) on a LocalCluster with one
  worker per core, against bare decoding on as many processes.

    python scripts/bench_decode.py --n 100000 --workdir /tmp/bench-decode --out decode.json

Shards are synthetic 32-px RGB PNGs, those of ``bench_gpu_e2e.py`` (same generator and seed): a
``--workdir`` of that benchmark re-uses its shards (``scripts/gpu_session.sh`` runs this one after
N=100000 that way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")


def in_process(ws, rows: np.ndarray, reps: int) -> float:
    """Best rows/s of decode_rows over ``rows`` in this process (warm catalog, page cache)."""
    from streamprune.decode import DecodeConfig, decode_rows
    from streamprune.shards import Catalog, ErrorPolicy

    cat = Catalog(ws)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        decode_rows(cat, rows, DecodeConfig(), ErrorPolicy("fail"), None)
        best = min(best, time.perf_counter() - t0)
    return len(rows) / best


def _timed(fn, *args) -> dict:
    """Run a task; its result (shipped back whole, as embed's decoded chunks are) gains ``timing``: rows,
    wall seconds, CPU seconds of the worker process (all threads) and of the task's own thread."""
    t0, c0, th0 = time.perf_counter(), time.process_time(), time.thread_time()
    out = fn(*args)
    out["timing"] = {"n": int(len(out["valid"])) if "valid" in out else int(out["n"]),
                     "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                     "thread_cpu": time.thread_time() - th0}
    return out


def _task_figures(results: list[dict], wall: float, workers: int) -> dict:
    rows = sum(r["n"] for r in results)
    busy = sum(r["wall"] for r in results)
    return {"per_s": rows / wall, "task_wall_us_per_row": busy / rows * 1e6,
            "task_cpu_us_per_row": sum(r["cpu"] for r in results) / rows * 1e6,
            "task_thread_cpu_us_per_row": sum(r["thread_cpu"] for r in results) / rows * 1e6,
            "workers_busy": busy / (wall * workers)}


def embed_reader_tasks(ws, n: int, chunk: int, workers: int) -> dict:
    """decode_range tasks over all rows, each decoded chunk shipped here and dropped."""
    from streamprune.compute import map_tasks
    from streamprune.decode import DecodeConfig
    from streamprune.decode_tasks import decode_range

    spec = {"on_error": "fail", "decode": DecodeConfig().to_dict(), "input_shape": (3, 32, 32)}
    timings: list[dict] = []
    args = [(decode_range, ws, r0, min(n, r0 + chunk), spec) for r0 in range(0, n, chunk)]
    t0 = time.perf_counter()
    map_tasks(_timed, args, scheduler="local", on_result=lambda i, r: timings.append(r["timing"]) or r.clear(),
              inflight_per_worker=2)
    return _task_figures(timings, time.perf_counter() - t0, workers)


def cache_tasks(ws, rows: np.ndarray, chunk: int, workers: int) -> dict:
    """The training cache's decode tasks over ``rows`` (written to <ws>/bench/cache.zarr)."""
    import zarr

    from streamprune import storage
    from streamprune.compute import map_tasks
    from streamprune.decode import DecodeConfig
    from streamprune.decode_tasks import cache_rows

    m = len(rows)
    g = zarr.open_group(storage.zarr_store(ws.path("bench", "cache.zarr")), mode="w")
    g.create_array("x", shape=(m, 3, 32, 32), chunks=(chunk, 3, 32, 32), dtype="uint8", compressors=None)
    g.create_array("labels", shape=(m,), chunks=(chunk,), dtype="int64", fill_value=-1)
    g.create_array("valid", shape=(m,), chunks=(chunk,), dtype="bool", fill_value=False)
    args = [(cache_rows, ws, "bench", rows[s:s + chunk], s, DecodeConfig().to_dict(), "fail", (3, 32, 32), None)
            for s in range(0, m, chunk)]
    t0 = time.perf_counter()
    out = map_tasks(_timed, args, scheduler="local")
    return _task_figures([r["timing"] for r in out], time.perf_counter() - t0, workers)


def main() -> None:
    import bench_gpu_e2e as e2e

    from streamprune.compute import client_for, shared_local_cluster
    from streamprune.shards import catalog
    from streamprune.subset import subset, subset_rows
    from streamprune.workspace import Workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes and dask workers")
    ap.add_argument("--bare-per-proc", type=int, default=20_000, help="PNGs each bare process decodes")
    ap.add_argument("--chunk", type=int, default=4096, help="rows per embed reader task")
    ap.add_argument("--cache-chunk", type=int, default=2048, help="rows per training-cache task")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench-decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    paths, _ = e2e.write_shards(os.path.join(args.workdir, "shards"), args.n, None, 0, args.workers)
    ws = Workspace(os.path.join(args.workdir, "ws-decode"))
    catalog(paths, ws, scheduler="threads")
    subset(ws, fraction=0.2, seed=0)
    rows = subset_rows(ws)

    bare1 = e2e.bare_decode(paths, 1, args.bare_per_proc)["decode_per_s"]
    bare = e2e.bare_decode(paths, args.workers, args.bare_per_proc)["decode_per_s"]
    first = min(args.n, 8192)
    res = {"n": args.n, "workers": args.workers, "bare_1proc_per_s": bare1, "bare_all_per_s": bare,
           "in_process_contiguous_per_s": in_process(ws, np.arange(first), args.reps),
           "in_process_subset_per_s": in_process(ws, rows[:min(len(rows), 4096)], args.reps)}
    os.environ["OMP_NUM_THREADS"] = "1"
    with shared_local_cluster():
        with client_for("local"):
            pass  # start the shared workers before timing
        res["embed_reader_tasks"] = embed_reader_tasks(ws, args.n, args.chunk, args.workers)
        res["cache_tasks"] = cache_tasks(ws, rows, args.cache_chunk, args.workers)
    res["tasks_embed_reader_per_s"] = res["embed_reader_tasks"]["per_s"]
    res["tasks_cache_per_s"] = res["cache_tasks"]["per_s"]

    print(f"{'path':<34}{'rows/s':>12}{'bare rows/s':>14}{'ratio':>8}")
    for label, key, ref in (("in-process, contiguous rows", "in_process_contiguous_per_s", bare1),
                            ("in-process, subset rows", "in_process_subset_per_s", bare1),
                            (f"embed reader tasks, {args.workers} workers", "tasks_embed_reader_per_s", bare),
                            (f"cache tasks, {args.workers} workers", "tasks_cache_per_s", bare)):
        res[key.replace("_per_s", "_ratio")] = res[key] / ref
        print(f"{label:<34}{res[key]:>12,.0f}{ref:>14,.0f}{res[key] / ref:>8.2f}")
    print(f"bare decode: {1e6 / bare1:.0f} us per image in one process, {args.workers * 1e6 / bare:.0f} on each of "
          f"{args.workers}; in-process decode_rows: {1e6 / res['in_process_contiguous_per_s']:.0f} us per row")
    for key in ("embed_reader_tasks", "cache_tasks"):
        t = res[key]
        print(f"{key}: in the task {t['task_wall_us_per_row']:.0f} us per row wall, {t['task_cpu_us_per_row']:.0f} "
              f"CPU of the worker process (all threads), {t['task_thread_cpu_us_per_row']:.0f} of the task's "
              f"thread; workers busy {t['workers_busy']:.0%} of the stage")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
