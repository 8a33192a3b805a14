"""Benchmark resharding: throughput against a plain byte copy, and peak memory at N and 4N.

    .venv/bin/python scripts/bench_prune.py [--mb 200] [--sample-kb 100] [--keep 0.7] [--dir /tmp/bench_prune]

For each scale (N = --mb of samples, then 4N) the script writes shards of random-payload samples,
catalogs them, writes a synthetic extrapolated score array, selects the hardest --keep fraction
and then times

* ``copy``: ``shutil.copyfile`` of every input shard (the I/O floor: bytes/s of input copied), and
  the same with an fsync of every copy (reshard fsyncs each output tar before renaming it, so that
  a tar recorded as done survives a power loss);
* ``reshard_nofsync`` (diagnostic): the same reshard with fsync disabled, to compare like with like
  against the plain copy, which only measures page-cache speed at these sizes;
* ``reshard``: ``streamprune.prune.reshard`` of the kept samples (bytes/s of output written).

Both run on warm page cache, best of --repeat.  Peak RSS of a reshard is measured in a fresh
subprocess (ru_maxrss) per scale: it should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np


def make_shards(directory: str, total_mb: int, sample_kb: int, shard_mb: int, seed: int = 0) -> list[str]:
    """Shards of samples with a random .bin payload (sizes +-50 %) and a .cls label."""
    from streamprune.tario import write_tar

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths, i, written = [], 0, 0
    while written < total_mb << 20:
        samples, size = [], 0
        while size < shard_mb << 20 and written + size < total_mb << 20:
            n = int(sample_kb * 1024 * rng.uniform(0.5, 1.5))
            samples.append((f"k{i:09d}", {"bin": rng.bytes(n), "cls": str(i % 10).encode()}))
            size += n
            i += 1
        path = os.path.join(directory, f"shard-{len(paths):06d}.tar")
        write_tar(path, samples)
        paths.append(path)
        written += size
    return paths


def setup_workspace(root: str, total_mb: int, sample_kb: int, shard_mb: int, keep: float) -> tuple[str, str, list[str]]:
    """Shards, catalog, synthetic scores and the selection; returns (workspace, prune name, shards)."""
    import zarr

    from streamprune import storage
    from streamprune.prune import prune
    from streamprune.shards import catalog
    from streamprune.workspace import Workspace

    shards = make_shards(os.path.join(root, "data"), total_mb, sample_kb, shard_mb)
    ws = Workspace(os.path.join(root, "ws"))
    n = catalog(shards, ws, scheduler="threads")["counts"]["n_samples"]
    g = zarr.open_group(storage.zarr_store(ws.path("extrapolated", "du-knn.zarr")), mode="w")
    g.create_array("score", shape=(n,), dtype="float32", chunks=(1 << 16,))[:] = np.random.default_rng(1).random(n)
    g.create_array("source", shape=(n,), dtype="uint8", chunks=(1 << 16,))[:] = 1
    ws.begin("extrapolate", {"bench": 1}, {}, key="extrapolate-du-knn").commit({"score": "extrapolated/du-knn.zarr"},
                                                                                {"n": n})
    t0 = time.time()
    prune(ws, keep_fraction=keep, name="bench")
    print(f"  select + keys for {n} rows: {time.time() - t0:.2f}s", flush=True)
    return ws.url, "bench", shards


def copy_baseline(shards: list[str], out: str, fsync: bool = False) -> tuple[float, int]:
    """Seconds and bytes to copy the input shards with shutil.copyfile (then fsync each copy with ``fsync``)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.perf_counter()
    for s in shards:
        dst = os.path.join(out, os.path.basename(s))
        shutil.copyfile(s, dst)
        if fsync:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    dt = time.perf_counter() - t0
    return dt, sum(os.path.getsize(s) for s in shards)


