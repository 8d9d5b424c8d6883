"""``mpmoe analyze``: routing/expert analysis reports.

    mpmoe analyze stats RUN_OR_STATS_DIR [--compare OTHER] --out DIR
    mpmoe analyze checkpoint --load CKPT [--compare-load CKPT2] --out DIR [trainer flags ...]

Errors end with one line ``mpmoe analyze: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from mpmoe.errors import ArgumentParser, UserError, run_verb

PROG = "mpmoe analyze"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Routing and expert analysis: plots and numbers from "
                "statistics dumps and checkpoints.")
    sub = p.add_subparsers(dest="command", metavar="{stats,checkpoint}", parser_class=ArgumentParser)
    s = sub.add_parser("stats", help="plots + summary.json from layer{L}_seg{S}_{moe|mope|remoe}.npz windows")
    s.add_argument("path", help="statistics folder, run folder (config.json names it), or a tree of them")
    s.add_argument("--compare", default=None, help="a second run's statistics, shown side by side")
    s.add_argument("--name", default=None, help="label of the first run (default: its routing and run name, e.g. \"MoPE (run1)\")")
    s.add_argument("--compare-name", default=None, help="label of the second run")
    s.add_argument("--out", required=True, help="report folder (PNGs, summary.json, index.md, index.html)")
    s.add_argument("--evolution-windows", type=int, default=4, help="windows shown in the evolution plot")
    s.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("checkpoint", help="expert-embedding ablations from a trainer checkpoint "
                       "(remaining flags are `mpmoe train` flags describing the model: --preset, ...)")
    c.add_argument("--load", required=True, help="checkpoint folder written by `mpmoe train --save`")
    c.add_argument("--compare-load", default=None, help="a second checkpoint (e.g. the MoE run vs the MoPE run)")
    c.add_argument("--compare-args", default=None,
                   help="`mpmoe train` flags of the second model as one string (default: the first "
                        "model's flags; pass them when the runs differ, e.g. in routing type)")
    c.add_argument("--name", default=None)
    c.add_argument("--compare-name", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--layers", default=None, help="comma-separated MoE layer numbers (default: all)")
    c.add_argument("--num-tokens", type=int, default=2048, help="tokens of the text sample (default 2048)")
    c.add_argument("--ot-samples", type=int, default=128, help="tokens per expert in the OT distance (0: skip)")
    c.add_argument("--stats", default=None, help="statistics folder of the run, for co-occurrence comparisons")
    c.add_argument("--compare-stats", default=None)
    c.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """The verb (user errors: one line ``mpmoe analyze: error: ...``, exit 2)."""
    return run_verb(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "stats" and rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)}")
    for flag, minimum in (("evolution_windows", 1), ("num_tokens", 1), ("ot_samples", 0)):
        value = getattr(args, flag, None)
        if value is not None and value < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {value}")
    from mpmoe.errors import folder_problem

    problem = folder_problem(args.out)
    if problem:  # before the model is loaded or the statistics read
        raise UserError(f"--out {args.out}: {problem}")
    start = time.perf_counter()
    if args.command == "stats":
        from mpmoe.analysis.stats import analyze_stats

        summary = analyze_stats(args.path, args.out, compare=args.compare, name=args.name,
                                compare_name=args.compare_name, evolution_windows=args.evolution_windows,
                                progress=not args.no_progress and sys.stderr.isatty())
    else:
        from mpmoe.analysis.checkpoint import analyze_checkpoint

        summary = analyze_checkpoint(args, rest)
    elapsed = time.perf_counter() - start
    print(f"{PROG} {args.command}: wrote {len(summary.get('images', []))} plots, summary.json and index.html "
          f"to {args.out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
