"""``mpmoe train`` options: Megatron-LM flag names, presets, validation with one-line errors.

Precedence: argparse defaults < preset (``--preset``, a ``configs/*.toml`` name or a
``.toml`` path) < flags given on the command line. The routing flags are generated from
the router registry and the settings table (:mod:`mpmoe.megatron.routers`,
:mod:`mpmoe.megatron.settings`; the router rule is :func:`resolve_routing`).
:func:`parse_args` returns an ``argparse.Namespace`` after :func:`validate`; errors raise
:class:`ConfigError`, which the CLI prints as ``mpmoe train: error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from typing import Optional, Sequence

from mpmoe.layout import fit_micro_batch
from mpmoe.megatron import routers, settings
from mpmoe.megatron.routers import ConfigError
from mpmoe.megatron.settings import Range
from mpmoe.run.presets import PresetError, fraction_of_iters, list_presets, load_preset, preset_path

__all__ = ["ConfigError", "DEFAULT_PRESET", "build_parser", "parse_args", "validate",
           "model_config_kwargs", "Range"]

DEFAULT_PRESET = "tiny-cpu"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line format, exit 2
        raise ConfigError(message)


POSITIVE = Range(int, 1)
NON_NEGATIVE = Range(int, 0)
NON_NEGATIVE_FLOAT = Range(float, 0)
POSITIVE_FLOAT = Range(float, 0, lo_open=True)
FRACTION = Range(float, 0, 1)                 # [0, 1]
PROBABILITY = Range(float, 0, 1, hi_open=True)  # [0, 1)


def _split(text):
    """``--split``: 1 to 3 comma-separated non-negative weights, not all zero (Megatron's)."""
    if not isinstance(text, str):  # a preset's split = 969 (TOML int)
        raise argparse.ArgumentTypeError(f"must be a string like \"969,30,1\", got {type(text).__name__} {text!r}")
    text = text.strip()
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights):
        raise argparse.ArgumentTypeError(f"expected up to 3 comma-separated weights like 969,30,1, got {text!r}")
    if sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"the weights {text!r} are all zero: no split would get data")
    return text


