"""MoPE flags for Megatron-LM's parser, and the check that runs after parsing.

Flags are MoPEConfig's field names with dashes (Megatron-LM's convention), so that
``core_transformer_config_from_args`` copies them into :class:`MoPEConfig` unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

__all__ = ["SPEC", "add_mpmoe_args", "args_provider", "check_args", "fail", "run_checks", "uses_mpmoe"]

#: ``--moe-router-load-balancing-type`` of MoPE (``mpmoe.megatron.config.MOPE_ROUTING_TYPE``;
#: not imported from there: this module must not import megatron-core at import time).
MOPE_ROUTING_TYPE = "otep"

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
    return (getattr(args, "moe_router_load_balancing_type", None) == MOPE_ROUTING_TYPE
            or bool(getattr(args, "moe_relu_routing", False))
            or any(getattr(args, name, None) is not None
                   for name in ("moe_stats_dir", "moe_mask_experts", "moe_dynamic_mask_mode",
                                "moe_eval_dump_dir")))


def fail(message: str, prog: Optional[str] = None) -> None:
    """One line ``<script>: error: ...`` on stderr, exit 2 (no traceback)."""
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron-lm"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _fail(message: str) -> None:
    fail(message, "pretrain_gpt.py")

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
    try:
        notes = run_checks(args)
    except ValueError as exc:
        _fail(str(exc))
    if getattr(args, "rank", 0) == 0:
        for note in notes:
            print(note, flush=True)
    if lbt == MOPE_ROUTING_TYPE and args.moe_otep_warmup_fraction > 0 and args.train_iters is None:
        _fail("--moe-otep-warmup-fraction is a fraction of --train-iters: give --train-iters, "
              "or --moe-otep-warmup-fraction 0 with --train-samples")
    for flag, on in (("--multi-latent-attention", args.multi_latent_attention),
                     ("--heterogeneous-layers-config-path", args.heterogeneous_layers_config_path),
                     ("--yaml-cfg", args.yaml_cfg)):
        if on:
            _fail(f"{flag} is not supported with mpmoe's routers (MoPE, --moe-stats-dir, masks)")
    from megatron.training.argument_utils import core_transformer_config_from_args

    from mpmoe.megatron_lm.hooks import transformer_config_class

    config_class = transformer_config_class(args)  # MoPEConfig; mpmoe's --spec when none is given
    try:
        core_transformer_config_from_args(args, config_class)
    except ValueError as exc:
        _fail(str(exc))
