"""Every difference between the megatron-core releases mpmoe runs on, in one place.

Supported: megatron-core 0.16.1 (Python 3.11; 0.17+ need Python >= 3.12) up to 0.19.x
(Python 3.12). Tested: 0.16.1 and 0.19.2. Each shim below detects the *feature*
(a parameter, an attribute, a type), never a version string, and says in one line what
changed and in which release. Nothing else in mpmoe branches on the megatron version;
code and tests go through these functions.

Differences handled without a branch (the same code is right on every release):

* 0.17: ``MoELayer`` builds the router as ``router(config=, pg_collection=,
  is_mtp_layer=)``; mpmoe's routers forward extra keyword arguments to ``TopKRouter``.
* 0.18: ``_AllToAll.forward`` gained ``use_nccl_stream``; cpu_compat's replacement accepts
  (and, on the CPU, ignores) it.

Upstream numerics that changed on purpose (MoPE inherits them; see docs/megatron.md):
0.17 counts ``seq_aux_loss`` tokens times the micro-batch size, scales aux and z-loss by the
tensor x context parallel size, and averages logged aux losses over data-parallel ranks
(``needs_dp_avg``). With ``aux_loss`` and tp = cp = 1 the losses are bit-identical.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

from mpmoe.megatron import routers

__all__ = [
    "allow_variable_experts_per_token",
    "build_mlp",
    "dist_ckpt_finalize_owner",
    "mlp_spec_for_backend",
    "moe_metrics",
    "moe_submodules",
    "replace_experts",
    "experts_module_and_submodules",
    "reset_moe_metrics",
    "start_grad_sync_uses_cuda_stream",
    "te_general_gemm_undefined",
]


# ---------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------


def mlp_spec_for_backend(backend, config, num_experts: Optional[int]):
    """``get_mlp_module_spec_for_backend`` for this config (dense when ``num_experts`` is None).

    0.17 removed legacy grouped GEMM: the ``moe_use_legacy_grouped_gemm`` argument (and
    config field) exist only before it, so it is passed only where accepted.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend

    if num_experts is None:
        return get_mlp_module_spec_for_backend(backend=backend, num_experts=None)
    kwargs = {"moe_grouped_gemm": config.moe_grouped_gemm}
    if "moe_use_legacy_grouped_gemm" in inspect.signature(get_mlp_module_spec_for_backend).parameters:
        kwargs["moe_use_legacy_grouped_gemm"] = getattr(config, "moe_use_legacy_grouped_gemm", False)
    return get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts, **kwargs)


def moe_submodules(mlp_spec: Any):
    """The ``MoESubmodules`` (router, experts, shared_experts) of an MLP spec; None when the
    spec is not an ``MoELayer``. Mutating it changes what the spec builds.

    0.18: MoE specs became ``functools.partial(MoELayer, submodules=MoESubmodules(...))``
    instead of ``ModuleSpec(module=MoELayer, submodules=...)``.
    """
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    if isinstance(mlp_spec, functools.partial):
        sub = mlp_spec.keywords.get("submodules")
    else:
        sub = getattr(mlp_spec, "submodules", None)
    return sub if isinstance(sub, MoESubmodules) else None


def replace_experts(moe: Any, module: type, **params) -> None:
    """Build ``moe``'s (an ``MoESubmodules``) experts with ``module`` and extra constructor
    keyword ``params``, keeping the experts' own submodules (linear layers, activation).

    0.18: the experts entry became a builder (``functools.partial``) instead of a
    ``ModuleSpec``.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = moe.experts
    if isinstance(spec, functools.partial):
        moe.experts = functools.partial(module, *spec.args, **{**spec.keywords, **params})
    elif isinstance(spec, ModuleSpec):
        moe.experts = ModuleSpec(module=module, submodules=spec.submodules,
                                 params={**(spec.params or {}), **params})
    else:
        raise TypeError(f"cannot replace an experts spec of type {type(spec).__name__}")


def experts_module_and_submodules(moe: Any) -> tuple:
    """``(module class, submodules)`` of ``moe``'s (an ``MoESubmodules``) experts entry.

    0.18: the experts entry became a builder (``functools.partial``) instead of a
    ``ModuleSpec``.
    """
    spec = moe.experts
    if isinstance(spec, functools.partial):
        return spec.func, spec.keywords.get("submodules")
    return getattr(spec, "module", None), getattr(spec, "submodules", None)


def build_mlp(mlp_spec: Any, **kwargs):
    """Build the module an MLP spec describes (``config=``, ``layer_number=``, ...).

    0.18: MLP/MoE specs are builders (``functools.partial``) called directly, not
    ``ModuleSpec``s for ``build_module``.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(mlp_spec, ModuleSpec):
        return build_module(mlp_spec, **kwargs)
    return mlp_spec(**kwargs)


