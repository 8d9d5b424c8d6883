"""``mpmoe experts compress``: every expert weight as low rank + row-sparse residual (the
compression of MC-SMoE, after LoSparse), stored factorised so that the model is really smaller.

Each routed expert's ``linear_fc1`` ``[2F, H]`` and ``linear_fc2`` ``[H, F]`` becomes
``L R + S``: ``L``, ``R`` from the rank-R SVD, and ``ceil(KEEP * rows)`` rows of the residual
``S``, chosen by PLATON sensitivity ``|S * dLoss/dS|`` (moving average, row means) under the
cubic schedule, driven by calibration gradients of the TRAINING split without any optimizer
step (the reference's decoder-only "fake training"). Stored: ``r (2F + H) + k1 H`` parameters
for ``linear_fc1`` and ``r (H + F) + k2 F`` for ``linear_fc2`` (``--moe-expert-compression
R:KEEP`` in the checkpoint's flags). Recovery fine-tuning: ``mpmoe train --load OUT
--no-load-optim``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mpmoe.experts.common import (ExpertsError, add_source_arguments, count_parameters, folder_bytes, moe_layers,
                                  rebuild, save_surgery, surgery_run)
from mpmoe.surgery import compress as C


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="checkpoint to compress (typically a merged one)")
    p.add_argument("--save", required=True, help="new folder for the compressed checkpoint")
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank part (the reference's scripts: 32)")
    p.add_argument("--sparse-keep", type=float, default=0.1, metavar="F",
                   help="fraction of the residual's rows kept (the reference's scripts: 0.10)")
    p.add_argument("--steps", type=int, default=12, help="calibration steps of the pruning schedule")
    p.add_argument("--initial-warmup", type=int, default=1, help="steps at keep 1.0 before pruning starts")
    p.add_argument("--final-warmup", type=int, default=4, help="last steps at the final keep fraction")
    p.add_argument("--beta1", type=float, default=0.85, help="PLATON moving-average factor")
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="calibration tokens in all (training split), spread over --steps")
    add_source_arguments(p, seed_help="calibration sample seed")


def _check(args) -> None:
    if args.rank < 1:
        raise ExpertsError(f"--rank must be >= 1, got {args.rank}")
    if not 0.0 <= args.sparse_keep <= 1.0:
        raise ExpertsError(f"--sparse-keep must be in [0, 1], got {args.sparse_keep}")
    if args.initial_warmup < 0 or args.final_warmup < 0:
        raise ExpertsError("--initial-warmup and --final-warmup must be >= 0")
    if 0.0 < args.sparse_keep < 1.0 and args.steps <= args.initial_warmup + args.final_warmup:
        raise ExpertsError(f"--steps {args.steps} must exceed --initial-warmup + --final-warmup "
                           f"({args.initial_warmup + args.final_warmup})")
    if not 0.0 <= args.beta1 < 1.0:
        raise ExpertsError(f"--beta1 must be in [0, 1), got {args.beta1}")
    if args.calibration_tokens < 1:
        raise ExpertsError("--calibration-tokens must be >= 1")


def _weights(model):
    """``{(layer, expert, "fc1"|"fc2"): weight Parameter}`` of every routed expert."""
    out = {}
    for n, mlp in moe_layers(model):
        for e, expert in enumerate(mlp.experts.local_experts):
            out[(n, e, "fc1")] = expert.linear_fc1.weight
            out[(n, e, "fc2")] = expert.linear_fc2.weight
    return out


def _calibrate(loaded, weights, factors, args) -> dict:
    """PLATON row selection driven by calibration gradients, no optimizer step."""
    from mpmoe import store

    seq = int(loaded.args.seq_length)
    tokens = store.calibration_tokens(loaded, num_tokens=args.calibration_tokens + seq, split="train",
                                      seed=args.seed, seq_length=seq + 1, data_path=args.data_path)
    batches = torch.tensor_split(tokens, min(args.steps, tokens.shape[0]))
    pruner = C.PlatonRowPruner(args.beta1)
    model = loaded.model
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    kept = {}
    try:
        for step in range(1, args.steps + 1):
            with torch.no_grad():
                for key, w in weights.items():
                    left, right, res = factors[key]
                    w.copy_(left @ right + res)
            batch = batches[(step - 1) % len(batches)].to(loaded.device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            pos = torch.arange(inputs.shape[1], device=loaded.device).unsqueeze(0).expand_as(inputs)
            loss = model(inputs, pos, None, labels=labels).float().mean()
            loss.backward()
            ratio = C.cubic_keep_ratio(step, args.steps, args.sparse_keep, initial_warmup=args.initial_warmup,
                                       final_warmup=args.final_warmup)
            for key, w in weights.items():
                res = factors[key][2]
                pruner.update(key, res, w.grad)  # dLoss/dS = dLoss/dW for W = L R + S
                w.grad = None
                if step > args.initial_warmup:
                    kept[key] = pruner.mask(key, res, ratio)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return kept


def run(args) -> int:
    _check(args)
    start = time.perf_counter()
    with surgery_run(args, verb="compress") as (out, loaded):
        weights = _weights(loaded.model)
        factors = {}
        for key, w in weights.items():
            rank = min(args.rank, *w.shape)
            factors[key] = list(C.low_rank_init(w.detach().float(), rank))
        keep = args.sparse_keep
        if 0.0 < keep < 1.0:
            kept = _calibrate(loaded, weights, factors, args)
        else:
            kept = {key: torch.full((w.shape[0],), keep == 1.0) for key, w in weights.items()}
        new_args = copy.copy(loaded.args)
        new_args.moe_expert_compression = f"{args.rank}:{keep:g}"
        model = rebuild(loaded, new_args)
        with torch.no_grad():
            for n, mlp in moe_layers(model):
                for e, expert in enumerate(mlp.experts.local_experts):
                    for name, linear in (("fc1", expert.linear_fc1), ("fc2", expert.linear_fc2)):
                        left, right, res = factors[(n, e, name)]
                        rows = kept[(n, e, name)].nonzero().flatten()
                        if rows.numel() != linear.sparse.shape[0]:
                            raise RuntimeError(f"compress: layer {n} expert {e} {name}: {rows.numel()} rows "
                                               f"kept, the model holds {linear.sparse.shape[0]}")
                        linear.left.copy_(left)
                        linear.right.copy_(right)
                        linear.sparse.copy_(res[rows])
                        linear.rows.copy_(rows)
        before, after = count_parameters(loaded.model), count_parameters(model)
        surgery = {
            "verb": "compress", "source": str(loaded.checkpoint), "rank": args.rank, "sparse_keep": keep,
            "schedule": {"steps": args.steps, "initial_warmup": args.initial_warmup,
                         "final_warmup": args.final_warmup, "beta1": args.beta1,
                         "calibration_tokens": args.calibration_tokens, "split": "train", "seed": args.seed},
            "parameters": {"before": before, "after": after},
        }
        surgery = save_surgery(out, loaded, model, new_args, surgery)
    print(f"mpmoe experts compress: rank {args.rank}, residual rows kept {keep:g}: expert parameters "
          f"{before['experts']} -> {after['experts']} ({after['experts'] / max(1, before['experts']):.1%}); "
          f"checkpoint {folder_bytes(out)} bytes; {time.perf_counter() - start:.1f} s -> {out}")
    import shlex

    print("recovery fine-tuning: mpmoe train --load " + shlex.quote(str(out)) + " --no-load-optim <the run's "
          "flags> " + " ".join(shlex.quote(f) for f in surgery["train_flags"]))
    return 0
