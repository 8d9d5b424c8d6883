"""``MoPEConfig``: megatron's ``TransformerConfig`` plus mpmoe's routing fields.

The router kind (top-k, MoPE, ReMoE, ...) is read from the config by
:func:`mpmoe.megatron.routers.kind_of`; the routing fields' types, ranges, defaults and
which routers they apply to are declared in :mod:`mpmoe.megatron.settings`, and
``__post_init__`` validates them there (the one validation path, shared with the flags).

Megatron's own ``__post_init__`` does not know "otep" (it rejects it together with an
expert capacity factor, for example). MoPE computes its aux loss exactly as megatron's
"aux_loss" routing does, so megatron's validation runs with "aux_loss" in its place and
"otep" is put back afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from mpmoe.megatron import routers, settings
from mpmoe.megatron.settings import parse_layer_list

__all__ = ["DYNAMIC_MASK_SOURCES", "MOPE_ROUTING_TYPE", "MoPEConfig", "parse_layer_list"]

#: ``moe_router_load_balancing_type`` value that selects MoPE routing.
MOPE_ROUTING_TYPE = routers.KINDS["mope"].marks["moe_router_load_balancing_type"]

#: Where the dynamic "cooccurrence" mask takes its matrix from (``moe_dynamic_mask_source``).
DYNAMIC_MASK_SOURCES = settings.BY_NAME["moe_dynamic_mask_source"].type.choices


def _with_routing_fields(cls):
    """Add every routing setting and router mark that megatron's config lacks as a field
    (default from the settings table), then make ``cls`` a dataclass."""
    own = {f.name for f in dataclasses.fields(TransformerConfig)}
    names = {s.name: s.default for s in settings.SETTINGS if s.config}
    names.update(routers.MARKS)
    annotations = cls.__dict__.get("__annotations__", {})
    for name, default in names.items():
        if name not in own:
            annotations[name] = Any
            setattr(cls, name, default)
    cls.__annotations__ = annotations
    return dataclass(cls)


@_with_routing_fields
class MoPEConfig(TransformerConfig):
    """TransformerConfig with mpmoe's routing fields: one per entry of
    :data:`mpmoe.megatron.settings.SETTINGS` (its help text and default) and per router mark
    of :mod:`mpmoe.megatron.routers` (``moe_relu_routing``: ReMoE)."""

    @property
    def router_kind(self) -> str:
        """``"topk"``, ``"mope"``, ``"remoe"``, ... (:mod:`mpmoe.megatron.routers`)."""
        return routers.kind_of(self)

    @property
    def is_mope(self) -> bool:
        """True when MoE layers route with MoPE (OTEP)."""
        return self.router_kind == "mope"

    def __post_init__(self):
        kind = routers.kind_of(self, dense=None) if self.num_moe_experts is not None else None
        values = {s.name: getattr(self, s.name) for s in settings.SETTINGS if s.config}
        for name, value in settings.check(values, kind, num_experts=self.num_moe_experts,
                                          topk=self.moe_router_topk,
                                          dispatcher=self.moe_token_dispatcher_type).items():
            setattr(self, name, value)
        is_mope = kind == "mope"
        if is_mope:
            # Megatron validates "aux_loss"; MoPE's losses are exactly aux_loss routing's.
            self.moe_router_load_balancing_type = "aux_loss"
        # Megatron accepts expert bias with sigmoid scores only; mpmoe's routers implement
        # it for softmax top-k and MoPE, so megatron validates the rest without it.
        softmax_bias = self.moe_router_enable_expert_bias and self.moe_router_score_function == "softmax"
        if softmax_bias:
            self.moe_router_enable_expert_bias = False
        try:
            super().__post_init__()
        finally:
            if is_mope:
                self.moe_router_load_balancing_type = MOPE_ROUTING_TYPE
            if softmax_bias:
                self.moe_router_enable_expert_bias = True
        if is_mope:
            for name, why in (("moe_router_num_groups", "group-limited top-k"),
                              ("moe_router_group_topk", "group-limited top-k"),
                              ("moe_router_fusion", "the selection is not megatron's top-k"),
                              ("moe_router_force_load_balancing", "it replaces the routing")):
                if getattr(self, name, None):
                    raise ValueError(f"{name} is not supported with MoPE ({why})")
