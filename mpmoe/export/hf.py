"""``mpmoe export hf``: an mpmoe checkpoint -> a Hugging Face transformers folder.

::

    mpmoe export hf --load runs/x/ckpt --out hf/x            # as trained
    mpmoe export hf --load runs/x/ckpt --out hf/x-topk --routing topk

What is written (docs/export.md):

* top-k MoE models -> ``Qwen2MoeForCausalLM`` (``model_type: qwen2_moe``), stock transformers;
* MoPE models -> the same layout plus remote code (``model_type: mpmoe``,
  ``configuration_mpmoe.py`` + ``modeling_mpmoe.py`` copied from ``mpmoe/export/hf_code/``;
  load with ``trust_remote_code=True``) and each sparse layer's Sigma as ``mlp.sigma``;
* dense models -> ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when the query/key/value
  projections have biases).

Each folder holds ``config.json``, ``model.safetensors``, the tokenizer files,
``generation_config.json`` and ``mpmoe_export.json`` (provenance). The model is read
through megatron (a loaded ``GPTModel``, tensor/expert parallelism 1), never from raw
checkpoint keys; every tensor of its state must be consumed, so nothing is dropped
silently. What transformers' classes cannot represent is a one-line error before anything
is written.

The mapping functions (:func:`hf_kind`, :func:`hf_state_dict`, :func:`hf_config`) take the
megatron model alone, so tests run them on a model built with
:func:`mpmoe.megatron.build_gpt_model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from mpmoe.errors import UserError, folder_problem

__all__ = ["ExportError", "HF_CODE_DIR", "PROVENANCE", "export_hf", "hf_config", "hf_kind",
           "hf_state_dict", "main", "qkv_split", "qkv_merge"]

HF_CODE_DIR = Path(__file__).with_name("hf_code")
PROVENANCE = "mpmoe_export.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Keys of a MoPE router's state that routing does not read (the counters Sigma was built from).
_SIGMA_COUNTERS = ("num_tokens", "usage", "cooccurrence")
#: router kind (mpmoe.megatron.routers) -> the Hugging Face model_type its layers export to.
HF_MODEL_TYPES = {"topk": "qwen2_moe", "mope": "mpmoe"}


class ExportError(UserError):
    """A model or folder that cannot be exported / imported; one line."""


# ----------------------------------------------------------------------------- attention
def qkv_split(weight: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's fused ``linear_qkv`` (rows interleaved per query group:
    ``[q_g (heads/groups * d), k_g (d), v_g (d)]`` for each group g) -> ``(q, k, v)``.
    Works for weights [rows, H] and biases [rows]."""
    per = heads // groups
    w = weight.reshape(groups, (per + 2) * head_dim, *weight.shape[1:])
    q, k, v = torch.split(w, [per * head_dim, head_dim, head_dim], dim=1)
    tail = weight.shape[1:]
    return (q.reshape(heads * head_dim, *tail), k.reshape(groups * head_dim, *tail),
            v.reshape(groups * head_dim, *tail))


def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """The inverse of :func:`qkv_split`."""
    per = heads // groups
    tail = q.shape[1:]
    parts = (q.reshape(groups, per * head_dim, *tail), k.reshape(groups, head_dim, *tail),
             v.reshape(groups, head_dim, *tail))
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * head_dim, *tail)


# ----------------------------------------------------------------------------- checks
def _layer_kinds(model) -> list[str]:
    from mpmoe.megatron.spec import layer_kinds

    return layer_kinds(model.config)


