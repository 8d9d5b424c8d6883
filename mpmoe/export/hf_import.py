"""``mpmoe import hf``: a local Hugging Face folder -> an mpmoe checkpoint (model only).

::

    mpmoe import hf --model hf/llama-tiny --save ckpt/llama-tiny
    mpmoe eval --load ckpt/llama-tiny --tasks mpmoe_local
    mpmoe train --preset ckpt/llama-tiny/mpmoe_import.toml --load ckpt/llama-tiny --no-load-optim ...

Reads ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen2MoeForCausalLM`` and
``MixtralForCausalLM`` folders (``config.json``, safetensors weights, ``tokenizer.json``),
builds the megatron model the config describes through ``mpmoe train``'s flags, fills it
and writes iteration 0 with its flags and tokenizer recorded, plus
``mpmoe_import.toml``: the model as an ``mpmoe train`` preset. What megatron-core cannot
represent is a one-line error naming the config field, before anything is written.

Mapping (the inverse of :mod:`mpmoe.export.hf`; docs/export.md): q/k/v are interleaved
per query group into ``linear_qkv``; gate/up concatenated into ``linear_fc1``;
Qwen2-MoE's ``mlp_only_layers`` / ``decoder_sparse_step`` become ``--moe-layer-freq`` as a
list; ``norm_topk_prob`` is ``not --moe-router-pre-softmax``; the Qwen2-MoE shared expert's
sigmoid gate becomes megatron's ``moe_shared_expert_gate`` (an all-zero gate: no gate and
the down projection halved, which is how ``mpmoe export hf`` writes gate-less shared
experts; an all-zero shared expert: none). Mixtral routes softmax top-k renormalised,
which is megatron's default (``--no-moe-router-pre-softmax``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from mpmoe.export.hf import ExportError, hf_verb_parser, qkv_merge

__all__ = ["SUPPORTED", "hf_flags", "import_hf", "main", "fill_model", "read_hf_tensors"]

#: model_type -> the transformers class import reads.
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
PRESET_NAME = "mpmoe_import.toml"
# A preset's training table: tiny-cpu's schedule (override on the command line).
_TRAINING = dict(train_iters=100, global_batch_size=8, micro_batch_size=8, lr=1.0e-4, min_lr=1.0e-5,
                 lr_decay_style="WSD", lr_wsd_decay_style="linear", lr_wsd_decay_fraction=0.2,
                 lr_warmup_fraction=0.05, weight_decay=0.1, clip_grad=1.0, eval_interval=50,
                 eval_iters=2, log_interval=5, bf16=False)


def _refuse(field: str, value, why: str):
    raise ExportError(f"cannot import: {field}={value!r}: {why}")


# ----------------------------------------------------------------------------- config
def read_hf_config(model_dir: Path):
    """The folder's transformers config (one of :data:`SUPPORTED`), with its defaults."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not JSON ({exc})") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        _refuse("model_type", model_type, f"import reads {', '.join(SUPPORTED)}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


def _rope_theta(cfg) -> int:
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        _refuse("rope_parameters.rope_type", rope_type, "megatron-core's GPT model has default RoPE only")
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if theta != int(theta) or theta < 1:
        _refuse("rope_parameters.rope_theta", theta, "megatron's --rotary-base is a positive integer")
    return int(theta)


