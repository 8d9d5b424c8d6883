"""Routing-ablation options shared by ``mpmoe train`` and ``mpmoe eval``.

The static expert knock-out, the dynamic k -> k-1 mask and their seed/source
(:mod:`mpmoe.routing.masks`, ``MoPEConfig.moe_mask_experts`` ...), with Megatron-style
flag names. :func:`add_arguments` declares them, :func:`validate` checks them (one-line
:class:`ValueError` naming the flag) and folds in the demo's environment variables,
:data:`FIELDS` maps each option to its ``MoPEConfig`` field.

Environment variables (the demo's ``MOE_MASK_EXPERTS``, ``MOE_DYNAMIC_MASK_MODE``,
``MOE_COOCCURRENCE_STATS_DIR``, ``MOE_DYNAMIC_MASK_LAYERS``, ``MOE_DYNAMIC_MASK_SEED``)
are honoured where the demo read them (training and evaluation) when the matching flag
is not given, with a note on stderr; a flag and a different variable together are an
error. ``EACT_SAVE`` is honoured by ``mpmoe eval`` (as ``--routing-dump-dir``) and
rejected by ``mpmoe train``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["FIELDS", "ENV_VARS", "DEFAULTS", "add_arguments", "validate", "resolve", "config_kwargs"]

#: option (argparse dest) -> MoPEConfig field
FIELDS = {
    "moe_mask_experts": "moe_mask_experts",
    "moe_mask_experts_semantics": "moe_mask_experts_semantics",
    "moe_dynamic_mask": "moe_dynamic_mask_mode",
    "moe_dynamic_mask_layers": "moe_dynamic_mask_layers",
    "moe_cooccurrence_stats_dir": "moe_cooccurrence_stats_dir",
    "moe_dynamic_mask_seed": "moe_dynamic_mask_seed",
    "moe_dynamic_mask_source": "moe_dynamic_mask_source",
}

#: the demo's environment variable -> option (argparse dest)
ENV_VARS = {
    "MOE_MASK_EXPERTS": "moe_mask_experts",
    "MOE_DYNAMIC_MASK_MODE": "moe_dynamic_mask",
    "MOE_COOCCURRENCE_STATS_DIR": "moe_cooccurrence_stats_dir",
    "MOE_DYNAMIC_MASK_LAYERS": "moe_dynamic_mask_layers",
    "MOE_DYNAMIC_MASK_SEED": "moe_dynamic_mask_seed",
}


#: option (argparse dest) -> default
DEFAULTS = {"moe_mask_experts": None, "moe_mask_experts_semantics": "mpmoe",
            "moe_dynamic_mask": None, "moe_dynamic_mask_layers": None,
            "moe_cooccurrence_stats_dir": None, "moe_dynamic_mask_seed": 1234,
            "moe_dynamic_mask_source": "mpmoe"}


def add_arguments(parser) -> None:
    """Declare the ablation flags on ``parser`` (an argparse parser or group)."""
    g = parser.add_argument_group("routing ablations (static knock-out, dynamic k->k-1 mask)")
    g.add_argument("--moe-mask-experts", default=None,
                   help='knock experts out: "LAYER:ID,ID;LAYER:ID" (e.g. "2:3,17;5:0"), JSON '
                        '{"2": [3, 17]} or a JSON file; layers 1-based, expert ids global')
    g.add_argument("--moe-mask-experts-semantics", choices=["mpmoe", "reference"], default="mpmoe",
                   help="MoPE and knocked-out experts: mpmoe = never picked; reference = the "
                        "authors' code: OTEP may still pick them through Sigma, with gate weight 0, "
                        "so the token runs on fewer than k experts (docs/reference.md)")
    g.add_argument("--moe-dynamic-mask", choices=["cooccurrence", "random"], default=None,
                   help="drop one routed expert per token (k -> k-1): the most co-occurring one, "
                        "or a random one")
    g.add_argument("--moe-dynamic-mask-layers", default=None,
                   help="layers (1-based, comma/space separated) the dynamic mask applies to "
                        "(default: every MoE layer)")
    g.add_argument("--moe-cooccurrence-stats-dir", default=None,
                   help="statistics folder (a run's --moe-stats-dir) the cooccurrence mask reads")
    g.add_argument("--moe-dynamic-mask-seed", type=int, default=1234, help="seed of the random mask")
    g.add_argument("--moe-dynamic-mask-source", choices=["mpmoe", "reference"], default="mpmoe",
                   help="mpmoe: all windows summed, kept weights keep their total; reference: the "
                        "latest window of top-k ('moe') files, kept weights renormalised to 1 "
                        "(docs/reference.md)")


def _apply_env(args, prog: str, environ) -> None:
    defaults = DEFAULTS
    for var, dest in ENV_VARS.items():
        raw = environ.get(var, "").strip()
        if not raw:
            continue
        value = raw.lower() if dest == "moe_dynamic_mask" else raw
        if dest == "moe_dynamic_mask" and value not in ("cooccurrence", "random"):
            raise ValueError(f"environment variable {var}={raw!r}: expected cooccurrence or random")
        if dest == "moe_dynamic_mask_seed":
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {var}={raw!r} is not an int") from None
        current = getattr(args, dest)
        if current != defaults[dest] and current != value:
            raise ValueError(f"--{dest.replace('_', '-')} {current!r} and environment variable "
                             f"{var}={raw!r} disagree; unset one")
        if current != value:
            print(f"{prog}: note: {var}={raw!r} sets --{dest.replace('_', '-')}", file=sys.stderr)
            setattr(args, dest, value)


def validate(args, num_experts, topk, *, prog: str = "mpmoe train", environ=None) -> None:
    """Fold the demo's environment variables into ``args`` and check the ablation flags.

    Raises ``ValueError`` with a one-line message naming the flag. Normalises
    ``args.moe_mask_experts`` to a dict and ``args.moe_dynamic_mask_layers`` to a list.
    """
    from mpmoe.megatron.config import parse_layer_list
    from mpmoe.routing.masks import parse_expert_mask

    environ = os.environ if environ is None else environ
    if prog == "mpmoe train" and environ.get("EACT_SAVE", "").strip():
        raise ValueError("environment variable EACT_SAVE (the demo's routing dump) is read by "
                         "`mpmoe eval --routing-dump-dir`, not by training; unset it")
    _apply_env(args, prog, environ)
    active = args.moe_mask_experts or args.moe_dynamic_mask
    if active and num_experts is None:
        raise ValueError("--moe-mask-experts / --moe-dynamic-mask need an MoE model (--num-experts)")
    try:
        mask = parse_expert_mask(args.moe_mask_experts)
    except ValueError as exc:
        raise ValueError(f"--moe-mask-experts: {exc}") from None
    for layer, ids in mask.items():
        if layer < 1:
            raise ValueError(f"--moe-mask-experts: layer {layer} (layers are 1-based)")
        bad = [e for e in ids if num_experts is not None and e >= num_experts]
        if bad:
            raise ValueError(f"--moe-mask-experts: layer {layer}: expert ids {bad} >= --num-experts {num_experts}")
        if num_experts is not None and len(ids) > num_experts - topk:
            raise ValueError(f"--moe-mask-experts: layer {layer} keeps {num_experts - len(ids)} experts, "
                             f"fewer than --moe-router-topk {topk}")
    args.moe_mask_experts = {str(k): list(v) for k, v in mask.items()} or None
    if getattr(args, "moe_mask_experts_semantics", "mpmoe") != "mpmoe" and not mask:
        raise ValueError("--moe-mask-experts-semantics applies to a knock-out: give --moe-mask-experts")
    layers = args.moe_dynamic_mask_layers
    try:
        layers = parse_layer_list(layers, "--moe-dynamic-mask-layers")
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    args.moe_dynamic_mask_layers = list(layers) if layers else None
    if args.moe_dynamic_mask_seed < 0:
        raise ValueError(f"--moe-dynamic-mask-seed must be >= 0, got {args.moe_dynamic_mask_seed}")
    if args.moe_dynamic_mask is not None:
        if topk < 2:
            raise ValueError("--moe-dynamic-mask needs --moe-router-topk >= 2 (it drops one of k experts)")
        if args.moe_dynamic_mask == "cooccurrence":
            stats = args.moe_cooccurrence_stats_dir
            if stats is None:
                raise ValueError("--moe-dynamic-mask cooccurrence needs --moe-cooccurrence-stats-dir")
            if not Path(stats).is_dir():
                raise ValueError(f"--moe-cooccurrence-stats-dir: {stats} is not a directory")
            if not any(Path(stats).glob("layer*_seg*_*.npz")):
                raise ValueError(f"--moe-cooccurrence-stats-dir: no layer*_seg*_{{moe,mope}}.npz in {stats}")
    elif args.moe_dynamic_mask_layers or args.moe_cooccurrence_stats_dir:
        raise ValueError("--moe-dynamic-mask-layers / --moe-cooccurrence-stats-dir need --moe-dynamic-mask")


def resolve(values, num_experts, topk, *, prog: str, environ=None) -> dict:
    """The validated ablation options of ``values`` (dest -> value; missing: default)."""
    import argparse

    ns = argparse.Namespace(**{**DEFAULTS, **{k: v for k, v in (values or {}).items() if k in DEFAULTS}})
    validate(ns, num_experts, topk, prog=prog, environ=environ)
    return vars(ns)


def config_kwargs(args) -> dict:
    """``MoPEConfig`` keyword arguments of the ablation options (missing ones skipped, so
    that the namespace of a checkpoint written before they existed still builds)."""
    out = {}
    for dest, field in FIELDS.items():
        if hasattr(args, dest):
            out[field] = getattr(args, dest)
    return out
