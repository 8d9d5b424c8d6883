"""Faults during training: stop signals and non-finite losses, agreed on by every rank.

* :class:`StopSignals`: SIGTERM (what schedulers such as SLURM send before a job's end) and
  SIGINT (Ctrl-C) ask the loop to stop at the next step boundary; a second signal more than
  :attr:`StopSignals.GRACE_S` seconds after the first exits at once (``128 + signal``).
  Signals within the grace period count as one request: under ``torchrun`` a Ctrl-C reaches
  each worker from the terminal and again, as SIGTERM, from torchrun itself.
* :func:`local_nonfinite`: whether this rank's loss or gradients hold a NaN/inf (megatron's
  own ``check_for_nan_in_grad`` needs CUDA to report one, so the trainer checks here).
* :func:`agree`: one tiny all-reduce (MAX) per step of ``[stop signal, non-finite]``, so
  that all ranks stop, or skip, at the same step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["NonFiniteLoss", "StopSignals", "TrainingStopped", "agree", "local_nonfinite"]


class TrainingStopped(Exception):
    """Training stopped on a signal; ``exit_code`` is ``128 + signal`` (SIGINT 130, SIGTERM 143)."""

    def __init__(self, signum: int, iteration: int, checkpoint):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum
        where = (f"checkpoint {checkpoint}" if checkpoint else
                 "no checkpoint written (no --save, or --no-save-on-signal)")
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; {where}")


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient under ``--on-nan stop``."""


class StopSignals:
    """SIGTERM/SIGINT handlers (main thread only) that record a stop request."""

    GRACE_S = 1.0
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._at = 0.0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._at = signum, now
        elif now - self._at > self.GRACE_S:
            print(f"mpmoe train: {signal.Signals(signum).name} again: stopping now, without a "
                  "checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)


def local_nonfinite(reports: list, model) -> str:
    """What is NaN/inf on this rank ("" when nothing): the summed loss of its micro-batches
    or the norm of its gradients (megatron DDP's ``main_grad``); one host sync."""
    named = []
    if reports:
        named.append(("the loss", torch.stack([r["lm loss"][0] for r in reports]).sum()))
    grads = [p.main_grad for p in model.parameters() if getattr(p, "main_grad", None) is not None]
    if grads:
        named.append(("the gradient norm", torch.stack(torch._foreach_norm(grads)).sum()))
    if not named:
        return ""
    device = named[0][1].device
    values = torch.stack([v.float().to(device) for _, v in named]).tolist()
    for (name, _), value in zip(named, values):
        if not math.isfinite(value):
            return f"{name} is {value}"
    return ""


def agree(signum: int, nonfinite: bool) -> tuple[int, bool]:
    """``(signal, non-finite)`` as the maximum over all ranks (a no-op for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signum, nonfinite
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flags = torch.tensor([signum, int(nonfinite)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, nonfinite = flags.tolist()
    return int(signum), bool(nonfinite)
