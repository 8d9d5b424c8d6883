"""A trainer checkpoint (+ its tokenizer) -> a model ready for inference.

::

    from mpmoe.megatron import init_distributed
    init_distributed()                       # one process, or each rank under torchrun
    m = load_eval_model("runs/x/ckpt", routing="topk")
    logits = m.forward(tokens)               # [B, S, vocab] float32, padded vocabulary cut off

The model is rebuilt only through the trainer's public functions
(:func:`mpmoe.train.loop.build_model`, :func:`mpmoe.train.checkpoint.load_checkpoint`) with
tensor, pipeline and expert parallelism 1: every process holds the whole model (a
checkpoint written with expert parallelism loads into it), so data-parallel evaluation is
one full model per rank.

What describes the model:

* checkpoints written by ``mpmoe train`` store the run's flags (``train_state["args"]``)
  and its vocabulary, and the save folder holds the run's tokenizer (``tokenizer/``);
  nothing else is needed;
* older or foreign checkpoints: pass the ``mpmoe train`` flags that built the model as
  ``model_flags`` (e.g. ``["--preset", "tiny-cpu"]``), and a tokenizer.

Routing modes (``routing``):

* ``"auto"``: as trained (MoPE layers route with OTEP and the checkpoint's Sigma);
* ``"mope"``: the same, but an error for a checkpoint trained with top-k routing (it has
  no Sigma to route with);
* ``"topk"``: plain top-k by router probability in every MoE layer, MoPE layers included
  (their Sigma is loaded and ignored): the same weights compared under both rules.

ReMoE checkpoints (``--moe-relu-routing``) route with their ReLU gates under ``"auto"``
(reported as ``"remoe"``); ``"topk"`` and ``"mope"`` are errors for them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from mpmoe.eval.errors import EvalError
from mpmoe.megatron import routers

__all__ = ["EvalModel", "load_eval_model", "ROUTING_MODES", "DTYPES"]

ROUTING_MODES = ("auto", "mope", "topk")
DTYPES = ("auto", "fp32", "bf16")

# Options that only concern training (or this process's parallel layout): reset for eval.
_FORCED = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
    recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
    recompute_modules=None, moe_stats_dir=None, load=None, save=None, hidden_dropout=0.0,
    attention_dropout=0.0,
)


@dataclasses.dataclass
class EvalModel:
    """A loaded checkpoint: the model, its tokenizer and what was loaded."""

    model: torch.nn.Module          # megatron GPTModel (eval mode)
    module: torch.nn.Module         # what runs forward: the model, or Float16Module(model) for bf16
    tokenizer: object               # tokenizers.Tokenizer
    eod_id: int
    vocab_size: int                 # the tokenizer's vocabulary (logits beyond it are padding)
    max_length: int                 # the model's context (its training sequence length)
    checkpoint: Path                # the iteration folder loaded
    iteration: int
    routing: str                    # "mope", "topk" or "remoe": what the MoE layers do now
    trained_routing: str            # "mope", "topk", "remoe" or "dense"
    dtype: torch.dtype
    device: torch.device
    args: argparse.Namespace        # the trainer flags the model was built from

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                inference_context=None, position_offset: int = 0) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]`` (in the model's dtype) for token ids ``[B, S]``.

        ``lengths``: valid tokens per row of a right-padded batch; padding positions are
        excluded from MoE routing (megatron's ``padding_mask``) and their logits are
        meaningless. ``inference_context``: a megatron ``StaticInferenceContext`` (KV
        cache); then only the last position's logits come back (``[B, 1, vocab]``) and
        ``position_offset`` is the position of ``tokens[:, 0]``.
        """
        tokens = tokens.to(self.device)
        b, s = tokens.shape
        positions = torch.arange(position_offset, position_offset + s, device=self.device)
        positions = positions.unsqueeze(0).expand(b, s)
        kwargs = {}
        if lengths is not None and inference_context is None:
            pad = torch.arange(s, device=self.device).unsqueeze(0) >= lengths.to(self.device).unsqueeze(1)
            if bool(pad.any()):
                kwargs["padding_mask"] = pad
        if inference_context is not None:
            kwargs.update(inference_context=inference_context, runtime_gather_output=True)
        logits = self.module(tokens, positions, None, **kwargs)
        # not cast to float32 here: at batch 32 x 2048 tokens x 50k vocabulary that copy alone
        # would take 13 GB; callers upcast the rows they read
        return logits[..., : self.vocab_size]


