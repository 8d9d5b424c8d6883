"""``mpmoe train`` options: Megatron-LM flag names, presets, validation with one-line errors.

Precedence: argparse defaults < preset (``--preset``, a ``configs/*.toml`` name or a
``.toml`` path) < flags given on the command line. :func:`parse_args` returns an
``argparse.Namespace`` after :func:`validate`; errors raise :class:`ConfigError`, which the
CLI prints as ``mpmoe train: error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import os
from typing import Optional, Sequence

from mpmoe.train.presets import PresetError, list_presets, load_preset

__all__ = ["ConfigError", "DEFAULT_PRESET", "build_parser", "parse_args", "validate",
           "model_config_kwargs"]

DEFAULT_PRESET = "tiny-cpu"


class ConfigError(ValueError):
    """A bad configuration (the message is one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line format, exit 2
        raise ConfigError(message)


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
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (None: MHA)")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="model vocabulary (with --data-path and no "
                   "--tokenizer-model); the embedded default uses its tokenizer's")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action=B, default=True)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    g.add_argument("--untie-embeddings-and-output-weights", action=B, default=True)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-load-balancing-type",
                   choices=["aux_loss", "seq_aux_loss", "none", "otep"], default="aux_loss",
                   help="otep = MoPE routing; the others are megatron's top-k routing")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.01)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-layer-freq", type=_layer_freq, default=1)
    g.add_argument("--moe-ffn-hidden-size", type=int)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int)
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"],
                   default="alltoall")
    g.add_argument("--moe-grouped-gemm", action=B, default=False)
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default="fp32")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-otep-warmup-fraction", type=float, default=0.01,
                   help="MoPE: fraction of iterations routed top-k first")
    g.add_argument("--moe-sigma-update-every", type=int, default=1)
    g.add_argument("--moe-plot-every", type=int, default=200,
                   help="routing-statistics window (iterations) for --moe-stats-dir")
    g.add_argument("--moe-stats-dir", default=None,
                   help="write layer{L}_seg{S}_{moe|mope}.npz routing statistics here")
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
    g.add_argument("--last-trainable-layers", type=int, default=None,
                   help="train only the last N transformer layers (+ final norm and output "
                        "layer); -1 or unset: everything (the demo's flag)")

    from mpmoe.train import ablation

    ablation.add_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action=B, default=True,
                   help="GPU: megatron's distributed optimizer (CPU: megatron's plain optimizer)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo without")

    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine",
                                                "inverse-square-root", "WSD"], default="WSD")
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="linear")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: iterations of the final decay (default: --lr-wsd-decay-fraction)")
    g.add_argument("--lr-wsd-decay-fraction", type=float, default=0.1,
                   help="WSD: fraction of --lr-decay-iters spent decaying (mpmoe option)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action=B, default=False)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
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
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from the latest checkpoint here")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--run-dir", default=None,
                   help="metrics.jsonl, TensorBoard, config (default: runs/<preset>-<time>)")
    g.add_argument("--log-interval", type=int, default=10)
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
    except PresetError as exc:
        raise ConfigError(str(exc)) from None
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise ConfigError(f"preset {first.preset!r}: unknown option(s) {', '.join(unknown)}")
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    if check:
        validate(args)
    return args


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
    if args.train_iters < 0:
        raise ConfigError(f"--train-iters must be >= 0 (0: only save the initial model), got {args.train_iters}")
    for name in ["num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "global_batch_size", "micro_batch_size", "eval_iters", "log_interval",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
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
        if e < 1:
            raise ConfigError(f"--num-experts must be >= 1, got {e}")
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
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if not 0 <= args.lr_wsd_decay_fraction <= 1:
        raise ConfigError(f"--lr-wsd-decay-fraction must be in [0, 1], got {args.lr_wsd_decay_fraction}")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.load is not None and not os.path.isdir(args.load):
        raise ConfigError(f"--load: {args.load} is not a directory")
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.bf16 and not _cuda_available():
        raise ConfigError("--bf16 needs a GPU (the CPU optimizer keeps no fp32 master weights); "
                          "pass --no-bf16 on CPU")
    _validate_mpmoe_extras(args)
    if args.recompute_granularity == "full" and args.recompute_method is None:
        args.recompute_method = "uniform"
    if args.recompute_method is not None and args.recompute_num_layers is None:
        args.recompute_num_layers = 1


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
        )
        from mpmoe.train.ablation import config_kwargs

        kw.update(config_kwargs(args))
    return kw


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
    for key, value in saved.items():
        if key in known:
            setattr(args, key, value)
    if isinstance(args.moe_layer_freq, str):
        args.moe_layer_freq = _layer_freq(args.moe_layer_freq)
    return args