# ---------------------------------------------------------------------------------------
# Token dispatch
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _permute_needs_exact_count() -> bool:
    """0.19: the unfused ``permute`` selects exactly ``num_out_tokens`` rows (an argsort of
    fixed size, for CUDA graphs), where 0.16 used ``masked_select`` (the routed pairs)."""
    import torch
    from megatron.core.transformer.moe.moe_utils import permute

    routed_once = torch.tensor([[True, False], [False, False]])
    return permute(torch.zeros(2, 1), routed_once, num_out_tokens=2)[0].shape[0] != 1


def allow_variable_experts_per_token() -> None:
    """Let the dropless alltoall dispatcher carry a variable number of experts per token.

    megatron's ``MoEAlltoAllTokenDispatcher.preprocess`` sizes dropless permutation as
    tokens x ``moe_router_topk``; with 0.19's fixed-size ``permute`` a router that routes
    fewer or more pairs (ReMoE's ReLU gates, the k -> k-1 dynamic mask) then sends wrong
    rows. For configs that route so (a ``variable_k`` router kind, or ``moe_dynamic_mask_mode``)
    the count becomes the routing map's own (one host sync per layer; other configs are
    untouched). Idempotent; a no-op where ``permute`` takes the routed pairs as they are.
    """
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as D

    if getattr(D.preprocess, "_mpmoe_variable_k", False) or not _permute_needs_exact_count():
        return
    upstream = D.preprocess

    @functools.wraps(upstream)
    def preprocess(self, routing_map):
        out = upstream(self, routing_map)
        cfg = self.config
        variable = (routers.KINDS[routers.kind_of(cfg)].variable_k or getattr(cfg, "moe_dynamic_mask_mode", None)
                    or getattr(cfg, "moe_expert_groups", None))
        if variable and not self.drop_and_pad and cfg.moe_expert_capacity_factor is None \
                and not getattr(cfg, "moe_router_padding_for_quantization", False):
            self.num_out_tokens = int(routing_map.sum())
        return out

    preprocess._mpmoe_variable_k = True
    D.preprocess = preprocess


# ---------------------------------------------------------------------------------------
# MoE aux-loss logging
# ---------------------------------------------------------------------------------------


def _metrics_tracker():
    """megatron's live MoE metrics tracker (0.18+), or None on releases without it."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def moe_metrics() -> dict:
    """``{name: per-layer values tensor}`` of megatron's MoE aux-loss tracker, live (the
    tensors are the tracker's own, so a reduce or clear is seen).

    0.18: ``get_moe_layer_wise_logging_tracker()`` returns a copy built from
    ``get_moe_metrics_tracker().metrics``.
    """
    tracker = _metrics_tracker()
    if tracker is not None:
        return {name: entry.values for name, entry in tracker.metrics.items()}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}


def reset_moe_metrics() -> None:
    """Drop every entry of megatron's MoE aux-loss tracker (entries are sized per model).

    0.18: the tracker is a ``MoEMetricsTracker`` whose ``clear()`` only zeroes values and
    whose legacy dict view is a copy; ``destroy_moe_metrics_tracker()`` drops it.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    else:
        destroy_moe_metrics_tracker()


# ---------------------------------------------------------------------------------------
# Targets and needs of cpu_compat's patches
# ---------------------------------------------------------------------------------------


def dist_ckpt_finalize_owner():
    """The module whose ``save_state_dict_async_finalize`` the torch_dist save calls.

    0.17: ``strategies.torch`` no longer imports it by name; it looks it up in
    ``state_dict_saver`` at call time (``_import_mcore_async()``).
    """
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    if hasattr(torch_strategy, "save_state_dict_async_finalize"):
        return torch_strategy
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    return state_dict_saver


def te_general_gemm_undefined(moe_utils) -> bool:
    """True when ``moe_utils`` leaves ``te_general_gemm`` undefined without Transformer Engine.

    0.17: ``moe_utils`` sets ``te_general_gemm = None`` when TE is missing.
    """
    return not hasattr(moe_utils, "te_general_gemm")


def start_grad_sync_uses_cuda_stream(fn) -> bool:
    """True when DDP's ``start_grad_sync`` asks for ``torch.cuda.current_stream()``.

    0.19: it waits on CUDA-graph weight-gradient events on the current CUDA stream.
    """
    code = getattr(fn, "__code__", None)
    return code is not None and "current_stream" in code.co_names
