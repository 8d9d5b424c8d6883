"""``MoPEConfig``: megatron's ``TransformerConfig`` plus the MoPE routing fields.

``moe_router_load_balancing_type="otep"`` selects MoPE routing for the MoE layers of a
model (the layer spec then builds :class:`mpmoe.megatron.router.MoPERouter`). Every
other value keeps megatron's top-k routing (through
:class:`mpmoe.megatron.router.TopKStatsRouter`, which shares the statistics hooks).

Field names follow the MoPE specification in ``docs/design.md`` (the demo code's names). The
demo's environment variables can be read with :meth:`MoPEConfig.env_overrides`.

Megatron's own ``__post_init__`` does not know "otep" (it rejects it together with an
expert capacity factor, for example). MoPE computes its aux loss exactly as megatron's
"aux_loss" routing does, so megatron's validation runs with "aux_loss" in its place and
"otep" is put back afterwards.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from mpmoe.routing.masks import DYNAMIC_MASK_MODES, STATIC_MASK_SEMANTICS, parse_expert_mask

__all__ = ["DYNAMIC_MASK_SOURCES", "ENV_FIELDS", "MOPE_ROUTING_TYPE", "MoPEConfig", "parse_layer_list"]

#: ``moe_router_load_balancing_type`` value that selects MoPE routing.
MOPE_ROUTING_TYPE = "otep"

# Demo-code environment variable -> config field.
ENV_FIELDS = _ENV_FIELDS = {
    "MOE_MASK_EXPERTS": "moe_mask_experts",
    "MOE_DYNAMIC_MASK_MODE": "moe_dynamic_mask_mode",
    "MOE_COOCCURRENCE_STATS_DIR": "moe_cooccurrence_stats_dir",
    "MOE_DYNAMIC_MASK_LAYERS": "moe_dynamic_mask_layers",
    "MOE_DYNAMIC_MASK_SEED": "moe_dynamic_mask_seed",
    "EACT_SAVE": "moe_eval_dump_dir",
}

#: Where the dynamic "cooccurrence" mask takes its matrix from (``moe_dynamic_mask_source``).
DYNAMIC_MASK_SOURCES = ("mpmoe", "reference")


def parse_layer_list(value: Any, field: str) -> Optional[Tuple[int, ...]]:
    """``None`` / ``""`` -> None (all layers); ``"2,5,9"`` or an iterable of ints -> sorted tuple.

    Layer numbers are megatron's (1-based, global over pipeline stages).
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        if not text:
            return None
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{field}: expected comma-separated layer numbers, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{field}: expected a list of layer numbers, got {value!r}") from None
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"{field}: layer numbers are 1-based ints, got {layer!r}")
    return tuple(sorted(set(items)))


