"""HEMoE split math (mpmoe.surgery.split): exact identities, brute force, planted cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpmoe.surgery import split as S


def _swiglu(x, fc1, fc2, alpha=None, beta=None):
    f = fc2.shape[1]
    gate, up = fc1[:f], fc1[f:]
    g = x @ gate.T
    if beta is not None:
        g = g * beta
    a = F.silu(g) * (x @ up.T)
    if alpha is not None:
        a = a * alpha
    return a @ fc2.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_importance_terms_equal_dl_dalpha(seed):
    """down and up terms == dL/d(alpha_n) (alpha scales the activation), gate term == dL/d(beta_n)."""
    g = torch.Generator().manual_seed(seed)
    h, f, t = 8, 12, 5
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    target = torch.randn(t, h, generator=g, dtype=torch.float64)
    fc1 = torch.randn(2 * f, h, generator=g, dtype=torch.float64, requires_grad=True)
    fc2 = torch.randn(h, f, generator=g, dtype=torch.float64, requires_grad=True)
    loss = ((_swiglu(x, fc1, fc2) - target) ** 2).sum()
    g1, g2 = torch.autograd.grad(loss, (fc1, fc2))
    terms = S.neuron_scores(fc1, g1, fc2, g2, gated=True)

    alpha = torch.ones(f, dtype=torch.float64, requires_grad=True)
    beta = torch.ones(f, dtype=torch.float64, requires_grad=True)
    loss2 = ((_swiglu(x, fc1.detach(), fc2.detach(), alpha, beta) - target) ** 2).sum()
    da, db = torch.autograd.grad(loss2, (alpha, beta))
    scale = da.abs().max()
    assert (terms["down"] - da).abs().max() <= 1e-5 * scale
    assert (terms["up"] - da).abs().max() <= 1e-5 * scale
    assert (terms["gate"] - db).abs().max() <= 1e-5 * db.abs().max()
    assert torch.allclose(terms["total"], terms["gate"] + 2 * da)


def test_importance_ungated_and_accumulation():
    g = torch.Generator().manual_seed(3)
    fc1, fc2 = torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    with pytest.raises(ValueError):
        S.neuron_scores(fc1, fc1, fc2, fc2, gated=True)
    terms = S.neuron_scores(fc1, fc1, fc2, fc2, gated=False)
    assert terms["gate"] is None
    assert torch.allclose(terms["total"], (fc1.double() ** 2).sum(1) + (fc2.double() ** 2).sum(0))
    acc = S.accumulate_importance(None, torch.tensor([-1.0, 2.0]))
    acc = S.accumulate_importance(acc, torch.tensor([3.0, -4.0]))
    assert acc.tolist() == [4.0, 6.0]  # absolute per sample, then summed


def test_normalize_importance():
    a, b = torch.rand(5, 3), torch.rand(7, 3)
    b[:, 2] = 0
    a[:, 2] = 0
    na, nb = S.normalize_importance([a, b])
    both = torch.cat([na, nb])
    assert torch.allclose(both[:, :2].norm(dim=0), torch.ones(2, dtype=torch.float64))
    assert torch.all(both[:, 2] == 0)
    assert torch.allclose(na[:, 0] * torch.log1p(torch.cat([a, b])[:, 0].double()).norm(),
                          torch.log1p(a[:, 0].double()))


@pytest.mark.parametrize("n,k", [(64, 8), (48, 4), (30, 3)])
def test_balanced_kmeans_equal_and_deterministic(n, k):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
    labels = S.balanced_kmeans(x, k, seed=7)
    assert torch.bincount(labels, minlength=k).tolist() == [n // k] * k
    assert torch.equal(labels, S.balanced_kmeans(x, k, seed=7))
    with pytest.raises(ValueError):
        S.balanced_kmeans(x, n + 1)


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 20
    truth = torch.arange(4).repeat_interleave(10)
    x = centers[truth] + torch.randn(40, 6, generator=g) * 0.1
    labels = S.balanced_kmeans(x[torch.randperm(40, generator=g)], 4, seed=0)
    labels = S.balanced_kmeans(x, 4, seed=1)
    for c in range(4):  # each planted cluster is one cluster
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 4


def _brute_force(s: np.ndarray, e: int, ratio: float, coherence: float) -> float:
    m, d = s.shape
    lo, hi = S.ilp_size_bounds(m, e, ratio)
    cap = max(1, int(round(coherence * e / d)))
    ys = [np.array(bits, dtype=bool).reshape(e, d) for bits in itertools.product([0, 1], repeat=e * d)]
    ys = [y for y in ys if y.sum(1).min() >= 1 and y.sum(0).max() <= cap]
    best = -np.inf
    for assign in itertools.product(range(e), repeat=m):
        sizes = np.bincount(assign, minlength=e)
        if sizes.min() < lo or sizes.max() > hi:
            continue
        mass = np.stack([s[np.array(assign) == k].sum(0) for k in range(e)])
        for y in ys:
            best = max(best, float((mass * y).sum()))
    return best


@pytest.mark.parametrize("seed,m,e,d,signed", [(0, 6, 3, 2, False), (1, 6, 2, 3, False), (2, 7, 3, 2, False),
                                              (3, 6, 3, 2, True), (4, 5, 2, 2, True)])
def test_ilp_matches_brute_force(seed, m, e, d, signed):
    rng = np.random.default_rng(seed)
    s = rng.random((m, d)) - (0.5 if signed else 0.0)
    res = S.solve_split_ilp(torch.from_numpy(s), e, size_ratio=4.0, coherence=2.0, time_limit=30)
    assert res.status == "optimal"
    assert res.objective == pytest.approx(_brute_force(s, e, 4.0, 2.0), abs=1e-7)
    assert res.objective == pytest.approx(S.split_objective(torch.from_numpy(s), res.expert_of_module,
                                                            res.domains))


def _check_constraints(res, m, e, d, ratio=4.0, coherence=2.0):
    lo, hi = S.ilp_size_bounds(m, e, ratio)
    sizes = torch.bincount(res.expert_of_module, minlength=e).tolist()
    assert sizes == res.sizes and sum(sizes) == m
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes) >= lo and max(sizes) <= hi
    assert bool(res.domains.any(dim=1).all())
    assert int(res.domains.sum(0).max()) <= max(1, round(coherence * e / d))


def test_ilp_constraints_hold_on_a_realistic_instance():
    s = torch.rand(32, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = S.solve_split_ilp(s, 8, time_limit=3)
    assert res.status in ("optimal", "time_limit", "time_limit_fallback")
    _check_constraints(res, 32, 8, 4)
    if res.bound is not None:
        assert res.bound >= res.objective - 1e-6
        assert res.mip_gap >= 0


def test_ilp_fallback_is_feasible():
    s = torch.rand(32, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lo, hi = S.ilp_size_bounds(32, 8, 4.0)
    assign, y = S._fallback(s.numpy(), 8, lo, hi, 2)
    res = S.IlpResult(torch.from_numpy(assign), torch.from_numpy(y), np.bincount(assign).tolist(),
                      "time_limit_fallback", 0.0, None, None, 0.0)
    _check_constraints(res, 32, 8, 4)


@pytest.mark.parametrize("m,e,ratio,d,coh", [(4, 5, 4.0, 2, 2.0), (8, 2, 0.5, 2, 2.0), (8, 8, 4.0, 2, 0.2)])
def test_ilp_bad_inputs(m, e, ratio, d, coh):
    """more experts than modules, size ratio < 1, domains that cannot cover the experts"""
    with pytest.raises(ValueError):
        S.solve_split_ilp(torch.rand(m, d), e, size_ratio=ratio, coherence=coh, time_limit=1)


def test_partitions_and_split_ffn_reproduce_dense():
    g = torch.Generator().manual_seed(0)
    h, f, e = 6, 24, 4
    fc1, fc2 = torch.randn(2 * f, h, generator=g), torch.randn(h, f, generator=g)
    x = torch.randn(9, h, generator=g)
    dense = _swiglu(x, fc1, fc2)
    for labels in (S.moefication_partition(fc1, e, seed=1), S.random_homogeneous(f, e, seed=2),
                   S.random_heterogeneous(f, [10, 8, 4, 2], seed=3), S.contiguous_partition(f, e)):
        assert labels.shape == (f,) and int(labels.max()) == e - 1
        parts = S.split_ffn(fc1, fc2, labels, e)
        out = sum(_swiglu(x, p1, p2) for p1, p2 in parts)
        assert torch.allclose(out, dense, atol=1e-5)
        assert sum(p2.shape[1] for _, p2 in parts) == f
    assert torch.bincount(S.random_heterogeneous(f, [10, 8, 4, 2], seed=3)).tolist() == [10, 8, 4, 2]
    assert S.contiguous_partition(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.bincount(S.moefication_partition(fc1, e, seed=1)).tolist() == [6] * 4
    modules = torch.arange(f) // 4  # 6 modules of 4
    assert S.expert_of_neuron(modules, torch.tensor([0, 0, 1, 2, 3, 3])).tolist() == \
        [0] * 8 + [1] * 4 + [2] * 4 + [3] * 8
    sc = S.module_scores(torch.ones(f, 2), modules, 6)
    assert sc.tolist() == [[4.0, 4.0]] * 6
