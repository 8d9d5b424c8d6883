"""HEMoE's router output and balance loss (pure PyTorch), usable after any selection rule.

* :func:`unit_gates`: weight exactly 1 for every selected expert in the forward, with the
  straight-through gradient of the router probability ``p`` (``1 + p - p.detach()``), 0
  elsewhere (exactly 1: ``(p - p.detach()) + 1``). With all experts selected, an MoE layer of split experts then sums its experts'
  outputs: the dense FFN it was split from.
* :func:`size_weighted_balance_loss`: the Switch balance loss with each expert's term
  weighted by its share of the layer's FFN neurons, ``coeff * (E / k) * sum_e w_e f_e P_e``
  with ``w_e = E * size_e / sum(size)``, ``f_e`` the fraction of tokens routed to ``e``,
  ``P_e`` the mean router probability. Equal sizes give megatron's ``aux_loss`` exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["size_weighted_balance_loss", "unit_gates"]


def unit_gates(probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` gates: ``1 + p - p.detach()`` where routed, 0 elsewhere (``probs`` = full softmax)."""
    ones = (probs - probs.detach()) + 1.0  # exactly 1 in the forward (p - p is exactly 0)
    return torch.where(routing_map, ones, torch.zeros_like(probs))


def size_weighted_balance_loss(probs: torch.Tensor, routing_map: torch.Tensor, topk: int, coeff: float,
                               sizes: Optional[Sequence[int]] = None,
                               valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HEMoE's balance loss over the tokens of ``probs`` ``[T, E]`` (``valid`` ``[T]`` bool: tokens
    that count; default all). ``sizes=None``: equal sizes (megatron's ``aux_loss``)."""
    e = probs.shape[-1]
    p = probs.float()
    mask = routing_map.float()
    if valid is not None:
        keep = valid.reshape(-1, 1).float()
        p, mask = p * keep, mask * keep
        tokens = keep.sum().clamp_min(1.0)
    else:
        tokens = torch.tensor(float(p.shape[0]), device=p.device).clamp_min(1.0)
    if sizes is None:
        weight = torch.ones(e, device=p.device)
    else:
        size = torch.as_tensor([float(s) for s in sizes], device=p.device)
        weight = e * size / size.sum()
    f = mask.sum(0) / tokens
    mean_p = p.sum(0) / tokens
    return coeff * (e / topk) * torch.sum(weight * f * mean_p)
