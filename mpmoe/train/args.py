"""``mpmoe train`` options: Megatron-LM flag names, presets, validation with one-line errors.

Precedence: argparse defaults < preset (``--preset``, a ``configs/*.toml`` name or a
``.toml`` path) < flags given on the command line. :func:`parse_args` returns an
``argparse.Namespace`` after :func:`validate`; errors raise :class:`ConfigError`, which the
CLI prints as ``mpmoe train: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
from typing import Optional, Sequence

from mpmoe.errors import UserError
from mpmoe.train.presets import PresetError, list_presets, load_preset, preset_path

__all__ = ["ConfigError", "DEFAULT_PRESET", "build_parser", "parse_args", "validate",
           "model_config_kwargs", "Range"]

DEFAULT_PRESET = "tiny-cpu"


class ConfigError(UserError, ValueError):
    """A bad configuration (the message is one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line format, exit 2
        raise ConfigError(message)


class Range:
    """argparse ``type=`` for a number in a range; ``validate`` and preset loading reuse its
    :meth:`check`, so a flag declared with a ``Range`` is range-checked from every source
    (command line, preset, a checkpoint's recorded flags)::

        g.add_argument("--num-layers", type=Range(int, 1))             # >= 1
        g.add_argument("--hidden-dropout", type=Range(float, 0, 1, hi_open=True))  # [0, 1)
    """

    def __init__(self, kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def check(self, value) -> Optional[str]:
        """None if ``value`` is a number of this kind in range, else what is wrong."""
        wanted = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            what = "an integer" if self.kind is int else "a number"
            return f"must be {what}, got {type(value).__name__} {value!r}"
        if self.kind is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.describe()}, got {value}" if low or high else None

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = self.check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


POSITIVE = Range(int, 1)
NON_NEGATIVE = Range(int, 0)
NON_NEGATIVE_FLOAT = Range(float, 0)
POSITIVE_FLOAT = Range(float, 0, lo_open=True)
FRACTION = Range(float, 0, 1)                 # [0, 1]
PROBABILITY = Range(float, 0, 1, hi_open=True)  # [0, 1)


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
    g.add_argument("--rotary-base", type=POSITIVE_FLOAT, default=10000.0, help="RoPE base (theta)")
    g.add_argument("--add-qkv-bias", action=B, default=False,
                   help="biases on the query/key/value projections only (Qwen2)")
    g.add_argument("--untie-embeddings-and-output-weights", action=B, default=True)
    g.add_argument("--init-method-std", type=NON_NEGATIVE_FLOAT, default=0.02)
    g.add_argument("--hidden-dropout", type=PROBABILITY, default=0.0)
    g.add_argument("--attention-dropout", type=PROBABILITY, default=0.0)

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=POSITIVE)
    g.add_argument("--moe-router-topk", type=POSITIVE, default=2)
    g.add_argument("--moe-router-load-balancing-type",
                   choices=["aux_loss", "seq_aux_loss", "none", "otep"], default="aux_loss",
                   help="otep = MoPE routing; the others are megatron's top-k routing")
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
    g.add_argument("--moe-expert-capacity-factor", type=POSITIVE_FLOAT, default=None)
    g.add_argument("--moe-otep-warmup-fraction", type=FRACTION, default=0.01,
                   help="MoPE: fraction of iterations routed top-k first")
    g.add_argument("--moe-sigma-update-every", type=POSITIVE, default=1)
    g.add_argument("--moe-plot-every", type=POSITIVE, default=200,
                   help="routing-statistics window (iterations) for --moe-stats-dir")
    g.add_argument("--moe-stats-dir", default=None,
                   help="write layer{L}_seg{S}_{moe|mope|remoe}.npz routing statistics here")
    g.add_argument("--moe-relu-routing", action=B, default=False,
                   help="ReMoE: ReLU gates + adaptive load-balanced L1 instead of top-k (docs/routing.md)")
    g.add_argument("--moe-relu-l1-reg-coeff-init", type=float, default=1e-8,
                   help="ReMoE: initial L1 coefficient")
    g.add_argument("--moe-relu-l1-reg-coeff-multiplier", type=float, default=1.2,
                   help="ReMoE: the coefficient is multiplied/divided by this every iteration")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    g.add_argument("--moe-router-enable-expert-bias", action=B, default=False,
                   help="aux-loss-free balancing: per-expert bias on the scores for selection only")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="expert bias step per iteration (sign of the load offset times this)")
    g.add_argument("--moe-router-expert-bias-mode", choices=["prob", "logit", "prob-scaled"],
                   default="prob",
                   help="expert bias with softmax scores: added to the probabilities (prob), to "
                        "the logits (logit; MoPE: p = softmax(logits + b)), or to the "
                        "probabilities times 4/E (prob-scaled: the rate scaled by E); docs/routing.md")
    g.add_argument("--moe-router-pre-softmax", action=B, default=False,
                   help="softmax over all experts before the top-k (gate weights sum to the "
                        "top-k probability mass; megatron's semantics). Off: softmax over the k "
                        "chosen logits (weights sum to 1). MoPE after warm-up is unaffected")
    g.add_argument("--moe-sigma-shrinkage", type=float, default=0.0,
                   help="MoPE Sigma prior: shrink toward mean(diag) * I by this weight in [0, 1) "
                        "(bounds the pull of experts never routed yet; 0 = the reference)")
    g.add_argument("--moe-sigma-decay-rate", type=float, default=0.0,
                   help="MoPE: multiply the co-occurrence counts by (1 - rate) before each "
                        "training forward's update (0 = cumulative counts)")
    g.add_argument("--moe-expert-ffn-sizes", default=None,
                   help="experts of different sizes (HEMoE split, written by `mpmoe experts split`): "
                        "per MoE layer, one FFN size per expert, 'LAYER:S,S,...;LAYER:...' (1-based)")
    g.add_argument("--moe-router-unit-gates", action=B, default=False,
                   help="HEMoE gates: weight 1 for every routed expert (straight-through gradient)")
    g.add_argument("--moe-size-aux-loss-coeff", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="HEMoE's balance loss, each expert weighted by its size (0 = off)")
    g.add_argument("--trainable-params", choices=["all", "routers"], default="all",
                   help="routers: train only the MoE routers (e.g. after `mpmoe experts split`)")
    g.add_argument("--moe-expert-groups", default=None, metavar="LAYER:LABELS;...",
                   help="merged experts (written by `mpmoe experts merge`): per MoE layer, the group "
                        "of each router expert (-1: dropped); the router selects over them, then "
                        "folds into --num-experts experts (docs/experts.md)")
    g.add_argument("--moe-expert-compression", default=None, metavar="RANK:KEEP",
                   help="compressed experts (written by `mpmoe experts compress`): every expert "
                        "weight is low rank RANK + KEEP of its residual rows (docs/experts.md)")
    g.add_argument("--last-trainable-layers", type=int, default=None,
                   help="train only the last N transformer layers (+ final norm and output "
                        "layer); -1 or unset: everything (the demo's flag)")

    from mpmoe.train import ablation

    ablation.add_arguments(p)

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
    g.add_argument("--split", default="969,30,1", help="train,valid,test split of --data-path")
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
    first, _ = parser.parse_known_args(argv)
    try:
        preset = load_preset(first.preset)
        where = preset_path(first.preset)
    except PresetError as exc:
        raise ConfigError(str(exc)) from None
    check_preset(parser, preset, where)
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    if check:
        validate(args)
    return args


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
        return kind.check(value)
    if kind in (int, float):
        return Range(kind).check(value)
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
            problem = action.type.check(value)
            if problem:
                raise ConfigError(f"{action.option_strings[0]} {problem}")


