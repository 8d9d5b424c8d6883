"""megatron-core plugin: config, MoPE/top-k routers, statistics, specs, model building.

* :class:`MoPEConfig` - megatron's ``TransformerConfig`` plus the MoPE fields.
* :class:`MoPERouter`, :class:`TopKStatsRouter` - routers for ``MoESubmodules.router``;
  :func:`set_training_progress` and :func:`sync_routing_state` drive them.
* :class:`RoutingStatsTracker` - per-window ``layer{L}_seg{S}_{moe|mope|remoe}.npz`` files.
* :func:`build_gpt_model`, :func:`get_gpt_layer_specs` - the model and its layer specs.
* :func:`init_distributed` - process groups (gloo on CPU, nccl on GPU) and RNG seeds.
* :mod:`~mpmoe.megatron.cpu_compat` - the named CPU replacements for megatron-core 0.16.
"""

from mpmoe.megatron import cpu_compat
from mpmoe.megatron.attention import SDPAttention
from mpmoe.megatron.config import MOPE_ROUTING_TYPE, MoPEConfig
from mpmoe.megatron.model import build_gpt_model, check_model_config, init_experts_by_global_index
from mpmoe.megatron.parallel import (
    ParallelInfo,
    current_parallel_info,
    destroy_distributed,
    find_free_port,
    init_distributed,
    token_parallel_group,
    token_parallel_world_size,
)
from mpmoe.megatron.router import (
    MoPERouter,
    TopKStatsRouter,
    iter_routers,
    set_training_progress,
    sync_routing_state,
)
from mpmoe.megatron.spec import (
    PortableSpecProvider,
    get_gpt_block_spec,
    get_gpt_layer_specs,
    layer_kinds,
    moe_layer_pattern,
    resolve_backend,
)
from mpmoe.megatron.stats import RoutingStatsTracker

__all__ = [
    "MOPE_ROUTING_TYPE",
    "MoPEConfig",
    "MoPERouter",
    "RoutingStatsTracker",
    "TopKStatsRouter",
    "iter_routers",
    "set_training_progress",
    "sync_routing_state",
    "ParallelInfo",
    "PortableSpecProvider",
    "SDPAttention",
    "build_gpt_model",
    "check_model_config",
    "cpu_compat",
    "current_parallel_info",
    "destroy_distributed",
    "find_free_port",
    "get_gpt_block_spec",
    "get_gpt_layer_specs",
    "init_distributed",
    "init_experts_by_global_index",
    "layer_kinds",
    "moe_layer_pattern",
    "resolve_backend",
    "token_parallel_group",
    "token_parallel_world_size",
]
