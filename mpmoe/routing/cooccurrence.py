"""Expert co-occurrence counters and the covariance Sigma that MoPE routes with.

Every training forward of a MoPE layer adds its final routing map M (tokens x E,
bool) to three counters (spec, "Sigma: expert co-occurrence covariance"):

    N += tokens,    u += colsum(M)  (E,),    C += M^T M  (E, E)

and Sigma is rebuilt from the cumulative counts as the covariance of the routing
indicators:

    Sigma = C / N - u u^T / N^2,  symmetrised,  diag floored at eps

Before any token is counted Sigma is the identity (MoPE then equals top-k).

Two options beyond the reference code (both off by default, which is the reference):

* ``shrinkage`` lambda in [0, 1): Sigma <- (1 - lambda) Sigma + lambda tau I with
  tau = mean(diag Sigma), the Ledoit-Wolf target (a scaled identity). It bounds
  the pathology of an expert never routed so far: without it its variance is the
  floor eps and p_j^2 / Sigma_jj makes it nearly every token's first OTEP pick;
  with it Sigma_jj >= lambda tau, so it wins only when p_j > sqrt(lambda tau /
  Sigma_ii) p_i.
* ``decay_rate`` r in [0, 1): before each update the counts (totals and pending)
  are multiplied by (1 - r), an exponential forgetting of old routing (0 keeps the
  cumulative counts). The demo declares ``moe_sigma_decay_rate`` but never uses it.

Unlike the demo code, the counters stay on the device and nothing is synchronised
with the host: ``update`` only adds to local *pending* counters; ``all_reduce``
sums the pending counters over a process group (the ranks that see different
tokens) and folds them into the *totals*, which are therefore identical on every
rank and are what a checkpoint stores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["CooccurrenceStats", "covariance_from_counts", "sigma_summary"]


def covariance_from_counts(
    num_tokens: torch.Tensor,
    usage: torch.Tensor,
    cooccurrence: torch.Tensor,
    eps: float = 1e-12,
    shrinkage: float = 0.0,
) -> torch.Tensor:
    """Sigma = C/N - u u^T/N^2, symmetrised, shrunk toward ``tau I`` by ``shrinkage``
    (tau = mean of the diagonal), diag floored at ``eps``; identity if N == 0.

    Works on any device without a host synchronisation (the N == 0 case is a
    ``torch.where``, not a Python branch). Computed in the counters' dtype.
    """
    n = num_tokens.clamp_min(1)
    mean = usage / n
    sigma = cooccurrence / n - torch.outer(mean, mean)
    sigma = 0.5 * (sigma + sigma.transpose(0, 1))
    if shrinkage:
        tau = sigma.diagonal().mean()
        sigma = (1.0 - shrinkage) * sigma
        sigma.diagonal().add_(shrinkage * tau)
    diag = sigma.diagonal()
    diag.copy_(diag.clamp_min(eps))
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    return torch.where(num_tokens > 0, sigma, eye)


class CooccurrenceStats(torch.nn.Module):
    """Device-resident routing counters (N, u, C) and the Sigma built from them.

    Buffers (all in ``state_dict``):

    * ``num_tokens`` (float64, 0-dim), ``usage`` (float64 [E]), ``cooccurrence``
      (float64 [E, E]): cumulative totals over all ranks, as of the last
      :meth:`all_reduce`. float64 keeps integer counts exact far past 2^24 tokens.
    * ``covariance`` (float32 [E, E]): Sigma as of the last :meth:`refresh`
      (the identity until then); this is the matrix routing uses.

    Counts since the last :meth:`all_reduce` are kept in non-persistent pending
    buffers; call :meth:`all_reduce` (or :meth:`refresh`) before saving a checkpoint
    if they must not be lost.
    """

    def __init__(self, num_experts: int, *, eps: float = 1e-12, device=None,
                 shrinkage: float = 0.0, decay_rate: float = 0.0):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"CooccurrenceStats: num_experts must be a positive int, got {num_experts!r}")
        for name, value in (("shrinkage", shrinkage), ("decay_rate", decay_rate)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"CooccurrenceStats: {name} must be in [0, 1), got {value!r}")
        self.num_experts = num_experts
        self.eps = float(eps)
        self.shrinkage = float(shrinkage)
        self.decay_rate = float(decay_rate)
        f64 = dict(dtype=torch.float64, device=device)
        self.register_buffer("num_tokens", torch.zeros((), **f64))
        self.register_buffer("usage", torch.zeros(num_experts, **f64))
        self.register_buffer("cooccurrence", torch.zeros(num_experts, num_experts, **f64))
        self.register_buffer(
            "covariance", torch.eye(num_experts, dtype=torch.float32, device=device)
        )
        self.register_buffer("_pending_tokens", torch.zeros((), **f64), persistent=False)
        self.register_buffer("_pending_usage", torch.zeros(num_experts, **f64), persistent=False)
        self.register_buffer(
            "_pending_cooccurrence", torch.zeros(num_experts, num_experts, **f64), persistent=False
        )

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, eps={self.eps:g}, shrinkage={self.shrinkage:g}, "
                f"decay_rate={self.decay_rate:g}")

    @torch.no_grad()
    def update(self, routing_map: torch.Tensor) -> None:
        """Add a routing map (bool [T, E], True where a token was dispatched) locally."""
        if routing_map.dim() != 2 or routing_map.shape[1] != self.num_experts:
            raise ValueError(
                f"CooccurrenceStats.update: routing_map must be [tokens, {self.num_experts}], "
                f"got {tuple(routing_map.shape)}"
            )
        # fp32 products are exact while a single update has < 2^24 tokens; the
        # running sums are float64.
        m = routing_map.to(device=self.usage.device, dtype=torch.float32)
        if self.decay_rate:
            keep = 1.0 - self.decay_rate
            for t in (self.num_tokens, self.usage, self.cooccurrence,
                      self._pending_tokens, self._pending_usage, self._pending_cooccurrence):
                t.mul_(keep)
        self._pending_tokens.add_(m.shape[0])
        self._pending_usage.add_(m.sum(dim=0))
        self._pending_cooccurrence.add_(m.t() @ m)

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Sum pending counts over ``group`` and fold them into the totals.

        ``group`` should span exactly the ranks that see different tokens (data-,
        expert- and context-parallel; tensor-parallel ranks share tokens and must
        not be counted twice). Without an initialised default process group this
        only folds the local counts. No host synchronisation.
        """
        pending = (self._pending_tokens, self._pending_usage, self._pending_cooccurrence)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            flat = torch.cat([t.reshape(-1) for t in pending])
            dist.all_reduce(flat, group=group)
            offset = 0
            for t in pending:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.num_tokens.add_(self._pending_tokens)
        self.usage.add_(self._pending_usage)
        self.cooccurrence.add_(self._pending_cooccurrence)
        for t in pending:
            t.zero_()

    def sigma(self) -> torch.Tensor:
        """Sigma (float32 [E, E]) from the totals; the identity before any token."""
        return covariance_from_counts(
            self.num_tokens, self.usage, self.cooccurrence, self.eps, self.shrinkage
        ).to(torch.float32)

    @torch.no_grad()
    def refresh(self, group=None) -> torch.Tensor:
        """:meth:`all_reduce` then rebuild ``covariance`` from the totals; returns it."""
        self.all_reduce(group)
        self.covariance.copy_(self.sigma())
        return self.covariance

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every count; Sigma returns to the identity."""
        for t in (self.num_tokens, self.usage, self.cooccurrence):
            t.zero_()
        for t in (self._pending_tokens, self._pending_usage, self._pending_cooccurrence):
            t.zero_()
        self.covariance.copy_(torch.eye(self.num_experts, dtype=torch.float32, device=self.covariance.device))


@torch.no_grad()
def sigma_summary(sigma: torch.Tensor) -> dict:
    """Diagonal mean, mean |off-diagonal| and the largest |correlation| of a covariance."""
    s = sigma.detach().double()
    d = s.diagonal()
    e = s.shape[0]
    off = s - torch.diag(d)
    corr = off / torch.sqrt(torch.outer(d, d)).clamp_min(1e-30)
    return {
        "sigma_diag_mean": float(d.mean()),
        "sigma_offdiag_abs_mean": float(off.abs().sum() / max(e * (e - 1), 1)),
        "sigma_max_corr": float(corr.abs().max()),
    }
