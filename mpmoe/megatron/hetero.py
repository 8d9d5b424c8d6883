"""Experts of their real sizes: megatron's ``SequentialMLP`` with one FFN size per expert.

megatron-core builds every expert with ``moe_ffn_hidden_size`` and checkpoints a layer's
experts as one stacked tensor ``[E, ...]``. :class:`HeteroSequentialMLP` builds expert ``i``
with its own size (``moe_expert_ffn_sizes``: per MoE layer, one size per global expert) and
checkpoints each expert as its own tensors, keyed by its global index (megatron's
``singleton_local_shards`` layout: ``...mlp.experts.experts.<i>.linear_fc1.weight_w`` /
``_v`` for the gate and up halves, ``...experts.<i>.linear_fc2.weight``), so the sizes are in
the tensors' shapes and any expert-parallel layout loads them. The layer's parameter count is
that of the FFN it was split from, not E x the largest expert. Runs one expert after the other
as ``SequentialMLP`` does; grouped GEMM (which needs equal sizes) is refused.

``moe_expert_ffn_sizes`` text form (the flag ``--moe-expert-ffn-sizes`` and the checkpoint's
recorded flags): ``"2:192,128,128,64;3:..."`` (1-based layer numbers) or JSON
``{"2": [192, 128, 128, 64]}``.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional, Tuple

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from mpmoe.surgery.split import format_expert_sizes, parse_expert_sizes

__all__ = ["HeteroSequentialMLP", "format_expert_sizes", "layer_expert_sizes", "parse_expert_sizes"]

def layer_expert_sizes(config, layer_number: Optional[int]) -> Optional[Tuple[int, ...]]:
    """This layer's expert sizes, or None (all experts ``moe_ffn_hidden_size``). The config
    keeps ``moe_expert_ffn_sizes`` as text (the settings table's form) or a mapping."""
    value = getattr(config, "moe_expert_ffn_sizes", None)
    if not value or layer_number is None:
        return None
    sizes = _parsed(value) if isinstance(value, str) else parse_expert_sizes(value)
    return sizes.get(int(layer_number)) if sizes else None


@functools.lru_cache(maxsize=64)
def _parsed(text: str):
    return parse_expert_sizes(text)


class HeteroSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose global expert ``i`` has FFN size ``expert_sizes[i]``."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, *,
                 expert_sizes: Tuple[int, ...] = (), layer_number: int = 0, **kwargs):
        super().__init__(0, config, submodules, pg_collection, **kwargs)  # experts built below
        self.hetero_layer_number = int(layer_number)
        ep_size, ep_rank = self.ep_group.size(), self.ep_group.rank()
        sizes = tuple(int(s) for s in expert_sizes)
        if len(sizes) != num_local_experts * ep_size:
            raise ValueError(f"{len(sizes)} expert sizes for {num_local_experts * ep_size} experts")
        self.expert_sizes = sizes
        self.num_local_experts = num_local_experts
        name = kwargs.get("name")
        for local in range(num_local_experts):
            size = sizes[ep_rank * num_local_experts + local]
            # megatron's MLP sizes linear_fc2's input from config.ffn_hidden_size: one shallow
            # config copy per expert, with its own size
            expert_config = copy.copy(self.config)
            expert_config.ffn_hidden_size = expert_config.moe_ffn_hidden_size = size
            extra = {} if name is None else {"name": f"{name}.local_experts.{local}"}
            self.local_experts.append(MLP(expert_config, submodules, ffn_hidden_size=size,
                                          is_expert=True, tp_group=self.tp_group, **extra))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """One set of tensors per (layer, global expert): shapes differ between experts and
        between layers, so neither megatron's expert axis nor its layer axis can stack them.
        Keys: ``decoder.layers.mlp.experts.experts.layer<L>.<i>.linear_fc1.weight_w`` ..."""
        metadata = dict(metadata or {})
        metadata["singleton_local_shards"] = True
        sharded = super().sharded_state_dict(prefix, (), metadata)  # no layer axis
        old, new = f"{prefix}experts.", f"{prefix}experts.layer{self.hetero_layer_number}."
        for value in sharded.values():
            if value.key.startswith(old):
                value.key = new + value.key[len(old):]
        return sharded
