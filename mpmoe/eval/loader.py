"""A trainer checkpoint (+ its tokenizer) -> a model ready for inference.

::

    from mpmoe.megatron import init_distributed
    init_distributed()                       # one process, or each rank under torchrun
    m = load_eval_model("runs/x/ckpt", routing="topk")
    logits = m.forward(tokens)               # [B, S, vocab] float32, padded vocabulary cut off

A thin wrapper of :func:`mpmoe.store.load_model` (the one loader; its docstring describes
routing modes and what describes the model) for ``mpmoe eval``: errors are
:class:`EvalError`, ``dtype`` defaults to ``"auto"`` (bf16 on CUDA, fp32 on CPU) and the
model must have a tokenizer.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mpmoe.eval.errors import EvalError
from mpmoe.store import DTYPES, ROUTING_MODES, LoadedModel, StoreError, load_model

__all__ = ["EvalModel", "load_eval_model", "ROUTING_MODES", "DTYPES"]

#: The loaded model (an alias: one type for every driver).
EvalModel = LoadedModel


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
        routing_ablation: static knock-out / dynamic mask options (``mpmoe.megatron.settings``
            dests, e.g. ``{"moe_mask_experts": "2:3"}``); the training run's own are not
            carried over. The demo's environment variables are honoured too.
    """
    try:
        m = load_model(load, routing=routing, dtype=dtype, device=device, step=step, tokenizer=tokenizer,
                       model_flags=model_flags, routing_dump_dir=routing_dump_dir,
                       routing_ablation=routing_ablation)
    except StoreError as exc:
        hint = " (--model-flags)" if str(exc).startswith("model flags:") and not model_flags else ""
        msg = str(exc)
        raise EvalError(msg.replace("model flags:", f"model flags{hint}:", 1) if hint else msg) from None
    if m.tokenizer is None:
        raise EvalError(f"{m.root}: no tokenizer next to the checkpoint and none in the run's flags; "
                        "pass --tokenizer DIR")
    return m
