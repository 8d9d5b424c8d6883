"""MoPE flags for Megatron-LM's parser, and the check that runs after parsing.

Flags are MoPEConfig's field names with dashes (Megatron-LM's convention), so that
``core_transformer_config_from_args`` copies them into :class:`MoPEConfig` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from mpmoe.megatron.config import MOPE_ROUTING_TYPE

__all__ = ["SPEC", "add_mpmoe_args", "args_provider", "check_args", "uses_mpmoe"]

#: ``--spec`` value of mpmoe's layer spec (module, function).
SPEC = ["mpmoe.megatron_lm.spec", "gpt_block_spec"]

_LBT_FLAG = "--moe-router-load-balancing-type"


def add_mpmoe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the MoPE / statistics / mask flags (``otep`` itself is a choice patched into
    Megatron-LM's parser: ``inprocess_restart`` and ``ft_integration`` parse the command
    line early without extra providers)."""
    g = parser.add_argument_group(title="mpmoe (MoPE routing)")
    g.add_argument("--moe-otep-warmup-fraction", type=float, default=0.01,
                   help="MoPE: fraction of --train-iters routed with plain top-k before OTEP.")
    g.add_argument("--moe-sigma-update-every", type=int, default=1,
                   help="MoPE: rebuild the expert covariance Sigma every this many forwards.")
    g.add_argument("--moe-otep-eps", type=float, default=1e-12,
                   help="MoPE: floor for Sigma's diagonal and the Schur complements.")
    g.add_argument("--moe-otep-inference-topk", action="store_true",
                   help="MoPE: route with plain top-k outside training.")
    g.add_argument("--moe-stats-dir", default=None,
                   help="Write layer{L}_seg{S}_{moe|mope}.npz routing statistics here.")
    g.add_argument("--moe-plot-every", type=int, default=200,
                   help="Routing-statistics window in iterations (--moe-stats-dir).")
    g.add_argument("--moe-stats-layers", default=None,
                   help="Comma-separated MoE layers (1-based) to track; default all.")
    g.add_argument("--moe-mask-experts", default=None,
                   help='Static expert knock-out: JSON {"layer": [expert ids]} or a JSON file.')
    g.add_argument("--moe-mask-experts-semantics", choices=["mpmoe", "reference"], default="mpmoe",
                   help="MoPE and knocked-out experts: never picked (mpmoe), or pickable by OTEP "
                        "with gate weight 0 (reference: the MP-MoE authors' code).")
    g.add_argument("--moe-dynamic-mask-mode", choices=["cooccurrence", "random"], default=None,
                   help="Dynamic k -> k-1 expert mask.")
    g.add_argument("--moe-cooccurrence-stats-dir", default=None,
                   help="Statistics npz directory read by --moe-dynamic-mask-mode cooccurrence.")
    g.add_argument("--moe-dynamic-mask-layers", default=None,
                   help="Comma-separated layers (1-based) of the dynamic mask; default all.")
    g.add_argument("--moe-dynamic-mask-seed", type=int, default=1234,
                   help="Seed of --moe-dynamic-mask-mode random.")
    g.add_argument("--moe-eval-dump-dir", default=None,
                   help="Outside training, dump each token's routed experts here.")
    return parser


def args_provider(then: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` adding mpmoe's flags, then ``then``'s (e.g. ModelOpt's)."""

    def provider(parser):
        parser = add_mpmoe_args(parser)
        return then(parser) if then is not None else parser

    return provider


def uses_mpmoe(args) -> bool:
    """Whether the run needs mpmoe's config and routers: MoPE, statistics or masks.

    ``args`` may come from another script of the patched tree, whose parser has none of
    mpmoe's flags (``core_transformer_config_from_args`` asks for every script).
    """
    if getattr(args, "num_experts", None) is None:
        return False
    return getattr(args, "moe_router_load_balancing_type", None) == MOPE_ROUTING_TYPE or any(
        getattr(args, name, None) is not None
        for name in ("moe_stats_dir", "moe_mask_experts", "moe_dynamic_mask_mode", "moe_eval_dump_dir")
    )


def _fail(message: str) -> None:
    print(f"pretrain_gpt.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args) -> None:
    """After Megatron-LM's own validation: mpmoe's spec and a config check (exit 2 on error).

    Runs that use none of mpmoe's features are left exactly as they are.
    """
    lbt = getattr(args, "moe_router_load_balancing_type", None)
    if isinstance(lbt, list) and MOPE_ROUTING_TYPE in lbt:
        _fail(f"{_LBT_FLAG} otep cannot be combined with other types")
    if lbt == MOPE_ROUTING_TYPE and args.num_experts is None:
        _fail(f"{_LBT_FLAG} otep (MoPE) needs --num-experts")
    if not uses_mpmoe(args):
        return
    if lbt == MOPE_ROUTING_TYPE and args.moe_otep_warmup_fraction > 0 and args.train_iters is None:
        _fail("--moe-otep-warmup-fraction is a fraction of --train-iters: give --train-iters, "
              "or --moe-otep-warmup-fraction 0 with --train-samples")
    for flag, on in (("--multi-latent-attention", args.multi_latent_attention),
                     ("--heterogeneous-layers-config-path", args.heterogeneous_layers_config_path),
                     ("--yaml-cfg", args.yaml_cfg)):
        if on:
            _fail(f"{flag} is not supported with mpmoe's routers (MoPE, --moe-stats-dir, masks)")
    if args.spec is None:
        args.spec = list(SPEC)
    from megatron.training.argument_utils import core_transformer_config_from_args

    from mpmoe.megatron.config import MoPEConfig

    try:
        core_transformer_config_from_args(args, MoPEConfig)
    except ValueError as exc:
        _fail(str(exc))