def hf_flags(cfg, tensors: dict) -> tuple[dict, list[str]]:
    """``(preset values, notes)``: the ``mpmoe train`` options of the model ``cfg`` and its
    ``tensors`` describe (a flat dict, as a preset file holds them)."""
    kind = cfg.model_type
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if head_dim * heads != cfg.hidden_size:
        _refuse("head_dim", head_dim, f"megatron's GPT model needs head_dim x heads = hidden_size {cfg.hidden_size}")
    if cfg.hidden_act != "silu":
        _refuse("hidden_act", cfg.hidden_act, "megatron's gated MLP here is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(cfg, field, False):
            _refuse(field, True, "megatron's add_bias_linear would add biases to every projection")
    if getattr(cfg, "use_sliding_window", False) or (kind == "mixtral" and cfg.sliding_window):
        _refuse("sliding_window", cfg.sliding_window, "megatron's portable attention is full causal")
    seq = int(cfg.max_position_embeddings)
    preset = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads or heads, seq_length=seq, max_position_embeddings=seq,
        vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=128, normalization="RMSNorm",
        norm_epsilon=float(cfg.rms_norm_eps), swiglu=True, position_embedding_type="rope",
        rotary_base=_rope_theta(cfg), untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        add_qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and bool(cfg.qkv_bias)),
        init_method_std=float(cfg.initializer_range), hidden_dropout=0.0, attention_dropout=0.0,
        ffn_hidden_size=cfg.intermediate_size,
    )
    if kind in ("llama", "qwen2"):
        return preset, []
    n = cfg.num_hidden_layers
    if kind == "mixtral":
        experts, pattern, pre_softmax, moe_ffn = cfg.num_local_experts, [1] * n, False, cfg.intermediate_size
    else:
        experts, moe_ffn = cfg.num_experts, cfg.moe_intermediate_size
        pattern = [int(i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0) for i in range(n)]
        pre_softmax = not cfg.norm_topk_prob
    preset.update(num_experts=experts, moe_router_topk=cfg.num_experts_per_tok, moe_ffn_hidden_size=moe_ffn,
                  moe_layer_freq=pattern, moe_router_pre_softmax=pre_softmax,
                  moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=float(cfg.router_aux_loss_coef),
                  moe_router_dtype="fp32", moe_token_dispatcher_type="alltoall")
    if kind == "qwen2_moe":
        layers = [i for i, p in enumerate(pattern) if p]
        names = [f"model.layers.{i}.mlp.shared_expert.{w}_proj.weight" for i in layers for w in ("gate", "up", "down")]
        names += [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in layers]
        absent = [n for n in names if n not in tensors]
        if absent:
            raise ExportError(f"cannot import: the weights lack {absent[0]}")
        shared = [tensors[n] for n in names if "shared_expert_gate" not in n]
        gates = [tensors[n] for n in names if "shared_expert_gate" in n]
        if layers and any(bool(t.any()) for t in shared):
            preset["moe_shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
            preset["moe_shared_expert_gate"] = any(bool(g.any()) for g in gates)
    return preset, []


# ----------------------------------------------------------------------------- tensors
def read_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, keys normalised to the per-expert
    layout (``mlp.experts.<e>.{gate,up,down}_proj.weight``, ``mlp.gate.weight``) whether the
    folder stores fused experts (transformers 5) or Mixtral's ``block_sparse_moe`` keys."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors weights (PyTorch .bin files are not read)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    norm: dict[str, torch.Tensor] = {}
    mixtral = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for key, t in out.items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        parts = key.split(".")
        if key.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                norm[f"{base}{e}.gate_proj.weight"], norm[f"{base}{e}.up_proj.weight"] = gate, up
            continue
        if key.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                norm[f"{base}{e}.down_proj.weight"] = t[e]
            continue
        if len(parts) >= 3 and parts[-2] in mixtral and parts[-3].isdigit() and ".mlp.experts." in key:
            parts[-2] = mixtral[parts[-2]]
            key = ".".join(parts)
        norm[key] = t
    return norm


def fill_model(model, tensors: dict, cfg) -> None:
    """Copy the HF ``tensors`` into every parameter and buffer of the megatron ``model``
    (consuming ``tensors``: each is dropped once copied, so the peak memory is about the
    model plus the folder's weights); an :class:`ExportError` names a tensor that is
    missing, left over or of the wrong shape."""
    mc = model.config
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    done: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ExportError(f"cannot import: the weights lack {key}")
        return tensors.pop(key)

    def put(key: str, value: torch.Tensor, rows: Optional[int] = None) -> None:
        dst = target[key]
        if rows is not None:  # the vocabulary: megatron pads it; the padding rows are 0
            if value.shape[0] > dst.shape[0] or tuple(value.shape[1:]) != tuple(dst.shape[1:]):
                raise ExportError(f"cannot import: {key} has shape {tuple(value.shape)}, the model {tuple(dst.shape)}")
            with torch.no_grad():
                dst.zero_()
                dst[: value.shape[0]].copy_(value)
        else:
            if tuple(value.shape) != tuple(dst.shape):
                raise ExportError(f"cannot import: {key} has shape {tuple(value.shape)}, the model {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(value)
        done.add(key)

    heads, groups, d = mc.num_attention_heads, mc.num_query_groups or mc.num_attention_heads, mc.kv_channels
    put("embedding.word_embeddings.weight", take("model.embed_tokens.weight"), rows=0)
    if "output_layer.weight" in target:
        put("output_layer.weight", take("lm_head.weight"), rows=0)
    else:  # tied: a saved head is the embedding
        tensors.pop("lm_head.weight", None)
    put("decoder.final_layernorm.weight", take("model.norm.weight"))
    for i, layer in enumerate(model.decoder.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        put(m + "input_layernorm.weight", take(h + "input_layernorm.weight"))
        put(m + "pre_mlp_layernorm.weight", take(h + "post_attention_layernorm.weight"))
        a = h + "self_attn."
        put(m + "self_attention.linear_qkv.weight", qkv_merge(
            take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight"), heads, groups, d))
        if mc.add_qkv_bias:
            put(m + "self_attention.linear_qkv.bias", qkv_merge(
                take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias"), heads, groups, d))
        put(m + "self_attention.linear_proj.weight", take(a + "o_proj.weight"))
        if not hasattr(layer.mlp, "router"):
            put(m + "mlp.linear_fc1.weight", torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")]))
            put(m + "mlp.linear_fc2.weight", take(h + "mlp.down_proj.weight"))
            continue
        put(m + "mlp.router.weight", take(h + "mlp.gate.weight"))
        for e in range(mc.num_moe_experts):
            x, y = f"{h}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
            put(y + "linear_fc1.weight", torch.cat([take(x + "gate_proj.weight"), take(x + "up_proj.weight")]))
            put(y + "linear_fc2.weight", take(x + "down_proj.weight"))
        s, y = h + "mlp.shared_expert.", m + "mlp.shared_experts."
        if cfg.model_type == "qwen2_moe":
            fc1 = torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")])
            down, gate = take(s + "down_proj.weight"), take(h + "mlp.shared_expert_gate.weight")
            if mc.moe_shared_expert_intermediate_size:
                put(y + "linear_fc1.weight", fc1)
                if mc.moe_shared_expert_gate:
                    put(y + "linear_fc2.weight", down)
                    put(y + "gate_weight", gate)
                else:  # gate 0: sigmoid(0) = 1/2 folded into the down projection (exact)
                    put(y + "linear_fc2.weight", down / 2)
    # a MoPE router of a model imported as MoPE keeps its fresh Sigma (the identity)
    done.update(k for k in target if ".mlp.router.cooccurrence_stats." in k)
    missing = sorted(set(target) - done)
    if missing:
        raise ExportError(f"cannot import: no Hugging Face tensor maps to {missing[0]}")
    if tensors:
        left = sorted(tensors)
        raise ExportError(f"cannot import: the weights hold {left[0]}, which megatron's model has no place "
                          f"for{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}")


# ----------------------------------------------------------------------------- driver
def _toml(preset: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    moe_keys = [k for k in preset if k.startswith("moe_") or k == "num_experts"]
    lines = ["# Written by `mpmoe import hf`: the imported model as an `mpmoe train` preset.", "", "[model]"]
    lines += [f"{k} = {val(v)}" for k, v in preset.items() if k not in moe_keys]
    if moe_keys:
        lines += ["", "[moe]"] + [f"{k} = {val(preset[k])}" for k in moe_keys]
    lines += ["", "[training]"] + [f"{k} = {val(v)}" for k, v in _TRAINING.items()]
    return "\n".join(lines) + "\n"


def import_hf(model_dir, save) -> Path:
    """Import the folder ``model_dir`` into a new checkpoint ``save``; returns ``save``."""
    from mpmoe.data import load_tokenizer
    from mpmoe.data.errors import DataError
    from mpmoe.export.hf import _check_out
    from mpmoe.store import save_model
    from mpmoe.megatron import init_distributed
    from mpmoe.run.args import args_from_saved
    from mpmoe.run.model import build_model, padded_vocab_size

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ExportError(f"--model {model_dir} is not a folder (import reads local folders only)")
    save = _check_out(save)
    cfg = read_hf_config(model_dir)
    tensors = read_hf_tensors(model_dir)
    preset, _ = hf_flags(cfg, tensors)
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json (import needs a fast tokenizer)")
    try:
        tok = load_tokenizer(model_dir)
    except DataError as exc:
        raise ExportError(f"tokenizer: {exc}") from None
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if eos is not None and int(eos) != tok.eod_id:
        _refuse("eos_token_id", eos, f"the tokenizer's end-of-document token {tok.eod_token!r} is id {tok.eod_id}")
    eod_id = tok.eod_id
    if tok.vocab_size > cfg.vocab_size:
        _refuse("vocab_size", cfg.vocab_size, f"smaller than the tokenizer's {tok.vocab_size} tokens")

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        preset_file = Path(tmp) / PRESET_NAME
        preset_file.write_text(_toml(preset))
        args = args_from_saved(None, ["--preset", str(preset_file)])
        if "num_experts" not in preset:
            args.num_experts = None
        args.preset = "tiny-cpu"  # the base a reader parses; the record below sets every model option
        init_distributed()
        padded = padded_vocab_size(cfg.vocab_size, args.make_vocab_size_divisible_by)
        try:
            _, model, _ = build_model(args, padded, initialize=False)  # every tensor is set below
        except ValueError as exc:
            raise ExportError(f"cannot import: megatron-core cannot build the model: {exc}") from None
        fill_model(model, tensors, cfg)
        info = {"source": str(model_dir.resolve()), "model_type": cfg.model_type, "hf_vocab_size": int(cfg.vocab_size),
                "eod_id": eod_id}
        return save_model(save, model, args=args, tokenizer_dir=model_dir, extra_state={"hf_import": info},
                          extra_files={PRESET_NAME: preset_file.read_text(), "hf_import.json": info})


def build_parser() -> argparse.ArgumentParser:
    p, h = hf_verb_parser("import", "Import a model from another format.",
                                help="a local Hugging Face folder (Llama, Qwen2, Qwen2-MoE, Mixtral)",
                                description="Read a local Hugging Face folder (LlamaForCausalLM, Qwen2ForCausalLM, "
                                "Qwen2MoeForCausalLM, MixtralForCausalLM; safetensors + tokenizer.json) into an "
                                "mpmoe checkpoint (model only, iteration 0) that mpmoe eval / analyze / export / "
                                "train --load read. See docs/export.md.")
    h.add_argument("--model", required=True, help="the Hugging Face model folder")
    h.add_argument("--save", required=True, help="checkpoint folder to create (must not exist or be empty)")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    out = import_hf(args.model, args.save)
    print(f"mpmoe import hf: wrote {out} (iteration 0; train it with "
          f"--preset {out / PRESET_NAME} --load {out} --no-load-optim)")
    return 0