def reshard_once(ws: str, name: str, out: str, shard_mb: int, scheduler: str, fsync: bool = True) -> tuple[float, int]:
    """Seconds and bytes written by one reshard (fresh output); ``fsync=False`` is a diagnostic only."""
    from streamprune.prune import reshard

    shutil.rmtree(out, ignore_errors=True)
    real = os.fsync
    if not fsync:
        os.fsync = lambda fd: None  # what the copy costs without waiting for the disk
    try:
        t0 = time.perf_counter()
        m = reshard(ws, name, out, shard_size=shard_mb << 20, scheduler=scheduler, force=True)
        return time.perf_counter() - t0, m["counts"]["bytes"]
    finally:
        os.fsync = real


def vm_hwm_kib() -> int:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_rss(ws: str, name: str, out: str, shard_mb: int, scheduler: str) -> dict:
    """Peak RSS of a reshard in a fresh interpreter, and the peak after imports alone."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"from bench_prune import reshard_once, vm_hwm_kib; "
            f"import streamprune.prune, streamprune.shards, dask.utils, zarr; "
            f"base = vm_hwm_kib(); "
            f"dt, nbytes = reshard_once({ws!r}, {name!r}, {out!r}, {shard_mb}, {scheduler!r}); "
            f"print(json.dumps({{'s': dt, 'bytes': nbytes, 'base_kib': base, 'peak_kib': vm_hwm_kib()}}))")
    env = {**os.environ, "STREAMPRUNE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="data size N in MiB (4N is measured too)")
    ap.add_argument("--sample-kb", type=int, default=100)
    ap.add_argument("--shard-mb", type=int, default=32, help="input and output shard size")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--dir", default="/tmp/bench_prune")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")

    results = {}
    for scale in (1, 4):
        mb = args.mb * scale
        root = os.path.join(args.dir, f"{mb}mb")
        shutil.rmtree(root, ignore_errors=True)
        print(f"scale {scale}N: {mb} MiB of ~{args.sample_kb} KiB samples", flush=True)
        ws, name, shards = setup_workspace(root, mb, args.sample_kb, args.shard_mb, args.keep)
        copies, synced, reshards, unsynced = [], [], [], []
        for r in range(args.repeat):
            dt, nb = copy_baseline(shards, os.path.join(root, "copy"))
            copies.append(nb / dt)
            dt, nb = copy_baseline(shards, os.path.join(root, "copy"), fsync=True)
            synced.append(nb / dt)
            out = os.path.join(root, f"out-{r}")  # a new output location: a new reshard run, not a skip
            dt, wb = reshard_once(ws, name, out, args.shard_mb, args.scheduler)
            reshards.append(wb / dt)
            shutil.rmtree(out, ignore_errors=True)
            out = os.path.join(root, f"out-nofsync-{r}")
            dt, wb = reshard_once(ws, name, out, args.shard_mb, args.scheduler, fsync=False)
            unsynced.append(wb / dt)
            shutil.rmtree(out, ignore_errors=True)
        rss = child_rss(ws, name, os.path.join(root, "out-rss"), args.shard_mb, args.scheduler)
        res = {"input_mb": round(nb / 2**20, 1), "output_mb": round(wb / 2**20, 1),
               "copy_mb_s": round(max(copies) / 2**20, 1), "copy_fsync_mb_s": round(max(synced) / 2**20, 1),
               "reshard_mb_s": round(max(reshards) / 2**20, 1),
               "reshard_nofsync_mb_s": round(max(unsynced) / 2**20, 1),
               "ratio": round(max(reshards) / max(copies), 3), "ratio_vs_fsync_copy": round(max(reshards) / max(synced), 3),
               "ratio_nofsync": round(max(unsynced) / max(copies), 3), "reshard_peak_rss_mib": round(rss["peak_kib"] / 1024, 1),
               "rss_after_imports_mib": round(rss["base_kib"] / 1024, 1)}
        results[f"{scale}N"] = res
        print("  " + json.dumps(res), flush=True)
        if not args.keep_files:
            shutil.rmtree(root, ignore_errors=True)
    growth = results["4N"]["reshard_peak_rss_mib"] / results["1N"]["reshard_peak_rss_mib"]
    print(json.dumps({"results": results, "rss_growth_4N_over_N": round(growth, 3),
                      "ratio_target": 0.5}, indent=1))


if __name__ == "__main__":
    main()
