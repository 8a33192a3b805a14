"""Pseudo-labels for unsupervised scoring: k-means (faiss) on feature vectors."""

from __future__ import annotations

import numpy as np

from streamprune.errors import StreamPruneError


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows of ``x`` into ``k`` groups: (labels (n,) int64, centroids (k, d) float32)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise StreamPruneError(f"pseudo-labels: need at least k={k} vectors, got {len(x)}")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed) % (2**31), verbose=False,
                      max_points_per_centroid=max(256, len(x) // k + 1))
    km.train(x)
    return assign(x, km.centroids), np.asarray(km.centroids, np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of every row (squared L2)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)
