"""ReMoE router and softmax expert bias inside megatron's MoELayer (one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_megatron_router_support import make_config, single_process_group

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402

from mpmoe.megatron.remoe import ReMoERouter, update_balancing_state  # noqa: E402
from mpmoe.megatron.compat import build_mlp, moe_submodules  # noqa: E402
from mpmoe.megatron.router import TopKStatsRouter  # noqa: E402
from mpmoe.megatron.stats import RoutingStatsTracker, read_stats_file  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def group():
    with single_process_group():
        yield


def remoe_layer(seed=0, **overrides):
    cfg = make_config(moe_relu_routing=True, moe_router_load_balancing_type="none", **overrides)
    spec = get_moe_module_spec(use_te=False, num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    moe = moe_submodules(spec)  # megatron 0.18+: a builder, not a ModuleSpec
    moe.router = ReMoERouter
    moe.shared_experts = None
    torch.manual_seed(seed)
    layer = build_mlp(spec, config=cfg, layer_number=1)
    layer.set_layer_number(1)
    return layer


def batch(g):
    x = torch.randn(16, 4, 32, generator=g)
    x[..., 0] = 1.0  # a constant feature: the router can shift every gate (hidden states do)
    return x


def test_sparsity_converges_to_target_and_coefficient_follows_the_rule(tmp_path):
    """A tiny regression run: every step the coefficient takes ReMoE's step, computed by
    hand from the sparsity of the routing maps the layer returned; sparsity goes from ~0.5
    to around the target 1 - k/E = 0.75."""
    layer = remoe_layer(moe_relu_l1_reg_coeff_init=1e-2, moe_relu_l1_reg_coeff_multiplier=1.3,
                        moe_stats_dir=str(tmp_path), moe_plot_every=1)
    router = layer.router
    tracker = RoutingStatsTracker(layer)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    maps = []
    router.register_forward_hook(lambda m, i, out: maps.append(out[1].detach()))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g) / 6
    coeff, sparsities = 1e-2, []
    for step in range(40):
        maps.clear()
        x = batch(g)
        out, _ = layer(x)
        loss = ((out - torch.tanh(x @ w)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_balancing_state(layer)
        tracker.on_optimizer_step(step + 1)
        (m,) = maps
        s = 1.0 - m.sum().item() / m.numel()
        coeff = coeff * 1.3 if s < 0.75 else coeff / 1.3
        sparsities.append(s)
        assert float(router.last_sparsity) == pytest.approx(s, abs=1e-12)
        assert float(router.relu_l1_coeff) == pytest.approx(coeff, rel=1e-12)
        assert float(router.last_experts_per_token) == pytest.approx(m.sum().item() / m.shape[0])
        # statistics window: variable experts per token, histogram sums to the tokens
        f = read_stats_file(tmp_path / f"layer1_seg{step}_remoe.npz")
        hist = np.bincount(m.sum(dim=1).numpy(), minlength=9)
        assert f["experts_per_token"].tolist() == hist.tolist()
        assert f["expert_counts"].tolist() == m.sum(dim=0).tolist()
    assert sparsities[0] < 0.6
    assert abs(np.mean(sparsities[-15:]) - 0.75) < 0.1, sparsities


def test_eval_has_no_penalty_and_routes_every_positive_gate(tmp_path):
    layer = remoe_layer(moe_eval_dump_dir=str(tmp_path))
    layer.eval()
    x = batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, routing_map = layer.router(x)
        logits = layer.router.gating(x).reshape(-1, 8)
    assert torch.equal(routing_map, logits > 0)
    torch.testing.assert_close(probs, torch.relu(logits))
    dump = np.load(next(tmp_path.glob("layer1_rank0_fwd*.npz")))
    assert dump["experts"].shape == (64, 8)  # up to E experts per token
    assert ((dump["experts"] >= 0).sum(axis=1) == routing_map.sum(dim=1).numpy()).all()
    assert layer.router.step_tokens.item() == 0  # eval forwards are not counted


def test_coefficient_is_saved_and_restored_in_float64():
    layer = remoe_layer()
    layer.router.relu_l1_coeff.fill_(1e-8 * 1.2**7)
    state = layer.state_dict()
    assert "router.relu_l1_coeff" in state and "router.step_routed" not in state
    other = remoe_layer(seed=1)
    other.load_state_dict(state)
    assert other.router.relu_l1_coeff.item() == 1e-8 * 1.2**7
    other.bfloat16()
    assert other.router.relu_l1_coeff.dtype == torch.float64


@pytest.mark.parametrize("overrides, match", [
    (dict(moe_router_load_balancing_type="otep"), "exclude each other"),
    (dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor"),
    (dict(moe_relu_l1_reg_coeff_multiplier=0.5), "multiplier"),
])
def test_bad_remoe_configs_are_one_line_errors(overrides, match):
    kw = dict(moe_relu_routing=True, moe_router_load_balancing_type="none")
    kw.update(overrides)
    with pytest.raises(ValueError, match=match):
        make_config(**kw)


def test_softmax_expert_bias_steers_selection_only():
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none")
    assert cfg.moe_router_enable_expert_bias and cfg.moe_router_score_function == "softmax"
    torch.manual_seed(0)
    router = TopKStatsRouter(cfg)
    router.set_layer_number(1)
    x = torch.randn(8, 4, 32)
    probs0, map0 = router(x)
    assert router.local_tokens_per_expert.tolist() == map0.sum(dim=0).float().tolist()
    with torch.no_grad():
        router.expert_bias[5] = 10.0  # always selected, its weight unchanged
    probs, routing_map = router(x)
    assert routing_map[:, 5].all()
    logits = router.gating(x).reshape(-1, 8)
    expect = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, expect)
    router.eval()
    with torch.no_grad():
        _, eval_map = router(x)
    assert eval_map[:, 5].all()  # the bias also selects at inference
    assert router.local_tokens_per_expert.sum().item() == 2 * 2 * 32  # eval not counted


def test_sigmoid_expert_bias_is_megatrons_own_path_on_cpu():
    """Sigmoid scores + bias: megatron's selection and token counting, buffers on the CPU."""
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                      moe_router_load_balancing_type="none")
    torch.manual_seed(0)
    router = TopKStatsRouter(cfg)
    router.set_layer_number(1)
    assert not router._counts_expert_bias  # megatron counts (sigmoid path)
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    x = torch.randn(8, 4, 32)
    probs, routing_map = router(x)
    assert routing_map[:, 3].all()
    assert router.local_tokens_per_expert.tolist() == routing_map.sum(dim=0).float().tolist()


