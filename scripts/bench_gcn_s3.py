"""Benchmark: streamed GCN extrapolation over an ``s3://`` workspace, with and without this host's
local copies of the arrays its tasks gather neighbour rows of.

Each streamed task (and each batch of sampled training) gathers the rows of its neighbours, which
sit all over the dataset: read from object storage, every task fetched nearly every chunk of the
embeddings, labels and validity (layer 1) or of the previous layer's activations (later layers)
again, N²/chunk_rows over the stage.  The stage now reads them from copies on the local disk
(:func:`streamprune.index.local_embeddings`, :func:`streamprune.index.local_rows`).  On N rows of
clustered vectors with an exact k-NN graph, in a real S3 server (SeaweedFS on this machine, ``weed``
from the test extra, behind a counting proxy), this reports for both ways and at N and 2N the
stage's wall time and the GET requests and bytes it sent for array chunks::

    python scripts/bench_gcn_s3.py --n 20000 --out gcn_s3.json

"Remote" is the earlier behaviour, measured by turning the copies off in this process (the stage
runs on the ``threads`` scheduler here, with ``memory_limit=0`` so that every task streams).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the S3 server and the counting proxy of the test suite
os.environ.setdefault("STREAMPRUNE_PROGRESS", "0")

ARRAYS = ("embeddings.zarr/emb", "embeddings.zarr/labels", "embeddings.zarr/valid", "gcn/du/h1.zarr",
          "gcn/du/h2.zarr")


def write_workspace(ws, n: int, d: int, k: int, chunk: int, fraction: float, seed: int) -> dict:
    """Embeddings, labels and validity, an exact k-NN graph of all rows, a subset and its seed scores."""
    import faiss
    import zarr

    from streamprune import storage

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((200, d)).astype(np.float32) * 3
    c = rng.integers(0, 200, n)
    emb = (centers[c] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)
    labels = (c % 10).astype(np.int64)
    index = faiss.IndexFlatL2(d)
    index.add(emb)
    dist, nbrs = index.search(emb, k + 1)
    nbrs, dist = nbrs[:, 1:].astype(np.int64), np.sqrt(np.maximum(dist[:, 1:], 0)).astype(np.float32)

    def group(rel: str):
        return zarr.open_group(storage.zarr_store(ws.path(rel), ws.storage_options), mode="w")

    g = group("embeddings.zarr")
    g.create_array("emb", data=emb, chunks=(chunk, d), compressors=None)
    g.create_array("labels", data=labels, chunks=(chunk,))
    g.create_array("valid", data=np.ones(n, bool), chunks=(chunk,))
    ws.begin("embed", {"bench": n}, {}).commit({"embeddings": "embeddings.zarr"}, {"n": n})
    gg = group("graph/all.zarr")
    gg.create_array("neighbors", data=nbrs, chunks=(chunk, k))
    gg.create_array("distances", data=dist, chunks=(chunk, k))
    ws.begin("index", {"bench": n}, {}, key="index-all").commit({"graph": "graph/all.zarr"}, {"n": n})
    rows = np.sort(rng.choice(n, int(n * fraction), replace=False)).astype(np.int64)
    zarr.create_array(storage.zarr_store(ws.path("subset/rows.zarr"), ws.storage_options), data=rows,
                      chunks=(1 << 16,))
    ws.begin("subset", {"bench": n}, {}).commit({"rows": "subset/rows.zarr"}, {"n_subset": len(rows)})
    scores = (np.sin(emb[rows, 0]) + 0.5 * emb[rows, 1] ** 2).astype(np.float32)
    zarr.create_array(storage.zarr_store(ws.path("scores/du.zarr"), ws.storage_options), data=scores,
                      chunks=(1 << 16,))
    ws.begin("score", {"score": "du"}, {}, key="score-du").commit({"score": "scores/du.zarr"}, {"n": len(rows)})
    return {"emb_bytes": emb.nbytes}


def one_run(ws, proxy, copies: bool, args) -> dict:
    import streamprune.index as index
    from streamprune.extrapolate.gcn import extrapolate_gcn

    saved = index.local_embeddings, index.local_rows
    if not copies:  # the earlier behaviour: gather from the workspace's arrays
        index.local_embeddings = lambda ws, emb, marker: emb
        index.local_rows = lambda ws, arr, rel, version, group=None: arr
    from streamprune import storage

    storage.remove(ws.path("_stages", "extrapolate-du-gcn.json"), ws.storage_options)  # run it again, from scratch
    del proxy.seen[:]
    t0 = time.perf_counter()
    try:
        extrapolate_gcn(ws, "du", k=args.k, hidden=(64, 32), epochs=1, batch_size=256, fanout=(8, 4, 4),
                        chunk_rows=args.chunk_rows, memory_limit=0, prior="none", scheduler="threads")
    finally:
        index.local_embeddings, index.local_rows = saved
    wall = time.perf_counter() - t0
    gets: dict = {}
    for method, path in proxy.seen:
        m = re.search(r"/ws/(.+?)/c/", path)
        if method == "GET" and m and m.group(1) in ARRAYS:
            gets[m.group(1)] = gets.get(m.group(1), 0) + 1
    return {"wall_s": round(wall, 1), "chunk_gets": gets, "total_gets": sum(gets.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=2048, help="rows per zarr chunk of the workspace's arrays")
    ap.add_argument("--chunk-rows", type=int, default=2048, help="rows per GCN task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from faultproxy import FaultProxy
    from s3server import SeaweedS3

    from streamprune.workspace import Workspace

    results: dict = {"d": args.d, "k": args.k, "chunk_rows": args.chunk_rows, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gcn-s3-") as tmp:
        os.environ["STREAMPRUNE_CACHE"] = os.path.join(tmp, "cache")
        with SeaweedS3(os.path.join(tmp, "s3")) as s3, FaultProxy(s3.endpoint_url) as proxy:
            for i, n in enumerate((args.n, 2 * args.n)):
                s3.make_bucket(f"bench{i}")
                ws = Workspace(f"s3://bench{i}/ws", proxy.storage_options(s3.storage_options))
                info = write_workspace(ws, n, args.d, args.k, args.chunk, 0.1, args.seed)
                for label, copies in (("local copies", True), ("remote", False)):  # a warm server favours remote
                    r = one_run(ws, proxy, copies, args)
                    results["runs"][f"{n} {label}"] = {**r, **info}
                    print(f"N={n:>8} {label:>12}: {json.dumps(r)}", flush=True)
    runs = results["runs"]
    a, b = (args.n, 2 * args.n)
    results["growth_2n_over_n"] = {
        label: round(runs[f"{b} {label}"]["total_gets"] / runs[f"{a} {label}"]["total_gets"], 2)
        for label in ("remote", "local copies")}
    print(json.dumps(results["growth_2n_over_n"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
