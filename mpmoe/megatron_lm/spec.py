"""The ``--spec`` function: ``pretrain_gpt.py --spec mpmoe.megatron_lm.spec gpt_block_spec``.

Megatron-LM's ``GPTModelBuilder.build_model`` calls it as ``fn(model_config, vp_stage=)``
with its ``GPTModelConfig``; the decoder block spec comes from
:func:`mpmoe.megatron.spec.get_gpt_block_spec` (MoPE routers for ``otep``, top-k routers
with mpmoe's statistics otherwise). Backend: Transformer Engine when
``--transformer-impl transformer_engine`` (the default) and TE and CUDA are there,
megatron's local modules on CUDA otherwise, the portable (CPU) ones without CUDA.
"""

from __future__ import annotations

from typing import Optional

from mpmoe.megatron.spec import get_gpt_block_spec

__all__ = ["gpt_block_spec"]


def gpt_block_spec(model_config, vp_stage: Optional[int] = None):
    """Decoder block spec of this pipeline stage for Megatron-LM's model config."""
    config = getattr(model_config, "transformer", model_config)  # GPTModelConfig or TransformerConfig
    use_te = None if config.transformer_impl == "transformer_engine" else False
    return get_gpt_block_spec(config, use_te=use_te, vp_stage=vp_stage)
