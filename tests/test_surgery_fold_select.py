"""Fold-then-select over merged experts (``moe_expert_group_routing="fold-select"``): the grouped
router on CPU (1-rank gloo group) against hand-computed cases, plain selection and an
independent recomputation of MoPE's group selection."""

from __future__ import annotations

import math

import pytest
import torch

from test_megatron_router_support import make_config, single_process_group

from mpmoe.megatron.router import MoPERouter, TopKStatsRouter  # noqa: E402
from mpmoe.megatron.surgery import grouped_router_class  # noqa: E402
from mpmoe.routing import covariance_from_counts, otep_select  # noqa: E402
from mpmoe.surgery import merge as M  # noqa: E402

E = 8
OTEP = dict(moe_router_load_balancing_type="otep")


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    with single_process_group():
        yield


def _grouped(labels, *, mode="fold-select", k=2, **kw):
    groups = max(labels) + 1
    cfg = make_config(num_moe_experts=groups, moe_router_topk=k, moe_expert_groups="1:" + ",".join(map(str, labels)),
                      moe_expert_group_routing=mode, **kw)
    base = MoPERouter if cfg.is_mope else TopKStatsRouter
    router = grouped_router_class(base)(cfg)
    router.set_layer_number(1)
    return router.eval()


def _plain(num_experts=E, k=2, **kw):
    router = (MoPERouter if kw.get("moe_router_load_balancing_type") == "otep" else TopKStatsRouter)(
        make_config(num_moe_experts=num_experts, moe_router_topk=k, **kw))
    router.set_layer_number(1)
    return router.eval()


def _route(router, logits):
    with torch.no_grad():
        return router.routing(logits.reshape(-1, 1, logits.shape[-1]))


def _logits(n=32, e=E, seed=0):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed)) * 2


def test_fold_probabilities():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    got = M.fold_probabilities(probs, torch.tensor([1, 0, 1, -1]), 3)
    assert torch.allclose(got, torch.tensor([[0.2, 0.4, 0.0]]))


@pytest.mark.parametrize("pre_softmax", [True, False])
def test_hand_computed_top_k(pre_softmax):
    """E = 4, groups {0, 1}, {2}, {3}; p = (0.32, 0.28, 0.35, 0.05). Top-1 select-fold takes
    expert 2 (group 1); fold-then-select takes group 0 (0.60). Top-2: both take groups 0 and 1,
    with gates (0.32, 0.35) vs (0.60, 0.35) pre-softmax, renormalised otherwise."""
    logits = torch.log(torch.tensor([[0.32, 0.28, 0.35, 0.05]]))
    labels = [0, 0, 1, 2]
    kw = dict(moe_router_pre_softmax=pre_softmax)
    if pre_softmax:  # megatron refuses top-1 without it
        probs, rmap = _route(_grouped(labels, k=1, **kw), logits)
        assert rmap.tolist() == [[True, False, False]]
        assert math.isclose(float(probs[0, 0]), 0.60, rel_tol=1e-6)
        probs, rmap = _route(_grouped(labels, k=1, mode="select-fold", **kw), logits)
        assert rmap.tolist() == [[False, True, False]]
        assert math.isclose(float(probs[0, 1]), 0.35, rel_tol=1e-6)
    probs, rmap = _route(_grouped(labels, k=2, **kw), logits)
    want = torch.tensor([0.60, 0.35, 0.0]) if pre_softmax else torch.tensor([0.60, 0.35, 0.0]) / 0.95
    assert rmap.tolist() == [[True, True, False]] and torch.allclose(probs[0], want, atol=1e-6)
    probs, rmap = _route(_grouped(labels, k=2, mode="select-fold", **kw), logits)
    want = torch.tensor([0.32, 0.35, 0.0]) if pre_softmax else torch.tensor([0.32, 0.35, 0.0]) / 0.67
    assert rmap.tolist() == [[True, True, False]] and torch.allclose(probs[0], want, atol=1e-6)


