"""Straightforward reference implementations for the routing tests.

Written for clarity, not speed: OTEP by direct solves of p_S^T Sigma_SS^-1 p_S, in
float64, with the spec's eps floors (diag of Sigma; Schur complement of each
candidate), one candidate set at a time.
"""

from __future__ import annotations

import torch


def covariance_reference(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sigma from a stack of routing maps [N, E] by the textbook formula (float64)."""
    m = maps.to(torch.float64)
    n = m.shape[0]
    if n == 0:
        return torch.eye(m.shape[1], dtype=torch.float64)
    mean = m.mean(dim=0)
    sigma = (m.t() @ m) / n - torch.outer(mean, mean)
    sigma = 0.5 * (sigma + sigma.t())
    sigma.diagonal().clamp_(min=eps)
    return sigma


def greedy_gains(p: torch.Tensor, sigma: torch.Tensor, chosen: list[int], eps: float = 1e-12) -> torch.Tensor:
    """Gain of every expert given the chosen set, by direct solves (float64 [E]).

    gain_j = f(S + {j}) - f(S), with f(S) = p_S^T Sigma_SS^-1 p_S and the Schur
    complement of j floored at eps (the spec's rule for degenerate Sigma). Chosen
    experts get -inf.
    """
    p = p.to(torch.float64)
    sig = sigma.to(torch.float64)
    sig = 0.5 * (sig + sig.t())
    num_experts = p.shape[0]
    eff = sig.clone()
    eff.diagonal().clamp_(min=eps)
    # Rebuild the effective Sigma_SS the greedy steps factorised: each pick's
    # Schur complement was floored at eps, i.e. its diagonal entry was raised.
    for t, j in enumerate(chosen):
        prev = chosen[:t]
        if prev:
            a = torch.linalg.solve(eff[prev][:, prev], eff[prev, j])
            s = eff[j, j] - eff[prev, j] @ a
        else:
            s = eff[j, j]
        if s < eps:
            eff[j, j] += eps - s
    gains = torch.full((num_experts,), -torch.inf, dtype=torch.float64)
    if chosen:
        sss = eff[chosen][:, chosen]
        w = torch.linalg.solve(sss, p[chosen])  # Sigma_SS^-1 p_S
    for j in range(num_experts):
        if j in chosen:
            continue
        if chosen:
            a = torch.linalg.solve(sss, eff[chosen, j])  # Sigma_SS^-1 Sigma_Sj
            s = eff[j, j] - eff[chosen, j] @ a
            r = p[j] - eff[chosen, j] @ w
        else:
            s = eff[j, j]
            r = p[j]
        gains[j] = r * r / max(float(s), eps)
    return gains


def mahalanobis(p: torch.Tensor, sigma: torch.Tensor, chosen: list[int]) -> float:
    """f(S) = p_S^T Sigma_SS^-1 p_S by one direct solve (float64)."""
    p = p.to(torch.float64)
    sig = sigma.to(torch.float64)
    ps = p[chosen]
    return float(ps @ torch.linalg.solve(sig[chosen][:, chosen], ps))


def otep_reference(p: torch.Tensor, sigma: torch.Tensor, k: int, eps: float = 1e-12) -> list[int]:
    """Greedy OTEP for one token; ties go to the lowest expert index."""
    chosen: list[int] = []
    for _ in range(k):
        gains = greedy_gains(p, sigma, chosen, eps)
        chosen.append(int(torch.argmax(gains)))  # first maximum: lowest index
    return chosen
