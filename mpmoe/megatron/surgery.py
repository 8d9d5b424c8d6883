"""Megatron modules for checkpoints written by ``mpmoe experts`` (merged, compressed experts).

Two model-shape settings (recorded in the checkpoint's flags, so that every reader rebuilds
the same model):

* ``moe_expert_groups`` (``--moe-expert-groups "2:0,1,0,-1;3:..."``): per MoE layer, the group
  of each of the router's E experts (``-1``: dropped, never routed to). The router keeps its
  E rows (and, for MoPE, its E x E Sigma); it selects over E as trained, then each group's
  gate is the sum of its selected members' gates ("select, then fold"), and the layer holds
  ``num_moe_experts`` = E' experts (a group index is an expert index). With E' = E the layer
  is the stock one except for the dropped experts (the ``drop`` baseline of the bind layout).
  Layers may use fewer than E' groups (global grouping): the extra experts are never routed to.
  At evaluation, ``moe_expert_group_routing="fold-select"`` routes over the groups instead:
  the router's probabilities summed over each group, then top-k (MoPE: OTEP with the groups'
  pushed-forward Sigma) over the E' groups.
* ``moe_expert_compression`` (``--moe-expert-compression "RANK:KEEP"``): every expert's
  ``linear_fc1`` / ``linear_fc2`` is a :class:`FactorisedExpertLinear`: ``L [out, r]``,
  ``R [r, in]`` and ``ceil(KEEP * out)`` rows of a sparse residual, really that small in
  memory and on disk.

:func:`apply_surgery_spec` puts both into a MoE layer spec; :mod:`mpmoe.megatron.spec` calls it.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from mpmoe.surgery.compress import kept_row_count, parse_compression
from mpmoe.surgery.merge import parse_expert_groups

__all__ = ["grouped_router_class", "FactorisedExpertLinear", "parse_compression", "apply_surgery_spec",
           "router_width"]


def router_width(config) -> int:
    """E: the experts the router of a grouped layer selects over."""
    groups = parse_expert_groups(getattr(config, "moe_expert_groups", None))
    return len(next(iter(groups.values()))) if groups else config.num_moe_experts


class _GroupedRouter:
    """Mixin over an mpmoe router: select over the E original experts, fold into groups."""

    def __init__(self, config, *args, **kwargs):
        groups = parse_expert_groups(config.moe_expert_groups)
        width = len(next(iter(groups.values())))
        inner = copy.copy(config)
        inner.num_moe_experts = width
        super().__init__(inner, *args, **kwargs)
        self.num_groups = config.num_moe_experts
        self._groups = groups
        self._labels: Optional[torch.Tensor] = None
        self.fold_select = getattr(config, "moe_expert_group_routing", "select-fold") == "fold-select"
        if self.fold_select:
            _check_fold_select(config, groups)

    def _layer_labels(self, device) -> torch.Tensor:
        if self._labels is None or self._labels.device != device:
            if self.layer_number not in self._groups:
                raise ValueError(f"moe_expert_groups has no map for MoE layer {self.layer_number}")
            labels = self._groups[self.layer_number]
            if max(labels) >= self.num_groups:
                raise ValueError(f"moe_expert_groups: layer {self.layer_number} uses group {max(labels)}, "
                                 f"the model has {self.num_groups} experts")
            self._labels = torch.tensor(labels, dtype=torch.long, device=device)
        return self._labels

    @property
    def static_mask_ids(self) -> tuple:
        dropped = ()
        if self.layer_number in self._groups:
            dropped = tuple(e for e, g in enumerate(self._groups[self.layer_number]) if g < 0)
        return tuple(sorted(set(super().static_mask_ids) | set(dropped)))

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.fold_select:
            return self._fold_then_select(logits)
        probs, routing_map = super().routing(logits, padding_mask)
        if self.num_groups == self.num_experts and self._identity_groups():
            return probs, routing_map
        labels = self._layer_labels(probs.device).clamp_min(0)  # dropped experts are never selected
        shape = (probs.shape[0], self.num_groups)
        folded = torch.zeros(shape, dtype=probs.dtype, device=probs.device).index_add_(1, labels, probs)
        hits = torch.zeros(shape, dtype=torch.int32, device=probs.device)
        hits.index_add_(1, labels, routing_map.to(torch.int32))
        return folded, hits > 0

    def _fold_then_select(self, logits: torch.Tensor):
        """Fold-then-select (``moe_expert_group_routing="fold-select"``, evaluation only): the
        softmax over the E router experts (dropped and masked experts left out), summed over
        each group's members, then the router's own rule over the E' groups: top-k, or MoPE's
        OTEP with the groups' Sigma (:meth:`group_sigma`); the gates are the router's softmax
        top-k over the groups' log-probabilities (``--moe-router-pre-softmax``: the selected
        groups' folded probabilities; off: renormalised over the selected groups)."""
        if self.training:
            raise RuntimeError("moe_expert_group_routing='fold-select' is an evaluation option; "
                               "train merged experts with 'select-fold'")
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        from mpmoe.routing import otep_select
        from mpmoe.surgery.merge import fold_probabilities

        flat = logits.reshape(-1, self.num_experts).float()
        labels = self._layer_labels(flat.device)
        excluded = torch.zeros(self.num_experts, dtype=torch.bool, device=flat.device)
        excluded[list(self.static_mask_ids)] = True  # dropped (label -1) and knocked-out experts
        probs = torch.softmax(flat.masked_fill(excluded, -math.inf), dim=-1)
        folded = fold_probabilities(probs, labels.masked_fill(excluded, -1), self.num_groups)
        group_logits = folded.log()  # -inf for a group with no member left
        otep_active = getattr(self, "otep_active", None)
        if otep_active is not None and otep_active():
            used = torch.zeros(self.num_groups, dtype=torch.bool, device=flat.device)
            used[labels[~excluded]] = True
            selection = otep_select(folded, self.group_sigma().to(flat.device), self.topk, allowed=used,
                                    eps=self.config.moe_otep_eps)
            group_logits = group_logits.masked_fill(~selection, -math.inf)
        cfg = self.config
        return topk_routing_with_score_function(
            group_logits, self.topk, use_pre_softmax=cfg.moe_router_pre_softmax,
            scaling_factor=cfg.moe_router_topk_scaling_factor, score_function="softmax", fused=False)

    @torch.no_grad()
    def group_sigma(self) -> Optional[torch.Tensor]:
        """Sigma of the E' stored experts (MoPE; None for top-k): the router's counters pushed
        forward to the groups (N, A u, A C A^T; dropped experts in no group) and rebuilt. What
        analysis compares with the stored experts; routing itself uses the E x E Sigma."""
        sigma = self.current_sigma()
        stats = getattr(self, "cooccurrence_stats", None)
        if sigma is None or stats is None:
            return sigma
        from mpmoe.routing.cooccurrence import covariance_from_counts
        from mpmoe.surgery.merge import push_forward_counters

        labels = self._layer_labels(stats.usage.device)
        a = torch.zeros(self.num_groups, labels.numel(), dtype=stats.usage.dtype, device=labels.device)
        kept = labels >= 0
        a[labels[kept], kept.nonzero().flatten()] = 1
        counts = push_forward_counters(stats.num_tokens, stats.usage, stats.cooccurrence, a)
        return covariance_from_counts(*counts, stats.eps, stats.shrinkage).to(torch.float32)

    def _identity_groups(self) -> bool:
        labels = self._groups.get(self.layer_number)
        return labels is not None and all(g in (e, -1) for e, g in enumerate(labels))


