"""mpmoe's presets (``configs/*.toml``) as Megatron-LM ``pretrain_gpt.py`` flags.

    python -m mpmoe.megatron_lm.flags PRESET [--router mope|topk|remoe] [--train-iters N]
        [--world-size W] [--mock-data]

prints one flag or value per line (the launch script reads them into an array). The flags
are what ``mpmoe train --preset PRESET [--router R]`` resolves (the preset over
``mpmoe train``'s defaults): the model shape, routing, optimizer, schedule and batch of the
two launchers are the same (``tests/test_megatron_lm_flags.py`` compares them in
Megatron-LM's parser). The options whose names differ are translated:

* ``lr_wsd_decay_fraction`` -> ``--lr-wsd-decay-iters`` (as ``mpmoe train`` computes it);
* ``vocab_size`` -> ``--vocab-size`` with ``--tokenizer-type NullTokenizer`` only for
  ``--mock-data`` (with real data the tokenizer sets the vocabulary);
* ``router`` -> its marks (``--moe-router-load-balancing-type otep``, ``--moe-relu-routing``);
* ``--disable-bias-linear`` always (mpmoe's models have no linear biases);
* routing settings only where they apply to the router (:mod:`mpmoe.megatron.settings`), so
  that a top-k run's flags are stock Megatron-LM flags.

``--world-size`` adds ``--expert-model-parallel-size``: the largest divisor of the
expert count that also divides the world size (as ``scripts/train.sh`` chooses).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from mpmoe.errors import ArgumentParser, UserError, run_verb
from mpmoe.megatron import routers, settings

__all__ = ["HYPERPARAMETER_GROUPS", "ROUTER_ALIASES", "expert_parallel_size", "preset_flags"]

#: older launch-script router names -> router kind
ROUTER_ALIASES = {"moe": "topk"}

#: ``mpmoe train``'s option groups that make the model and its optimisation
HYPERPARAMETER_GROUPS = ("model", "mixture of experts", "router", "training",
                         *dict.fromkeys(s.group for s in settings.SETTINGS if s.config))

#: ``mpmoe train`` options that are not Megatron-LM flags of the same name (handled below, or
#: mpmoe-only: ``--last-trainable-layers`` needs mpmoe's model builder)
_NOT_FLAGS = {"vocab_size", "lr_wsd_decay_fraction", "lr_wsd_decay_iters", "train_iters", "router",
              "last_trainable_layers", "preset"}


def expert_parallel_size(num_experts: int, world_size: int) -> int:
    """Largest ``d <= world_size`` dividing both the expert count and the world size."""
    for d in range(max(world_size, 1), 0, -1):
        if num_experts % d == 0 and world_size % d == 0:
            return d
    return 1


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _hyperparameters(parser) -> list:
    return [a.dest for g in parser._action_groups if g.title in HYPERPARAMETER_GROUPS for a in g._group_actions]


def preset_flags(
    name: str,
    router: Optional[str] = None,
    train_iters: Optional[int] = None,
    world_size: Optional[int] = None,
    mock_data: bool = False,
) -> list[str]:
    """Megatron-LM flags of a preset (raises :class:`UserError`)."""
    from mpmoe.run.args import build_parser, fill_defaults, parse_args, schedule_lengths
    from mpmoe.run.presets import load_preset

    preset = load_preset(name)
    argv = ["--preset", name]
    if router is not None:
        argv += ["--router", ROUTER_ALIASES.get(router, router)]
    if train_iters is not None:
        argv += ["--train-iters", str(train_iters)]
    args = parse_args(argv, check=False)
    fill_defaults(args)
    kind = routers.kind_of(args) if args.num_experts is not None else None
    values = vars(args)
    out = ["--disable-bias-linear"]
    keys = list(dict.fromkeys([*_hyperparameters(build_parser()), *preset]))
    for key in keys:
        value = values.get(key)
        setting = settings.BY_NAME.get(key)
        if key in _NOT_FLAGS or value is None:
            continue
        if setting is not None and value == setting.default and not setting.megatron:
            continue  # mpmoe's own flags at their defaults: a top-k run's flags stay stock
        if isinstance(value, bool):
            if value:
                out.append(_flag(key))
        elif isinstance(value, list):  # moe_layer_freq: Megatron-LM takes a Python list
            out += [_flag(key), "[" + ",".join(str(v) for v in value) + "]"]
        elif isinstance(value, dict):
            out += [_flag(key), ";".join(f"{k}:{','.join(map(str, v))}" for k, v in value.items())]
        else:
            out += [_flag(key), str(value)]
    if args.train_iters is not None:
        out += ["--train-iters", str(args.train_iters)]
        if args.lr_decay_style == "WSD":
            out += ["--lr-wsd-decay-iters", str(schedule_lengths(args)["wsd_decay"])]
    elif args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        raise UserError(f"preset {name!r} decays over a fraction of the run: give --train-iters")
    if args.num_query_groups is not None:
        out.append("--group-query-attention")  # Megatron-LM reads --num-query-groups only with it
    if mock_data:
        out += ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(preset["vocab_size"])]
    if world_size is not None and args.num_experts:
        out += ["--expert-model-parallel-size", str(expert_parallel_size(int(args.num_experts), world_size))]
    return out


PROG = "python -m mpmoe.megatron_lm.flags"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (user errors: one line, exit 2)."""
    return run_verb(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list) -> int:
    from mpmoe.run.args import POSITIVE

    p = ArgumentParser(prog=PROG,
                                description="Print a preset's Megatron-LM flags, one per line.")
    p.add_argument("preset", help="configs/*.toml name (tiny-cpu, flame-moe-38m, ...) or a .toml path")
    p.add_argument("--router", choices=[*routers.KINDS, *ROUTER_ALIASES], default=None,
                   help="router kind (moe = topk); default: the preset's")
    p.add_argument("--train-iters", type=POSITIVE, default=None)
    p.add_argument("--world-size", type=POSITIVE, default=None,
                   help="number of processes: adds --expert-model-parallel-size")
    p.add_argument("--mock-data", action="store_true",
                   help="add --mock-data with a NullTokenizer of the preset's vocabulary")
    args = p.parse_args(argv)
    flags = preset_flags(args.preset, args.router, args.train_iters, args.world_size, args.mock_data)
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