def test_remoe_logs_the_mean_l1_penalty_per_layer():
    """remoe/l1_loss/layer_L: lambda * L1 recomputed by hand, averaged over the step's micro-batches."""
    from mpmoe.megatron.remoe import balancing_scalars

    layer = remoe_layer(moe_relu_l1_reg_coeff_init=0.5)
    router = layer.router
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    g = torch.Generator().manual_seed(4)
    expected = []
    for _ in range(2):  # two micro-batches of one step
        x = batch(g)
        out, _ = layer(x)
        out.sum().backward()
        with torch.no_grad():
            gates = torch.relu(router.gating(x).reshape(-1, 8))
        n, counts = gates.shape[0], (gates > 0).sum(0).double()
        expected.append(0.5 * 8 / (2 * n * n) * float((gates.sum(0).double() * counts).sum()))
    update_balancing_state(layer)
    value = balancing_scalars(layer)["remoe/l1_loss/layer_1"]
    assert value == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert router.step_l1.item() == 0 and router.step_l1_batches.item() == 0


def test_a_skipped_step_does_not_leak_into_the_next_steps_sparsity():
    from mpmoe.megatron.remoe import discard_balancing_state

    layer = remoe_layer()
    router = layer.router
    maps = []
    router.register_forward_hook(lambda m, i, out: maps.append(out[1].detach()))
    g = torch.Generator().manual_seed(5)
    layer(batch(g))[0].sum().backward()  # the step whose loss turned out NaN: skipped
    discard_balancing_state(layer)
    coeff = router.relu_l1_coeff.item()
    assert router.step_routed.item() == 0 and router.step_tokens.item() == 0
    assert router.relu_l1_coeff.item() == coeff  # the coefficient did not move
    maps.clear()
    layer(batch(g))[0].sum().backward()
    update_balancing_state(layer)
    (m,) = maps
    assert float(router.last_sparsity) == pytest.approx(1.0 - m.sum().item() / m.numel(), abs=1e-12)