def _check_fold_select(config, groups: dict) -> None:
    """Fold-then-select is defined for softmax top-k and MoPE routers, k groups or more."""
    for name, why in (("moe_router_score_function", "sigmoid scores do not fold into group probabilities"),
                      ("moe_router_enable_expert_bias", "the expert bias steers a selection over the E experts"),
                      ("moe_dynamic_mask_mode", "the dynamic mask drops one of the E experts' selection"),
                      ("moe_router_unit_gates", "unit gates are a selection over the E experts"),
                      ("moe_expert_capacity_factor", "capacity is per expert of the router"),
                      ("moe_eval_dump_dir", "the routing dump records the router's E experts")):
        value = getattr(config, name, None)
        if value and value != "softmax":
            raise ValueError(f"moe_expert_group_routing fold-select cannot be combined with {name} ({why})")
    k = config.moe_router_topk
    for layer, labels in groups.items():
        used = len({g for g in labels if g >= 0})
        if used < k:
            raise ValueError(f"moe_expert_group_routing fold-select: layer {layer} has {used} groups, fewer than "
                             f"the top-k {k} (select-fold routes it)")


@functools.lru_cache(maxsize=None)
def grouped_router_class(router_cls: type) -> type:
    """``router_cls`` selecting over E experts and folding into ``num_moe_experts`` groups."""
    from mpmoe.megatron import compat

    compat.allow_variable_experts_per_token()  # two members of a group fold into one expert
    return type(f"Grouped{router_cls.__name__}", (_GroupedRouter, router_cls), {})


