"""Build a megatron-core GPT (MoE / MoPE) model: the one entry point for trainer, eval, tests.

::

    from mpmoe.megatron import init_distributed, build_gpt_model
    init_distributed(expert_model_parallel_size=config.expert_model_parallel_size)
    model = build_gpt_model(config, vocab_size=50304, max_sequence_length=2048)
    loss = model(tokens, position_ids, attention_mask=None, labels=labels)  # [b, s]

The result is a plain ``megatron.core.models.gpt.GPTModel`` built from
:func:`mpmoe.megatron.spec.get_gpt_block_spec`; wrap it in megatron's DDP / optimizer as
usual. Without CUDA, :func:`mpmoe.megatron.cpu_compat.enable` is called, the portable
spec is chosen, and ``config.use_cpu_initialization`` is set to True (parameters cannot
be initialised on a GPU that is not there).

Expert initialisation with ``use_cpu_initialization``: megatron then initialises every
rank's local experts from the same default-generator stream, so with expert parallelism
expert ``i`` of EP rank 1 would be a copy of expert ``i`` of EP rank 0 (on GPU the
expert-parallel RNG tracker prevents this). :func:`build_gpt_model` therefore
re-initialises ``SequentialMLP`` experts from a seed derived from
``(torch.initial_seed(), layer number, global expert index)``: experts are distinct and
their initial weights do not depend on the expert-parallel size (with ETP = 1).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mpmoe.megatron import cpu_compat
from mpmoe.megatron.spec import check_expert_parallel, get_gpt_block_spec, resolve_backend

__all__ = ["build_gpt_model", "check_model_config", "init_experts_by_global_index"]

log = logging.getLogger(__name__)

_DISPATCHERS = ("allgather", "alltoall", "flex")


def check_model_config(config: TransformerConfig) -> None:
    """Validate ``config`` against the current parallel state; one-line ValueError if not."""
    if config.num_moe_experts:
        check_expert_parallel(config)
        if config.moe_token_dispatcher_type not in _DISPATCHERS:
            raise ValueError(
                f"moe_token_dispatcher_type={config.moe_token_dispatcher_type!r} is not one of "
                f"{_DISPATCHERS}"
            )
        if config.add_bias_linear and not config.moe_grouped_gemm:
            # megatron-core 0.16.1's SequentialMLP adds the expert bias in place on the
            # output of an autograd Function that returns its input as-is (TP=1), which
            # autograd forbids: the first backward-enabled forward fails deep inside.
            raise ValueError(
                "add_bias_linear=True is not supported with megatron's sequential (local) "
                "experts in megatron-core 0.16; set add_bias_linear=False"
            )
        if config.moe_token_dispatcher_type == "flex" and not torch.cuda.is_available():
            raise ValueError("moe_token_dispatcher_type='flex' needs CUDA; use 'allgather' or "
                             "'alltoall' on CPU")
    elif config.expert_model_parallel_size > 1:
        raise ValueError("expert_model_parallel_size > 1 needs num_moe_experts")
    if not parallel_state.model_parallel_is_initialized():
        raise ValueError(
            "megatron parallel state is not initialised: call "
            "mpmoe.megatron.init_distributed() before build_gpt_model()"
        )
    sizes = {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
    }
    for name, actual in sizes.items():
        wanted = getattr(config, name)
        if wanted != actual:
            raise ValueError(
                f"config.{name}={wanted} but the parallel state was initialised with {actual}"
            )


def build_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    block_spec: Optional[TransformerBlockSubmodules] = None,
    use_te: Optional[bool] = None,
    portable: Optional[bool] = None,
    moe_router: Optional[type] = None,
    mope_router: Optional[type] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    position_embedding_type: str = "rope",
    rotary_percent: float = 1.0,
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
    parallel_output: bool = True,
    **gpt_model_kwargs,
) -> GPTModel:
    """Build a ``GPTModel`` whose decoder layers follow mpmoe's layer specs.

    Args:
        config: ``TransformerConfig`` (or mpmoe's ``MoPEConfig``); its parallel sizes must
            match the initialised parallel state (see :func:`init_distributed`).
        vocab_size, max_sequence_length: as megatron's ``GPTModel``.
        block_spec: a ready decoder block spec; default
            :func:`~mpmoe.megatron.spec.get_gpt_block_spec` with ``use_te``, ``portable``,
            ``moe_router``, ``mope_router`` (``None`` = automatic choice / default routers).
        pre_process / post_process: embedding / output layer on this stage; default from
            the pipeline rank.
        position_embedding_type: ``"rope"`` (default), ``"learned_absolute"`` or ``"none"``.
        **gpt_model_kwargs: passed to ``GPTModel`` unchanged.
    """
    if not torch.cuda.is_available():
        cpu_compat.enable()
        if not config.use_cpu_initialization:
            log.info("no CUDA: setting config.use_cpu_initialization=True")
            config.use_cpu_initialization = True
        backend = resolve_backend(use_te, portable)
        if block_spec is None and backend != "portable":
            raise ValueError(f"the {backend!r} spec needs CUDA; use portable=True (default) on CPU")
    check_model_config(config)

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if block_spec is None:
        block_spec = get_gpt_block_spec(
            config,
            use_te=use_te,
            portable=portable,
            moe_router=moe_router,
            mope_router=mope_router,
            vp_stage=vp_stage,
        )
    # megatron-core 0.19 logs "GPTModel IS DEPRECATED" for every model built: not the user's concern
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
        **gpt_model_kwargs,
    )
    if config.use_cpu_initialization and config.perform_initialization:
        init_experts_by_global_index(model, torch.initial_seed())
    return model


def init_experts_by_global_index(model: torch.nn.Module, seed: int) -> int:
    """Re-initialise ``SequentialMLP`` expert weights, one seed per (layer, global expert).

    ``linear_fc1`` uses ``config.init_method``, ``linear_fc2``
    ``config.output_layer_init_method``, biases are zeroed, as megatron's ``MLP`` does.
    The default generator's state is left untouched. Returns the number of experts
    re-initialised. (GroupedMLP experts are left as megatron initialised them.)
    """
    count = 0
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        if not isinstance(moe.experts, SequentialMLP):
            continue
        cfg = moe.config
        layer = int(moe.layer_number or 0)
        for local_index, expert in enumerate(moe.experts.local_experts):
            global_index = moe.local_expert_indices[local_index]
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed((int(seed) * 1_000_003 + layer * 10_007 + global_index)
                                  % (2**63 - 1))
                for name, param in expert.named_parameters():
                    if name.endswith("bias"):
                        param.zero_()
                    elif "linear_fc2" in name:
                        cfg.output_layer_init_method(param)
                    else:
                        cfg.init_method(param)
            count += 1
    return count