def _layer_freq(text):
    """``--moe-layer-freq``: an int N, or a 0/1 list (``[0,1,1]`` or Megatron's ``([0]*1+[1]*8)``)."""
    if isinstance(text, (int, list)):
        return text
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = _safe_list_expr(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an int or a list of 0/1 like [0,1,1], got {text!r}")
    return value


def _safe_list_expr(node):
    """Evaluate list literals, ``+`` of lists and ``list * int`` (Megatron's layer-freq syntax)."""
    if isinstance(node, ast.List):
        return [_safe_list_expr(e) for e in node.elts]
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _safe_list_expr(node.left), _safe_list_expr(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError("unsupported expression")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mpmoe train",
        description="Train a GPT MoE / MoPE model on megatron-core. Flags use Megatron-LM's "
        "names; a preset (configs/*.toml) supplies defaults. Without --data-path the embedded "
        "corpus is used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("preset")
    g.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"configs/<name>.toml or a .toml path (known: {', '.join(list_presets())})")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=POSITIVE)
    g.add_argument("--hidden-size", type=POSITIVE)
    g.add_argument("--ffn-hidden-size", type=POSITIVE)
    g.add_argument("--num-attention-heads", type=POSITIVE)
    g.add_argument("--num-query-groups", type=POSITIVE, default=None, help="GQA groups (None: MHA)")
    g.add_argument("--seq-length", type=POSITIVE)
    g.add_argument("--max-position-embeddings", type=POSITIVE)
    g.add_argument("--vocab-size", type=POSITIVE, help="model vocabulary (with --data-path and no "
                   "--tokenizer-model); the embedded default uses its tokenizer's")
    g.add_argument("--make-vocab-size-divisible-by", type=POSITIVE, default=128)
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action=B, default=True)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    g.add_argument("--rotary-base", type=POSITIVE, default=10000, help="RoPE base (theta; an int, as in Megatron-LM)")
    g.add_argument("--add-qkv-bias", action=B, default=False,
                   help="biases on the query/key/value projections only (Qwen2)")
    g.add_argument("--untie-embeddings-and-output-weights", action=B, default=True)
    g.add_argument("--init-method-std", type=NON_NEGATIVE_FLOAT, default=0.02)
    g.add_argument("--hidden-dropout", type=PROBABILITY, default=0.0)
    g.add_argument("--attention-dropout", type=PROBABILITY, default=0.0)

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=POSITIVE)
    g.add_argument("--moe-router-topk", type=POSITIVE, default=2)
    g.add_argument("--moe-aux-loss-coeff", type=NON_NEGATIVE_FLOAT, default=0.01)
    g.add_argument("--moe-z-loss-coeff", type=NON_NEGATIVE_FLOAT, default=None)
    g.add_argument("--moe-layer-freq", type=_layer_freq, default=1)
    g.add_argument("--moe-ffn-hidden-size", type=POSITIVE)
    g.add_argument("--moe-shared-expert-intermediate-size", type=POSITIVE)
    g.add_argument("--moe-shared-expert-gate", action=B, default=False,
                   help="scale the shared expert by sigmoid(w . x), a learned per-token gate (Qwen2-MoE)")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"],
                   default="alltoall")
    g.add_argument("--moe-grouped-gemm", action=B, default=False)
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default="fp32")
    routers.add_arguments(p)
    settings.add_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=POSITIVE, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=POSITIVE, default=1)
    g.add_argument("--expert-model-parallel-size", type=POSITIVE, default=1)
    g.add_argument("--use-distributed-optimizer", action=B, default=True,
                   help="GPU: megatron's distributed optimizer (CPU: megatron's plain optimizer)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo without")

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=NON_NEGATIVE)
    g.add_argument("--global-batch-size", type=POSITIVE)
    g.add_argument("--micro-batch-size", type=POSITIVE)
    g.add_argument("--lr", type=NON_NEGATIVE_FLOAT)
    g.add_argument("--min-lr", type=NON_NEGATIVE_FLOAT, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine",
                                                "inverse-square-root", "WSD"], default="WSD")
    g.add_argument("--lr-warmup-fraction", type=PROBABILITY, default=None)
    g.add_argument("--lr-warmup-iters", type=NON_NEGATIVE, default=0)
    g.add_argument("--lr-decay-iters", type=POSITIVE, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="linear")
    g.add_argument("--lr-wsd-decay-iters", type=NON_NEGATIVE, default=None,
                   help="WSD: iterations of the final decay (default: --lr-wsd-decay-fraction)")
    g.add_argument("--lr-wsd-decay-fraction", type=FRACTION, default=0.1,
                   help="WSD: fraction of --lr-decay-iters spent decaying (mpmoe option)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.1)
    g.add_argument("--adam-beta1", type=PROBABILITY, default=0.9)
    g.add_argument("--adam-beta2", type=PROBABILITY, default=0.95)
    g.add_argument("--adam-eps", type=POSITIVE_FLOAT, default=1e-8)
    g.add_argument("--clip-grad", type=NON_NEGATIVE_FLOAT, default=1.0)
    g.add_argument("--bf16", action=B, default=False)
    g.add_argument("--seed", type=NON_NEGATIVE, default=1234)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=POSITIVE, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Megatron data prefixes, optionally weighted: [W1] PREFIX1 [W2] PREFIX2 ... "
                   "(default: the embedded corpus)")
    g.add_argument("--split", type=_split, default="969,30,1",
                   help="train,valid,test split of --data-path (the embedded corpus has its own files)")
    g.add_argument("--tokenizer-model", default=None,
                   help="HF tokenizer directory (vocab size and EOD id) for --data-path")
    g.add_argument("--data-cache-path", default=None, help="GPTDataset index cache")
    g.add_argument("--embedded-cache-dir", default=None,
                   help="cache of the embedded corpus build (default: $MPMOE_CACHE or ~/.cache/mpmoe)")
    g.add_argument("--eval-interval", type=POSITIVE, default=100)
    g.add_argument("--eval-iters", type=POSITIVE, default=10)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=POSITIVE, default=None)
    g.add_argument("--load", default=None,
                   help="resume from a save folder (its latest checkpoint) or one iter_XXXXXXX "
                        "folder; with --load equal to --save a folder without a checkpoint "
                        "starts from scratch (auto-resume)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--allow-model-change", action="store_true",
                   help="load a checkpoint whose model differs from this run's (another router, "
                        "more or fewer layers): tensors both have are loaded, state only the "
                        "checkpoint has is dropped, state only this model has keeps its "
                        "initialisation (both named on stderr); needs --no-load-optim. Without "
                        "it such a checkpoint is refused")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-on-signal", action="store_true",
                   help="on SIGTERM/SIGINT stop at the next step without writing a checkpoint")

    g = p.add_argument_group("numerical faults")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=B, default=True,
                   help="check every step's loss and gradients for NaN/inf before the "
                        "optimizer step (default: on)")
    g.add_argument("--on-nan", choices=["stop", "skip"], default="stop",
                   help="a non-finite loss or gradient: stop with an error (default), or skip "
                        "that step's update and go on")

    g = p.add_argument_group("logging")
    g.add_argument("--run-dir", default=None,
                   help="metrics.jsonl, TensorBoard, config (default: runs/<preset>-<time>)")
    g.add_argument("--log-interval", type=POSITIVE, default=10)
    g.add_argument("--tensorboard-dir", default=None, help="default: <run-dir>/tensorboard")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--progress", action=B, default=None, help="progress bar (default: on a terminal)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, *, check: bool = True) -> argparse.Namespace:
    """Parse ``argv`` over the preset's values and (``check``) validate them for this
    world size; raises :class:`ConfigError`."""
    argv = list(argv or [])
    parser = build_parser()
    explicit = routers.explicit_dests(parser, argv)
    preset_name = explicit.get("preset", DEFAULT_PRESET)
    try:
        preset = load_preset(preset_name)
        where = preset_path(preset_name)
    except PresetError as exc:
        raise ConfigError(str(exc)) from None
    check_preset(parser, preset, where)
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    if check and not args.data_path and any(a == "--split" or a.startswith("--split=") for a in argv):
        raise ConfigError("--split applies to --data-path; the embedded corpus comes as fixed "
                          "train/valid/test files (leave --split out, or pass --data-path)")
    resolve_routing(args, explicit, preset)
    if check:
        validate(args)
    return args


