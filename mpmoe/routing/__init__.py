"""MoPE routing math in PyTorch (no megatron import; CPU and CUDA; no host sync on a device;
OTEP's few-token CPU loop works on host memory through NumPy).

* :func:`otep_select` / :func:`otep_select_indices` - greedy OTEP expert selection
  (:class:`OtepCache`: its decode-time memo, one per Sigma).
* :class:`CooccurrenceStats` - device-resident co-occurrence counters and Sigma.
* :mod:`mpmoe.routing.masks` - static expert knock-out and dynamic k -> k-1 masks.
* :mod:`mpmoe.routing.balancing` - ReMoE's ReLU gates and adaptive L1, and the
  aux-loss-free expert-bias rule (docs/routing.md).
"""

from mpmoe.routing.cooccurrence import CooccurrenceStats, covariance_from_counts
from mpmoe.routing.masks import (
    DYNAMIC_MASK_MODES,
    apply_static_mask,
    dynamic_drop_one,
    normalized_cooccurrence,
    parse_expert_mask,
)
from mpmoe.routing.otep import DEFAULT_EPS, OtepCache, otep_select, otep_select_indices

__all__ = [
    "DEFAULT_EPS",
    "DYNAMIC_MASK_MODES",
    "CooccurrenceStats",
    "OtepCache",
    "apply_static_mask",
    "covariance_from_counts",
    "dynamic_drop_one",
    "normalized_cooccurrence",
    "otep_select",
    "otep_select_indices",
    "parse_expert_mask",
]
