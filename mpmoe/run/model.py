"""The model a run's options describe: :func:`build_model` (megatron's ``GPTModel`` with
mpmoe's layers), the padded vocabulary, and the parameter counts."""

from __future__ import annotations

import math
import re

import torch

__all__ = ["build_model", "count_parameters", "padded_vocab_size"]


def build_model(args, vocab_size: int, *, initialize: bool = True):
    """The model ``args`` describe: ``(config, model, module)``.

    ``initialize=False`` leaves the weights uninitialised (megatron's
    ``perform_initialization``): for callers that overwrite every tensor at once (loading
    a checkpoint, importing a model), where initialising a flame-moe-38m on a 2-core CPU
    alone takes about a minute.

    ``model`` is megatron's ``GPTModel`` (MoE or MoPE layers, :class:`MoPEConfig`);
    ``module`` is what trains: the model itself, or wrapped in megatron's
    ``Float16Module`` under ``--bf16``; on the GPU when there is one. Used by the loop,
    the training benchmark and ``mpmoe analyze checkpoint`` alike.
    """
    from mpmoe.megatron import build_gpt_model
    from mpmoe.megatron.config import MoPEConfig
    from mpmoe.run.args import model_config_kwargs

    config = MoPEConfig(**model_config_kwargs(args), perform_initialization=initialize)
    model = build_gpt_model(
        config, vocab_size=vocab_size, max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_base=getattr(args, "rotary_base", 10000),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    module = model
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(config, model)
    if torch.cuda.is_available():
        module.cuda()
    return config, model, module


def padded_vocab_size(vocab: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron-LM's padding of the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def count_parameters(model) -> dict:
    """``{"total": N, "active": A}`` parameters of a (single-rank) GPT MoE model.

    Active = what one token uses: everything except the routed experts it is not sent to,
    i.e. per MoE layer only ``moe_router_topk`` of its ``num_moe_experts`` routed experts
    (shared experts, router, attention, norms and embeddings all count).
    """
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert_re = re.compile(r"(.*\.mlp\.experts)\.")
    per_layer: dict = {}
    for name, p in model.named_parameters():
        m = expert_re.match(name)
        if m:
            per_layer[m.group(1)] = per_layer.get(m.group(1), 0) + p.numel()
    active = total
    if cfg.num_moe_experts:
        local = cfg.num_moe_experts // cfg.expert_model_parallel_size
        for n in per_layer.values():
            active -= n - n // local * cfg.moe_router_topk
    return {"total": int(total), "active": int(active)}