def _check_output_dir(flag: str, path: Optional[str]) -> None:
    """``path`` is (or can be created as) a writable folder; else a one-line error."""
    if path is None:
        return
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise ConfigError(f"{flag} {path}: exists and is not a directory")
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {probe} is not writable")


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
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings and args.position_embedding_type != "rope":
        raise ConfigError("--seq-length exceeds --max-position-embeddings")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by "
                          f"--num-attention-heads {args.num_attention_heads}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
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
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.ffn_hidden_size
        freq = args.moe_layer_freq
        if isinstance(freq, list) and len(freq) != args.num_layers:
            raise ConfigError(f"--moe-layer-freq has {len(freq)} entries for --num-layers {args.num_layers}")
    elif ep > 1:
        raise ConfigError("--expert-model-parallel-size > 1 needs --num-experts")
    elif args.moe_router_load_balancing_type == "otep":
        raise ConfigError("--moe-router-load-balancing-type otep (MoPE) needs --num-experts")
    _validate_balancing(args)
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                          f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
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
    _validate_mpmoe_extras(args)
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_method is not None and args.recompute_num_layers is None:
        args.recompute_num_layers = 1


def _validate_balancing(args: argparse.Namespace) -> None:
    """ReMoE / expert-bias flags (one-line errors before a model is built)."""
    if args.moe_relu_routing:
        if args.num_experts is None:
            raise ConfigError("--moe-relu-routing (ReMoE) needs --num-experts")
        if args.moe_router_load_balancing_type == "otep":
            raise ConfigError("--moe-relu-routing (ReMoE) and --moe-router-load-balancing-type otep "
                              "(MoPE) exclude each other")
        if args.moe_router_enable_expert_bias:
            raise ConfigError("--moe-router-enable-expert-bias does not apply to --moe-relu-routing "
                              "(ReMoE balances with its L1 penalty)")
        if args.moe_expert_capacity_factor is not None:
            raise ConfigError("--moe-expert-capacity-factor does not apply to --moe-relu-routing")
        if not args.moe_relu_l1_reg_coeff_init > 0:
            raise ConfigError(f"--moe-relu-l1-reg-coeff-init must be > 0, got {args.moe_relu_l1_reg_coeff_init}")
        if not args.moe_relu_l1_reg_coeff_multiplier >= 1:
            raise ConfigError("--moe-relu-l1-reg-coeff-multiplier must be >= 1, got "
                              f"{args.moe_relu_l1_reg_coeff_multiplier}")
    if args.moe_router_enable_expert_bias and not args.moe_router_bias_update_rate >= 0:
        raise ConfigError(f"--moe-router-bias-update-rate must be >= 0, got {args.moe_router_bias_update_rate}")
    if args.moe_router_load_balancing_type == "otep" and args.moe_router_score_function != "softmax":
        raise ConfigError("--moe-router-load-balancing-type otep (MoPE) needs --moe-router-score-function softmax")


