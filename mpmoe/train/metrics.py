"""Run logging: progress bar, ``metrics.jsonl``, TensorBoard, optional W&B, MoE statistics.

Only rank 0 writes. Every rank must call :meth:`RunLogger.moe_scalars` on logging
iterations (it sums expert loads and aux losses over ranks).

``metrics.jsonl`` (one JSON object per logged iteration, in the run directory)::

    {"iteration": 10, "loss": 6.93, "lr": 0.0004, "tokens_per_s": 5120.3,
     "grad_norm": 1.2, "iter_time_s": 0.4, "consumed_samples": 160}
    {"iteration": 50, ..., "val_loss": 5.87}          # on evaluation iterations

TensorBoard scalars: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``val/loss``, per MoE layer L ``moe/aux_loss/layer_L`` (and
z-loss), ``moe/load_max_over_mean/layer_L``, ``moe/load_min/layer_L``,
``moe/load_std/layer_L`` (tokens per expert over the logging window), and for MoPE layers
``mope/sigma_diag_mean/layer_L``, ``mope/sigma_offdiag_abs_mean/layer_L``,
``mope/sigma_max_corr/layer_L``. ReMoE and expert-bias runs add per layer, to TensorBoard
and to each logged metrics.jsonl line: ``remoe/l1_coeff/layer_L``, ``remoe/sparsity/layer_L``
and ``remoe/experts_per_token/layer_L`` (the last iteration's, summed over ranks), or
``moe/expert_bias_absmax/layer_L``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mpmoe.routing.cooccurrence import sigma_summary

__all__ = ["ExpertLoadMonitor", "RunLogger"]


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class ExpertLoadMonitor:
    """Tokens per expert of every MoE layer, from forward hooks on the routers.

    Counts training forwards only (not evaluation, not activation recomputation), on the
    device, without host synchronisation; :meth:`collect` sums them over the ranks that
    route different tokens and resets.
    """

    def __init__(self, model):
        from mpmoe.megatron.router import iter_routers

        self.routers = list(iter_routers(model))
        self.counts = {}
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router, inputs, output):
        from mpmoe.megatron.router import is_counted_forward

        if not is_counted_forward(router):
            return
        routing_map = output[1]
        c = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0, dtype=torch.float32)
        key = router.layer_number
        self.counts[key] = self.counts[key] + c if key in self.counts else c

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def collect(self) -> dict:
        """{layer: {"load_max_over_mean", "load_min", "load_std"}} over the window."""
        out = {}
        for router in self.routers:
            c = self.counts.get(router.layer_number)
            if c is None:
                c = torch.zeros(router.num_experts, device=router.weight.device)
            c = c.clone()
            if router.token_group is not None and dist.get_world_size(router.token_group) > 1:
                dist.all_reduce(c, group=router.token_group)
            mean = c.mean().clamp_min(1e-9)
            out[router.layer_number] = {
                "load_max_over_mean": float(c.max() / mean),
                "load_min": float(c.min()),
                "load_std": float(c.std(unbiased=False)),
            }
        self.counts = {}
        return out


def _aux_losses(iterations: int, num_microbatches: int) -> dict:
    """Per-layer aux losses megatron's routers recorded since the last call (then cleared)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    from mpmoe.megatron.compat import moe_metrics

    if not moe_metrics():
        return {}
    reduce_aux_losses_tracker_across_ranks()
    scale = 1.0 / max(iterations * num_microbatches, 1)
    out = {name: [float(v) * scale for v in values.tolist()] for name, values in moe_metrics().items()}
    clear_aux_losses_tracker()
    return out


def _drop_lines_after(path: Path, iteration: int) -> None:
    """Keep the lines of ``iteration`` and before: a run resumed into its run directory
    (after a kill, from an earlier checkpoint) logs each iteration once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the kill
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


class RunLogger:
    """Progress bar + metrics.jsonl + TensorBoard (+ W&B) for one run (rank 0 writes)."""

    def __init__(self, run_dir, args, total_iters: int, start_iter: int, *, tokens_per_iter: int):
        self.rank0 = _rank0()
        self.run_dir = Path(run_dir)
        self.tokens_per_iter = tokens_per_iter
        self.tb = None
        self.wandb = None
        self.bar = None
        self.postfix: dict = {}
        self.jsonl = None
        if not self.rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_lines_after(self.run_dir / "metrics.jsonl", start_iter)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if not args.no_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("mpmoe train: tensorboard is not installed; TensorBoard logging is off "
                      "(pip install tensorboard)", file=sys.stderr)
            else:
                self.tb = SummaryWriter(args.tensorboard_dir or str(self.run_dir / "tensorboard"))
        if args.wandb_project:
            import wandb  # optional dependency: only when asked for

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                    dir=str(self.run_dir), config=vars(args))
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                            desc="train")

    def _scalars(self, iteration: int, scalars: dict) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def step(self, iteration: int) -> None:
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)

    def log(self, iteration: int, record: dict) -> None:
        """One metrics.jsonl line + TensorBoard scalars + progress-bar postfix."""
        if not self.rank0:
            return
        record = {"iteration": iteration, **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                 "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss"}
        scalars = {names[k]: v for k, v in record.items() if k in names}
        scalars.update({k: v for k, v in record.items() if "/" in k})  # e.g. remoe/sparsity/layer_1
        self._scalars(iteration, scalars)
        if self.bar is not None:  # the latest value of each, kept between logging lines
            fmt = {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.2e}"),
                   "tokens_per_s": ("tok/s", "{:.0f}"), "val_loss": ("val", "{:.4f}")}
            for key, (label, f) in fmt.items():
                if record.get(key) is not None:
                    self.postfix[label] = f.format(record[key])
            self.bar.set_postfix(self.postfix, refresh=False)
        elif "loss" in record or "val_loss" in record:
            parts = [f"iter {iteration}"]
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if key in record:
                    parts.append(f"{key} {record[key]:.4g}")
            print(" | ".join(parts), file=sys.stderr, flush=True)

    def moe_scalars(self, iteration: int, load: ExpertLoadMonitor, model, iterations: int,
                    num_microbatches: int) -> dict:
        """Collective: per-layer aux losses, expert load, Sigma summaries -> TensorBoard."""
        from mpmoe.megatron.router import MoPERouter, iter_routers

        scalars = {}
        for name, values in _aux_losses(iterations, num_microbatches).items():
            for layer, v in enumerate(values, start=1):
                if v != 0.0:
                    scalars[f"moe/{name}/layer_{layer}"] = v
        for layer, stats in load.collect().items():
            for k, v in stats.items():
                scalars[f"moe/{k}/layer_{layer}"] = v
        for router in iter_routers(model):
            if isinstance(router, MoPERouter):
                for k, v in sigma_summary(router.current_sigma()).items():
                    scalars[f"mope/{k}/layer_{router.layer_number}"] = v
        if self.rank0:
            self._scalars(iteration, scalars)
        return scalars

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Wall-clock per iteration and tokens/s over the last logging window."""

    def __init__(self, tokens_per_iter: int):
        self.tokens_per_iter = tokens_per_iter
        self.t0 = time.perf_counter()
        self.iters = 0

    def tick(self) -> None:
        self.iters += 1

    def read(self) -> tuple[float, float]:
        """(seconds per iteration, tokens per second) since the last read."""
        dt = time.perf_counter() - self.t0
        n = max(self.iters, 1)
        self.t0, self.iters = time.perf_counter(), 0
        return dt / n, self.tokens_per_iter * n / max(dt, 1e-9)


def environment_summary() -> dict:
    return {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "hostname": os.uname().nodename}
