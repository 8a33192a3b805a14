"""Score extrapolation: predict every row's score from the seed rows' measured scores.

One method per module behind one interface (see ``common``): ``extrapolate(ws, score, method)``
dispatches to the function a method registered with ``register_method``.  Outputs are
``extrapolated/<score>-<method>.zarr`` with ``score`` (N,) float32 and ``source`` (N,) uint8.
"""

from streamprune.extrapolate.common import (
    INVALID,
    SOURCES,
    extrapolate,
    methods,
    read_extrapolated,
    register_method,
)
from streamprune.extrapolate.knn import choose_k, extrapolate_knn, knn_predict, knn_weights

__all__ = ["INVALID", "SOURCES", "choose_k", "extrapolate", "extrapolate_knn", "knn_predict", "knn_weights",
           "methods", "read_extrapolated", "register_method"]