def _validate_mpmoe_extras(args: argparse.Namespace) -> None:
    """Sigma prior / decay, layer freezing and the routing ablations (mpmoe.train.ablation)."""
    from mpmoe.train import ablation

    for name in ("moe_sigma_shrinkage", "moe_sigma_decay_rate"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    n = args.last_trainable_layers
    if n is not None and not -1 <= n <= args.num_layers:
        raise ConfigError(f"--last-trainable-layers must be -1 (all) or 0..--num-layers "
                          f"{args.num_layers}, got {n}")
    if getattr(args, "trainable_params", "all") == "routers" and args.num_experts is None:
        raise ConfigError("--trainable-params routers needs a model with experts (--num-experts)")
    if getattr(args, "moe_expert_ffn_sizes", None):
        from mpmoe.megatron.hetero import parse_expert_sizes

        try:
            parse_expert_sizes(args.moe_expert_ffn_sizes, args.num_experts)
        except ValueError as exc:
            raise ConfigError(f"--{exc}".replace("moe_expert_ffn_sizes", "moe-expert-ffn-sizes", 1)) from None
    try:
        ablation.validate(args, args.num_experts, args.moe_router_topk)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


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
        kw.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_layer_freq=args.moe_layer_freq,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_router_dtype=args.moe_router_dtype,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_otep_warmup_fraction=args.moe_otep_warmup_fraction,
            moe_sigma_update_every=args.moe_sigma_update_every,
            moe_plot_every=args.moe_plot_every,
            moe_stats_dir=args.moe_stats_dir,
            moe_router_pre_softmax=getattr(args, "moe_router_pre_softmax", False),
            moe_sigma_shrinkage=getattr(args, "moe_sigma_shrinkage", 0.0),
            moe_sigma_decay_rate=getattr(args, "moe_sigma_decay_rate", 0.0),
            moe_expert_groups=getattr(args, "moe_expert_groups", None),
            moe_expert_compression=getattr(args, "moe_expert_compression", None),
        )
        kw.update(moe_expert_ffn_sizes=getattr(args, "moe_expert_ffn_sizes", None),
                  moe_router_unit_gates=bool(getattr(args, "moe_router_unit_gates", False)),
                  moe_size_aux_loss_coeff=getattr(args, "moe_size_aux_loss_coeff", 0.0))
        kw.update(_balancing_kwargs(args))
        from mpmoe.train.ablation import config_kwargs

        kw.update(config_kwargs(args))
    return kw


def _balancing_kwargs(args: argparse.Namespace) -> dict:
    """ReMoE / expert-bias config fields (defaults for options a saved run lacks)."""
    get = lambda name, default: getattr(args, name, default)  # noqa: E731
    return dict(
        moe_relu_routing=bool(get("moe_relu_routing", False)),
        moe_relu_l1_reg_coeff_init=get("moe_relu_l1_reg_coeff_init", 1e-8),
        moe_relu_l1_reg_coeff_multiplier=get("moe_relu_l1_reg_coeff_multiplier", 1.2),
        moe_router_score_function=get("moe_router_score_function", "softmax"),
        moe_router_enable_expert_bias=bool(get("moe_router_enable_expert_bias", False)),
        moe_router_bias_update_rate=get("moe_router_bias_update_rate", 1e-3),
        # a run saved before the option existed used "prob"
        moe_router_expert_bias_mode=get("moe_router_expert_bias_mode", "prob"),
    )


def args_from_saved(saved: Optional[dict], flags: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options of a run rebuilt from a checkpoint's record of them.

    ``saved``: the ``args`` a checkpoint written by ``mpmoe train`` stores (see
    :func:`mpmoe.train.checkpoint.saved_run_info`): the run's preset is parsed, then every
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
    # options a run saved before they existed ran with (their defaults may have changed since)
    args.moe_router_expert_bias_mode = "prob"
    for key, value in saved.items():
        if key in known:
            setattr(args, key, value)
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    return args
