"""The training loop, top to bottom.

::

    args = mpmoe.run.args.parse_args(["--preset", "tiny-cpu", "--train-iters", "50"])
    result = mpmoe.train.loop.train(args)      # {"iteration": 50, "val_loss": ..., ...}

1. processes and parallel groups (megatron ``parallel_state``: TP / EP / DP, RNG seeds);
2. data: megatron ``GPTDataset``s from ``--data-path`` or the embedded corpus;
3. model: a megatron ``GPTModel`` with MoE or MoPE layers (:func:`mpmoe.megatron.build_gpt_model`);
4. data-parallel wrapper, optimizer, LR schedule (:mod:`mpmoe.train.optim`);
5. resume from ``--load`` (model, optimizer, schedule, data position, RNG, routing state);
6. iterations: tell the routers the step (MoPE warm-up), forward-backward over the
   micro-batches (megatron's schedule), NaN/inf check and stop-signal agreement
   (:mod:`mpmoe.train.faults`), optimizer step, schedule step, routing statistics window,
   logging, evaluation, checkpoint.

A SIGTERM/SIGINT during the iterations stops at the next step boundary, saves (``--save``,
unless ``--no-save-on-signal``) and raises :class:`mpmoe.train.faults.TrainingStopped`;
a NaN/inf loss or gradient raises :class:`mpmoe.train.faults.NonFiniteLoss` (``--on-nan
stop``) or skips that step's update (``--on-nan skip``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["train", "evaluate", "forward_backward"]


# --------------------------------------------------------------------------- one micro-batch
def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's 3-tuple loss: (sum of token losses, token count, values to report)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def forward_backward(model, data_iterator, num_microbatches: int, args, *, forward_only: bool = False):
    """Forward (and backward) over this rank's micro-batches with megatron's schedule
    (``get_forward_backward_func``); returns the reported losses. On CPU the schedule runs
    through :mod:`mpmoe.megatron.cpu_compat` (patch ``schedule_token_count_device``)."""
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data_iterator, model=model,
        num_microbatches=num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only,
    )


def _reduce_losses(reports: list) -> float:
    """Mean token loss over the micro-batches of all data-parallel ranks."""
    from megatron.core import parallel_state as ps

    if not reports:
        return float("nan")
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).double()
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp_min(1))


@torch.no_grad()
def evaluate(model, dataset, args, dp_rank: int, dp_size: int) -> float:
    """Validation loss on the first ``--eval-iters`` global batches of ``dataset`` (fixed set).

    Routing state is synced first (pending Sigma counts summed over ranks, Sigma rebuilt),
    so validation routes with every token counted so far, as a checkpoint would.
    """
    from mpmoe.megatron.router import sync_routing_state
    from mpmoe.run.data import micro_batches

    sync_routing_state(model)
    model.eval()
    reports = []
    nmb = args.global_batch_size // (args.micro_batch_size * dp_size)
    for i in range(args.eval_iters):
        it = micro_batches(dataset, i * args.global_batch_size, args.global_batch_size,
                           args.micro_batch_size, dp_rank, dp_size)
        reports += forward_backward(model, it, nmb, args, forward_only=True)
    model.train()
    return _reduce_losses(reports)


def _default_run_dir(args, rank: int = 0) -> str:
    """``runs/<preset>-<date>-<time>``, claimed by rank 0 with one ``mkdir`` (atomic): a second
    run started in the same second gets ``...-2`` (then ``-3``, ...) instead of sharing the
    folder (interleaved metrics, one ``config.json`` overwritten). Other ranks get ""
    and take rank 0's answer."""
    if rank != 0:
        return ""
    base = Path("runs") / f"{Path(args.preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: no free run directory name")


