"""Compressing expert weights as low rank + row-sparse residual (the "compress" of MC-SMoE).

Each expert weight ``W [out, in]`` becomes ``L R + S`` (LoSparse): ``L [out, r]`` and
``R [r, in]`` from the rank-``r`` truncated SVD (``L = U sqrt(s)``, ``R = sqrt(s) V^T``) and
the residual ``S = W - L R`` of which only some ROWS are kept. Which rows: PLATON
sensitivity ``|S * dLoss/dS|``, an exponential moving average over calibration steps
(``beta1`` 0.85; the uncertainty term off, as the reference's ``beta2 = 1``), averaged over
each row; the kept fraction follows the cubic schedule of :func:`cubic_keep_ratio`, and rows
that fall out are zeroed (so they stay out). The default drive is training-free: gradients
of the calibration loss, no optimizer step.

:class:`LowRankSparseLinear` stores the result for real: ``L``, ``R``, the kept rows of
``S`` and their indices, ``r (out + in) + kept * in`` parameters instead of ``out * in``.

Differences from the reference (``mcsmoe/pruning/losparse.py``): the kept fraction applies
per matrix (the reference ranks rows of all matrices against one threshold), so that every
expert weight has the same, predictable size; the moving average includes the current
step's sensitivity (the reference's lags one step behind).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = ["parse_compression", "low_rank_init", "cubic_keep_ratio", "kept_row_count", "PlatonRowPruner",
           "LowRankSparseLinear", "factorised_param_count"]


def low_rank_init(weight: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L [out, r], R [r, in], S = W - L R)`` from the truncated SVD (computed in float64)."""
    out_dim, in_dim = weight.shape
    if not 1 <= rank <= min(out_dim, in_dim):
        raise ValueError(f"rank must be in [1, {min(out_dim, in_dim)}] for a {out_dim}x{in_dim} "
                         f"weight, got {rank}")
    w = weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    residual = w - left @ right
    return left.to(weight.dtype), right.to(weight.dtype), residual.to(weight.dtype)


def cubic_keep_ratio(step: int, total_steps: int, final: float, *, initial_warmup: int = 1,
                     final_warmup: int = 4) -> float:
    """Kept fraction of the residual's rows after calibration step ``step`` (1-based).

    1.0 for the first ``initial_warmup`` steps, ``final`` for the last ``final_warmup``, and
    ``final + (1 - final) (1 - progress)^3`` in between (the reference's schedule with
    ``warmup_steps`` folded into the two warm-up lengths)."""
    if step <= initial_warmup:
        return 1.0
    if step > total_steps - final_warmup:
        return float(final)
    span = total_steps - initial_warmup - final_warmup
    progress = (step - initial_warmup) / span
    return float(final + (1.0 - final) * (1.0 - progress) ** 3)


def kept_row_count(rows: int, keep: float) -> int:
    """Rows of a residual kept at fraction ``keep`` (rounded up; 0 for keep 0)."""
    return min(rows, int(math.ceil(keep * rows - 1e-9)))


class PlatonRowPruner:
    """PLATON row selection for a set of residual matrices (name -> ``[rows, cols]``)."""

    def __init__(self, beta1: float = 0.85):
        self.beta1 = float(beta1)
        self.ema: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, name: str, residual: torch.Tensor, grad: torch.Tensor) -> None:
        """Fold one step's sensitivity ``|S * dL/dS|`` into the moving average."""
        ipt = (residual.double() * grad.double()).abs()
        if name not in self.ema:
            self.ema[name] = torch.zeros_like(ipt)
        self.ema[name].mul_(self.beta1).add_(ipt, alpha=1.0 - self.beta1)

    def row_scores(self, name: str) -> torch.Tensor:
        return self.ema[name].mean(dim=1)

    @torch.no_grad()
    def mask(self, name: str, residual: torch.Tensor, keep: float) -> torch.Tensor:
        """Zero the residual's least sensitive rows in place; returns the kept-row mask."""
        scores = self.row_scores(name)
        k = kept_row_count(scores.numel(), keep)
        order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[order[:k]] = True
        residual[~kept.to(residual.device)] = 0
        return kept


def factorised_param_count(out_dim: int, in_dim: int, rank: int, kept_rows: int) -> int:
    """``r (out + in) + kept * in``: the stored parameters of one factorised weight."""
    return rank * (out_dim + in_dim) + kept_rows * in_dim


class LowRankSparseLinear(torch.nn.Module):
    """``y = x R^T L^T + scatter_rows(x S_kept^T)``: a factorised ``[out, in]`` weight.

    Parameters ``left [out, r]``, ``right [r, in]``, ``sparse [kept, in]``; buffer ``rows``
    (long ``[kept]``, the output rows the sparse part adds to)."""

    def __init__(self, out_features: int, in_features: int, rank: int, kept_rows: int, *,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.out_features, self.in_features = out_features, in_features
        self.left = torch.nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.right = torch.nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.sparse = torch.nn.Parameter(torch.zeros(kept_rows, in_features, **kw))
        self.register_buffer("rows", torch.arange(kept_rows, device=device, dtype=torch.long))

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, residual: torch.Tensor,
                     kept: torch.Tensor) -> "LowRankSparseLinear":
        rows = kept.nonzero().flatten()
        m = cls(left.shape[0], right.shape[1], left.shape[1], len(rows), device=left.device,
                dtype=left.dtype)
        with torch.no_grad():
            m.left.copy_(left)
            m.right.copy_(right)
            m.sparse.copy_(residual[rows.to(residual.device)])
            m.rows.copy_(rows)
        return m

    def dense_weight(self) -> torch.Tensor:
        w = self.left @ self.right
        return w.index_add(0, self.rows, self.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.right.t()) @ self.left.t()
        if self.sparse.shape[0]:
            y = y.index_add(-1, self.rows, x @ self.sparse.t())
        return y

    def extra_repr(self) -> str:
        return (f"out={self.out_features}, in={self.in_features}, rank={self.left.shape[1]}, "
                f"kept_rows={self.sparse.shape[0]}")


def parse_compression(value) -> Optional[tuple]:
    """``"RANK:KEEP"`` -> ``(rank, keep)``; None/"" -> None; one-line ValueError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        rank, keep = value
    else:
        rank, sep, keep = str(value).partition(":")
        if not sep:
            raise ValueError(f"moe_expert_compression: expected RANK:KEEP, got {value!r}")
    try:
        rank, keep = int(rank), float(keep)
    except ValueError:
        raise ValueError(f"moe_expert_compression: expected RANK:KEEP, got {value!r}") from None
    if rank < 1 or not 0.0 <= keep <= 1.0:
        raise ValueError(f"moe_expert_compression: rank >= 1 and keep in [0, 1], got {value!r}")
    return rank, keep
