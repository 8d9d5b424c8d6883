"""Helpers for the Hugging Face export/import tests (no tests here)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 8192  # the embedded tokenizer's
# A small tiny-cpu: 3 layers, GQA (4 heads, 2 groups), context 32.
BASE = ["--preset", "tiny-cpu", "--hidden-size", "64", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32",
        "--moe-shared-expert-intermediate-size", "48", "--num-layers", "3", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--max-position-embeddings", "32",
        "--moe-layer-freq", "[0,1,1]", "--moe-router-load-balancing-type", "aux_loss"]


def set_hf_home(path) -> None:
    """Offline, with transformers' caches under ``path`` (remote-code modules stay in the
    process's one folder, set by conftest.py)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(path)


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory):
    """Each test module that imports this fixture runs offline with its own HF_HOME, restored after."""
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE")}
    set_hf_home(tmp_path_factory.mktemp("hf-home"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def build_args(flags=(), dense=False):
    from mpmoe.run.args import args_from_saved

    args = args_from_saved(None, [*BASE, *(f for f in flags if f != "--no-shared-expert")])
    if "--no-shared-expert" in flags:
        args.moe_shared_expert_intermediate_size = None
    if dense:
        args.num_experts = None
    args.tokenizer_model = None
    return args


def build(flags=(), *, dense=False, seed=0, sigma_seed=None):
    """``(args, model)``: a megatron model with random weights (norms included)."""
    from mpmoe.megatron import init_distributed
    from mpmoe.run.model import build_model, padded_vocab_size

    init_distributed()
    args = build_args(flags, dense)
    torch.manual_seed(seed)
    _, model, _ = build_model(args, padded_vocab_size(VOCAB, 128))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = (0.2 if "layernorm" in name else 0.3 if "output_layer" in name or "word_embeddings" in name
                     else 0.5 * float(p.std()) if p.numel() > 1 else 0.1)
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    if sigma_seed is not None:
        plant_sigma(model, sigma_seed)
    model.eval()
    return args, model


def plant_sigma(model, seed: int) -> None:
    """A trained-looking Sigma in every MoPE router: counts of correlated routing maps."""
    from mpmoe.megatron.router import MoPERouter, iter_routers

    gen = torch.Generator().manual_seed(seed)
    for router in iter_routers(model):
        if not isinstance(router, MoPERouter):
            continue
        e, k = router.num_experts, router.topk
        logits = torch.randn(4096, e, generator=gen) + torch.randn(e, generator=gen) * 1.5
        logits[:, 1::2] += logits[:, 0::2] * 0.8  # pairs that co-occur
        picks = logits.topk(k, dim=1).indices
        m = torch.zeros(4096, e, dtype=torch.bool).scatter_(1, picks, True)
        router.cooccurrence_stats.update(m)
        router.cooccurrence_stats.refresh(None)


@torch.no_grad()
def megatron_logits(model, tokens, vocab=VOCAB):
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return model(tokens, pos, None)[..., :vocab].float()


def hf_model(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def hf_logits(folder_or_model, tokens, **kwargs):
    model = folder_or_model if isinstance(folder_or_model, torch.nn.Module) else hf_model(folder_or_model, **kwargs)
    return model(input_ids=tokens).logits.float()


def real_text_ids(tokenizer_dir, n=2, length=32):
    """Token ids of the first documents of the offline task data (real text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    data = Path(importlib.import_module("mpmoe.eval").__file__).parent / "tasks" / "data"
    rows = []
    for f in sorted(data.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            text = " ".join(str(v) for v in json.loads(line).values() if isinstance(v, str))
            ids = tok.encode(text).ids
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == n:
                return torch.tensor(rows)
    raise AssertionError("no task text long enough")


def import_template(tmp_path):
    """The remote-code template as a package (relative imports), imported from a copy."""
    from mpmoe.export.hf import HF_CODE_DIR

    pkg = Path(tmp_path) / "mpmoe_hf_template"
    shutil.copytree(HF_CODE_DIR, pkg, dirs_exist_ok=True)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module("mpmoe_hf_template.modeling_mpmoe")
    finally:
        sys.path.remove(str(tmp_path))


def tiny_hf_folder(kind: str, out, tokenizer_dir, *, seed: int = 0, **overrides):
    """A tiny random ``kind`` model (llama, qwen2, qwen2_moe, mixtral) saved with
    ``save_pretrained`` beside the embedded tokenizer; nothing is downloaded."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, mlp_only_layers=[0], decoder_sparse_step=1,
                                norm_topk_prob=False, qkv_bias=True)
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "intermediate_size": 32, "rope_parameters":
                                  {"rope_type": "default", "rope_theta": 1e6}}, num_local_experts=4,
                               num_experts_per_tok=2)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "bias" in name or "shared_expert_gate" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.mul_(10.0)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, Path(out) / name)
    return model.eval()
