"""megatron-core plugin: routers, config, statistics, specs, model building.

Modules, lowest first (a module imports only those above it):

* :mod:`~mpmoe.megatron.settings` - the routing settings table (no torch, no megatron);
* :mod:`~mpmoe.megatron.routers` - the router registry: kinds, labels, selection (no torch);
* :mod:`~mpmoe.megatron.statsfile` - the statistics file format (NumPy only; analysis reads it);
* :mod:`~mpmoe.megatron.compat`, :mod:`~mpmoe.megatron.cpu_compat`, :mod:`~mpmoe.megatron.parallel`;
* :mod:`~mpmoe.megatron.config` - :class:`MoPEConfig` (fields generated from the table);
* :mod:`~mpmoe.megatron.router` - :class:`TopKStatsRouter`, :class:`MoPERouter` and the shared
  routing tail; :mod:`~mpmoe.megatron.remoe` - :class:`ReMoERouter` and the balancing updates;
* :mod:`~mpmoe.megatron.stats` - :class:`RoutingStatsTracker` (writes the statistics files);
* :mod:`~mpmoe.megatron.attention`, :mod:`~mpmoe.megatron.spec`, :mod:`~mpmoe.megatron.model`.

The names below are imported on first use, so ``import mpmoe.megatron.settings`` (flag
parsing) does not import megatron-core or torch.
"""

import importlib

_NAMES = {
    "cpu_compat": "cpu_compat",
    "SDPAttention": "attention",
    "MOPE_ROUTING_TYPE": "config", "MoPEConfig": "config",
    "build_gpt_model": "model", "check_model_config": "model", "init_experts_by_global_index": "model",
    "ParallelInfo": "parallel", "current_parallel_info": "parallel", "destroy_distributed": "parallel",
    "find_free_port": "parallel", "init_distributed": "parallel", "token_parallel_group": "parallel",
    "token_parallel_world_size": "parallel",
    "MoPERouter": "router", "TopKStatsRouter": "router", "iter_routers": "router",
    "set_training_progress": "router", "sync_routing_state": "router",
    "ReMoERouter": "remoe",
    "PortableSpecProvider": "spec", "get_gpt_block_spec": "spec", "get_gpt_layer_specs": "spec",
    "layer_kinds": "spec", "moe_layer_pattern": "spec", "resolve_backend": "spec",
    "RoutingStatsTracker": "stats",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod if name == module else getattr(mod, name)