def resolve_routing(args: argparse.Namespace, explicit: dict, preset: dict, *, prog: str = "mpmoe train",
                    environ=None) -> None:
    """The router (:func:`mpmoe.megatron.routers.resolve`), the demo's environment variables,
    and the routing settings checked once (:func:`mpmoe.megatron.settings.check`): a setting
    given on the command line that cannot apply is an error, one from the preset is dropped."""
    values = vars(args)
    kind = routers.resolve(values, explicit, preset)
    notes = settings.apply_env(values, explicit, prog, os.environ if environ is None else environ)
    checked = settings.check(values, kind if args.num_experts is not None else None, explicit=set(explicit),
                             flags=True, num_experts=args.num_experts, topk=args.moe_router_topk,
                             moe_layers=settings.moe_layer_numbers(args.num_layers, args.moe_layer_freq,
                                                                   args.num_experts),
                             dispatcher=args.moe_token_dispatcher_type)
    for note in notes:  # only for values that hold (an error is then the one line)
        print(note, file=sys.stderr)
    for name, value in checked.items():
        setattr(args, name, settings.recorded(value))


_BOOL_ACTIONS = (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)


def _preset_value_problem(action: argparse.Action, value) -> Optional[str]:
    """What is wrong with a preset's ``value`` for the flag ``action`` (None: fine). TOML
    values are typed, so a string where the flag takes a number or a boolean is an error."""
    if isinstance(action, _BOOL_ACTIONS):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if action.nargs in ("*", "+"):
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            return f"must be a list, got {value!r}"
        return None
    kind = action.type
    if isinstance(kind, Range):
        return kind.problem(value)
    if kind in (int, float):
        return Range(kind).problem(value)
    if kind is None:
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__} {value!r}"
    else:
        try:
            kind(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            return str(exc)
    if action.choices is not None and value not in action.choices:
        return f"must be one of {', '.join(map(str, action.choices))}, got {value!r}"
    return None


def check_preset(parser: argparse.ArgumentParser, preset: dict, where) -> None:
    """Every key of a preset is a flag of ``parser`` and its value has the flag's type and range;
    else one :class:`ConfigError` naming the preset file and the key."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "preset")}
    for key, value in preset.items():
        if key not in actions:
            raise ConfigError(f"preset {where}: unknown key {key!r} (keys are `mpmoe train` flags with "
                              "underscores, e.g. num_layers)")
        problem = _preset_value_problem(actions[key], value)
        if problem:
            raise ConfigError(f"preset {where}: {key} {problem}")


def check_ranges(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Every flag declared with a :class:`Range` type holds a value in range (or None)."""
    for action in (parser or build_parser())._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Range) and value is not None:
            problem = action.type.problem(value)
            if problem:
                raise ConfigError(f"{action.option_strings[0]} {problem}")


