"""An mpmoe MoPE model for Hugging Face transformers (inference).

Written by ``mpmoe export hf`` next to the weights; load with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. Self-contained:
it imports torch and transformers only, never mpmoe (an exported model must not change
with the environment it is loaded in).

The model is ``Qwen2MoeForCausalLM`` with every sparse block replaced by
:class:`MpmoeMoeBlock`, which routes as mpmoe's MoPE router does outside training:

1. router logits in fp32 (whatever the model's dtype), p = softmax(logits) over all experts;
2. the k experts S picked by greedy OTEP (:func:`otep_select`): the first maximises
   p_j^2 / Sigma_jj, each further one the gain (p_j - a_j^T z)^2 / s_j of
   f(S) = p_S^T Sigma_SS^-1 p_S (a pivoted partial Cholesky factorisation of Sigma);
   exact ties go to the lowest expert index;
3. gate weights = softmax of the logits over S (megatron's gating on the masked logits);
4. output = sum over S of weight x expert(x), plus the shared expert times
   sigmoid(shared_expert_gate(x)), as Qwen2-MoE.

Sigma is the checkpoint's trained expert covariance, a frozen buffer (``mlp.sigma``).
Experts are per-expert ``Qwen2MoeMLP`` modules (keys ``mlp.experts.<e>.gate_proj`` ...),
so the weights load without transformers' fused-expert conversion.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2MoeForCausalLM, Qwen2MoeModel
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

from .configuration_mpmoe import MpmoeConfig


@torch.no_grad()
def otep_select(probs, sigma, k, eps=1e-12):
    """Greedy OTEP: the indices [T, k] of the experts picked for each token, in pick order.

    probs: [T, E] router probabilities; sigma: [E, E] expert covariance (fp32 at least).
    """
    dtype = torch.promote_types(torch.promote_types(probs.dtype, sigma.dtype), torch.float32)
    probs = probs.to(dtype)
    sig = sigma.to(device=probs.device, dtype=dtype)
    sig = 0.5 * (sig + sig.t())
    num_tokens, num_experts = probs.shape
    rows = torch.arange(num_tokens, device=probs.device)
    r = probs.clone()  # residuals p_j - a_j^T z
    s = sig.diagonal().clamp_min(eps).expand(num_tokens, num_experts).clone()  # Schur complements
    factor = []  # rows a[i] of the partial Cholesky factor, [T, E] each
    picks = torch.empty(num_tokens, k, dtype=torch.long, device=probs.device)
    for t in range(k):
        gain = torch.mul(r, r).div_(s)
        if t:
            gain.scatter_(1, picks[:, :t], -float("inf"))
        j = gain.argmax(dim=1)  # the first maximum: the lowest index wins exact ties
        picks[:, t] = j
        if t == k - 1:
            break
        r_j, s_j = r[rows, j].unsqueeze(1), s[rows, j].unsqueeze(1)
        col = sig.index_select(0, j)
        for a in factor:
            col.addcmul_(a, a[rows, j].unsqueeze(1), value=-1.0)
        inv_l = s_j.rsqrt_()
        col.mul_(inv_l)
        s.addcmul_(col, col, value=-1.0).clamp_min_(eps)
        r.addcmul_(col, r_j.mul_(inv_l), value=-1.0)
        factor.append(col)
    return picks


class MpmoeMoeBlock(nn.Module):
    """A MoPE sparse block: fp32 router, OTEP selection with a frozen Sigma, experts, shared expert."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.otep_eps = config.otep_eps
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [Qwen2MoeMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.num_experts)]
        )
        self.shared_expert = Qwen2MoeMLP(config, intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.register_buffer("sigma", torch.eye(config.num_experts, dtype=torch.float32))

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_dim)
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        picks = otep_select(probs, self.sigma.float(), self.top_k, self.otep_eps)
        weights = torch.softmax(logits.gather(1, picks), dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(picks).tolist():
            token, slot = torch.where(picks == e)
            y = self.experts[e](x[token]) * weights[token, slot].unsqueeze(1)
            out.index_add_(0, token, y.to(out.dtype))
        shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
        return (out + shared).reshape(batch_size, sequence_length, hidden_dim)


def _replace_sparse_blocks(decoder, config):
    for i, layer in enumerate(decoder.layers):
        if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0:
            layer.mlp = MpmoeMoeBlock(config)


class MpmoeModel(Qwen2MoeModel):
    config_class = MpmoeConfig

    def __init__(self, config):
        super().__init__(config)
        _replace_sparse_blocks(self, config)
        self.post_init()


class MpmoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = MpmoeConfig

    def __init__(self, config):
        super().__init__(config)
        _replace_sparse_blocks(self.model, config)
        self.post_init()


__all__ = ["MpmoeForCausalLM", "MpmoeModel", "otep_select"]
