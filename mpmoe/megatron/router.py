"""MoPE and top-k routers for megatron-core 0.16-0.19 (subclasses of ``TopKRouter``).

* :class:`TopKStatsRouter` - megatron's top-k routing plus what every mpmoe MoE layer
  shares: a portable gating (no Transformer Engine needed), the static and dynamic
  expert masks, the per-window routing statistics read by
  :class:`mpmoe.megatron.stats.RoutingStatsTracker`, and the eval-time dump of each
  token's routed experts and weights.
* :class:`MoPERouter` - MoPE routing (``docs/design.md``): plain top-k
  during the warm-up, then OTEP over the softmax probabilities and the layer's
  expert covariance Sigma, megatron's top-k softmax (capacity, dropping, scaling) on
  the logits masked to the OTEP selection, aux loss and z-loss from the unmasked
  probabilities.

Both plug into ``MoESubmodules(router=...)`` with megatron's constructor signature
``(config, pg_collection=None, **kwargs)`` (0.17+ passes ``is_mtp_layer``).

Training progress (warm-up is measured in optimizer steps) is pushed in by the
trainer with :func:`set_training_progress`; a router that was never told routes as if
the warm-up were over. Statistics are counted only by *counted* forwards: training
mode and not inside autograd's backward pass. Activation recomputation (megatron's
reentrant ``tensor_parallel.checkpoint`` as well as ``torch.utils.checkpoint``)
re-runs the forward from inside the backward pass, so it is never counted twice;
eval forwards are never counted. Sigma is rebuilt lazily at the start of a counted
forward once ``moe_sigma_update_every`` counted forwards have been added. When megatron
recomputes the router (``recompute_granularity="full"``, or "selective" with "moe" in
``recompute_modules``), each counted forward queues the Sigma and random-mask draw it
used and its recomputation replays them in order, so a recomputation routes exactly as
its forward even when a pipeline schedule runs other micro-batches' forwards (and Sigma
rebuilds) in between. Recomputation outside megatron's config (a user's own
``torch.utils.checkpoint``) is still counted once, and routes identically unless a
Sigma rebuild happens between the forward and its recomputation.

Hot path (training forward): no ``.item()``, ``.cpu()``, ``.tolist()`` and no Python
branch on tensor values; the only collective is the all-reduce of the counters when
Sigma is rebuilt.
"""

from __future__ import annotations

import collections
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    get_default_pg_collection,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from mpmoe.megatron import compat, routers, statsfile
from mpmoe.megatron.parallel import token_parallel_group
from mpmoe.routing import CooccurrenceStats, OtepCache, apply_static_mask, dynamic_drop_one, otep_select
from mpmoe.routing.balancing import biased_softmax_topk
from mpmoe.routing.otep import default_backend

try:  # Transformer Engine provides megatron's fused gating on CUDA.
    import transformer_engine  # noqa: F401

    _HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_TE = False

# -inf as a 0-dim CPU tensor: on CPU torch.where takes it (of any float dtype) for about
# half the cost of a Python-scalar operand. The device is explicit: this module may first be
# imported inside a `with torch.device("meta")` block (building a model to count its
# parameters), which would otherwise make the constant a meta tensor for the whole process.
_NEG_INF = torch.tensor(-math.inf, device="cpu")

__all__ = [
    "TopKStatsRouter",
    "MoPERouter",
    "iter_routers",
    "set_training_progress",
    "sync_routing_state",
    "token_group",
    "is_counted_forward",
]


def is_counted_forward(module: torch.nn.Module) -> bool:
    """True for a forward whose routing must be counted: training mode, not in backward.

    Activation recomputation runs inside the backward pass (autograd graph task id
    != -1), evaluation runs in eval mode; neither is counted.
    """
    return module.training and torch._C._current_graph_task_id() == -1