class FactorisedExpertLinear(MegatronModule):
    """An expert linear stored as ``L R`` + kept rows of a sparse residual (compressed expert).

    Built where megatron builds an expert's ``linear_fc1`` / ``linear_fc2`` (same call), shaped
    by ``config.moe_expert_compression``; returns ``(output, None)`` like megatron's linears.
    Parameters ``left [out, r]``, ``right [r, in]``, ``sparse [kept, in]``; buffer ``rows``
    (the output rows of the kept residual rows). TP = 1 only.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = False,
                 skip_bias_add: bool = True, is_expert: bool = True, **kwargs):
        super().__init__(config=config)
        if bias:
            raise ValueError("moe_expert_compression: experts with biases (--add-bias-linear) are not supported")
        rank, keep = parse_compression(config.moe_expert_compression)
        rank = min(rank, input_size, output_size)
        kept = kept_row_count(output_size, keep)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        kw = dict(dtype=config.params_dtype, device=device)
        self.input_size, self.output_size = input_size, output_size
        self.left = torch.nn.Parameter(torch.zeros(output_size, rank, **kw))
        self.right = torch.nn.Parameter(torch.zeros(rank, input_size, **kw))
        self.sparse = torch.nn.Parameter(torch.zeros(kept, input_size, **kw))
        self.register_buffer("rows", torch.arange(kept, dtype=torch.long, device=device))
        # megatron's expert-parameter marker, as its own expert linears set it: only under expert
        # parallelism are expert weights kept out of the data-parallel all-reduce (at EP = 1 a
        # False here would put them in a separate optimizer of their own)
        expert_parallel = is_expert and getattr(config, "expert_model_parallel_size", 1) > 1
        for p in (self.left, self.right, self.sparse):
            setattr(p, "allreduce", not expert_parallel)

    def dense_weight(self) -> torch.Tensor:
        return (self.left @ self.right).index_add(0, self.rows, self.sparse)

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight the factors represent (computed, not stored): readers that
        inspect expert weights (analysis, sizes) see compressed experts like dense ones."""
        return self.dense_weight()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        y = torch.matmul(torch.matmul(x, self.right.t()), self.left.t())
        if self.sparse.shape[0]:
            y = y.index_add(-1, self.rows, torch.matmul(x, self.sparse.t()))
        return y, None

    def backward_dw(self):  # megatron's delayed weight-gradient hook (nothing delayed here)
        return None

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, rank={self.left.shape[1]}, "
                f"kept_rows={self.sparse.shape[0]}")


def apply_surgery_spec(moe_submodules, config) -> None:
    """Put the grouped router and the factorised expert linears into a MoE layer's submodules."""
    if getattr(config, "moe_expert_groups", None):
        moe_submodules.router = grouped_router_class(moe_submodules.router)
    if getattr(config, "moe_expert_compression", None):
        from mpmoe.megatron.compat import experts_module_and_submodules
        from megatron.core.transformer.moe.experts import SequentialMLP

        module, sub = experts_module_and_submodules(moe_submodules)
        if module is not SequentialMLP or sub is None or not hasattr(sub, "linear_fc1"):
            name = getattr(module, "__name__", type(moe_submodules.experts).__name__)
            raise ValueError("moe_expert_compression needs megatron's SequentialMLP experts "
                             f"(--no-moe-grouped-gemm), the spec has {name}")
        sub.linear_fc1 = FactorisedExpertLinear
        sub.linear_fc2 = FactorisedExpertLinear
