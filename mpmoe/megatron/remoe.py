"""ReMoE (``--router remoe``; thu-ml/ReMoE's ``--moe-relu-routing``) and the balancing
state updates after each optimizer step.

The math is :mod:`mpmoe.routing.balancing` (pure PyTorch); this module plugs it into
megatron-core:

* :class:`ReMoERouter`: ReLU gates, a variable number of experts per token, the
  load-balanced L1 penalty attached to the gates with megatron's ``MoEAuxLossAutoScaler``
  (so it is added to the loss's gradient like the aux loss), and the adaptive coefficient
  ``relu_l1_coeff`` - a persistent float64 buffer, so it is in every checkpoint and resumes
  exactly. The trainer calls :func:`update_balancing_state` after each optimizer step: one
  all-reduce of the step's routed-pair and token counts, then every ReMoE layer's
  coefficient takes the same multiplicative step from the mean sparsity over the MoE
  layers (ReMoE's rule).
* The expert bias (softmax top-k and MoPE, :mod:`mpmoe.megatron.router`) needs nothing
  here: its buffer, token counts and update are megatron's own (``finalize_model_grads``
  sums the counts over TP x CP x DP and applies ``bias += u * sign(mean - n)``);
  :func:`balancing_scalars` logs it.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from mpmoe.megatron import routers
from mpmoe.megatron.router import TopKStatsRouter, iter_routers
from mpmoe.routing.balancing import relu_gates, relu_l1_coeff_update, relu_l1_loss, relu_sparsity, target_sparsity

__all__ = ["ReMoERouter", "balancing_scalars", "discard_balancing_state", "update_balancing_state"]


# --------------------------------------------------------------------------- ReMoE
class ReMoERouter(TopKStatsRouter):
    """ReMoE: ``ReLU(x W)`` gates, adaptive load-balanced L1 (see module doc)."""

    stats_kind = routers.KINDS["remoe"].stats_tag

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        # kwargs: what MoELayer passes besides (is_mtp_layer from megatron-core 0.17).
        if routers.kind_of(config) != "remoe":
            raise ValueError("ReMoERouter needs an MoPEConfig with moe_relu_routing=True")
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        f64 = dict(dtype=torch.float64, device=self.weight.device)
        # The adaptive L1 coefficient: training state, saved and resumed with the model.
        self.register_buffer("relu_l1_coeff", torch.full((), float(config.moe_relu_l1_reg_coeff_init), **f64))
        # This optimizer step's routed (token, expert) pairs and tokens (local, counted forwards).
        self.register_buffer("step_routed", torch.zeros((), **f64), persistent=False)
        self.register_buffer("step_tokens", torch.zeros((), **f64), persistent=False)
        # Last update's rank-summed values, for logging: sparsity, experts per token.
        self.register_buffer("last_sparsity", torch.full((), float("nan"), **f64), persistent=False)
        self.register_buffer("last_experts_per_token", torch.full((), float("nan"), **f64), persistent=False)
        # The penalty lambda * L1 this step (sum over the micro-batches that attached it, and
        # their number) and the last step's mean, logged as remoe/l1_loss/layer_L.
        self.register_buffer("step_l1", torch.zeros((), **f64), persistent=False)
        self.register_buffer("step_l1_batches", torch.zeros((), **f64), persistent=False)
        self.register_buffer("last_l1", torch.full((), float("nan"), **f64), persistent=False)

    def _stat_buffer_names(self) -> list[str]:
        return super()._stat_buffer_names() + ["relu_l1_coeff", "step_routed", "step_tokens",
                                               "last_sparsity", "last_experts_per_token",
                                               "step_l1", "step_l1_batches", "last_l1"]

    @property
    def target_sparsity(self) -> float:
        return target_sparsity(self.topk, self.num_experts)

    def _select(self, logits: torch.Tensor, padding_mask, counted: bool, replay: Optional[dict]):
        flat = logits.reshape(-1, self.num_experts)
        gates, routing_map = relu_gates(flat)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1, 1)
        routed = routing_map if valid is None else routing_map & valid
        if self.training and torch.is_grad_enabled():
            # Gates of padding tokens neither count nor enter the penalty.
            counted_gates = gates if valid is None else gates * valid
            tokens = flat.shape[0] if valid is None else valid.sum()
            l1 = relu_l1_loss(counted_gates, routed.sum(dim=0), self.topk, num_tokens=tokens)
            penalty = l1 * self.relu_l1_coeff.to(l1.dtype)
            gates = MoEAuxLossAutoScaler.apply(gates, penalty)
            # once per micro-batch: in its forward, or under full recomputation (whose first
            # forward runs without grad) in the recomputation
            with torch.no_grad():
                self.step_l1.add_(penalty.detach())
                self.step_l1_batches.add_(1)
        if counted:
            with torch.no_grad():
                self.step_routed.add_(routed.sum())
                self.step_tokens.add_(flat.shape[0] if valid is None else valid.sum())
        return gates.type_as(logits), routing_map

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts


@torch.no_grad()
def update_balancing_state(models) -> None:
    """After each optimizer step: ReMoE's coefficient update (collective over the token group).

    The step's routed pairs and tokens of every ReMoE layer are summed over the ranks that
    see different tokens (one all-reduce); the mean sparsity over those layers moves every
    layer's coefficient by ReMoE's rule. No-op without ReMoE layers. (The expert bias is
    updated by megatron's ``finalize_model_grads`` inside the step.)
    """
    routers = [r for r in iter_routers(models) if isinstance(r, ReMoERouter)]
    if not routers:
        return
    counts = torch.stack([torch.stack([r.step_routed, r.step_tokens]) for r in routers])
    group = routers[0].token_group
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(counts, group=group)
    e = routers[0].num_experts
    sparsity = relu_sparsity(counts[:, 0], counts[:, 1], e)
    mean = sparsity.mean()
    cfg = routers[0].config
    for i, r in enumerate(routers):
        r.last_sparsity.copy_(sparsity[i])
        r.last_experts_per_token.copy_(counts[i, 0] / counts[i, 1].clamp_min(1))
        r.relu_l1_coeff.copy_(relu_l1_coeff_update(r.relu_l1_coeff, mean, r.target_sparsity,
                                                   cfg.moe_relu_l1_reg_coeff_multiplier))
        r.last_l1.copy_(r.step_l1 / r.step_l1_batches.clamp_min(1))
        r.step_routed.zero_()
        r.step_tokens.zero_()
        r.step_l1.zero_()
        r.step_l1_batches.zero_()


@torch.no_grad()
def discard_balancing_state(models) -> None:
    """A skipped step (``--on-nan skip``): drop its ReMoE counts so that they do not roll
    into the next step's sparsity (and the coefficient does not move)."""
    for r in iter_routers(models):
        if isinstance(r, ReMoERouter):
            for t in (r.step_routed, r.step_tokens, r.step_l1, r.step_l1_batches):
                t.zero_()


def balancing_scalars(models) -> dict:
    """Per-layer logging values: ``remoe/{l1_coeff,sparsity,experts_per_token,l1_loss}/layer_L`` and
    ``moe/expert_bias_absmax/layer_L`` (host copies; call on logging iterations only)."""
    out = {}
    for r in iter_routers(models):
        layer = r.layer_number
        if isinstance(r, ReMoERouter):
            out[f"remoe/l1_coeff/layer_{layer}"] = float(r.relu_l1_coeff)
            out[f"remoe/sparsity/layer_{layer}"] = float(r.last_sparsity)
            out[f"remoe/experts_per_token/layer_{layer}"] = float(r.last_experts_per_token)
            out[f"remoe/l1_loss/layer_{layer}"] = float(r.last_l1)
        elif getattr(r, "expert_bias", None) is not None:
            # the bias as the selection adds it (x 4/E in mode "prob-scaled")
            bias, _ = r.selection_bias()
            out[f"moe/expert_bias_absmax/layer_{layer}"] = float(bias.abs().max())
    return out


def nonfinite_balancing_state(models) -> str:
    """What of the routers' balancing state is NaN/inf ("" when all is finite): ReMoE's L1
    coefficient or the expert bias, named with the flag that drives it (one host sync)."""
    state = []
    for r in iter_routers(models):
        if isinstance(r, ReMoERouter):
            state.append((r, "ReMoE's L1 coefficient", "--moe-relu-l1-reg-coeff-init / "
                          "--moe-relu-l1-reg-coeff-multiplier", r.relu_l1_coeff))
        elif getattr(r, "expert_bias", None) is not None:
            state.append((r, "the expert bias", "--moe-router-bias-update-rate", r.expert_bias))
    if not state or bool(torch.cat([t.detach().reshape(-1).double() for *_, t in state]).isfinite().all()):
        return ""
    for r, what, flag, t in state:
        if not bool(t.isfinite().all()):
            return f"{what} of layer {r.layer_number} is not finite (driven by {flag})"
    return ""


def balancing_flags(models) -> str:
    """The flags of the balancing schemes ``models`` use (for advice on a NaN loss)."""
    flags = []
    for r in iter_routers(models):
        if isinstance(r, ReMoERouter) and "--moe-relu-l1-reg-coeff-multiplier" not in flags:
            flags.append("--moe-relu-l1-reg-coeff-multiplier")
        elif getattr(r, "expert_bias", None) is not None and "--moe-router-bias-update-rate" not in flags:
            flags.append("--moe-router-bias-update-rate")
    return ", ".join(flags)
