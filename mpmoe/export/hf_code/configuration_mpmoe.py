"""Configuration of an mpmoe MoPE model exported for Hugging Face transformers.

Written by ``mpmoe export hf`` next to the weights; load with ``trust_remote_code=True``.
Self-contained: it imports transformers only, never mpmoe, so the exported model does not
change with the environment it is loaded in.

A Qwen2-MoE configuration plus the MoPE routing fields:

* ``mpmoe_routing``: ``"mope"`` (greedy OTEP selection with the frozen expert covariance
  ``Sigma`` stored in each sparse layer as the buffer ``mlp.sigma``);
* ``otep_eps``: floor for Sigma's diagonal and the Schur complements of the selection.
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2MoeConfig


@strict
class MpmoeConfig(Qwen2MoeConfig):
    model_type = "mpmoe"

    mpmoe_routing: str = "mope"
    otep_eps: float = 1e-12


__all__ = ["MpmoeConfig"]
