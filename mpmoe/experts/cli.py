"""``mpmoe experts``: merge, compress and split the experts of a checkpoint.

    mpmoe experts merge --load CKPT --save OUT --num-experts E' [--layout bind|collapsed] ...
    mpmoe experts compress --load MERGED --save OUT --rank R --sparse-keep F ...
    mpmoe experts split --load DENSE --save OUT --num-experts E --moe-router-topk K ...

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``
(:data:`SUBCOMMANDS`). Errors are one line ``mpmoe experts: error: ...``, exit 2, and leave
nothing behind. See docs/experts.md.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional

from mpmoe.errors import UserError, debug_enabled

PROG = "mpmoe experts"

# subcommand -> (module with add_arguments / run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("mpmoe.experts.merge", "merge each MoE layer's experts into E' groups (MC-SMoE's M-SMoE and baselines)"),
    "compress": ("mpmoe.experts.compress", "store every expert as low rank + row-sparse residual (MC-SMoE's compression)"),
    "split": ("mpmoe.experts.split", "a dense model's FFNs into experts of different sizes (HEMoE's ILP) or a baseline partition"),
}


class _UsageError(UserError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through run_verb, exit 2
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Merge, compress and split the experts of a checkpoint (docs/experts.md).")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", parser_class=_Parser)
    for name, (module, text) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=text, description=text)
        importlib.import_module(module).add_arguments(s)
    return p


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not debug_enabled():  # megatron's and torch's deprecation notes would bury the one-line result
        import warnings

        warnings.filterwarnings("ignore", module=r"megatron\..*")
        warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args)