def _flags_namespace(saved: Optional[dict], model_flags: Optional[Sequence[str]]) -> argparse.Namespace:
    from mpmoe.train.args import ConfigError, args_from_saved

    try:
        return args_from_saved(saved, model_flags)
    except ConfigError as exc:
        hint = " (--model-flags)" if not model_flags else ""
        raise EvalError(f"model flags{hint}: {exc}") from None
    except SystemExit:
        raise EvalError(f"model flags: cannot parse {' '.join(model_flags or [])!r} "
                        "(see `mpmoe train --help`)") from None


def _find_tokenizer(tokenizer, root: Path, it_dir: Path, args) -> Path:
    from mpmoe.train.checkpoint import TOKENIZER_DIR

    if tokenizer is not None:
        return Path(tokenizer)
    for candidate in (root / TOKENIZER_DIR, it_dir / TOKENIZER_DIR):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    if getattr(args, "tokenizer_model", None):
        return Path(args.tokenizer_model)
    if not args.data_path:  # the embedded corpus: its tokenizer is rebuilt deterministically
        from mpmoe.data import prepare_embedded

        return Path(prepare_embedded(args.embedded_cache_dir, progress=False).tokenizer_dir)
    raise EvalError(f"{root}: no tokenizer next to the checkpoint and none in the run's flags; "
                    "pass --tokenizer DIR")


def _trained_routing(args) -> str:
    return routers.kind_of(args, dense="dense")


