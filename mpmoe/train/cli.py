"""``mpmoe train``: parse Megatron-LM-style flags over a preset and run :func:`mpmoe.train.loop.train`.

Exit codes: 0 success, 2 configuration error or NaN/inf under ``--on-nan stop`` (one line:
``mpmoe train: error: ...``), 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (one line; with
``--save`` a checkpoint of the last completed step is written first).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import warnings
from typing import Optional

__all__ = ["SET_UP_STOP", "main"]

#: the end of the line a stop signal before the first iteration prints
SET_UP_STOP = " before training started; nothing was saved"


class _Stopped(Exception):
    """SIGINT / SIGTERM outside the iterations (set-up): one line of its own, not run_verb's
    generic one (an Exception, which run_verb passes on)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Stopped(signal.SIGTERM)


def main(argv: Optional[list[str]] = None) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        from mpmoe.errors import run_verb
        from mpmoe.supervise import die_with_launcher

        die_with_launcher()  # under torchrun (scripts/train.sh runs this module): end with the agent
        return run_verb("mpmoe train", _main, list(sys.argv[1:] if argv is None else argv))
    except (KeyboardInterrupt, _Stopped) as exc:
        signum = exc.signum if isinstance(exc, _Stopped) else signal.SIGINT
        if os.environ.get("RANK", "0") == "0":
            print(f"mpmoe train: stopped by {signal.Signals(signum).name}{SET_UP_STOP}", file=sys.stderr)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list) -> int:
    try:
        return _train(argv)
    except KeyboardInterrupt:  # Ctrl-C in set-up (the iterations handle their own)
        raise _Stopped(signal.SIGINT) from None


def _train(argv: list) -> int:
    from mpmoe.errors import UserError
    from mpmoe.run.args import ConfigError, parse_args

    try:
        args = parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    from mpmoe.deps import missing

    for modules, purpose, wanted in (
            (["tokenizers"], "the embedded corpus (no --data-path) or --tokenizer-model",
             args.data_path is None or args.tokenizer_model is not None),
            (["wandb"], "--wandb-project", bool(args.wandb_project))):
        problem = missing(modules, purpose) if wanted else None
        if problem:
            raise UserError(problem)
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")  # megatron's CUDA-graph default
    from mpmoe.train.faults import NonFiniteLoss, TrainingStopped
    from mpmoe.train.loop import train

    try:
        result = train(args)
    except NonFiniteLoss as exc:
        raise UserError(str(exc)) from None
    except TrainingStopped as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"mpmoe train: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # megatron's own config validation: one line
        if isinstance(exc, UserError) or len(str(exc).splitlines()) > 1:
            raise
        raise ConfigError(str(exc)) from None
    if os.environ.get("RANK", "0") != "0":
        return 0
    if not result.get("steps", 1):
        print(f"mpmoe train: nothing to do: at iteration {result['iteration']} (--train-iters "
              f"{args.train_iters})", file=sys.stderr)
        return 0
    losses = (result["train_loss"], result["val_loss"])
    if not all(math.isfinite(x) for x in losses if x == x) or result["train_loss"] != result["train_loss"]:
        raise UserError(f"iteration {result['iteration']}: the run ended with train loss {losses[0]}, "
                      f"validation loss {losses[1]} ({result.get('nan_skipped', 0)} of {result['steps']} "
                      f"updates skipped under --on-nan skip); run dir {result['run_dir']}")
    print(f"mpmoe train: done at iteration {result['iteration']}: train loss "
          f"{result['train_loss']:.4f}, validation loss {result['val_loss']:.4f}; run dir "
          f"{result['run_dir']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