def _broadcast_str(text: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- the run
def train(args) -> dict:
    """Run training as configured by ``args`` (see :mod:`mpmoe.run.args`); returns a summary."""
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.megatron.remoe import (balancing_flags, balancing_scalars, discard_balancing_state,
                                      nonfinite_balancing_state, update_balancing_state)
    from mpmoe.megatron.router import set_training_progress
    from mpmoe.run import checkpoint as ckpt
    from mpmoe.run.args import schedule_lengths, validate
    from mpmoe.run.data import build_datasets, micro_batches, resolve_data
    from mpmoe.run.model import build_model, count_parameters, padded_vocab_size
    from mpmoe.train.faults import NonFiniteLoss, StopSignals, TrainingStopped, agree, local_nonfinite
    from mpmoe.train.metrics import ExpertLoadMonitor, RunLogger, Throughput, environment_summary
    from mpmoe.train.optim import (build_optimizer, build_scheduler, freeze_all_but_last_layers,
                                   freeze_all_but_routers, wrap_model)

    # 1. processes and parallel groups ------------------------------------------------
    info = init_distributed(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        backend=args.distributed_backend, seed=args.seed,
    )
    signals = StopSignals()
    claimed, started = None, False  # a default run dir this run made; the iterations began
    try:
        validate(args, world_size=info.world_size)
        dp_rank, dp_size = info.data_parallel_rank, info.data_parallel_size
        num_microbatches = args.global_batch_size // (args.micro_batch_size * dp_size)
        run_dir = Path(_broadcast_str(str(args.run_dir) if args.run_dir else _default_run_dir(args, info.rank)))
        if not args.run_dir and info.rank == 0:
            claimed = run_dir

        # 2. data -----------------------------------------------------------------------
        spec = resolve_data(args)
        vocab = padded_vocab_size(spec.vocab_size, args.make_vocab_size_divisible_by, info.tensor_model_parallel_size)
        train_ds, valid_ds, _ = build_datasets(spec, args, seed=args.seed)

        # 3. model ----------------------------------------------------------------------
        config, model, module = build_model(args, vocab)
        freeze_all_but_last_layers(model, getattr(args, "last_trainable_layers", None))
        freeze_all_but_routers(model, getattr(args, "trainable_params", "all"))

        # 4. data parallelism, optimizer, LR schedule ------------------------------------
        wrapped, finalize_grads = wrap_model(module, config, args)
        config.finalize_model_grads_func = finalize_grads
        optimizer = build_optimizer(wrapped, config, args)
        config.grad_scale_func = optimizer.scale_loss
        scheduler = build_scheduler(optimizer, args)

        # 5. resume ---------------------------------------------------------------------
        iteration, consumed = 0, 0
        resume = ckpt.resolve_load(args.load, args.save) if args.load is not None else None
        if resume is not None:
            ckpt.check_tokenizer(resume[0], spec.tokenizer_sha256, "--tokenizer-model" if args.data_path
                                 else "the embedded corpus's tokenizer")
            state = ckpt.load_checkpoint(resume[0].parent, model, optimizer, scheduler,
                                         load_optim=not args.no_load_optim,
                                         load_rng=not args.no_load_rng, iteration=resume[1],
                                         run_args=vars(args), allow_model_change=args.allow_model_change)
            iteration, consumed = state["iteration"], state["consumed_samples"]
        if info.rank == 0 and args.load is not None:
            print(f"mpmoe train: resuming from {resume[0]} (iteration {iteration}"
                  f"{', optimizer not loaded' if args.no_load_optim else ''})" if resume else
                  f"mpmoe train: no checkpoint in {args.load} yet: starting from scratch",
                  file=sys.stderr, flush=True)
        stats = None
        if args.num_experts is not None and args.moe_stats_dir is not None:
            from mpmoe.megatron.stats import RoutingStatsTracker

            stats = RoutingStatsTracker(model)

        tokens_per_iter = args.global_batch_size * args.seq_length
        logger = RunLogger(run_dir, args, args.train_iters, iteration, tokens_per_iter=tokens_per_iter)
        if logger.rank0:  # whole or not at all (a stop signal may come at any time)
            (run_dir / "config.json.tmp").write_text(json.dumps(
                {"args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                 "data": {"source": spec.source, "vocab_size": spec.vocab_size, "padded_vocab": vocab,
                          "tokenizer_dir": spec.tokenizer_dir},
                 "schedule": schedule_lengths(args), "num_microbatches": num_microbatches,
                 "parameters": count_parameters(model), "environment": environment_summary()},
                indent=2))
            os.replace(run_dir / "config.json.tmp", run_dir / "config.json")
        # What `mpmoe eval` / `mpmoe analyze` need to rebuild the model from a checkpoint
        # alone: the run's flags (in every checkpoint) and its tokenizer (next to them).
        run_info = {"args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                    "data": {"source": spec.source, "vocab_size": spec.vocab_size,
                             "padded_vocab": vocab, "eod_id": spec.eod_id,
                             "tokenizer_sha256": spec.tokenizer_sha256}}
        if args.save and logger.rank0 and spec.tokenizer_dir:
            ckpt.save_tokenizer(args.save, spec.tokenizer_dir)
        load_monitor = ExpertLoadMonitor(model)
        throughput = Throughput(tokens_per_iter)
        last_log = iteration
        last_saved = iteration if args.load is not None and iteration > 0 else None
        train_loss = val_loss = float("nan")
        stop_signal, nan_skipped = 0, 0
        first_iteration = iteration
        wrapped.train()

        # 6. iterations -----------------------------------------------------------------
        signals.__enter__()
        started = True
        while iteration < args.train_iters and not stop_signal:
            set_training_progress(model, iteration, args.train_iters)  # MoPE warm-up clock
            optimizer.zero_grad()
            wrapped.zero_grad_buffer()
            data = micro_batches(train_ds, consumed, args.global_batch_size, args.micro_batch_size,
                                 dp_rank, dp_size)
            reports = forward_backward(wrapped, data, num_microbatches, args)
            bad = local_nonfinite(reports, wrapped) if args.check_for_nan_in_loss_and_grad else ""
            stop_signal, nonfinite = agree(signals.signum, bool(bad))
            if nonfinite:
                what = (f"iteration {iteration + 1}: {bad or 'a loss or gradient on another rank is not finite'}")
                if args.on_nan == "stop":
                    others = balancing_flags(model)
                    raise NonFiniteLoss(f"{what}; stopped before the optimizer step (checkpoints "
                                        f"are unchanged); lower --lr{' or ' + others if others else ''}, "
                                        "or pass --on-nan skip")
                nan_skipped += 1
                if info.rank == 0:
                    print(f"mpmoe train: {what}: update skipped (--on-nan skip)", file=sys.stderr, flush=True)
                ok, grad_norm = False, None
                discard_balancing_state(model)  # the skipped step's ReMoE counts
            else:
                ok, grad_norm, _ = optimizer.step()
                update_balancing_state(model)  # ReMoE's L1 coefficient (the expert bias: in the step)
                broken = nonfinite_balancing_state(model)  # the same on every rank (replicated)
                if broken:  # a skipped step cannot undo it: stop whatever --on-nan says
                    raise NonFiniteLoss(f"iteration {iteration + 1}: {broken}; stopped before saving "
                                        "(checkpoints are unchanged); lower that setting")
                scheduler.step(increment=1)
            iteration += 1
            consumed += args.global_batch_size
            throughput.tick()
            if stats is not None:
                stats.on_optimizer_step(iteration)
            logger.step(iteration)

            record = {}
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                train_loss = _reduce_losses(reports)
                sec, tok_s = throughput.read()
                record.update(loss=train_loss, lr=optimizer.param_groups[0]["lr"],
                              grad_norm=float(grad_norm) if grad_norm is not None else None,
                              tokens_per_s=tok_s, iter_time_s=sec, consumed_samples=consumed,
                              skipped=not ok, nan_skipped=nan_skipped)
                if args.num_experts is not None:
                    logger.moe_scalars(iteration, load_monitor, model, iteration - last_log,
                                       num_microbatches)
                    record.update(balancing_scalars(model))  # per-layer ReMoE / bias values
                last_log = iteration
            if valid_ds is not None and (iteration % args.eval_interval == 0
                                         or iteration == args.train_iters):
                val_loss = evaluate(wrapped, valid_ds, args, dp_rank, dp_size)
                record["val_loss"] = val_loss
            if record:
                logger.log(iteration, record)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                ckpt.save_checkpoint(args.save, iteration, model, optimizer, scheduler,
                                     {"consumed_samples": consumed, **run_info})
                last_saved = iteration
        # the final state, unless just saved (or stopped by a signal under --no-save-on-signal)
        if args.save and last_saved != iteration and not (stop_signal and args.no_save_on_signal):
            ckpt.save_checkpoint(args.save, iteration, model, optimizer, scheduler,
                                 {"consumed_samples": consumed, **run_info})
            last_saved = iteration
        logger.close()
        load_monitor.close()
        if stop_signal:
            raise TrainingStopped(stop_signal, iteration, ckpt.iteration_dir(args.save, iteration)
                                  if args.save and last_saved == iteration else None)
        return {"iteration": iteration, "train_loss": train_loss, "val_loss": val_loss,
                "run_dir": str(run_dir), "consumed_samples": consumed, "steps": iteration - first_iteration,
                "nan_skipped": nan_skipped}
    except BaseException:
        if claimed is not None and not started:  # stopped or failed in set-up: no empty run folder left
            shutil.rmtree(claimed, ignore_errors=True)
        raise
    finally:
        signals.__exit__()
        destroy_distributed()


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False

