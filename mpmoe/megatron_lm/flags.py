"""mpmoe's presets (``configs/*.toml``) as Megatron-LM ``pretrain_gpt.py`` flags.

    python -m mpmoe.megatron_lm.flags PRESET [--router mope|moe] [--train-iters N]
        [--world-size W] [--mock-data]

prints one flag or value per line (the launch script reads them into an array). The
presets are the single source of the model shapes: ``mpmoe train --preset`` and
``pretrain_gpt.py`` get the same model. Preset keys are Megatron-LM argument names with
underscores; the few that Megatron-LM spells otherwise are translated here:

* ``lr_wsd_decay_fraction`` -> ``--lr-wsd-decay-iters`` (fraction of ``--train-iters``,
  rounded down: :func:`mpmoe.train.presets.fraction_of_iters`);
* ``vocab_size`` -> ``--vocab-size`` with ``--tokenizer-type NullTokenizer`` only for
  ``--mock-data`` (with real data the tokenizer sets the vocabulary);
* ``--disable-bias-linear`` always (mpmoe's models have no linear biases);
* MoPE-only keys (``moe_otep_*``, ``moe_sigma_update_every``) only for MoPE, so that a
  top-k run's flags are stock Megatron-LM flags.

``--world-size`` adds ``--expert-model-parallel-size``: the largest divisor of the
expert count that also divides the world size (as ``scripts/train.sh`` chooses).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mpmoe.train.presets import PresetError, fraction_of_iters, load_preset

__all__ = ["ROUTER_TYPES", "expert_parallel_size", "preset_flags"]

#: launch-script router name -> --moe-router-load-balancing-type
ROUTER_TYPES = {"mope": "otep", "moe": "aux_loss"}

# Preset keys that are not Megatron-LM flags of the same name (handled below).
_SPECIAL = {"vocab_size", "lr_wsd_decay_fraction", "train_iters"}


def _mope_only(key: str) -> bool:
    return key.startswith("moe_otep_") or key == "moe_sigma_update_every"


def expert_parallel_size(num_experts: int, world_size: int) -> int:
    """Largest ``d <= world_size`` dividing both the expert count and the world size."""
    for d in range(max(world_size, 1), 0, -1):
        if num_experts % d == 0 and world_size % d == 0:
            return d
    return 1


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def preset_flags(
    name: str,
    router: Optional[str] = None,
    train_iters: Optional[int] = None,
    world_size: Optional[int] = None,
    mock_data: bool = False,
) -> list[str]:
    """Megatron-LM flags of a preset (raises :class:`PresetError` / ValueError)."""
    preset = load_preset(name)
    if router is not None:
        if router not in ROUTER_TYPES:
            raise ValueError(f"unknown router {router!r} (choose from {', '.join(ROUTER_TYPES)})")
        preset["moe_router_load_balancing_type"] = ROUTER_TYPES[router]
    if train_iters is None:
        train_iters = preset.get("train_iters")
    mope = preset.get("moe_router_load_balancing_type") == ROUTER_TYPES["mope"]
    out = ["--disable-bias-linear"]
    for key, value in preset.items():
        if key in _SPECIAL or (_mope_only(key) and not mope):
            continue
        if isinstance(value, bool):
            if value:
                out.append(_flag(key))
        elif isinstance(value, list):  # moe_layer_freq: Megatron-LM takes a Python list
            out += [_flag(key), "[" + ",".join(str(v) for v in value) + "]"]
        else:
            out += [_flag(key), str(value)]
    if train_iters is not None:
        out += ["--train-iters", str(train_iters)]
        fraction = preset.get("lr_wsd_decay_fraction")
        if fraction is not None:
            out += ["--lr-wsd-decay-iters", str(fraction_of_iters(fraction, train_iters))]
    elif preset.get("lr_wsd_decay_fraction") is not None:
        raise ValueError(f"preset {name!r} decays over a fraction of the run: give --train-iters")
    if mock_data:
        out += ["--mock-data", "--tokenizer-type", "NullTokenizer",
                "--vocab-size", str(preset["vocab_size"])]
    if world_size is not None and preset.get("num_experts"):
        out += ["--expert-model-parallel-size",
                str(expert_parallel_size(int(preset["num_experts"]), world_size))]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpmoe.megatron_lm.flags",
                                description="Print a preset's Megatron-LM flags, one per line.")
    p.add_argument("preset", help="configs/*.toml name (tiny-cpu, flame-moe-38m, ...) or a .toml path")
    p.add_argument("--router", choices=sorted(ROUTER_TYPES), default=None,
                   help="mope (otep) or moe (aux_loss top-k); default: the preset's")
    p.add_argument("--train-iters", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes: adds --expert-model-parallel-size")
    p.add_argument("--mock-data", action="store_true",
                   help="add --mock-data with a NullTokenizer of the preset's vocabulary")
    args = p.parse_args(argv)
    try:
        flags = preset_flags(args.preset, args.router, args.train_iters, args.world_size, args.mock_data)
    except (PresetError, ValueError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