def load_eval_model(
    load,
    *,
    routing: str = "auto",
    dtype: str = "auto",
    device: Optional[str] = None,
    step: Optional[int] = None,
    tokenizer=None,
    model_flags: Optional[Sequence[str]] = None,
    routing_dump_dir: Optional[str] = None,
    routing_ablation: Optional[dict] = None,
) -> EvalModel:
    """Load a checkpoint for inference (needs :func:`mpmoe.megatron.init_distributed`).

    Args:
        load: a save folder (its latest iteration, or ``step``) or an ``iter_XXXXXXX`` folder.
        routing: ``"auto"`` | ``"mope"`` | ``"topk"`` (module docstring).
        dtype: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 on CUDA, fp32 on CPU).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available). The model is built
            where megatron builds it (CUDA when available); ``"cpu"`` on a CUDA machine is
            refused rather than silently ignored.
        tokenizer: a tokenizer folder / ``tokenizer.json`` overriding the checkpoint's.
        model_flags: ``mpmoe train`` flags describing the model, for checkpoints that do not
            record them (they override the recorded ones otherwise).
        routing_dump_dir: write each forward's routing (experts and weights per token) there
            (the router's evaluation dump, ``moe_eval_dump_dir``).
        routing_ablation: static knock-out / dynamic mask options (``mpmoe.train.ablation``
            dests, e.g. ``{"moe_mask_experts": "2:3"}``); the training run's own are not
            carried over. The demo's environment variables are honoured too.
    """
    from mpmoe.data import load_tokenizer
    from mpmoe.data.errors import DataError
    from mpmoe.megatron.router import MoPERouter, iter_routers
    from mpmoe.train.checkpoint import TOKENIZER_DIR, load_checkpoint, resolve_checkpoint, saved_run_info
    from mpmoe.train.loop import build_model, padded_vocab_size

    if routing not in ROUTING_MODES:
        raise EvalError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
    if dtype not in DTYPES:
        raise EvalError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    device = str(device)
    if device.startswith("cuda:") and device[5:].isdigit():
        device = "cuda"  # each process uses the GPU of its LOCAL_RANK (init_distributed)
    if device not in ("cpu", "cuda"):
        raise EvalError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda:
        raise EvalError("device 'cuda' asked for, but torch sees no CUDA device")
    if device == "cpu" and cuda:
        raise EvalError("device 'cpu' on a machine with CUDA: megatron builds on the GPU there; "
                        "hide the GPUs (CUDA_VISIBLE_DEVICES=) to evaluate on the CPU")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"

    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        root, it_dir, iteration = resolve_checkpoint(load, step)
        info = saved_run_info(it_dir)
    except CheckpointingException as exc:
        raise EvalError(str(exc)) from None
    args = _flags_namespace(info.get("args"), model_flags)
    for key, value in _FORCED.items():
        setattr(args, key, value)
    args.bf16 = dtype == "bf16"
    trained = _trained_routing(args)
    if routing == "mope" and trained != "mope":
        raise EvalError(f"{it_dir} was trained with {trained} routing: it has no Sigma to route "
                        "with; use --routing topk (or auto)")
    if routing == "topk" and trained == "remoe":
        raise EvalError(f"{it_dir} was trained with ReMoE (ReLU) routing, which has no top-k rule; "
                        "use --routing auto")

    tok_path = _find_tokenizer(tokenizer, root, it_dir, args)
    try:
        tok_info = load_tokenizer(tok_path)
    except DataError as exc:
        raise EvalError(f"tokenizer: {exc}") from None
    data = info.get("data") or {}
    vocab = int(data.get("vocab_size", tok_info.vocab_size))
    if tok_info.vocab_size != vocab:  # larger: ids the model lacks; smaller: a different tokenizer
        raise EvalError(f"tokenizer {tok_path} has {tok_info.vocab_size} tokens, the model was "
                        f"trained with {vocab}{' (--tokenizer)' if tokenizer is not None else ''}")
    own = root / TOKENIZER_DIR
    if tokenizer is not None and (own / "tokenizer.json").is_file():
        try:
            same = load_tokenizer(own).sha256 == tok_info.sha256
        except DataError:
            same = True  # the checkpoint's copy is unreadable: the user's choice stands
        if not same:
            raise EvalError(f"--tokenizer {tokenizer} differs from the tokenizer the model was trained "
                            f"with ({own}); leave --tokenizer out to use that one")
    padded = int(data.get("padded_vocab") or padded_vocab_size(vocab, args.make_vocab_size_divisible_by))

    import os

    from mpmoe.megatron import settings

    values = {s.name: s.default for s in settings.SETTINGS if s.eval}  # the run's own are not carried over
    given = settings.from_record(routing_ablation or {})
    values.update({k: v for k, v in given.items() if k in values})
    explicit = {k for k, v in given.items() if k in values and v != settings.by_name(k).default}
    try:
        settings.apply_env(values, explicit, "mpmoe eval", os.environ)
        kind = routers.kind_of(args) if args.num_experts is not None else None
        resolved = settings.check(values, kind, explicit=explicit, flags=True, num_experts=args.num_experts,
                                  topk=args.moe_router_topk)
        settings.check_files(resolved)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    for key, value in resolved.items():
        setattr(args, key, settings.recorded(value))
    if routing_dump_dir is not None:
        args.moe_eval_dump_dir = str(routing_dump_dir)
    config, model, module = build_model(args, padded)
    try:
        load_checkpoint(root, model, None, None, load_optim=False, load_rng=False, iteration=iteration)
    except Exception as exc:  # noqa: BLE001 - one line for a model/checkpoint mismatch
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalError(f"{it_dir}: cannot load into the model its flags describe "
                        f"({type(exc).__name__}: {msg[:300]})") from None
    now = "topk" if routing == "topk" or trained == "topk" else trained
    for router in iter_routers(model):
        if isinstance(router, MoPERouter):
            router.config.moe_otep_inference_topk = now == "topk"
        if routing_dump_dir is not None:
            router.config.moe_eval_dump_dir = str(routing_dump_dir)
    module.eval()
    return EvalModel(
        model=model, module=module, tokenizer=tok_info.build(), eod_id=int(data.get("eod_id", tok_info.eod_id)),
        vocab_size=vocab, max_length=int(args.seq_length), checkpoint=it_dir, iteration=iteration,
        routing=now, trained_routing=trained, dtype=torch.bfloat16 if args.bf16 else torch.float32,
        device=torch.device(device), args=args,
    )