@dataclass
class MoPEConfig(TransformerConfig):
    """TransformerConfig with the MoPE / routing-statistics fields (all optional)."""

    moe_otep_warmup_fraction: float = 0.01
    """Fraction of training (in optimizer steps) routed with plain top-k before OTEP."""

    moe_sigma_update_every: int = 1
    """Rebuild Sigma (and sum the counters over ranks) every this many training forwards."""

    moe_otep_eps: float = 1e-12
    """Floor for Sigma's diagonal and the Schur complements in OTEP."""

    moe_otep_inference_topk: bool = False
    """Outside training, route MoPE layers with plain top-k instead of the stored Sigma."""

    moe_plot_every: int = 200
    """Routing-statistics window, in optimizer steps."""

    moe_stats_dir: Optional[str] = None
    """Directory for ``layer{L}_seg{S}_{moe|mope|remoe}.npz`` statistics files; None = no tracking."""

    moe_stats_layers: Optional[Tuple[int, ...]] = None
    """MoE layers (1-based) whose statistics are tracked; None = all MoE layers."""

    moe_mask_experts: Optional[Union[str, Mapping]] = None
    """Static expert knock-out: JSON text, a JSON file path or a dict layer -> expert ids
    (normalised to ``dict[int, tuple[int, ...]]``)."""

    moe_mask_experts_semantics: str = "mpmoe"
    """Static knock-out under MoPE: "mpmoe" (never picked) or "reference" (the authors':
    pickable by OTEP through Sigma, gate weight 0); see mpmoe.routing.masks."""

    moe_dynamic_mask_mode: Optional[str] = None
    """Dynamic k -> k-1 mask: None (off), "cooccurrence" or "random"."""

    moe_cooccurrence_stats_dir: Optional[str] = None
    """Directory of statistics npz files the "cooccurrence" dynamic mask reads."""

    moe_dynamic_mask_layers: Optional[Tuple[int, ...]] = None
    """Layers (1-based) the dynamic mask applies to; None = all MoE layers."""

    moe_dynamic_mask_seed: int = 1234
    """Seed of the "random" dynamic mask."""

    moe_dynamic_mask_source: str = "mpmoe"
    """Dynamic mask's matrix and weights. "mpmoe": all windows of the layer in
    ``moe_cooccurrence_stats_dir`` summed (the router's own kind preferred), kept weights
    rescaled to the token's original total; "reference" (the demo): the latest window
    only, kept weights renormalised to 1 (see docs/reference.md)."""

    moe_sigma_shrinkage: float = 0.0
    """Sigma prior: shrink Sigma toward mean(diag) * I by this weight in [0, 1) (0: off,
    the reference). Bounds the first-pick advantage of experts never routed so far."""

    moe_sigma_decay_rate: float = 0.0
    """Multiply the co-occurrence counts by (1 - rate) before each update (0: cumulative)."""

    moe_eval_dump_dir: Optional[str] = None
    """Outside training, dump each token's routed experts and weights here (demo: EACT_SAVE)."""

    moe_relu_routing: bool = False
    """ReMoE routing (ReLU gates + adaptive load-balanced L1), thu-ml/ReMoE's flag name."""

    moe_relu_l1_reg_coeff_init: float = 1e-8
    """ReMoE: initial L1 coefficient lambda_0 (ReMoE's default)."""

    moe_relu_l1_reg_coeff_multiplier: float = 1.2
    """ReMoE: lambda is multiplied / divided by this after every optimizer step."""

    moe_expert_ffn_sizes: Optional[Union[str, Mapping]] = None
    """Experts of different sizes (HEMoE split): per MoE layer (1-based), one FFN size per
    expert, as ``"2:192,128,128,64;3:..."``, JSON or a dict (normalised to
    ``dict[int, tuple[int, ...]]``); layers not listed use ``moe_ffn_hidden_size``."""

    moe_router_unit_gates: bool = False
    """HEMoE's gates: weight 1 for every routed expert (straight-through gradient of p)."""

    moe_size_aux_loss_coeff: float = 0.0
    """HEMoE's size-weighted balance loss coefficient (0: off); equal sizes give aux_loss."""
    moe_expert_groups: Optional[str] = None
    """Merged experts (``mpmoe experts merge``): ``"LAYER:g0,g1,...;..."``, the group of each of
    the router's experts per MoE layer (-1: dropped); see :mod:`mpmoe.megatron.surgery`."""

    moe_expert_compression: Optional[str] = None
    """Compressed experts (``mpmoe experts compress``): ``"RANK:KEEP"``."""

    moe_router_expert_bias_mode: str = "prob"
    """Expert bias with softmax scores: where the selection adds it. "prob": softmax + b;
    "logit": logits + b (MoPE: p = softmax(logits + b)); "prob-scaled": softmax + b * 4/E
    (the update rate scaled by E). See docs/routing.md."""

    def __post_init__(self):
        self._validate_mope_fields()
        self._validate_split_fields()
        self._validate_surgery_fields()
        is_mope = self.moe_router_load_balancing_type == MOPE_ROUTING_TYPE
        if is_mope:
            # Megatron validates "aux_loss"; MoPE's losses are exactly aux_loss routing's.
            self.moe_router_load_balancing_type = "aux_loss"
        # Megatron accepts expert bias with sigmoid scores only; mpmoe's routers implement
        # it for softmax top-k and MoPE (mpmoe.megatron.balancing), so megatron validates
        # the rest of the config without it.
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
        from mpmoe.megatron.balancing import validate_balancing_config

        validate_balancing_config(self)
        if is_mope:
            self._validate_otep_combination()

    # ------------------------------------------------------------------ validation
    def _validate_mope_fields(self) -> None:
        lbt = self.moe_router_load_balancing_type
        if isinstance(lbt, (list, tuple)) and MOPE_ROUTING_TYPE in lbt:
            raise ValueError(
                "moe_router_load_balancing_type: 'otep' cannot be combined in a list; use the string 'otep'"
            )
        f = self.moe_otep_warmup_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 <= f <= 1.0:
            raise ValueError(f"moe_otep_warmup_fraction must be a number in [0, 1], got {f!r}")
        self.moe_otep_warmup_fraction = float(f)
        for name in ("moe_sigma_update_every", "moe_plot_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        eps = self.moe_otep_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"moe_otep_eps must be a positive finite number, got {eps!r}")
        self.moe_otep_eps = float(eps)
        if not isinstance(self.moe_otep_inference_topk, bool):
            raise ValueError(f"moe_otep_inference_topk must be a bool, got {self.moe_otep_inference_topk!r}")
        for name in ("moe_stats_dir", "moe_cooccurrence_stats_dir", "moe_eval_dump_dir"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, (str, os.PathLike)) or not os.fspath(v).strip():
                    raise ValueError(f"{name} must be a non-empty path or None, got {v!r}")
                setattr(self, name, os.fspath(v))
        self.moe_stats_layers = parse_layer_list(self.moe_stats_layers, "moe_stats_layers")
        self.moe_dynamic_mask_layers = parse_layer_list(self.moe_dynamic_mask_layers, "moe_dynamic_mask_layers")
        try:
            mask = parse_expert_mask(self.moe_mask_experts)
        except ValueError as exc:
            raise ValueError(f"moe_mask_experts: {exc}") from None
        if self.num_moe_experts is not None:
            for layer, ids in mask.items():
                bad = [e for e in ids if e >= self.num_moe_experts]
                if bad:
                    raise ValueError(
                        f"moe_mask_experts: layer {layer}: expert ids {bad} >= num_moe_experts={self.num_moe_experts}"
                    )
        self.moe_mask_experts = mask or None
        if self.moe_mask_experts_semantics not in STATIC_MASK_SEMANTICS:
            raise ValueError(f"moe_mask_experts_semantics must be one of {STATIC_MASK_SEMANTICS}, "
                             f"got {self.moe_mask_experts_semantics!r}")
        mode = self.moe_dynamic_mask_mode
        if mode is not None and mode != "":
            if mode not in DYNAMIC_MASK_MODES:
                raise ValueError(f"moe_dynamic_mask_mode must be one of {DYNAMIC_MASK_MODES} or None, got {mode!r}")
            if mode == "cooccurrence" and self.moe_cooccurrence_stats_dir is None:
                raise ValueError("moe_cooccurrence_stats_dir is required when moe_dynamic_mask_mode='cooccurrence'")
            if self.moe_router_topk is not None and self.moe_router_topk < 2:
                raise ValueError("moe_dynamic_mask_mode needs moe_router_topk >= 2 (it drops one of k experts)")
        else:
            self.moe_dynamic_mask_mode = None
        seed = self.moe_dynamic_mask_seed
        if isinstance(seed, str):
            try:
                seed = int(seed)
            except ValueError:
                raise ValueError(f"moe_dynamic_mask_seed must be an int, got {seed!r}") from None
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"moe_dynamic_mask_seed must be a non-negative int, got {seed!r}")
        self.moe_dynamic_mask_seed = seed
        if self.moe_dynamic_mask_source not in DYNAMIC_MASK_SOURCES:
            raise ValueError(f"moe_dynamic_mask_source must be one of {DYNAMIC_MASK_SOURCES}, "
                             f"got {self.moe_dynamic_mask_source!r}")
        for name in ("moe_sigma_shrinkage", "moe_sigma_decay_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
            setattr(self, name, float(v))

    def _validate_split_fields(self) -> None:
        from mpmoe.megatron.hetero import parse_expert_sizes

        self.moe_expert_ffn_sizes = parse_expert_sizes(self.moe_expert_ffn_sizes, self.num_moe_experts)
        if self.moe_expert_ffn_sizes and self.num_moe_experts is None:
            raise ValueError("moe_expert_ffn_sizes needs num_moe_experts")
        if not isinstance(self.moe_router_unit_gates, bool):
            raise ValueError(f"moe_router_unit_gates must be a bool, got {self.moe_router_unit_gates!r}")
        c = self.moe_size_aux_loss_coeff
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"moe_size_aux_loss_coeff must be a number >= 0, got {c!r}")
        self.moe_size_aux_loss_coeff = float(c)
        if self.moe_expert_ffn_sizes and (getattr(self, "moe_expert_groups", None)
                                          or getattr(self, "moe_expert_compression", None)):
            raise ValueError("moe_expert_ffn_sizes (split experts) cannot be combined with merged or "
                             "compressed experts")
        if (self.moe_router_unit_gates or c) and self.moe_relu_routing:
            raise ValueError("moe_router_unit_gates / moe_size_aux_loss_coeff do not apply to ReMoE's "
                             "ReLU routing")
    def _validate_surgery_fields(self) -> None:
        from mpmoe.surgery.compress import parse_compression
        from mpmoe.surgery.merge import parse_expert_groups

        groups = parse_expert_groups(self.moe_expert_groups)
        if groups:
            if self.num_moe_experts is None:
                raise ValueError("moe_expert_groups needs num_moe_experts")
            for layer, labels in groups.items():
                if len(labels) < self.num_moe_experts or max(labels) >= self.num_moe_experts:
                    raise ValueError(f"moe_expert_groups: layer {layer} maps {len(labels)} experts into "
                                     f"groups up to {max(labels)}, the model has num_moe_experts="
                                     f"{self.num_moe_experts}")
        self.moe_expert_groups = self.moe_expert_groups or None
        parse_compression(self.moe_expert_compression)
        self.moe_expert_compression = self.moe_expert_compression or None

    def _validate_otep_combination(self) -> None:
        if self.num_moe_experts is None:
            raise ValueError("num_moe_experts must be set when moe_router_load_balancing_type='otep'")
        if self.moe_router_score_function != "softmax":
            raise ValueError(
                "moe_router_score_function must be 'softmax' for 'otep' (MoPE routes on softmax probabilities), "
                f"got {self.moe_router_score_function!r}"
            )
        if self.moe_router_num_groups or self.moe_router_group_topk:
            raise ValueError("moe_router_num_groups/moe_router_group_topk (group-limited top-k) are not supported with 'otep'")
        if self.moe_router_fusion:
            raise ValueError("moe_router_fusion is not supported with 'otep' (the selection is not megatron's top-k)")
        if self.moe_router_force_load_balancing:
            raise ValueError("moe_router_force_load_balancing is not supported with 'otep'")

    # ------------------------------------------------------------------ helpers
    @property
    def is_mope(self) -> bool:
        """True when MoE layers route with MoPE (OTEP)."""
        return self.moe_router_load_balancing_type == MOPE_ROUTING_TYPE

    @staticmethod
    def env_overrides(environ: Optional[Mapping[str, str]] = None) -> dict:
        """Config field values from the demo code's environment variables that are set.

        ``MoPEConfig(**base_kwargs, **MoPEConfig.env_overrides())`` honours
        ``MOE_MASK_EXPERTS``, ``MOE_DYNAMIC_MASK_MODE``, ``MOE_COOCCURRENCE_STATS_DIR``,
        ``MOE_DYNAMIC_MASK_LAYERS``, ``MOE_DYNAMIC_MASK_SEED`` and ``EACT_SAVE``.
        """
        env = os.environ if environ is None else environ
        out = {}
        for var, field in _ENV_FIELDS.items():
            value = env.get(var)
            if value is not None and value.strip():
                out[field] = value.strip()
        return out