def test_aux_loss_under_expert_bias_counts_the_unbiased_topk_map(monkeypatch):
    """As megatron's TopKRouter with bias: scores and tokens per expert of the unbiased top-k."""
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_load_balancing_type="aux_loss",
                      moe_aux_loss_coeff=0.01)
    torch.manual_seed(0)
    router = TopKStatsRouter(cfg)
    router.set_layer_number(1)
    seen = {}
    original = router._apply_aux_loss

    def spy(probs, scores, routing_map, **kw):
        seen["scores"], seen["map"] = scores.detach(), routing_map
        return original(probs, scores, routing_map, **kw)

    monkeypatch.setattr(router, "_apply_aux_loss", spy)
    with torch.no_grad():
        router.expert_bias[5] = 10.0  # the biased selection routes every token to expert 5
    x = torch.randn(8, 4, 32)
    _, routing_map = router(x)
    assert routing_map[:, 5].all()
    with torch.no_grad():
        p = torch.softmax(router.gating(x).reshape(-1, 8), dim=-1)
    unbiased = torch.zeros_like(routing_map).scatter_(1, p.topk(2, dim=-1).indices, True)
    assert torch.equal(seen["map"], unbiased) and not seen["map"][:, 5].all()
    torch.testing.assert_close(seen["scores"], p)


@pytest.mark.parametrize("mode", ["prob", "logit", "prob-scaled"])
def test_expert_bias_modes_select_as_documented(mode):
    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none",
                      moe_router_expert_bias_mode=mode)
    torch.manual_seed(0)
    router = TopKStatsRouter(cfg)
    router.set_layer_number(1)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(8, 4, 32)
    with torch.no_grad():
        _, routing_map = router(x)
        logits = router.gating(x).reshape(-1, 8)
    b = router.expert_bias
    score = {"prob": torch.softmax(logits, -1) + b, "logit": logits + b,
             "prob-scaled": torch.softmax(logits, -1) + b * 4 / 8}[mode]
    expect = torch.zeros_like(routing_map).scatter_(1, score.topk(2, dim=-1).indices, True)
    assert torch.equal(routing_map, expect)


def test_mope_logit_bias_runs_otep_on_the_biased_softmax():
    from mpmoe.megatron.router import MoPERouter
    from mpmoe.routing import otep_select

    cfg = make_config(moe_router_enable_expert_bias=True, moe_router_load_balancing_type="otep",
                      moe_router_expert_bias_mode="logit", moe_router_topk=3)
    torch.manual_seed(0)
    router = MoPERouter(cfg)
    router.set_layer_number(1)
    sigma = torch.eye(8) * 0.2
    sigma[0, 1] = sigma[1, 0] = 0.15
    router.cooccurrence_stats.covariance.copy_(sigma)
    router.eval()
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-2.0, 2.0, 8))
        x = torch.randn(8, 4, 32)
        _, routing_map = router(x)
        p = torch.softmax(router.gating(x).reshape(-1, 8) + router.expert_bias, dim=-1)
    assert torch.equal(routing_map, otep_select(p, sigma, 3))


def test_a_run_saved_before_the_bias_mode_existed_keeps_probability_bias():
    from mpmoe.run.args import args_from_saved

    saved = {"preset": "tiny-cpu", "moe_router_enable_expert_bias": True}
    assert args_from_saved(saved).moe_router_expert_bias_mode == "prob"
    saved["moe_router_expert_bias_mode"] = "logit"
    assert args_from_saved(saved).moe_router_expert_bias_mode == "logit"