def test_hand_computed_dropped_expert():
    """A dropped expert (label -1) is left out of the softmax: groups {0, 1}, {3} get
    0.60 / 0.65 and 0.05 / 0.65."""
    logits = torch.log(torch.tensor([[0.32, 0.28, 0.35, 0.05]]))
    probs, rmap = _route(_grouped([0, 0, -1, 1], k=1, moe_router_pre_softmax=True), logits)
    assert rmap.tolist() == [[True, False]]
    assert math.isclose(float(probs[0, 0]), 0.60 / 0.65, rel_tol=1e-6)


@pytest.mark.parametrize("pre_softmax", [True, False])
@pytest.mark.parametrize("kind", ["topk", "mope"])
def test_singleton_groups_are_plain_selection(kind, pre_softmax):
    """Every expert its own group (a permutation of the slots): fold-then-select is the plain
    router's selection and gates, permuted (MoPE: the pushed-forward Sigma is Sigma permuted)."""
    kw = dict(OTEP if kind == "mope" else {}, moe_router_pre_softmax=pre_softmax)
    plain = _plain(**kw)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(3))
    grouped = _grouped(perm.tolist(), **kw)
    if kind == "mope":
        gen = torch.Generator().manual_seed(1)
        maps = torch.zeros(64, E, dtype=torch.bool)
        maps.scatter_(1, torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(64)]), True)
        maps[:, 1] |= maps[:, 0]  # correlated experts: a Sigma that is far from diagonal
        for r in (plain, grouped):
            r.cooccurrence_stats.update(maps)
            r.cooccurrence_stats.refresh()
    logits = _logits()
    p0, m0 = _route(plain, logits)
    p1, m1 = _route(grouped, logits)
    assert torch.equal(m1[:, perm], m0)
    assert torch.allclose(p1[:, perm], p0, atol=1e-6)
    if kind == "mope":  # the case is not trivial: OTEP differs from top-k here
        assert not torch.equal(m0, torch.zeros_like(m0).scatter(1, logits.topk(2, dim=1).indices, True))


def test_mope_groups_recomputed_independently():
    """MoPE, groups of several experts: the selection is OTEP over the folded probabilities with
    the Sigma rebuilt from the pushed-forward counters; gates the folded probabilities
    renormalised over the selected groups."""
    labels = torch.tensor([0, 0, 1, 2, 1, 3, 3, 3])
    grouped = _grouped(labels.tolist(), **OTEP)
    gen = torch.Generator().manual_seed(2)
    maps = torch.zeros(80, E, dtype=torch.bool)
    maps.scatter_(1, torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(80)]), True)
    grouped.cooccurrence_stats.update(maps)
    grouped.cooccurrence_stats.refresh()
    logits = _logits(seed=5)
    probs, rmap = _route(grouped, logits)
    m = maps.double()
    a = M.membership_matrix(labels)
    counts = M.push_forward_counters(torch.tensor(80.0, dtype=torch.float64), m.sum(0), m.t() @ m, a)
    sigma = covariance_from_counts(*counts).float()
    folded = torch.softmax(logits, dim=1) @ a.t().float()
    want_map = otep_select(folded, sigma, 2)
    assert torch.equal(rmap, want_map)
    want = torch.where(want_map, folded, torch.zeros_like(folded))
    assert torch.allclose(probs, want / want.sum(1, keepdim=True), atol=1e-6)


def test_refusals():
    with pytest.raises(ValueError, match="fold-select: layer 1 has 2 groups, fewer than the top-k 3"):
        _grouped([0, 0, 1, 1, -1], k=3)
    with pytest.raises(ValueError, match="moe_router_score_function"):
        _grouped([0, 0, 1, 2], moe_router_score_function="sigmoid")
    with pytest.raises(ValueError, match="fold-select needs merged experts"):
        make_config(moe_expert_group_routing="fold-select")
    router = _grouped([0, 0, 1, 2])
    router.train()
    with pytest.raises(RuntimeError, match="evaluation option"):
        _route(router, _logits(e=4))
