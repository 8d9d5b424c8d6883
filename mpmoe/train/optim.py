"""Data-parallel wrapping, optimizer and LR schedule: megatron's own, on GPU and CPU.

* megatron's ``DistributedDataParallel`` (contiguous grad buffers, ``main_grad``; dense
  grads averaged over DP x CP, expert grads over the expert-data-parallel group), with
  megatron's ``finalize_model_grads`` as the schedule's gradient hook;
* ``get_megatron_optimizer`` (Adam, megatron's parameter groups and global-norm clipping);
  the distributed optimizer when ``--use-distributed-optimizer`` is on and CUDA is present;
* megatron's ``OptimizerParamScheduler`` for LR/WD (WSD included).

On CPU the same objects run thanks to :mod:`mpmoe.megatron.cpu_compat` (patches
``ddp_grad_buffer_device``, ``fp32_optimizer_scale_device``, ``grad_norm_device``). The one
CPU difference: the distributed optimizer is not used without CUDA (megatron-core 0.16.1's
``DistributedOptimizer`` checks parameter types against ``torch.cuda.*Tensor`` names and
reduce-scatters gradient buckets, which gloo does not implement), so CPU runs use
megatron's plain (non-distributed) optimizer; the result is the same update, with the
optimizer state replicated instead of sharded over data-parallel ranks.
"""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "freeze_all_but_last_layers", "build_scheduler", "use_distributed_optimizer",
           "wrap_model"]


def use_distributed_optimizer(args) -> bool:
    """``--use-distributed-optimizer``, honoured only with CUDA (see the module docstring)."""
    return bool(args.use_distributed_optimizer) and torch.cuda.is_available()


def wrap_model(model: torch.nn.Module, config, args):
    """``(ddp_model, finalize_grads_fn)``: megatron's DistributedDataParallel around ``model``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(args),
        # the trainer checks loss and gradients itself (mpmoe.train.faults): megatron's
        # check needs CUDA to report a NaN, and it can only stop, not skip the step
        check_for_nan_in_grad=False,
    )
    wrapped = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = wrapped.no_sync
    return wrapped, finalize_model_grads


def build_optimizer(wrapped, config, args):
    """megatron's optimizer (``get_megatron_optimizer``) over the DDP-wrapped model."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    oc = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer(args),
    )
    return get_megatron_optimizer(oc, [wrapped])


def build_scheduler(optimizer, args):
    """megatron's OptimizerParamScheduler, stepped once per iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from mpmoe.run.args import schedule_lengths

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


def freeze_all_but_last_layers(model: torch.nn.Module, n) -> int:
    """``--last-trainable-layers N``: only the last ``N`` transformer layers, the final norm
    and the output layer keep ``requires_grad`` (embeddings and earlier layers are frozen;
    megatron's DDP and optimizer skip frozen parameters). ``None`` or -1: train everything.
    Routers of frozen layers still route and count their statistics. Returns the number
    of frozen parameters (elements)."""
    if n is None or n < 0:
        return 0
    decoder = model.decoder
    layers = list(decoder.layers)
    keep = {id(p) for layer in layers[len(layers) - n:] for p in layer.parameters()} if n else set()
    for name in ("final_layernorm",):
        mod = getattr(decoder, name, None)
        if mod is not None:
            keep |= {id(p) for p in mod.parameters()}
    output = getattr(model, "output_layer", None)
    if output is not None and not getattr(model, "share_embeddings_and_output_weights", False):
        keep |= {id(p) for p in output.parameters()}
    frozen = 0
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def freeze_all_but_routers(model: torch.nn.Module, trainable: str = "all") -> int:
    """``--trainable-params routers``: only the MoE routers' weights keep ``requires_grad``
    (HEMoE trains the gates of a split model with the experts frozen). Returns the number of
    frozen parameters (elements); ``"all"`` freezes nothing."""
    if trainable != "routers":
        return 0
    frozen = 0
    for name, p in model.named_parameters():
        if ".mlp.router." not in name:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
