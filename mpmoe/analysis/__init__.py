"""Routing and expert analysis: numbers and plots from statistics dumps and checkpoints.

* :mod:`mpmoe.analysis.metrics` - the math (numpy; POT for optimal transport).
* :mod:`mpmoe.analysis.stats` - ``layer{L}_seg{S}_{moe|mope|remoe}.npz`` windows -> plots + summary.
* :mod:`mpmoe.analysis.checkpoint` - expert embeddings and ablations from a checkpoint.
* :mod:`mpmoe.analysis.cli` - ``mpmoe analyze stats|checkpoint``.

Importing this package imports neither matplotlib nor megatron-core.
"""

from mpmoe.analysis.metrics import (
    coactivation_concentration,
    cosine_similarity_matrix,
    covariance_to_correlation,
    effective_num_experts,
    linear_cka,
    load_imbalance,
    matrix_cka,
    matrix_cka_baseline,
    mean_offdiagonal,
    ot_distance,
    ot_distance_matrix,
    pmi_cooccurrence,
    row_normalized_cooccurrence,
    top_pairs,
)

__all__ = [
    "coactivation_concentration",
    "cosine_similarity_matrix",
    "covariance_to_correlation",
    "effective_num_experts",
    "linear_cka",
    "load_imbalance",
    "matrix_cka",
    "matrix_cka_baseline",
    "mean_offdiagonal",
    "ot_distance",
    "ot_distance_matrix",
    "pmi_cooccurrence",
    "row_normalized_cooccurrence",
    "top_pairs",
]
