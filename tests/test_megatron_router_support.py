"""Helpers shared by the router and statistics tests (no tests in this module).

Single-process tests get megatron's parallel_state on a 1-rank gloo group
(:func:`single_process_group`); multi-process checks spawn workers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")

from megatron.core.models.backends import LocalSpecProvider  # noqa: E402

from mpmoe.megatron.compat import build_mlp, mlp_spec_for_backend, moe_submodules  # noqa: E402

from mpmoe.megatron.config import MoPEConfig  # noqa: E402
from mpmoe.megatron.parallel import destroy_distributed, find_free_port, init_distributed  # noqa: E402
from mpmoe.megatron.router import MoPERouter, TopKStatsRouter  # noqa: E402


def init_parallel(rank: int, world_size: int, port: int, *, ep: int = 1, tp: int = 1) -> None:
    init_distributed(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, rank=rank,
        world_size=world_size, init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
    )


def destroy_parallel() -> None:
    destroy_distributed()


@contextlib.contextmanager
def single_process_group():
    init_parallel(0, 1, find_free_port())
    try:
        yield
    finally:
        destroy_parallel()


BASE = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    moe_token_dispatcher_type="allgather",
    moe_router_dtype="fp32",
    moe_aux_loss_coeff=1e-2,
    add_bias_linear=False,
    use_cpu_initialization=True,
    bf16=False,
    params_dtype=torch.float32,
)


def make_config(**overrides) -> MoPEConfig:
    kw = dict(BASE)
    kw.update(overrides)
    return MoPEConfig(**kw)


def build_moe_layer(config: MoPEConfig, layer_number: int = 1, seed: int = 0):
    """A megatron MoELayer (local SequentialMLP experts) with an mpmoe router."""
    router = MoPERouter if config.is_mope else TopKStatsRouter
    spec = mlp_spec_for_backend(LocalSpecProvider(), config, num_experts=config.num_moe_experts)
    moe_submodules(spec).router = router
    moe_submodules(spec).shared_experts = None
    torch.manual_seed(seed)
    layer = build_mlp(spec, config=config, layer_number=layer_number)
    layer.set_layer_number(layer_number)
    return layer