def hf_kind(model, routing: str = "auto") -> str:
    """``"llama"``, ``"qwen2"``, ``"qwen2_moe"`` or ``"mpmoe"`` for this model routed as
    ``routing`` (``"auto"``: as its router kind says, :data:`HF_MODEL_TYPES`; ``"topk"``:
    plain top-k whatever the kind; ``"mope"``; ``"dense"``); :class:`ExportError` naming the
    first thing transformers' classes cannot represent."""
    from mpmoe.megatron import routers

    cfg = model.config
    trained = routers.kind_of(cfg, dense="dense")

    def refuse(what: str):
        raise ExportError(f"cannot export to Hugging Face: {what}")

    if cfg.normalization != "RMSNorm":
        refuse(f"normalization {cfg.normalization} (only RMSNorm maps onto Llama / Qwen2-MoE)")
    if model.position_embedding_type != "rope":
        refuse(f"position_embedding_type {model.position_embedding_type} (only rope)")
    if getattr(model, "rotary_percent", 1.0) != 1.0:
        refuse(f"rotary_percent {model.rotary_percent} (only full rotary embeddings)")
    if not cfg.gated_linear_unit or cfg.activation_func is not torch.nn.functional.silu:
        refuse("the MLP is not SwiGLU (gated silu)")
    if cfg.add_bias_linear:
        refuse("add_bias_linear (biases on the projections and MLPs)")
    if getattr(cfg, "qk_layernorm", False):
        refuse("qk_layernorm")
    if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
        refuse(f"kv_channels {cfg.kv_channels} x heads != hidden_size {cfg.hidden_size}")
    if routing == "dense" or trained == "dense":
        return "qwen2" if cfg.add_qkv_bias else "llama"
    if cfg.moe_expert_capacity_factor is not None:
        refuse(f"moe_expert_capacity_factor {cfg.moe_expert_capacity_factor} (token dropping depends on the batch)")
    if cfg.moe_router_topk_scaling_factor not in (None, 1.0):
        refuse(f"moe_router_topk_scaling_factor {cfg.moe_router_topk_scaling_factor}")
    if cfg.moe_router_score_function != "softmax":
        refuse(f"moe_router_score_function {cfg.moe_router_score_function} (only softmax)")
    if trained not in HF_MODEL_TYPES:
        refuse(f"{routers.label(cfg)} routing has no transformers class yet")
    if routing not in ("auto", "topk", trained):
        refuse(f"--routing {routing}: the model routes with {routers.label(cfg)}")
    if getattr(cfg, "moe_router_enable_expert_bias", False):
        refuse("the expert bias (aux-loss-free balancing) has no transformers class yet")
    if getattr(cfg, "moe_expert_ffn_sizes", None):
        refuse("experts of different sizes (mpmoe experts split) have no transformers class")
    if getattr(cfg, "moe_router_unit_gates", False):
        refuse("unit gates (mpmoe experts split, --moe-router-unit-gates) have no transformers class")
    if getattr(cfg, "moe_expert_groups", None):
        refuse("merged experts folded from a wider router or dropped experts (mpmoe experts merge "
               "--layout collapsed / --method drop) have no transformers class; the bind layout exports")
    if getattr(cfg, "moe_expert_compression", None):
        refuse("compressed experts (low rank + sparse, mpmoe experts compress) have no transformers class")
    if getattr(cfg, "moe_mask_experts", None) or getattr(cfg, "moe_dynamic_mask_mode", None):
        refuse("expert masks are an evaluation ablation, not part of the model")
    if cfg.moe_router_num_groups or getattr(cfg, "moe_router_group_topk", None):
        refuse("group-limited routing")
    for layer in model.decoder.layers:
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            if getattr(mlp.router, "bias", None) is not None:
                refuse("a router bias")
            if not hasattr(mlp.experts, "local_experts"):
                refuse(f"experts of type {type(mlp.experts).__name__} (export loads models with "
                       "sequential experts, as mpmoe eval does on CPU)")
    return HF_MODEL_TYPES["topk" if routing == "topk" else trained]


