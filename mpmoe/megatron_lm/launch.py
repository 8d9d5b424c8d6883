"""What ``scripts/megatron_lm/pretrain.sh`` launches: a pure function of the command line
and the environment.

    python -m mpmoe.megatron_lm.launch PRESET {mope,moe} --physical-gpus N [--nnodes N] -- [flags...]

prints the processes per node, the GPUs seen, then every ``pretrain_gpt.py`` argument
(one per line; the preset's flags, the launcher's choices, then the user's flags, which
win), and its log lines on stderr. :func:`plan` decides:

* GPUs: this node's ``nvidia-smi`` count as torch sees it (``CUDA_VISIBLE_DEVICES``,
  :func:`mpmoe.layout.visible_gpus`); processes per node: ``NPROC_PER_NODE``, else the
  GPUs, else 1 CPU process with ``--distributed-backend gloo``;
* expert parallelism (unless ``--expert-model-parallel-size`` is given): the largest size
  dividing the expert count and ``world / (TP x PP x CP)``, with ``EP x ETP x PP``
  dividing the world (:func:`mpmoe.layout.expert_parallel_size`);
* the micro-batch: lowered, with a log line, when ``micro x data-parallel size`` does not
  divide the global batch (:func:`mpmoe.layout.fit_micro_batch`);
* data: ``--mock-data`` with a NullTokenizer of the preset's vocabulary unless a data
  source is given (``--data-path``, ``--train-data-path``/``--valid-data-path``/
  ``--test-data-path``, ``--data-args-path``, ``--per-split-data-args-path``, ``--mock-data``):
  megatron accepts exactly one source.

CUDA graphs that capture the router and megatron's rerun state machine are handled where
every entry point sees them, in :func:`mpmoe.megatron_lm.args.run_checks`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from mpmoe.layout import expert_parallel_size, fit_micro_batch, visible_gpus
from mpmoe.megatron_lm.flags import ROUTER_ALIASES, preset_flags
from mpmoe.run.presets import PresetError, load_preset

__all__ = ["DATA_FLAGS", "Plan", "check_values", "plan"]

#: Megatron-LM's data sources (one per run): any of them means no automatic --mock-data.
DATA_FLAGS = ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path",
              "--data-args-path", "--per-split-data-args-path", "--mock-data")


@dataclass
class Plan:
    nproc: int                 # processes per node
    gpus: int                  # GPUs this node's processes see
    args: list                 # pretrain_gpt.py's arguments
    notes: list = field(default_factory=list)  # log lines


def _value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The last value given to ``flag`` (``--flag V`` or ``--flag=V``), else None."""
    out = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith(flag + "="):
            out = a.split("=", 1)[1]
    return out


def _has(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _int(argv, flag, default):
    v = _value(argv, flag)
    try:
        return int(v) if v is not None else default
    except ValueError:
        raise ValueError(f"{flag} {v!r} is not an integer") from None


def _valued_options() -> set:
    """Options that take a value: ``mpmoe train``'s (Megatron-LM's names; the routing
    settings the patch set adds included) and the data sources the launcher reads."""
    from mpmoe.run.args import build_parser

    out = {s for a in build_parser()._actions if a.nargs not in (0, "?", "*") for s in a.option_strings}
    return out | (set(DATA_FLAGS) - {"--mock-data"})


def check_values(argv: Sequence[str]) -> None:
    """``ValueError`` (one line) for an option given without its value (the last word, or
    followed by another ``--option``): the launcher would read it as absent and hand
    the bare flag on (megatron's parser answers with its whole usage text)."""
    valued = _valued_options()
    for i, a in enumerate(argv):
        if a in valued and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            raise ValueError(f"{a} needs a value")


def plan(preset: str, router: str, argv: Sequence[str], env: Mapping[str, str], physical_gpus: int,
         nnodes: int = 1) -> Plan:
    """The launch of ``preset`` with ``router`` and the user's ``argv`` (``ValueError`` /
    :class:`PresetError` on a layout that cannot start)."""
    argv = list(argv)
    check_values(argv)
    gpus = visible_gpus(env, physical_gpus)
    nproc = int(env.get("NPROC_PER_NODE") or 0) or gpus or 1
    world = nproc * nnodes
    mock = not any(_has(argv, f) for f in DATA_FLAGS)
    args = preset_flags(preset, router, train_iters=_int(argv, "--train-iters", None), mock_data=mock)
    notes = []
    if gpus == 0:
        args += ["--distributed-backend", "gloo"]
    merged = args + argv  # the user's flags come last and win
    tp = _int(merged, "--tensor-model-parallel-size", 1)
    pp = _int(merged, "--pipeline-model-parallel-size", 1)
    cp = _int(merged, "--context-parallel-size", 1)
    etp = _int(merged, "--expert-tensor-parallel-size", None)
    experts = _int(merged, "--num-experts", 0)
    if experts and not _has(argv, "--expert-model-parallel-size"):
        ep = expert_parallel_size(experts, world, tp, pp, cp, etp)
        args += ["--expert-model-parallel-size", str(ep)]
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    dp = world // (tp * pp * cp)
    gbs, mbs = _int(merged, "--global-batch-size", None), _int(merged, "--micro-batch-size", 1)
    if gbs is not None:
        fitted, note = fit_micro_batch(gbs, mbs, dp)
        if note is not None:
            notes.append(note)
            argv = [a for i, a in enumerate(argv) if not (
                a.startswith("--micro-batch-size=")
                or a == "--micro-batch-size" or (i > 0 and argv[i - 1] == "--micro-batch-size"))]
            argv += ["--micro-batch-size", str(fitted)]
    return Plan(nproc=nproc, gpus=gpus, args=args + argv, notes=notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    user = []
    if "--" in argv:
        i = argv.index("--")
        argv, user = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="pretrain.sh", description=__doc__.splitlines()[0])
    p.add_argument("preset")
    from mpmoe.megatron import routers

    p.add_argument("router", choices=[*routers.KINDS, *ROUTER_ALIASES])
    p.add_argument("--physical-gpus", type=int, default=0, help="GPUs on this node (nvidia-smi)")
    p.add_argument("--nnodes", type=int, default=1)
    a = p.parse_args(argv)
    try:
        load_preset(a.preset)
        result = plan(a.preset, a.router, user, os.environ, a.physical_gpus, a.nnodes)
    except (PresetError, ValueError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"{p.prog}: {note}", file=sys.stderr)
    print("\n".join([str(result.nproc), str(result.gpus), *result.args]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
