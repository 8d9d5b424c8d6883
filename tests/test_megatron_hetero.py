"""Experts of their own sizes (mpmoe.megatron.hetero) and HEMoE's gates in the routers."""

from __future__ import annotations

import pytest
import torch

from megatron_testing import make_batch, run_distributed, tiny_config

SIZES = {1: (96, 16, 8, 8), 2: (32, 32, 32, 32)}


def _config(**overrides):
    from mpmoe.megatron.config import MoPEConfig

    kw = dict(num_moe_experts=4, moe_ffn_hidden_size=32, moe_expert_ffn_sizes=SIZES, ffn_hidden_size=128,
              gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    kw.update(overrides)
    return tiny_config(MoPEConfig, **kw)


def _build(config, seed=0):
    from mpmoe.megatron import build_gpt_model

    torch.manual_seed(seed)
    return build_gpt_model(config, vocab_size=128, max_sequence_length=32)


def test_parse_expert_sizes():
    from mpmoe.megatron.hetero import format_expert_sizes, parse_expert_sizes

    assert parse_expert_sizes("2:3,4;1:5,6") == {1: (5, 6), 2: (3, 4)}
    assert parse_expert_sizes('{"3": [1, 2]}', 2) == {3: (1, 2)}
    assert parse_expert_sizes(None) is None and parse_expert_sizes(" ") is None
    assert format_expert_sizes({2: (3, 4), 1: (5, 6)}) == "1:5,6;2:3,4"
    assert parse_expert_sizes(format_expert_sizes(SIZES)) == SIZES
    for bad in ("2:3,x", "0:1,2", "2:0,1", "nocolon", "{bad"):
        with pytest.raises(ValueError, match="moe_expert_ffn_sizes"):
            parse_expert_sizes(bad)
    with pytest.raises(ValueError, match="3 sizes"):
        parse_expert_sizes("1:1,2,3", 2)


def test_hetero_experts_shapes_parameters_and_checkpoint(tmp_path):
    from megatron.core import dist_checkpointing

    from mpmoe.megatron import init_distributed
    from mpmoe.megatron.hetero import HeteroSequentialMLP

    init_distributed()
    model = _build(_config())
    for layer, sizes in SIZES.items():
        experts = model.decoder.layers[layer - 1].mlp.experts
        assert isinstance(experts, HeteroSequentialMLP)
        got = [e.linear_fc2.weight.shape[1] for e in experts.local_experts]
        assert got == list(sizes)
        assert [e.linear_fc1.weight.shape[0] for e in experts.local_experts] == [2 * s for s in sizes]
        n = sum(p.numel() for p in experts.parameters())
        assert n == 3 * 64 * sum(sizes) == 3 * 64 * 128  # the dense FFN's count (SwiGLU, H=64)
    tokens, pos, labels = make_batch(0)
    model.eval()
    with torch.no_grad():
        before = model(tokens, pos, None)
    sd = model.sharded_state_dict()
    keys = {v.key for v in sd.values()}
    # per layer and expert, no [E, ...] or [layers, ...] stack
    assert "decoder.layers.mlp.experts.experts.layer1.0.linear_fc1.weight" in keys
    assert "decoder.layers.mlp.experts.experts.layer2.3.linear_fc2.weight" in keys
    dist_checkpointing.save(sd, str(tmp_path))
    other = _build(_config(), seed=1)
    other.eval()
    with torch.no_grad():
        assert not torch.allclose(other(tokens, pos, None), before)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(other(tokens, pos, None), before)
    # other sizes cannot load silently
    wrong = _build(_config(moe_expert_ffn_sizes={1: (64, 32, 16, 16), 2: (32, 32, 32, 32)}))
    with pytest.raises(BaseException, match="shape"):  # torch's CheckpointException is a BaseException
        wrong.load_state_dict(dist_checkpointing.load(wrong.sharded_state_dict(), str(tmp_path)))


def test_sizes_refused_for_dense_layers_and_grouped_gemm():
    from mpmoe.megatron import init_distributed

    init_distributed()
    with pytest.raises(ValueError, match="no experts"):
        _build(_config(moe_layer_freq=[0, 1], moe_expert_ffn_sizes={1: (32, 32, 32, 32)}))
    from mpmoe.megatron.spec import get_gpt_layer_specs

    with pytest.raises(ValueError, match="grouped"):
        get_gpt_layer_specs(_config(moe_grouped_gemm=True), portable=True)


def _ep_worker(rank, world, ckpt):
    from megatron.core import dist_checkpointing

    from mpmoe.megatron import init_distributed

    init_distributed(expert_model_parallel_size=world)
    model = _build(_config(expert_model_parallel_size=world), seed=5 + rank)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    model.eval()
    tokens, pos, _ = make_batch(0)
    with torch.no_grad():
        out = model(tokens, pos, None)
    shapes = [tuple(e.linear_fc2.weight.shape) for e in model.decoder.layers[0].mlp.experts.local_experts]
    return out, shapes


@pytest.mark.slow
def test_hetero_checkpoint_loads_under_expert_parallelism(tmp_path):
    from megatron.core import dist_checkpointing

    from mpmoe.megatron import init_distributed

    init_distributed()
    model = _build(_config())
    model.eval()
    tokens, pos, _ = make_batch(0)
    with torch.no_grad():
        want = model(tokens, pos, None)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    (out0, shapes0), (out1, shapes1) = run_distributed(_ep_worker, 2, str(tmp_path))
    assert shapes0 == [(64, 96), (64, 16)] and shapes1 == [(64, 8), (64, 8)]
    assert torch.allclose(out0, want, atol=1e-5) and torch.allclose(out1, want, atol=1e-5)


def test_unit_gates_and_size_weighted_loss_math():
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    from mpmoe.routing.unit_gates import size_weighted_balance_loss, unit_gates

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=g, requires_grad=True)
    p = torch.softmax(logits, -1)
    rmap = torch.zeros(10, 4, dtype=torch.bool)
    rmap.scatter_(1, p.topk(2, -1).indices, True)
    gates = unit_gates(p, rmap)
    assert torch.equal(gates.detach(), rmap.float())
    w = torch.randn(10, 4, generator=g)
    got = torch.autograd.grad((gates * w).sum(), logits, retain_graph=True)[0]
    want = torch.autograd.grad((p * rmap * w).sum(), logits)[0]
    assert torch.allclose(got, want)  # straight-through: the gradient of p
    megatron = switch_load_balancing_loss_func(p.detach(), rmap.sum(0), 10, 2, 4, 0.1)
    ours = size_weighted_balance_loss(p.detach(), rmap, 2, 0.1, None)
    assert torch.allclose(ours, megatron)
    assert torch.allclose(size_weighted_balance_loss(p.detach(), rmap, 2, 0.1, [5, 5, 5, 5]), megatron)
    sized = size_weighted_balance_loss(p.detach(), rmap, 2, 0.1, [4, 2, 1, 1])
    f, mp = rmap.float().mean(0), p.detach().mean(0)
    assert torch.allclose(sized, 0.1 * 2 * (torch.tensor([2.0, 1, 0.5, 0.5]) * f * mp).sum())


def test_router_unit_gates_all_experts_sum_the_experts():
    """Unit gates + all experts routed: the MoE layer is the sum of its experts' outputs."""
    from mpmoe.megatron import init_distributed

    init_distributed()
    model = _build(_config(moe_router_topk=4, moe_router_unit_gates=True, moe_size_aux_loss_coeff=0.01,
                           moe_router_load_balancing_type="none"))
    layer = model.decoder.layers[0].mlp
    x = torch.randn(6, 1, 64, generator=torch.Generator().manual_seed(1))
    layer.train()
    out, _ = layer(x)
    want = sum(e(x.reshape(6, 64), torch.ones(6))[0] for e in layer.experts.local_experts)
    assert torch.allclose(out.reshape(6, 64), want, atol=1e-5)
    out.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
