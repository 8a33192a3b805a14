"""Benchmark: the index stage over an ``s3://`` workspace, with and without the local copy of the
embeddings that the exact re-rank reads.

The re-rank of each search chunk gathers candidate vectors from all over the rows.  Read from
object storage, every search chunk fetched the whole of embeddings.zarr again (and so did each
nprobe tried by the tuning); the stage now copies it once to this host's disk
(:func:`streamprune.index.local_embeddings`).  On N rows of 128-d clustered vectors in a real S3
server (SeaweedFS on this machine, ``weed`` from the test extra, behind a counting proxy) this
reports, for both ways, the stage's wall time, its search and tuning times, and the GET requests
and bytes it sent for chunks of ``embeddings.zarr/emb``::

    python scripts/bench_index_s3.py --n 200000 --out index_s3.json

"Remote" is the earlier behaviour, measured by turning the copy off in this process (the stage
runs on the ``threads`` scheduler here).  The S3 server is local, so its reads are fast; against a
remote endpoint the reads weigh more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the S3 server and the counting proxy of the test suite
os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")


def write_embeddings(ws, n: int, d: int, chunk: int, seed: int) -> int:
    """Clustered vectors (Gaussian blobs on random 16-d patches) into ``ws``'s embeddings.zarr.

    Returns the bytes of one of its chunks."""
    import zarr

    from streamprune import storage

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, d)).astype(np.float32) * 3
    bases = (rng.standard_normal((1000, 16, d)) / 4).astype(np.float32)
    group = zarr.open_group(storage.zarr_store(ws.path("embeddings.zarr"), ws.storage_options), mode="w")
    emb = group.create_array("emb", shape=(n, d), chunks=(chunk, d), dtype="float32", compressors=None)
    group.create_array("valid", data=np.ones(n, bool), chunks=(chunk,))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = rng.integers(0, 1000, m)
        z = rng.standard_normal((m, 16)).astype(np.float32)
        emb[s:s + m] = centers[c] + np.einsum("ni,nid->nd", z, bases[c]) + 0.1 * rng.standard_normal((m, d))
    ws.begin("embed", {"bench": n}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    return chunk * d * 4


def one_run(ws, proxy, copy: bool, args) -> dict:
    import streamprune.index as index

    saved = index.local_embeddings
    if not copy:
        index.local_embeddings = lambda ws, emb, marker: emb  # the earlier behaviour: read the workspace's array
    from streamprune import storage

    storage.remove(ws.path("_stages", "index-all.json"), ws.storage_options)  # build it again
    del proxy.seen[:]
    t0 = time.perf_counter()
    try:
        marker = index.build_index(ws, graph="all", k=args.k, scheduler="threads")["all"]
    finally:
        index.local_embeddings = saved
    wall = time.perf_counter() - t0
    gets = sum(1 for method, path in proxy.seen if method == "GET" and "/embeddings.zarr/emb/c/" in path)
    t = marker["timings"]
    return {"wall_s": round(wall, 1), "search_s": t.get("search_s"), "tune_s": t.get("tune_total_s"),
            "local_copy_s": t.get("local_copy_s"), "emb_chunk_gets": gets,
            "factory": marker["counts"]["factory"], "recall_at_k": marker["counts"]["recall_at_k"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=4096, help="rows per zarr chunk of the embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from faultproxy import FaultProxy
    from s3server import SeaweedS3

    from streamprune.workspace import Workspace

    results: dict = {"n": args.n, "d": args.d, "k": args.k}
    with tempfile.TemporaryDirectory(prefix="bench-index-s3-") as tmp:
        os.environ["STREAMPRUNE_CACHE"] = os.path.join(tmp, "cache")
        with SeaweedS3(os.path.join(tmp, "s3")) as s3, FaultProxy(s3.endpoint_url) as proxy:
            s3.make_bucket("bench")
            ws = Workspace("s3://bench/ws", proxy.storage_options(s3.storage_options))
            chunk_bytes = write_embeddings(ws, args.n, args.d, args.chunk, args.seed)
            n_chunks = -(-args.n // args.chunk)
            results["emb_bytes"] = args.n * args.d * 4
            for label, copy in (("remote", False), ("local copy", True)):
                r = one_run(ws, proxy, copy, args)
                r["emb_bytes_read"] = r["emb_chunk_gets"] * chunk_bytes
                r["reads_over_emb"] = round(r["emb_chunk_gets"] / n_chunks, 2)
                results[label] = r
                print(f"{label:>10}: {json.dumps(r)}", flush=True)
    a, b = results["remote"], results["local copy"]
    results["ratios"] = {"wall": round(b["wall_s"] / a["wall_s"], 3),
                         "search": round(b["search_s"] / a["search_s"], 3) if a["search_s"] else None,
                         "bytes": round(b["emb_bytes_read"] / a["emb_bytes_read"], 4)}
    print(json.dumps(results["ratios"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
