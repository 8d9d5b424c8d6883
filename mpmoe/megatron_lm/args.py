"""MoPE flags for Megatron-LM's parser, and the check that runs after parsing.

Flags are MoPEConfig's field names with dashes (Megatron-LM's convention), so that
``core_transformer_config_from_args`` copies them into :class:`MoPEConfig` unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from mpmoe.errors import UserError, run_verb
from mpmoe.megatron import routers, settings

__all__ = ["SPEC", "add_mpmoe_args", "args_provider", "check_args", "fail", "run_checks", "uses_mpmoe"]

#: ``--spec`` value of mpmoe's layer spec (module, function).
SPEC = ["mpmoe.megatron_lm.spec", "gpt_block_spec"]

PROG = "pretrain_gpt.py"


def add_mpmoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """mpmoe's routing flags, generated from the settings table and the router registry
    (same names and defaults as ``mpmoe train``; Megatron-LM's own routing flags are its
    parser's). ``otep`` itself is a choice patched into Megatron-LM's parser:
    ``inprocess_restart`` and ``ft_integration`` parse the command line early without extra
    providers."""
    routers.add_arguments(parser, megatron_lm=True)
    settings.add_arguments(parser, megatron_lm=True)
    return parser


def args_provider(then: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` adding mpmoe's flags, then ``then``'s (e.g. ModelOpt's)."""

    def provider(parser):
        parser = add_mpmoe_args(parser)
        return then(parser) if then is not None else parser

    return provider


def uses_mpmoe(args) -> bool:
    """Whether the run needs mpmoe's config and routers: a router other than top-k, softmax
    expert bias, statistics or masks.

    ``args`` may come from another script of the patched tree, whose parser has none of
    mpmoe's flags (``core_transformer_config_from_args`` asks for every script).
    """
    if getattr(args, "num_experts", None) is None:
        return False
    try:
        kind = routers.kind_of(args)
    except ValueError:
        return True  # two routers named: check_args reports it
    return kind != routers.DEFAULT or any(
        getattr(args, name, None) is not None
        for name in ("moe_stats_dir", "moe_mask_experts", "moe_dynamic_mask_mode", "moe_eval_dump_dir")
    )


def fail(message: str, prog: Optional[str] = None) -> None:
    """One line ``<script>: error: ...`` on stderr, exit 2 (no traceback)."""
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron-lm"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


#: ``--cuda-graph-modules`` values whose capture contains the router's forward.
_ROUTER_GRAPH_MODULES = {"moe", "moe_router", "moe_preprocess"}


def run_checks(args) -> list[str]:
    """What mpmoe's routers need from Megatron-LM's other settings, for a run that uses them.

    Returns the log lines of the settings it changed; raises ``ValueError`` (one line) for
    a setting that cannot work:

    * CUDA graphs that capture the router (``--cuda-graph-impl`` other than ``none`` with no
      ``--cuda-graph-modules`` (whole layers), a router/MoE module, or ``full_iteration``):
      MoPE's routing branches on Python state (warm-up, Sigma refresh) and all-reduces its
      counts inside the forward, which a replayed graph would skip;
    * megatron's rerun state machine (``--rerun-mode validate_results``, the default) re-runs
      an iteration whose loss looks wrong, and every counted forward would count the
      routing statistics (Sigma, ReMoE's sparsity, the statistics windows) twice: it is
      turned off (``disabled`` still stops on NaN/inf losses), with a log line.
    """
    notes = []
    impl = getattr(args, "cuda_graph_impl", "none") or "none"
    if impl != "none":
        modules = {getattr(m, "name", str(m)) for m in (getattr(args, "cuda_graph_modules", None) or [])}
        if impl == "full_iteration" or not modules or modules & _ROUTER_GRAPH_MODULES:
            what = "whole layers" if not modules else " ".join(sorted(modules))
            raise ValueError(
                f"--cuda-graph-impl {impl} ({what if impl != 'full_iteration' else 'the whole iteration'}) "
                "captures the router, but mpmoe's routers branch on Python state and all-reduce "
                "inside the forward: use --cuda-graph-modules attn (or mlp), or --cuda-graph-impl none")
    if getattr(args, "rerun_mode", "disabled") not in (None, "disabled"):
        notes.append(f"mpmoe: --rerun-mode {args.rerun_mode} -> disabled (a re-run iteration would count "
                     "the routing statistics twice; NaN/inf losses still stop the run)")
        args.rerun_mode = "disabled"
    return notes


def check_args(args) -> None:
    """After Megatron-LM's own validation: mpmoe's spec and a config check (one line, exit 2).

    Runs that use none of mpmoe's features are left exactly as they are.
    """
    code = run_verb(PROG, lambda _: _check_args(args), [])
    if code:
        sys.exit(code)


def _check_args(args) -> None:
    lbt = getattr(args, "moe_router_load_balancing_type", None)
    mope = routers.KINDS["mope"].marks["moe_router_load_balancing_type"]
    if isinstance(lbt, list) and mope in lbt:
        raise UserError(f"--moe-router-load-balancing-type {mope} cannot be combined with other types")
    if lbt == mope and args.num_experts is None:
        raise UserError(f"--moe-router-load-balancing-type {mope} (MoPE) needs --num-experts")
    if not uses_mpmoe(args):
        return
    try:
        notes = run_checks(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if getattr(args, "rank", 0) == 0:
        for note in notes:
            print(note, flush=True)
    from mpmoe.errors import folder_problem

    for name in ("moe_stats_dir", "moe_eval_dump_dir"):  # before training, not at the first window
        folder = getattr(args, name, None)
        problem = folder_problem(folder) if folder else None
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {folder}: {problem}")
    if lbt == mope and args.moe_otep_warmup_fraction > 0 and args.train_iters is None:
        raise UserError("--moe-otep-warmup-fraction is a fraction of --train-iters: give --train-iters, "
                        "or --moe-otep-warmup-fraction 0 with --train-samples")
    for flag, on in (("--multi-latent-attention", args.multi_latent_attention),
                     ("--heterogeneous-layers-config-path", args.heterogeneous_layers_config_path),
                     ("--yaml-cfg", args.yaml_cfg)):
        if on:
            raise UserError(f"{flag} is not supported with mpmoe's routers (MoPE, ReMoE, --moe-stats-dir, masks)")
    from megatron.training.argument_utils import core_transformer_config_from_args

    from mpmoe.megatron_lm.hooks import transformer_config_class

    config_class = transformer_config_class(args)  # MoPEConfig; mpmoe's --spec when none is given
    try:  # MoPEConfig validates the routing settings (mpmoe.megatron.settings.check)
        settings.check_files(vars(args))
        core_transformer_config_from_args(args, config_class)
    except ValueError as exc:
        raise UserError(str(exc)) from None
