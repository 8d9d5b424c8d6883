"""The ``mpmoe`` command: ``mpmoe <verb> [args]``.

Each verb lives in its driver package and is imported only when used, so that
``mpmoe data ...`` does not import megatron-core and ``mpmoe --help`` is instant.
A driver exposes ``main(argv: list[str] | None) -> int``.
"""

from __future__ import annotations

import importlib
import logging
import sys

# verb -> (module with main(argv), one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("mpmoe.train.cli", "train a GPT MoE / MoPE model on megatron-core (default: tiny-cpu, embedded corpus)"),
    "data": ("mpmoe.data.cli", "text -> tokenizer -> Megatron indexed dataset (.bin/.idx)"),
    "eval": ("mpmoe.eval.cli", "evaluate checkpoints with lm-evaluation-harness (offline local tasks or the hub suite)"),
    "analyze": ("mpmoe.analysis.cli", "routing/expert analysis: plots + summary.json from statistics dumps and checkpoints"),
    "experts": ("mpmoe.experts.cli", "merge / compress / split the experts of a checkpoint (MC-SMoE, HEMoE)"),
    "export": ("mpmoe.export.hf", "export a checkpoint: `export hf` writes a Hugging Face transformers folder"),
    "import": ("mpmoe.export.hf_import", "import a model: `import hf` reads a Hugging Face folder into a checkpoint"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: mpmoe <command> [options]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "Run `mpmoe <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``mpmoe <verb>``; a signal while the verb's modules import (seconds) also ends in one line."""
    from mpmoe.errors import (Terminated, debug_enabled, exit_on_stop_signals, install_stop_handlers,
                              restore_stop_handlers, stop_signals_received)

    command = argv is None  # the process's own command line (console script, python -m mpmoe)
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv and argv[0] in VERBS else ""
    previous = install_stop_handlers(f"mpmoe {verb}" if verb else "mpmoe")  # at once: imports take seconds
    before = len(stop_signals_received())  # an earlier call's signals (in-process callers) do not count
    try:
        code = _main(argv)
        received = stop_signals_received()[before:]  # one a library swallowed while the verb imported
        return 128 + received[0] if received and code == 0 else code
    except (KeyboardInterrupt, Terminated) as exc:
        if debug_enabled():
            raise
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        end = ""
        if verb == "train":  # while `mpmoe train` imports, it is in its set-up: its own line
            from mpmoe.train.cli import SET_UP_STOP as end
        print(f"mpmoe{' ' + verb if verb else ''}: stopped by {name}{end}", file=sys.stderr)
        return 130 if name == "SIGINT" else 143
    finally:  # an in-process caller (a test, a notebook) gets its own handlers back
        restore_stop_handlers(previous)
        if command:  # a signal while the process exits (seconds): the one line, not a traceback
            exit_on_stop_signals()


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mpmoe import __version__

        print(f"mpmoe {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"mpmoe: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from mpmoe.errors import debug_enabled, run_verb
    from mpmoe.supervise import die_with_launcher

    die_with_launcher()  # under torchrun: end with the agent (no unsupervised workers)

    if not debug_enabled():  # megatron's notes on missing optional fused kernels, at import
        import warnings

        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
        # a CUDA build of torch on a machine without CUDA notes it at import (cpp_extension)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        # megatron's note on a CUDA-graph scope name, raised while a preset is applied
        warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    if not {"-h", "--help"} & set(rest):
        from mpmoe.deps import VERB_NEEDS, missing

        problem = missing(VERB_NEEDS[verb], f"mpmoe {verb}")
        if problem:
            print(f"mpmoe {verb}: error: {problem}", file=sys.stderr)
            return 2
    module = importlib.import_module(VERBS[verb][0])
    return run_verb(f"mpmoe {verb}", module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
