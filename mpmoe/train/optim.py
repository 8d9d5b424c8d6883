"""Data-parallel wrapping, optimizer and LR schedule.

GPU: megatron's ``DistributedDataParallel`` (contiguous grad buffers, ``main_grad``) and
``get_megatron_optimizer`` (the distributed optimizer by default), with megatron's
``finalize_model_grads`` as the schedule's gradient hook. Both allocate on CUDA in
megatron-core 0.16.1 (``_ParamAndGradBuffer`` uses ``torch.cuda.current_device()``,
``FP32Optimizer`` a CUDA tensor), so on CPU a narrow substitute with the same interface
is used:

* :class:`CpuGradSync` averages gradients over data-parallel replicas the way megatron's
  DDP does (dense parameters over DP x CP, expert parameters over the expert-data-parallel
  group, both scaled by 1/(DP x CP)), as the schedule's ``finalize_model_grads_func``;
* :class:`CpuAdamW` is ``torch.optim.AdamW`` behind megatron's optimizer interface
  (``zero_grad``, ``step() -> (ok, grad_norm, num_zeros)``, ``param_groups``,
  ``sharded_state_dict``, ``load_state_dict``), with megatron's parameter groups (no weight
  decay on biases and norms) and global-norm clipping over all model-parallel shards.

The LR/WD schedule is megatron's ``OptimizerParamScheduler`` in both cases (WSD included).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["CpuAdamW", "CpuGradSync", "build_optimizer", "build_scheduler", "wrap_model"]


def _is_expert(p: torch.nn.Parameter) -> bool:
    return not getattr(p, "allreduce", True)


class CpuGradSync:
    """Megatron-DDP-equivalent gradient averaging on CPU (``finalize_model_grads_func``)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.edp_group = ps.get_expert_data_parallel_group()
        self.scale = 1.0 / ps.get_data_parallel_world_size(with_context_parallel=True)

    @torch.no_grad()
    def __call__(self, model_list=None, num_tokens=None, pg_collection=None, force_all_reduce=False):
        for expert in (False, True):
            grads = [p.grad for p in self.params if p.grad is not None and _is_expert(p) == expert]
            if not grads:
                continue
            group = self.edp_group if expert else self.dp_group
            flat = torch.cat([g.reshape(-1) for g in grads])
            if dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
            flat.mul_(self.scale)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "weight_decay": 0.0})
    for g in groups:  # keys OptimizerParamScheduler reads
        g.update(is_decoupled_lr=False)
    return groups


class CpuAdamW:
    """``torch.optim.AdamW`` with megatron's optimizer interface (CPU substitute)."""

    def __init__(self, model: torch.nn.Module, args):
        self.model = model
        self.clip_grad = args.clip_grad
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, args.weight_decay), lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
            weight_decay=args.weight_decay, foreach=False,
        )
        self.mp_group = ps.get_model_parallel_group()
        self.ep_group = ps.get_expert_model_parallel_group()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return torch.ones(1)

    def scale_loss(self, loss):
        return loss

    @torch.no_grad()
    def grad_norm(self) -> float:
        """L2 norm of the full gradient (expert shards summed over expert-parallel ranks)."""
        dense = torch.zeros((), dtype=torch.float64)
        expert = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sq = p.grad.detach().double().pow(2).sum()
                if _is_expert(p):
                    expert += sq
                else:
                    dense += sq
        if dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(expert, group=self.ep_group)
        return math.sqrt(float(dense + expert))

    @torch.no_grad()
    def step(self):
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.zero_grad()
            return False, norm, None
        if self.clip_grad and self.clip_grad > 0 and norm > self.clip_grad:
            coeff = self.clip_grad / (norm + 1e-6)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coeff)
        self.optimizer.step()
        return True, norm, None

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **_):
        """Adam moments as ShardedTensors shaped like their parameters (+ step, hyper-params)."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        params = [p for g in self.param_groups for p in g["params"]]
        if is_loading:  # create the moment tensors so that there is something to load into
            for p in params:
                st = self.optimizer.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, iter(params))
        state = self.optimizer.state_dict()
        # Adam's per-parameter step counts are equal on every rank: common (rank-0) data.
        state["param_steps"] = {pid: float(st["step"]) for pid, st in state["state"].items()}
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        return state

    def load_state_dict(self, state_dict):
        steps = state_dict.pop("param_steps", {})
        for pid, st in state_dict["state"].items():
            st["step"] = torch.tensor(float(steps.get(pid, 0.0)), dtype=torch.float32)
        self.optimizer.load_state_dict(state_dict)


def wrap_model(model: torch.nn.Module, config, args):
    """``(model_for_schedule, finalize_grads_fn, uses_megatron_ddp)``."""
    if torch.cuda.is_available():
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        wrapped = DistributedDataParallel(config, ddp_config, model)
        config.no_sync_func = wrapped.no_sync
        return wrapped, finalize_model_grads, True
    return model, CpuGradSync(model), False


def build_optimizer(wrapped, config, args, uses_megatron_ddp: bool):
    if uses_megatron_ddp:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        oc = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        return get_megatron_optimizer(oc, [wrapped])
    return CpuAdamW(wrapped, args)


def schedule_lengths(args) -> dict:
    """Warm-up, decay and WSD-decay lengths in iterations."""
    decay = args.lr_decay_iters or max(args.train_iters, 1)
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(round(args.lr_warmup_fraction * decay))
    wsd = args.lr_wsd_decay_iters
    if wsd is None:
        wsd = max(1, int(round(args.lr_wsd_decay_fraction * decay)))
    return {"warmup": warmup, "decay": decay, "wsd_decay": wsd}


def build_scheduler(optimizer, args):
    """megatron's OptimizerParamScheduler, stepped once per iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    n = schedule_lengths(args)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=n["warmup"],
        lr_decay_steps=n["decay"],
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=n["decay"],
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=n["wsd_decay"] if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style if args.lr_decay_style == "WSD" else None,
    )
