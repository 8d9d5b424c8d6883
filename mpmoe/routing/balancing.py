"""Load-balancing math of two routing methods beside top-k and MoPE (pure PyTorch).

**ReMoE** (Wang, Chen, Zhu et al., "ReMoE: Fully Differentiable Mixture-of-Experts with
ReLU Routing", ICLR 2025; reference code thu-ml/ReMoE, flag ``--moe-relu-routing``):

* gates ``g = ReLU(logits)``; a token goes to every expert whose gate is positive, so the
  number of experts per token varies (:func:`relu_gates`);
* an L1 penalty on the gates, weighted by each expert's share of the routed tokens (the
  switch-transformer load-balancing formula applied to the ReLU gates)::

      L1 = lambda * E / (k * N^2) * sum_e (sum_t g[t, e]) * n_e

  with N tokens, n_e tokens routed to expert e, E experts, k the nominal top-k
  (:func:`relu_l1_loss`);
* ``lambda`` adapts after every optimizer step from the step's measured sparsity
  ``s = 1 - (routed pairs) / (N * E)`` (mean over the MoE layers):
  ``lambda *= alpha`` when ``s < 1 - k / E`` (too dense), else ``lambda /= alpha``
  (:func:`relu_l1_coeff_update`; reference defaults lambda_0 = 1e-8, alpha = 1.2).

**Aux-loss-free balancing** (Wang et al. 2024, arXiv 2408.15664; megatron-core's
``get_updated_expert_bias``): a per-expert bias ``b`` is added to the routing scores for
the *selection only*; after each optimizer step ``b += u * sign(mean(n) - n)`` with the
tokens per expert ``n`` of the step summed over all ranks (:func:`expert_bias_update`).
:func:`biased_softmax_topk` is that selection for softmax scores (megatron-core has it for
sigmoid scores only).

No host synchronisation anywhere (no ``.item()``, no branch on tensor values).
"""

from __future__ import annotations

import torch

__all__ = [
    "EXPERT_BIAS_MODES",
    "biased_softmax_topk",
    "expert_bias_scale",
    "expert_bias_update",
    "relu_gates",
    "relu_l1_coeff_update",
    "relu_l1_loss",
    "relu_sparsity",
    "target_sparsity",
]


def relu_gates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gates, routing_map)``: ``ReLU(logits)`` [T, E] and ``gates > 0`` (bool)."""
    gates = torch.relu(logits)
    return gates, gates > 0


def relu_l1_loss(gates: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int,
                 num_tokens=None) -> torch.Tensor:
    """Load-balanced L1 of ReLU gates, coefficient 1: ``E/(k N^2) sum_e G_e n_e``.

    ``gates`` [T, E] (differentiable), ``tokens_per_expert`` [E] (counts, no gradient),
    ``num_tokens`` N (default ``T``; larger when the counts were summed over a sequence
    split). Multiply by the adaptive coefficient lambda.
    """
    n = gates.shape[0] if num_tokens is None else num_tokens
    n = torch.as_tensor(n, dtype=torch.float32, device=gates.device).clamp_min(1)
    num_experts = gates.shape[1]
    per_expert = gates.sum(dim=0, dtype=torch.float32)
    weights = tokens_per_expert.detach().to(torch.float32)
    return (per_expert * weights).sum() * num_experts / (topk * n * n)


def target_sparsity(topk: int, num_experts: int) -> float:
    """ReMoE's target fraction of zero gates, ``1 - k/E``."""
    return 1.0 - topk / num_experts


def relu_sparsity(routed_pairs: torch.Tensor, num_tokens: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of zero gates: ``1 - routed_pairs / (num_tokens * E)`` (0 tokens -> 1)."""
    denom = (num_tokens * num_experts).clamp_min(1)
    return 1.0 - routed_pairs / denom


def relu_l1_coeff_update(coeff: torch.Tensor, sparsity: torch.Tensor, target: float,
                         multiplier: float) -> torch.Tensor:
    """ReMoE's zeroth-order step: ``coeff * alpha`` if ``sparsity < target`` else ``coeff / alpha``."""
    return torch.where(sparsity < target, coeff * multiplier, coeff / multiplier)


def expert_bias_update(tokens_per_expert: torch.Tensor, bias: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free step: ``bias + rate * sign(mean(n) - n)`` over the last dim.

    ``tokens_per_expert`` must already be summed over every rank (megatron-core sums it over
    TP x CP x DP before the same formula).
    """
    n = tokens_per_expert.to(torch.float32)
    offset = n.mean(dim=-1, keepdim=True) - n
    return bias + torch.sign(offset) * rate


#: Where a softmax router adds the expert bias (``moe_router_expert_bias_mode``) -> the factor
#: on the bias. "prob": ``softmax(logits) + b`` (megatron's sigmoid rule applied to
#: probabilities); "logit": ``logits + b`` (MoPE: ``p = softmax(logits + b)``);
#: "prob-scaled": ``softmax(logits) + b * 4 / E``, i.e. the update rate scaled by the ratio of
#: the scores' slopes (softmax ~1/E per unit logit, sigmoid at most 1/4).
EXPERT_BIAS_MODES = ("prob", "logit", "prob-scaled")


def expert_bias_scale(mode: str, num_experts: int) -> float:
    """Factor on the stored bias that a selection of ``mode`` adds (see :data:`EXPERT_BIAS_MODES`)."""
    if mode not in EXPERT_BIAS_MODES:
        raise ValueError(f"expert bias mode must be one of {', '.join(EXPERT_BIAS_MODES)}, got {mode!r}")
    return 4.0 / num_experts if mode == "prob-scaled" else 1.0


def biased_softmax_topk(logits: torch.Tensor, bias: torch.Tensor, topk: int, *,
                        pre_softmax: bool = False, scaling_factor=None,
                        space: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing whose *selection* uses ``softmax(logits) + bias`` (``space``
    "prob") or ``logits + bias`` ("logit"; the order of ``softmax(logits + bias)``).

    The gate weights are megatron's for the chosen experts, unbiased: with
    ``pre_softmax`` the full softmax probabilities, otherwise the softmax over the k chosen
    logits; times ``scaling_factor`` when given. Returns ``(probs [T, E], routing_map [T, E])``
    with zeros / False outside the selection. Without bias (zeros) this is exactly top-k.
    """
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    with torch.no_grad():
        if space == "logit":
            chosen = torch.topk(logits + bias.to(logits.dtype), k=topk, dim=-1).indices
        else:
            # an expert whose logit is -inf (knocked out) has p = 0 but may carry a positive
            # bias: it stays unselectable
            selection = (scores + bias.to(scores.dtype)).masked_fill(torch.isneginf(logits), float("-inf"))
            chosen = torch.topk(selection, k=topk, dim=-1).indices
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)
    if pre_softmax:
        probs = scores * routing_map
    else:
        probs = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1, dtype=torch.float32)
    if scaling_factor:
        probs = probs * scaling_factor
    return probs.type_as(logits), routing_map