# ----------------------------------------------------------------------------- tensors
def hf_state_dict(model, *, vocab_size: int, routing: str) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of ``model``, on the CPU in the model's own dtype (Sigma:
    fp32) and views of the model's tensors where no conversion is needed, so treat them as
    read-only (:func:`write_folder` casts them one at a time); keys of the kind
    :func:`hf_kind` names. ``vocab_size``: the tokenizer's vocabulary (megatron's padding
    rows are cut).
    Every tensor of the megatron state is consumed or an :class:`ExportError` says which
    is not."""
    kind = hf_kind(model, routing)
    cfg = model.config
    src = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:  # the model's own tensor when it is on the CPU (no copy)
        used.add(key)
        return src[key].detach().to(device="cpu")

    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    d = cfg.kv_channels
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")[:vocab_size]
    if not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab_size]
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    moe_layers = kind in ("qwen2_moe", "mpmoe")
    for i, layer in enumerate(model.decoder.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = take(m + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
        q, k, v = qkv_split(take(m + "self_attention.linear_qkv.weight"), heads, groups, d)
        out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v})
        if cfg.add_qkv_bias:
            q, k, v = qkv_split(take(m + "self_attention.linear_qkv.bias"), heads, groups, d)
            out.update({h + "self_attn.q_proj.bias": q, h + "self_attn.k_proj.bias": k,
                        h + "self_attn.v_proj.bias": v})
        out[h + "self_attn.o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        if not hasattr(layer.mlp, "router"):
            gate, up = take(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                        h + "mlp.down_proj.weight": take(m + "mlp.linear_fc2.weight")})
            continue
        if not moe_layers:  # pragma: no cover - hf_kind returns a MoE kind for MoE models
            raise ExportError("internal: MoE layer in a dense export")
        out[h + "mlp.gate.weight"] = take(m + "mlp.router.weight")
        for e in range(cfg.num_moe_experts):
            x = f"{m}mlp.experts.local_experts.{e}."
            gate, up = take(x + "linear_fc1.weight").chunk(2, dim=0)
            out[f"{h}mlp.experts.{e}.gate_proj.weight"] = gate
            out[f"{h}mlp.experts.{e}.up_proj.weight"] = up
            out[f"{h}mlp.experts.{e}.down_proj.weight"] = take(x + "linear_fc2.weight")
        s = m + "mlp.shared_experts."
        if cfg.moe_shared_expert_intermediate_size:
            gate, up = take(s + "linear_fc1.weight").chunk(2, dim=0)
            down = take(s + "linear_fc2.weight")
            if cfg.moe_shared_expert_gate:
                gate_w = take(s + "gate_weight")
            else:  # Qwen2-MoE always gates: sigmoid(0) = 1/2, and x 2 is exact in floating point
                gate_w, down = down.new_zeros(1, cfg.hidden_size), down * 2
        else:  # no shared expert: one of width 1 that outputs exactly 0
            gate, up = torch.zeros(1, cfg.hidden_size), torch.zeros(1, cfg.hidden_size)
            down, gate_w = torch.zeros(cfg.hidden_size, 1), torch.zeros(1, cfg.hidden_size)
        out.update({h + "mlp.shared_expert.gate_proj.weight": gate, h + "mlp.shared_expert.up_proj.weight": up,
                    h + "mlp.shared_expert.down_proj.weight": down, h + "mlp.shared_expert_gate.weight": gate_w})
        r = m + "mlp.router.cooccurrence_stats."
        if kind == "mpmoe":
            out[h + "mlp.sigma"] = take(r + "covariance")
        if r + "covariance" in src:  # Sigma's counters, or a MoPE model exported top-k
            used.update(r + n for n in (*_SIGMA_COUNTERS, "covariance"))
    left = sorted(set(src) - used)
    if left:
        raise ExportError(f"the model holds state the export would drop: {left[0]}"
                          f"{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}")
    return out


# ----------------------------------------------------------------------------- config
def hf_config(model, *, kind: str, vocab_size: int, eod_id: int, max_length: int,
              dtype: str = "fp32") -> dict:
    """``config.json`` of the exported folder (a plain dict)."""
    cfg = model.config
    groups = cfg.num_query_groups or cfg.num_attention_heads
    conf = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=groups,
        head_dim=cfg.kv_channels, hidden_act="silu", max_position_embeddings=max_length,
        rms_norm_eps=cfg.layernorm_epsilon, tie_word_embeddings=bool(model.share_embeddings_and_output_weights),
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        attention_dropout=0.0, bos_token_id=eod_id, eos_token_id=eod_id, use_cache=True,
        initializer_range=cfg.init_method_std,
    )
    dense_ffn = cfg.ffn_hidden_size
    if kind == "llama":
        conf.update(model_type="llama", architectures=["LlamaForCausalLM"], intermediate_size=dense_ffn,
                    attention_bias=False, mlp_bias=False)
    elif kind == "qwen2":
        conf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], intermediate_size=dense_ffn,
                    use_sliding_window=False)
    else:
        kinds = _layer_kinds(model)
        shared = cfg.moe_shared_expert_intermediate_size or 1
        conf.update(
            model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], intermediate_size=dense_ffn,
            num_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
            moe_intermediate_size=cfg.moe_ffn_hidden_size, shared_expert_intermediate_size=shared,
            # megatron's moe_layer_freq = N puts experts where i % N == 0, Qwen2-MoE's
            # decoder_sparse_step where (i + 1) % N == 0: always name the dense layers
            decoder_sparse_step=1, mlp_only_layers=[i for i, k in enumerate(kinds) if k == "dense"],
            norm_topk_prob=not cfg.moe_router_pre_softmax, qkv_bias=bool(cfg.add_qkv_bias),
            use_sliding_window=False, router_aux_loss_coef=float(cfg.moe_aux_loss_coeff or 0.0),
        )
        if kind == "mpmoe":
            conf.update(model_type="mpmoe", architectures=["MpmoeForCausalLM"],
                        auto_map={"AutoConfig": "configuration_mpmoe.MpmoeConfig",
                                  "AutoModelForCausalLM": "modeling_mpmoe.MpmoeForCausalLM"},
                        mpmoe_routing="mope", otep_eps=float(cfg.moe_otep_eps))
    conf["dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    return conf


# ----------------------------------------------------------------------------- folder
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_files(tokenizer_dir: Path, dst: Path, eod_token: str, max_length: int) -> None:
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dst / name)
    conf_path = dst / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    conf.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    conf.setdefault("eos_token", eod_token)
    conf.setdefault("bos_token", eod_token)
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def save_safetensors(tensors: dict, path, cast: torch.dtype) -> None:
    """Write ``tensors`` as one safetensors file, each cast to ``cast`` (keys ending in
    ``.sigma``: fp32) one tensor at a time, so the only copy held is the tensor being
    written (``safetensors.torch.save_file`` needs every converted tensor at once).
    The format: an 8-byte little-endian header length, the JSON header (dtype, shape,
    byte offsets per tensor), then the tensors' bytes in header order."""
    def out_dtype(key):
        return torch.float32 if key.endswith(".sigma") else cast

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in tensors.items():
        size = t.numel() * torch.empty((), dtype=out_dtype(key)).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[out_dtype(key)], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for key, t in tensors.items():
            data = t.detach().to(device="cpu", dtype=out_dtype(key)).contiguous()
            if data.numel():
                fh.write(data.reshape(-1).view(torch.uint8).numpy().data)