def token_group(config, pg_collection=None):
    """The process group of all ranks whose routers see different tokens.

    The group from ``pg_collection`` when it carries one (``dp_cp``, or ``tp_dp_cp``
    under sequence parallelism), else :func:`mpmoe.megatron.parallel.token_parallel_group`
    (which explains the choice). None when torch.distributed is not initialised.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    sequence_parallel = bool(getattr(config, "sequence_parallel", False))
    name = "tp_dp_cp" if sequence_parallel else "dp_cp"
    group = getattr(pg_collection, name, None) if pg_collection is not None else None
    return group if group is not None else token_parallel_group(sequence_parallel)


def _walk_modules(models) -> Iterator[torch.nn.Module]:
    if isinstance(models, torch.nn.Module):
        models = [models]
    for model in models:
        yield from model.modules()


def iter_routers(models) -> Iterator["TopKStatsRouter"]:
    """Every :class:`TopKStatsRouter` (MoPE included) in a model or list of model chunks."""
    for module in _walk_modules(models):
        if isinstance(module, TopKStatsRouter):
            yield module


def set_training_progress(models, step: int, total_steps: Optional[int]) -> None:
    """Tell every router of ``models`` the completed optimizer steps and the run's total.

    Call before the forwards of each optimizer step (``step`` = optimizer steps done so
    far, 0 for the first). ``total_steps=None`` means "warm-up over".
    """
    for router in iter_routers(models):
        router.set_training_progress(step, total_steps)


@torch.no_grad()
def sync_routing_state(models, rebuild_sigma: bool = True) -> None:
    """Fold every router's pending Sigma counts into the (rank-summed) totals.

    Collective over each router's token group. With ``rebuild_sigma`` Sigma is also
    rebuilt from them. Call before saving a checkpoint and before evaluation, so that
    the state dict and inference see every counted token.
    """
    for router in iter_routers(models):
        if isinstance(router, MoPERouter):
            router.refresh_sigma(rebuild=rebuild_sigma)


class TopKStatsRouter(TopKRouter):
    """Megatron's top-k router with mpmoe's masks, statistics windows and eval dump."""

    #: file-name tag of the statistics files (``layer{L}_seg{S}_{tag}.npz``).
    stats_kind = routers.KINDS["topk"].stats_tag

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        # kwargs: what MoELayer passes besides (e.g. is_mtp_layer from 0.17), for TopKRouter.
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        if not torch.cuda.is_available():
            # Expert-bias buffers: megatron allocates them on CUDA; the cpu_compat patch
            # "router_expert_bias_device" puts them on the CPU.
            lbt = config.moe_router_load_balancing_type
            if lbt == "global_aux_loss" or (isinstance(lbt, list) and "global_aux_loss" in lbt):
                raise ValueError(
                    "moe_router_load_balancing_type='global_aux_loss' needs CUDA (megatron allocates its buffers there)"
                )
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        if routers.KINDS[routers.kind_of(config)].variable_k or getattr(config, "moe_dynamic_mask_mode", None):
            compat.allow_variable_experts_per_token()  # not exactly k experts per token
        self.pg_collection = pg_collection
        self.token_group = token_group(config, pg_collection)
        num_experts = config.num_moe_experts
        f64 = dict(dtype=torch.float64, device=self.weight.device)
        # Routing-statistics window (summed over ranks and cleared by the tracker).
        self.register_buffer("window_tokens", torch.zeros((), **f64), persistent=False)
        self.register_buffer("window_usage", torch.zeros(num_experts, **f64), persistent=False)
        self.register_buffer("window_cooccurrence", torch.zeros(num_experts, num_experts, **f64), persistent=False)
        # Tokens with 0, 1, ..., E routed experts (variable under ReMoE), same window.
        self.register_buffer("window_experts_per_token", torch.zeros(num_experts + 1, **f64), persistent=False)
        self.last_window_experts_per_token: Optional[torch.Tensor] = None
        self._step: Optional[int] = None
        self._total_steps: Optional[int] = None
        self._counted_forwards = 0  # counted (training, non-recompute) forwards so far
        self._eval_dumps = 0
        self._eval_forwards = 0  # forwards in eval mode (seeds the random dynamic mask)
        # What a counted forward decided (Sigma, forward index), replayed in order by the
        # activation recomputations of those forwards (pipeline schedules run several
        # forwards before the first backward). Cleared every optimizer step.
        self._replay: collections.deque = collections.deque(maxlen=1024)
        self._dynamic_cooccurrence: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ plumbing
    def set_training_progress(self, step: int, total_steps: Optional[int]) -> None:
        """Completed optimizer steps and the run's total (None: warm-up over)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"set_training_progress: step must be a non-negative int, got {step!r}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"set_training_progress: total_steps must be a positive int or None, got {total_steps!r}")
        self._step, self._total_steps = step, total_steps
        self._replay.clear()

    @property
    def recomputed(self) -> bool:
        """Whether megatron re-runs this router's forward in the backward pass."""
        cfg = self.config
        granularity = getattr(cfg, "recompute_granularity", None)
        return granularity == "full" or (
            granularity == "selective" and "moe" in (getattr(cfg, "recompute_modules", None) or [])
        )

    def _stat_buffer_names(self) -> list[str]:
        return ["window_tokens", "window_usage", "window_cooccurrence", "window_experts_per_token"]

    def _apply(self, fn, recurse=True):
        # Float16Module / .half() / .bfloat16() must not cast the float64 counters
        # (they would lose exactness); device moves still apply.
        named = dict(self.named_buffers())
        keep = {name: named[name] for name in self._stat_buffer_names() if name in named}
        result = super()._apply(fn, recurse)
        for name, old in keep.items():
            owner_name, _, attr = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            new = owner._buffers[attr]
            if new is not None and new.dtype != old.dtype:
                owner._buffers[attr] = old.to(device=new.device)
        return result

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits, in ``moe_router_dtype`` (fp32/fp64) or the input dtype.

        Megatron's fused gating needs Transformer Engine and CUDA; elsewhere a plain
        linear layer computes the same product.
        """
        if _HAVE_TE and input.is_cuda:
            return super().gating(input)
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        bias = None if self.bias is None else self.bias.to(router_dtype)
        return F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)

    # ------------------------------------------------------------------ per-layer options
    def _layer_selected(self, layers: Optional[tuple]) -> bool:
        return layers is None or (self.layer_number is not None and self.layer_number in layers)

    @property
    def tracks_statistics(self) -> bool:
        """Whether this layer's window statistics are collected (``moe_stats_dir`` set)."""
        cfg = self.config
        return getattr(cfg, "moe_stats_dir", None) is not None and self._layer_selected(
            getattr(cfg, "moe_stats_layers", None)
        )

    @property
    def static_mask_ids(self) -> tuple:
        """Expert ids knocked out in this layer by ``moe_mask_experts``."""
        mask = getattr(self.config, "moe_mask_experts", None) or {}
        return tuple(mask.get(self.layer_number, ())) if self.layer_number is not None else ()

    @property
    def static_mask_reference(self) -> bool:
        """Knock-out with the authors' semantics (masked experts pickable by OTEP, weight 0)."""
        return getattr(self.config, "moe_mask_experts_semantics", "mpmoe") == "reference"

    @property
    def dynamic_mask_mode(self) -> Optional[str]:
        """The dynamic mask mode active for this layer, or None."""
        mode = getattr(self.config, "moe_dynamic_mask_mode", None)
        if mode is None or not self._layer_selected(getattr(self.config, "moe_dynamic_mask_layers", None)):
            return None
        return mode

    def _dynamic_mask_cooccurrence(self, device) -> torch.Tensor:
        if self._dynamic_cooccurrence is None:
            reference = self._dynamic_mask_source == "reference"
            counts = statsfile.load_layer_cooccurrence(
                self.config.moe_cooccurrence_stats_dir, self.layer_number,
                prefer="moe" if reference else self.stats_kind, latest_only=reference,
            )
            if counts.shape != (self.num_experts, self.num_experts):
                raise ValueError(
                    f"moe_cooccurrence_stats_dir: layer {self.layer_number} co-occurrence matrix is "
                    f"{counts.shape}, expected ({self.num_experts}, {self.num_experts})"
                )
            self._dynamic_cooccurrence = torch.as_tensor(counts, dtype=torch.float32)
        if self._dynamic_cooccurrence.device != device:
            self._dynamic_cooccurrence = self._dynamic_cooccurrence.to(device)
        return self._dynamic_cooccurrence

    # ------------------------------------------------------------------ routing
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Static mask -> selection (top-k here) -> dynamic mask -> statistics."""
        shape = logits.shape
        flat = logits.reshape(-1, self.num_experts)
        masked_ids = self.static_mask_ids
        if masked_ids:
            flat = apply_static_mask(flat, masked_ids, finite=self.static_mask_reference)
        counted = is_counted_forward(self)
        replay = None
        if counted and self.recomputed:
            replay = {"index": self._counted_forwards}
            self._replay.append(replay)
        elif self.training and not counted and self._replay:
            replay = self._replay.popleft()  # recomputation of the oldest pending forward
        probs, routing_map = self._select(flat.view(shape), padding_mask, counted, replay)
        mode = self.dynamic_mask_mode
        if mode is not None:
            probs, routing_map = self._apply_dynamic_mask(probs, routing_map, mode, counted, replay)
        cfg = self.config
        if getattr(cfg, "moe_router_unit_gates", False) or getattr(cfg, "moe_size_aux_loss_coeff", 0.0):
            probs = self._hemoe_gates(flat, probs, routing_map, padding_mask)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1, 1)
        if counted:
            self._count(routing_map if valid is None else routing_map & valid)
            if self._counts_expert_bias:
                self._count_expert_bias(routing_map if valid is None else routing_map & valid)
        elif not self.training and getattr(self.config, "moe_eval_dump_dir", None):
            self._dump_eval(probs, routing_map if valid is None else routing_map & valid)
        if counted:
            self._counted_forwards += 1
        elif not self.training:
            self._eval_forwards += 1
        return probs, routing_map

    def _hemoe_gates(self, flat: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, padding_mask):
        """HEMoE (``moe_router_unit_gates``, ``moe_size_aux_loss_coeff``), after any selection:
        unit gates with the straight-through gradient of the full softmax, and the
        size-weighted balance loss attached to it (megatron's aux-loss autoscaler)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from mpmoe.megatron.hetero import layer_expert_sizes
        from mpmoe.routing.unit_gates import size_weighted_balance_loss, unit_gates

        cfg = self.config
        full = torch.softmax(flat.float(), dim=-1)
        rmap = routing_map.reshape(full.shape)
        coeff = getattr(cfg, "moe_size_aux_loss_coeff", 0.0)
        if coeff and self.training and torch.is_grad_enabled():
            valid = None if padding_mask is None else ~padding_mask.reshape(-1)
            loss = size_weighted_balance_loss(full, rmap, cfg.moe_router_topk, coeff,
                                              layer_expert_sizes(cfg, self.layer_number), valid)
            if cfg.moe_router_unit_gates:
                full = MoEAuxLossAutoScaler.apply(full, loss)
            else:
                probs = MoEAuxLossAutoScaler.apply(probs, loss)
        if cfg.moe_router_unit_gates:
            probs = unit_gates(full, rmap).to(probs.dtype).reshape(probs.shape)
        return probs

    def _select(self, logits: torch.Tensor, padding_mask, counted: bool, replay: Optional[dict]):
        """Megatron's top-k routing (capacity, aux loss, z-loss as configured)."""
        return self._topk_routing(logits, padding_mask)

    @property
    def _counts_expert_bias(self) -> bool:
        """Expert bias on a softmax router: mpmoe counts its tokens (megatron: sigmoid only)."""
        return bool(self.enable_expert_bias) and self.config.moe_router_score_function == "softmax"

    def selection_bias(self):
        """``(bias, space)``: the expert bias as a softmax selection adds it (the buffer times
        :func:`mpmoe.routing.balancing.expert_bias_scale`) and where ("prob" or "logit")."""
        from mpmoe.routing.balancing import expert_bias_scale

        mode = getattr(self.config, "moe_router_expert_bias_mode", "prob")
        scale = expert_bias_scale(mode, self.num_experts)
        bias = self.expert_bias if scale == 1.0 else self.expert_bias * scale
        return bias, ("logit" if mode == "logit" else "prob")

    def _topk_routing(self, logits: torch.Tensor, padding_mask):
        """Megatron's top-k, or with softmax scores and expert bias mpmoe's biased selection
        (:meth:`selection_bias`; gate weights and aux loss from the unbiased routing)."""
        if not self._counts_expert_bias:
            return TopKRouter.routing(self, logits, padding_mask=padding_mask)
        cfg = self.config

        def select(flat, need_aux):
            bias, space = self.selection_bias()
            probs, routing_map = biased_softmax_topk(
                flat, bias, self.topk, space=space,
                pre_softmax=cfg.moe_router_pre_softmax, scaling_factor=cfg.moe_router_topk_scaling_factor,
            )
            if not need_aux:
                return probs, routing_map, None, None
            # as megatron's TopKRouter.routing with expert bias: the aux loss counts the tokens
            # of the *unbiased* top-k map, before capacity dropping
            aux_map, scores = compute_routing_scores_for_aux_loss(flat, self.topk, "softmax", fused=False)
            return probs, routing_map, aux_map, scores

        return self._routing_tail(logits, padding_mask, select)

    def _routing_tail(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor], select):
        """Megatron's routing steps around an mpmoe selection, shared by every mpmoe router:
        z-loss -> ``select`` -> capacity dropping -> aux losses (as ``TopKRouter.routing``).

        ``select(flat_logits, need_aux) -> (probs, routing_map, aux_map, scores)``: ``aux_map``
        the tokens per expert the aux loss counts (None: the routing map after dropping),
        ``scores`` the unmasked softmax probabilities if it computed them (else None).
        """
        cfg = self.config
        seq_length, bsz = logits.shape[:2]
        logits = logits.reshape(-1, self.num_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        need_aux = self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled()
        probs, routing_map, aux_map, scores = select(logits, need_aux)
        if cfg.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk, capacity_factor=cfg.moe_expert_capacity_factor,
                drop_policy=cfg.moe_token_drop_policy, pad_to_capacity=cfg.moe_pad_expert_input_to_capacity,
            )
        if need_aux:
            if scores is None:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            aux_map = routing_map if aux_map is None else aux_map
            if padding_mask is not None:
                valid = ~padding_mask.unsqueeze(-1)
                scores, aux_map = scores * valid, aux_map & valid
            with_pad = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores, aux_map, with_padding_mask=with_pad)
            probs = self._apply_seq_aux_loss(probs, scores, aux_map, seq_length, bsz, with_padding_mask=with_pad)
        return probs, routing_map

    @torch.no_grad()
    def _count_expert_bias(self, routing_map: torch.Tensor) -> None:
        # Counted forwards only; megatron's finalize_model_grads sums these over ranks and
        # updates expert_bias after each step (and zeroes the counts).
        self.local_tokens_per_expert += routing_map.sum(dim=0)

    @property
    def _dynamic_mask_source(self) -> str:
        return getattr(self.config, "moe_dynamic_mask_source", "mpmoe")

    def _apply_dynamic_mask(self, probs, routing_map, mode: str, counted: bool, replay: Optional[dict] = None):
        renormalize = self._dynamic_mask_source == "reference"
        if mode == "cooccurrence":
            return dynamic_drop_one(
                probs,
                routing_map,
                "cooccurrence",
                cooccurrence=self._dynamic_mask_cooccurrence(probs.device),
                max_routed=self.topk,
                renormalize=renormalize,
            )
        # Seeded per (seed, layer, forward) so that a recomputation of a forward (which
        # runs before the next counted forward) draws the same experts.
        if not self.training:
            forward_index = self._eval_forwards
        elif replay is not None:
            forward_index = replay["index"]
        else:
            forward_index = self._counted_forwards if counted else max(self._counted_forwards - 1, 0)
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(
            (int(self.config.moe_dynamic_mask_seed) * 1_000_003 + int(self.layer_number or 0)) * 1_000_003
            + forward_index * 2 + (0 if self.training else 1)
        )
        return dynamic_drop_one(probs, routing_map, "random", generator=gen, renormalize=renormalize)

    @torch.no_grad()
    def _count(self, routing_map: torch.Tensor) -> None:
        if self.tracks_statistics:
            m = routing_map.to(torch.float32)
            self.window_tokens.add_(m.shape[0])
            self.window_usage.add_(m.sum(dim=0))
            self.window_cooccurrence.add_(m.t() @ m)
            per_token = routing_map.sum(dim=1)
            self.window_experts_per_token.index_add_(
                0, per_token, torch.ones_like(per_token, dtype=self.window_experts_per_token.dtype)
            )

    @torch.no_grad()
    def _dump_eval(self, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
        k = min(getattr(self, "max_experts_per_token", self.topk), routing_map.shape[1])
        weights = probs.detach().to(torch.float32).masked_fill(~routing_map, -float("inf"))
        vals, idx = weights.topk(k, dim=1)
        valid = torch.isfinite(vals)
        experts = torch.where(valid, idx, torch.full_like(idx, -1))
        vals = torch.where(valid, vals, torch.zeros_like(vals))
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        statsfile.write_eval_dump(self.config.moe_eval_dump_dir, self.layer_number, rank, self._eval_dumps,
                                  experts.cpu().numpy(), vals.cpu().numpy())
        self._eval_dumps += 1

    @torch.no_grad()
    def reduce_window(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum the window counters over the token group (collective) and return them.

        Returns ``(num_tokens, usage [E], cooccurrence [E, E])`` (float64, exact counts)
        and clears the window. Called by the statistics tracker at a window's end.
        """
        flat = torch.cat([self.window_tokens.reshape(1), self.window_usage, self.window_cooccurrence.reshape(-1),
                          self.window_experts_per_token])
        group = self.token_group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(flat, group=group)
        e = self.num_experts
        out = flat[0].clone(), flat[1 : 1 + e].clone(), flat[1 + e : 1 + e + e * e].view(e, e).clone()
        # Histogram of routed experts per token (index = count), read by the tracker.
        self.last_window_experts_per_token = flat[1 + e + e * e :].clone()
        for t in (self.window_tokens, self.window_usage, self.window_cooccurrence, self.window_experts_per_token):
            t.zero_()
        return out

    def current_sigma(self) -> Optional[torch.Tensor]:
        """Sigma this layer routes with (None for top-k layers)."""
        return None


class MoPERouter(TopKStatsRouter):
    """MoPE (OTEP) routing with a device-resident, checkpointed expert covariance."""

    stats_kind = routers.KINDS["mope"].stats_tag

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        if not hasattr(config, "moe_otep_warmup_fraction") or routers.kind_of(config) != "mope":
            raise ValueError("MoPERouter needs an MoPEConfig with moe_router_load_balancing_type='otep', "
                             f"got {config.moe_router_load_balancing_type!r}")
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        # Aux loss and z-loss exactly as megatron's "aux_loss" routing.
        self.routing_type = "aux_loss"
        self.cooccurrence_stats = CooccurrenceStats(
            self.num_experts, eps=config.moe_otep_eps, device=self.weight.device,
            shrinkage=getattr(config, "moe_sigma_shrinkage", 0.0),
            decay_rate=getattr(config, "moe_sigma_decay_rate", 0.0),
        )
        self._since_refresh = 0  # counted forwards added since Sigma was last rebuilt
        self._otep_cache = OtepCache()  # CPU decode: OTEP's Sigma-only state by pick prefix
        self._otep_backend = None  # MPMOE_OTEP_BACKEND, read at the first OTEP forward (not at each)

    def _stat_buffer_names(self) -> list[str]:
        names = super()._stat_buffer_names()
        names += [f"cooccurrence_stats.{n}" for n, _ in self.cooccurrence_stats.named_buffers()]
        return names

    # ------------------------------------------------------------------ state
    @property
    def warmup_steps(self) -> Optional[float]:
        """Optimizer steps of the top-k warm-up (None when progress was never set)."""
        if self._total_steps is None:
            return None
        return self.config.moe_otep_warmup_fraction * self._total_steps

    def otep_active(self) -> bool:
        """Whether this forward routes with OTEP (Python state only, no tensor read)."""
        if not self.training:
            return not self.config.moe_otep_inference_topk
        warmup = self.warmup_steps
        return warmup is None or self._step >= warmup

    def current_sigma(self) -> torch.Tensor:
        return self.cooccurrence_stats.covariance

    @torch.no_grad()
    def refresh_sigma(self, rebuild: bool = True) -> None:
        """Sum pending counts over the token group (collective); rebuild Sigma if asked."""
        if rebuild:
            self.cooccurrence_stats.refresh(self.token_group)
            self._since_refresh = 0
        else:
            self.cooccurrence_stats.all_reduce(self.token_group)

    # ------------------------------------------------------------------ routing
    def _select(self, logits: torch.Tensor, padding_mask, counted: bool, replay: Optional[dict]):
        if counted and self._since_refresh >= self.config.moe_sigma_update_every:
            self.refresh_sigma(rebuild=True)
        if not self.otep_active():
            return self._topk_routing(logits, padding_mask)
        sigma = self.cooccurrence_stats.covariance
        if replay is not None:
            if counted:
                replay["sigma"] = sigma.clone()
            else:
                sigma = replay.get("sigma", sigma)
        return self._otep_routing(logits, padding_mask, sigma)

    def _otep_routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor], sigma: torch.Tensor):
        return self._routing_tail(logits, padding_mask, lambda flat, need_aux: self._otep_select(flat, need_aux, sigma))

    def _otep_select(self, logits: torch.Tensor, need_aux: bool, sigma: torch.Tensor):
        """OTEP's selection, then megatron's top-k softmax on the logits masked to it; the aux
        loss counts the OTEP selection with the unmasked probabilities."""
        # Unmasked softmax probabilities: OTEP's p, and (with grad) the aux loss's scores.
        # (No grad-mode context managers and no Python-scalar operands here: at one-token
        # decode steps every microsecond shows.)
        scores_all = torch.softmax(logits if need_aux else logits.detach(), dim=-1, dtype=torch.float32)
        masked_ids = self.static_mask_ids
        allowed = None
        # reference semantics: p_j = 0 for a knocked-out expert (finite lowest logit), but OTEP
        # may still pick it through Sigma; masked_logits below keeps its finite logit, so the
        # top-k over them returns exactly OTEP's selection and its gate weight is 0
        if masked_ids and not self.static_mask_reference:
            allowed = torch.ones(self.num_experts, dtype=torch.bool, device=logits.device)
            allowed[list(masked_ids)] = False
        if self._otep_backend is None:
            self._otep_backend = default_backend()
        selection = otep_select(  # records no autograd graph
            self._otep_scores(scores_all.detach() if need_aux else scores_all, logits),
            sigma,
            self.topk,
            allowed=allowed,
            eps=self.config.moe_otep_eps,
            check_finite=False,
            backend=self._otep_backend,
            cache=self._otep_cache,
        )
        masked_logits = torch.where(selection, logits, _NEG_INF if logits.is_cpu else -math.inf)
        probs, routing_map = topk_routing_with_score_function(
            masked_logits,
            self.topk,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function="softmax",
            fused=False,
            router_replay=self.router_replay,
        )
        return probs, routing_map, selection, scores_all if need_aux else None

    def _otep_scores(self, probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """OTEP's p: the softmax probabilities, or with the expert bias ``max(p + b, 0)``
        (bias modes "prob", "prob-scaled") or ``softmax(logits + b)`` (mode "logit").

        The bias steers the selection only (gate weights and aux loss stay unbiased); on
        probabilities it is clamped at 0 because OTEP's objective is quadratic in p
        (docs/routing.md).
        """
        if not self.enable_expert_bias:
            return probs
        bias, space = self.selection_bias()
        if space == "logit":
            with torch.no_grad():
                return torch.softmax(logits.detach() + bias.to(logits.dtype), dim=-1, dtype=torch.float32)
        return (probs + bias.to(probs.dtype)).clamp_min(0.0)

    @torch.no_grad()
    def _count(self, routing_map: torch.Tensor) -> None:
        super()._count(routing_map)
        self.cooccurrence_stats.update(routing_map)
        self._since_refresh += 1
