"""Portable core attention: PyTorch ``scaled_dot_product_attention`` as a megatron module.

``SDPAttention`` takes the place of megatron's ``DotProductAttention`` (or
``TEDotProductAttention``) in ``SelfAttentionSubmodules.core_attention``. It has the same
constructor and forward signature, so ``SelfAttention`` builds and calls it unchanged,
but it allocates nothing on a fixed device (megatron's ``DotProductAttention`` takes its
score buffer from a CUDA-only global memory buffer and builds its default causal mask
with ``device="cuda"``). It runs on any device PyTorch SDPA supports, CPU included.

Supported: causal and padding/arbitrary boolean masks (megatron convention: ``True`` =
masked out), grouped-query attention (``num_query_groups < num_attention_heads``),
tensor parallelism (heads split per partition), attention dropout drawn inside the
model-parallel RNG tracker (as megatron does). Not supported (clear error at build):
context parallelism, packed sequences (THD), attention bias, sliding windows, and
non-vanilla softmax types.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SDPAttention"]


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"SDPAttention: {what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator


class SDPAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Inputs follow megatron's core-attention layout: ``query`` ``[sq, b, np, hn]``,
    ``key``/``value`` ``[sk, b, ng, hn]`` (``np``/``ng``: query heads / query groups on
    this tensor-parallel rank); output ``[sq, b, np * hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the TE spec")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        tp_size = pg_collection.tp.size()

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = _divide(projection_size, tp_size, "kv_channels * heads")
        self.num_heads_per_partition = _divide(
            config.num_attention_heads, tp_size, "num_attention_heads"
        )
        self.num_groups_per_partition = _divide(
            config.num_query_groups, tp_size, "num_query_groups"
        )
        # megatron's apply_query_key_layer_scaling divides the scores by layer_number and
        # multiplies them back inside the softmax: a no-op mathematically, so ignored here.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attention over ``[s, b, heads, dim]`` inputs; returns ``[sq, b, heads * dim]``."""
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences; use the TE spec")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type

        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        attn_mask = None
        is_causal = False
        if attention_mask is not None:
            # megatron: True = do not attend; SDPA (bool mask): True = attend.
            attn_mask = ~attention_mask.to(torch.bool)
        elif mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal) and sq > 1:
            if q.shape[2] != k.shape[2]:
                raise ValueError("causal SDPAttention without a mask needs sq == sk")
            is_causal = True

        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        if self.num_heads_per_partition != self.num_groups_per_partition:
            kwargs["enable_gqa"] = True
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)

        # [b, h, sq, d] -> [sq, b, h * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
