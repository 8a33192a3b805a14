"""Score extrapolation: predict every row's score from the seed rows' measured scores.

One method per module behind one interface (see ``common``): ``extrapolate(ws, score, method)``
dispatches to the function a method registered with ``register_method``.  Outputs are
``extrapolated/<score>-<method>.zarr`` with ``score`` (N,) float32 and ``source`` (N,) uint8.
"""

from streamprune.errors import Rule, finite, whole
from streamprune.extrapolate.common import (
    INVALID,
    SOURCES,
    check_method,
    extrapolate,
    methods,
    read_extrapolated,
    register_method,
)
from streamprune.extrapolate.kernel import choose_bandwidth, extrapolate_kernel, kernel_predict
from streamprune.extrapolate.knn import choose_k, extrapolate_knn, knn_predict, knn_weights
from streamprune.extrapolate.propagate import extrapolate_propagate, propagate_block, propagate_in_memory

# gcn (torch) and label-aware register themselves when `extrapolate` (or `check_method`) first imports them by name.
__all__ = ["INVALID", "Rule", "SOURCES", "check_method", "choose_bandwidth", "choose_k", "extrapolate", "extrapolate_kernel",
           "extrapolate_knn", "extrapolate_propagate", "kernel_predict", "knn_predict", "knn_weights", "methods",
           "propagate_block", "propagate_in_memory", "read_extrapolated", "register_method", "finite", "whole"]
