"""MoPE flags for Megatron-LM's parser, and the check that runs after parsing.

Flags are MoPEConfig's field names with dashes (Megatron-LM's convention), so that
``core_transformer_config_from_args`` copies them into :class:`MoPEConfig` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from mpmoe.errors import UserError, run_verb
from mpmoe.megatron import routers, settings

__all__ = ["SPEC", "add_mpmoe_args", "args_provider", "check_args", "uses_mpmoe"]

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
    if lbt == mope and args.moe_otep_warmup_fraction > 0 and args.train_iters is None:
        raise UserError("--moe-otep-warmup-fraction is a fraction of --train-iters: give --train-iters, "
                        "or --moe-otep-warmup-fraction 0 with --train-samples")
    for flag, on in (("--multi-latent-attention", args.multi_latent_attention),
                     ("--heterogeneous-layers-config-path", args.heterogeneous_layers_config_path),
                     ("--yaml-cfg", args.yaml_cfg)):
        if on:
            raise UserError(f"{flag} is not supported with mpmoe's routers (MoPE, ReMoE, --moe-stats-dir, masks)")
    if args.spec is None:
        args.spec = list(SPEC)
    from megatron.training.argument_utils import core_transformer_config_from_args

    from mpmoe.megatron.config import MoPEConfig

    try:  # MoPEConfig validates the routing settings (mpmoe.megatron.settings.check)
        settings.check_files(vars(args))
        core_transformer_config_from_args(args, MoPEConfig)
    except ValueError as exc:
        raise UserError(str(exc)) from None
