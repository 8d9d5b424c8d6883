"""Helpers for the evaluation tests (no tests here): tiny checkpoints, request builders."""

from __future__ import annotations

from pathlib import Path

# A smaller tiny-cpu (the same layout: dense first layer, MoPE layers with a shared
# expert), trained on the embedded corpus; context 128 tokens like tiny-cpu.
MODEL_FLAGS = ["--preset", "tiny-cpu", "--hidden-size", "64", "--ffn-hidden-size", "256",
               "--moe-ffn-hidden-size", "64", "--moe-shared-expert-intermediate-size", "64",
               "--num-layers", "3", "--moe-layer-freq", "[0,1,1]"]


def train_checkpoint(save: Path, cache: str, iters: int, lr: float = 3e-3, extra=()) -> Path:
    """Train with ``mpmoe train`` in this process; returns the save folder."""
    from mpmoe.train.cli import main

    save = Path(save)
    argv = [*MODEL_FLAGS, "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
            "--global-batch-size", "8", "--micro-batch-size", "8", "--eval-interval", str(iters),
            "--eval-iters", "1", "--log-interval", str(max(1, iters // 4)), "--save", str(save),
            "--run-dir", str(save.parent / (save.name + "-run")), "--no-tensorboard", "--no-progress",
            "--embedded-cache-dir", cache, *extra]
    assert main(argv) == 0
    return save


def instance(request_type: str, args: tuple, idx: int = 0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)
