"""ReMoE and aux-loss-free balancing math (mpmoe.routing.balancing) against hand formulas."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmoe.routing.balancing import (
    biased_softmax_topk,
    expert_bias_update,
    relu_gates,
    relu_l1_coeff_update,
    relu_l1_loss,
    relu_sparsity,
    target_sparsity,
)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(2, 8), st.integers(0, 10_000))
def test_relu_l1_loss_is_the_load_weighted_gate_sum(tokens, experts, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, requires_grad=True)
    gates, routed = relu_gates(logits)
    topk = max(1, experts // 4)
    n_e = routed.sum(dim=0)
    loss = relu_l1_loss(gates, n_e, topk)
    hand = sum(float(gates[:, e].detach().sum()) * int(n_e[e]) for e in range(experts)) * experts / (topk * tokens**2)
    assert math.isclose(float(loss), hand, rel_tol=1e-5, abs_tol=1e-9)
    loss.backward()
    # d loss / d logit[t, e] = E n_e / (k N^2) where the gate is open, 0 where it is shut
    expect = (n_e.float() * experts / (topk * tokens**2)).expand(tokens, experts) * routed
    torch.testing.assert_close(logits.grad, expect)


def test_relu_sparsity_and_target():
    assert target_sparsity(2, 8) == 0.75
    s = relu_sparsity(torch.tensor([16.0, 0.0]), torch.tensor([4.0, 0.0]), 8)
    torch.testing.assert_close(s, torch.tensor([0.5, 1.0]))


def test_l1_coefficient_follows_remoes_rule_step_by_step():
    """x1.2 while too dense (sparsity < target), /1.2 otherwise (equality included)."""
    sparsities = [0.1, 0.5, 0.74, 0.75, 0.9, 0.2]
    coeff = torch.tensor(1e-8, dtype=torch.float64)
    hand = 1e-8
    for s in sparsities:
        coeff = relu_l1_coeff_update(coeff, torch.tensor(s, dtype=torch.float64), 0.75, 1.2)
        hand = hand * 1.2 if s < 0.75 else hand / 1.2
        assert float(coeff) == hand


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=16), st.floats(1e-4, 1e-1))
def test_expert_bias_update_is_the_sign_rule(counts, rate):
    n = torch.tensor(counts, dtype=torch.float32)
    bias = torch.linspace(-0.1, 0.1, len(counts))
    new = expert_bias_update(n, bias, rate)
    mean = sum(counts) / len(counts)
    for e, c in enumerate(counts):
        step = 0.0 if abs(c - mean) < 1e-6 else (rate if c < mean else -rate)
        assert math.isclose(float(new[e]), float(bias[e]) + step, rel_tol=1e-6, abs_tol=1e-7)


def test_biased_softmax_topk_without_bias_is_megatrons_topk():
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    for pre in (False, True):
        ref_p, ref_m = topk_routing_with_score_function(logits, 2, use_pre_softmax=pre, score_function="softmax")
        p, m = biased_softmax_topk(logits, torch.zeros(8), 2, pre_softmax=pre)
        assert torch.equal(m, ref_m.bool())
        torch.testing.assert_close(p, ref_p)


def test_bias_moves_the_selection_not_the_weights():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(8)
    bias[7] = 2.0  # larger than any probability gap: expert 7 always chosen
    p, m = biased_softmax_topk(logits, bias, 2)
    assert m[:, 7].all() and (m.sum(dim=1) == 2).all()
    # weights: softmax over the two chosen logits, unbiased
    chosen = logits.masked_fill(~m, float("-inf"))
    torch.testing.assert_close(p, torch.softmax(chosen, dim=-1))