def _check_output_dir(flag: str, path: Optional[str]) -> None:
    """``path`` is (or can be created as) a writable folder; else a one-line error."""
    from mpmoe.errors import folder_problem

    problem = None if path is None else folder_problem(path)
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


def _data_prefixes(data_path: list[str]) -> list[str]:
    """Prefixes of ``--data-path`` (``[W] PREFIX ...`` or ``PREFIX ...``)."""
    try:
        float(data_path[0])
        weighted = True
    except ValueError:
        weighted = False
    if weighted:
        if len(data_path) % 2:
            raise ConfigError("--data-path: expected weight/prefix pairs")
        return data_path[1::2]
    return list(data_path)


def check_otep_backend(args: argparse.Namespace) -> None:
    """A MoPE model with a bad ``MPMOE_OTEP_BACKEND`` fails at start, not at its first routing."""
    if args.num_experts is None or getattr(args, "moe_router_load_balancing_type", None) != "otep":
        return
    from mpmoe.routing.otep import default_backend

    try:
        default_backend()
    except ValueError as exc:
        raise ConfigError(f"environment variable {str(exc).split(': ', 1)[-1]}") from None


def validate(args: argparse.Namespace, world_size: Optional[int] = None) -> None:
    """One-line :class:`ConfigError` for configurations that cannot run."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    required = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
                "global_batch_size", "micro_batch_size", "lr"]
    for name in required:
        if getattr(args, name) is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required (not set by preset {args.preset!r})")
    check_ranges(args)
    check_otep_backend(args)
    if getattr(args, "allow_model_change", False) and not args.no_load_optim:
        raise ConfigError("--allow-model-change needs --no-load-optim (the optimizer state of "
                          "another model does not apply)")
    if getattr(args, "allow_model_change", False) and args.load is None:
        raise ConfigError("--allow-model-change without --load has nothing to apply to")
    fill_defaults(args)
    if args.seq_length > args.max_position_embeddings and args.position_embedding_type != "rope":
        raise ConfigError("--seq-length exceeds --max-position-embeddings")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by "
                          f"--num-attention-heads {args.num_attention_heads}")
    if args.pipeline_model_parallel_size != 1:
        raise ConfigError("--pipeline-model-parallel-size > 1 is not supported by mpmoe train yet")
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    if world_size % tp:
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}")
    dp = world_size // tp
    if args.num_experts is not None:
        e, k = args.num_experts, args.moe_router_topk
        if k < 1 or k > e:
            raise ConfigError(f"--moe-router-topk {k} must be between 1 and --num-experts {e}")
        if e % ep:
            raise ConfigError(f"--num-experts {e} is not divisible by --expert-model-parallel-size {ep}")
        if world_size % (ep * tp) and ep > 1:
            raise ConfigError(f"world size {world_size} is not divisible by expert x tensor "
                              f"parallel size {ep}*{tp}")
        freq = args.moe_layer_freq
        if isinstance(freq, list) and len(freq) != args.num_layers:
            raise ConfigError(f"--moe-layer-freq has {len(freq)} entries for --num-layers {args.num_layers}")
    elif ep > 1:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    try:  # a micro-batch that does not fit this data-parallel size is lowered (log line)
        args.micro_batch_size, note = fit_micro_batch(args.global_batch_size, args.micro_batch_size, dp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if note is not None and os.environ.get("RANK", "0") == "0":
        print(f"mpmoe train: {note}", file=sys.stderr, flush=True)
    if args.data_path is not None:
        if not args.data_path:
            raise ConfigError("--data-path needs at least one prefix")
        for prefix in _data_prefixes(args.data_path):
            if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                raise ConfigError(f"--data-path: {prefix}.bin/.idx not found")
        if args.tokenizer_model is None and args.vocab_size is None:
            raise ConfigError("--data-path needs --tokenizer-model or --vocab-size")
    if args.tokenizer_model is not None and not os.path.isfile(
            os.path.join(args.tokenizer_model, "tokenizer.json")):
        raise ConfigError(f"--tokenizer-model: {args.tokenizer_model}/tokenizer.json not found")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    for flag, path in (("--save", args.save), ("--run-dir", args.run_dir),
                       ("--tensorboard-dir", args.tensorboard_dir), ("--moe-stats-dir", args.moe_stats_dir),
                       ("--data-cache-path", args.data_cache_path)):
        _check_output_dir(flag, path)
    if args.load is not None and not os.path.isdir(args.load) and not (
            args.save is not None and os.path.abspath(args.load) == os.path.abspath(args.save)):
        raise ConfigError(f"--load: {args.load} is not a directory")
    if args.bf16 and not _cuda_available():
        raise ConfigError("--bf16 needs a GPU (the CPU optimizer keeps no fp32 master weights); "
                          "pass --no-bf16 on CPU")
    n = args.last_trainable_layers
    if n is not None and not -1 <= n <= args.num_layers:
        raise ConfigError(f"--last-trainable-layers must be -1 (all) or 0..--num-layers "
                          f"{args.num_layers}, got {n}")
    settings.check_files(vars(args))


def fill_defaults(args: argparse.Namespace) -> None:
    """The values that default to others (as Megatron-LM derives them)."""
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_method is not None and args.recompute_num_layers is None:
        args.recompute_num_layers = 1


def schedule_lengths(args) -> dict:
    """Warm-up, decay and WSD-decay lengths in iterations."""
    decay = args.lr_decay_iters or max(args.train_iters, 1)
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        # not rounded: Megatron-LM's training.py passes fraction x decay steps as is
        # (21.21 iterations of warm-up for 0.01 of 2121)
        warmup = args.lr_warmup_fraction * decay
    wsd = args.lr_wsd_decay_iters
    if wsd is None:
        wsd = fraction_of_iters(args.lr_wsd_decay_fraction, decay)
    return {"warmup": warmup, "decay": decay, "wsd_decay": wsd}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def model_config_kwargs(args: argparse.Namespace) -> dict:
    """``MoPEConfig`` keyword arguments for these options (parallel sizes included)."""
    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kw = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(args, "add_qkv_bias", False)),
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.tensor_model_parallel_size > 1,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if args.recompute_modules is not None:
        kw["recompute_modules"] = list(args.recompute_modules)
    if args.num_experts is not None:
        kind = routers.kind_of(args)
        kw.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_layer_freq=args.moe_layer_freq,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_router_dtype=args.moe_router_dtype,
            **{name: getattr(args, name, default) for name, default in routers.MARKS.items()},
            **settings.config_kwargs(settings.from_record(vars(args)), kind),
        )
    return kw


def args_from_saved(saved: Optional[dict], flags: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options of a run rebuilt from a checkpoint's record of them.

    ``saved``: the ``args`` a checkpoint written by ``mpmoe train`` stores (see
    :func:`mpmoe.run.checkpoint.saved_run_info`): the run's preset is parsed, then every
    recorded value laid over it. ``flags``: ``mpmoe train`` flags that describe the model
    instead (for checkpoints that record nothing, or to override the record). Raises
    :class:`ConfigError` (one line).
    """
    # Not validated against this process's world size: the batch sizes and parallel sizes
    # were the training run's; the caller sets the parallel layout it builds with.
    if flags:
        return parse_args(["--train-iters", "1", *flags], check=False)
    if not saved:
        raise ConfigError("the checkpoint does not record its run's flags (written before mpmoe "
                          "stored them); give the `mpmoe train` flags that built it")
    args = parse_args(["--preset", str(saved.get("preset", "tiny-cpu")), "--train-iters", "1"], check=False)
    known = vars(args)
    for key, value in settings.from_record(saved, old_run=True).items():
        if key in known:
            setattr(args, key, value)
    routers.select(known, routers.kind_of(known))
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    return args