def write_folder(out, tensors: dict, config: dict, *, tokenizer_dir: Path, eod_id: int, eod_token: str,
                 provenance: dict, dtype: str = "fp32") -> Path:
    """Write the folder atomically (a temporary sibling renamed at the end)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # Sigma stays fp32 (routing decisions must not move with the weights' precision)
        save_safetensors(tensors, tmp / "model.safetensors", torch.bfloat16 if dtype == "bf16" else torch.float32)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id, "do_sample": False},
            indent=2) + "\n")
        _tokenizer_files(Path(tokenizer_dir), tmp, eod_token, config["max_position_embeddings"])
        if config["model_type"] == "mpmoe":
            for name in ("configuration_mpmoe.py", "modeling_mpmoe.py"):
                shutil.copyfile(HF_CODE_DIR / name, tmp / name)
        provenance = dict(provenance, tokenizer_sha256=_sha256(tmp / "tokenizer.json"))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder")
    problem = folder_problem(out)
    if problem:
        raise ExportError(f"--out {out}: {problem}")
    return out


def export_hf(load, out, *, routing: str = "auto", dtype: str = "fp32", tokenizer=None,
              model_flags=None) -> Path:
    """Export the checkpoint ``load`` to the folder ``out``; returns ``out``."""
    from mpmoe import __version__, store
    from mpmoe.megatron import init_distributed
    from mpmoe.run.checkpoint import saved_run_info

    out = _check_out(out)
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    init_distributed()
    # the weights in the dtype they were saved in: no converted copy (the writer casts one at a time)
    loaded = store.load_model(load, routing=routing, dtype="checkpoint", tokenizer=tokenizer,
                              model_flags=model_flags)
    if loaded.tokenizer is None:
        raise ExportError(f"{loaded.root}: the model has no tokenizer; pass --tokenizer DIR")
    # an imported model keeps the vocabulary of its source (which may exceed its tokenizer's)
    imported = saved_run_info(loaded.checkpoint).get("hf_import") or {}
    vocab = int(imported.get("hf_vocab_size") or loaded.vocab_size)
    model = loaded.model
    how = "dense" if loaded.trained_routing == "dense" else loaded.routing
    kind = hf_kind(model, how)
    tensors = hf_state_dict(model, vocab_size=vocab, routing=how)
    config = hf_config(model, kind=kind, vocab_size=vocab, eod_id=loaded.eod_id, max_length=loaded.max_length,
                       dtype=dtype)
    provenance = {"source": str(Path(loaded.checkpoint).resolve()), "iteration": loaded.iteration,
                  "routing": how, "trained_routing": loaded.trained_routing, "model_type": kind,
                  "dtype": dtype, "mpmoe_version": __version__}
    eod_token = loaded.tokenizer.id_to_token(loaded.eod_id)
    return write_folder(out, tensors, config, tokenizer_dir=loaded.tokenizer_dir, eod_id=loaded.eod_id,
                        eod_token=eod_token, provenance=provenance, dtype=dtype)


# ----------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: the one-line format, exit 2
        raise ExportError(message)


def hf_verb_parser(verb: str, what: str, *, help: str, description: str):
    """``(parser of mpmoe <verb>, its "hf" subparser)``: the shape ``mpmoe export`` and
    ``mpmoe import`` share (argparse errors on one line, exit 2)."""
    p = _Parser(prog=f"mpmoe {verb}", description=what)
    sub = p.add_subparsers(dest="format", required=True)
    return p, sub.add_parser("hf", prog=f"mpmoe {verb} hf", help=help, description=description)


def build_parser() -> argparse.ArgumentParser:
    p, h = hf_verb_parser("export", "Export a checkpoint to another format.",
                                help="a Hugging Face transformers folder (Qwen2-MoE / Llama / MoPE remote code)",
                                description="Write a Hugging Face transformers folder (config, safetensors, "
                                "tokenizer, generation config, provenance). Top-k MoE -> qwen2_moe, dense -> "
                                "llama (qwen2 with qkv biases), MoPE -> qwen2_moe layout + remote code "
                                "(trust_remote_code=True). See docs/export.md.")
    h.add_argument("--load", required=True, help="save folder (latest iteration) or iter_XXXXXXX folder")
    h.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    h.add_argument("--routing", choices=["auto", "topk", "mope"], default="auto",
                   help="auto: as trained; topk: a MoPE checkpoint as plain qwen2_moe (Sigma dropped)")
    h.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights' dtype on disk (Sigma stays fp32; bf16 may flip near-tied routing)")
    h.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    h.add_argument("--model-flags", default=None,
                   help="`mpmoe train` flags for a checkpoint that does not record them (one string)")
    return p


def main(argv: Optional[list] = None) -> int:
    import shlex

    args = build_parser().parse_args(argv)
    flags = shlex.split(args.model_flags) if args.model_flags else None
    out = export_hf(args.load, args.out, routing=args.routing, dtype=args.dtype, tokenizer=args.tokenizer,
                    model_flags=flags)
    print(f"mpmoe export hf: wrote {out}")
    return 0
