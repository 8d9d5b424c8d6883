"""``mpmoe export hf``: megatron -> Hugging Face mapping, parity, the MoPE remote code, refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from export_testing import VOCAB, build, hf_logits, hf_model, import_template, megatron_logits, real_text_ids, hf_home  # noqa: E402,F401 (hf_home: an autouse fixture)

TOL = 1e-4


@pytest.fixture(scope="module")
def tok_dir(embedded_cache):
    from mpmoe.data import prepare_embedded

    return prepare_embedded(embedded_cache, progress=False).tokenizer_dir


def export_model(model, routing, out, tok_dir, dtype="fp32"):
    from mpmoe.export.hf import hf_config, hf_kind, hf_state_dict, write_folder

    kind = hf_kind(model, routing)
    tensors = hf_state_dict(model, vocab_size=VOCAB, routing=routing)
    conf = hf_config(model, kind=kind, vocab_size=VOCAB, eod_id=0, max_length=32, dtype=dtype)
    write_folder(out, tensors, conf, tokenizer_dir=tok_dir, eod_id=0, eod_token="<|endoftext|>",
                 provenance={"test": True}, dtype=dtype)
    return kind


CASES = {
    # name: (flags, dense, routing, expected model_type)
    "topk-list-shared": ([], False, "topk", "qwen2_moe"),
    "topk-int-noshared-presoftmax": (["--moe-layer-freq", "2", "--moe-router-pre-softmax",
                                      "--no-shared-expert"], False, "topk", "qwen2_moe"),
    "topk-int3-gated-shared": (["--moe-layer-freq", "3", "--moe-shared-expert-gate"], False, "topk", "qwen2_moe"),
    "topk-qkv-bias-tied": (["--add-qkv-bias", "--no-untie-embeddings-and-output-weights"], False, "topk", "qwen2_moe"),
    "dense": ([], True, "dense", "llama"),
    "dense-qkv-bias-rope-base": (["--add-qkv-bias", "--rotary-base", "500000"], True, "dense", "qwen2"),
    "mope": (["--moe-router-load-balancing-type", "otep"], False, "mope", "mpmoe"),
    "mope-presoftmax-noshared": (["--moe-router-load-balancing-type", "otep", "--moe-router-pre-softmax",
                                  "--no-shared-expert"], False, "mope", "mpmoe"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_parity(name, tmp_path, tok_dir):
    """HF logits equal megatron's (fp32) on random ids and on real text."""
    flags, dense, routing, model_type = CASES[name]
    _, model = build(flags, dense=dense, seed=len(name), sigma_seed=7)
    out = tmp_path / "hf"
    assert export_model(model, routing, out, tok_dir) == model_type
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == model_type and conf["vocab_size"] == VOCAB
    if model_type in ("qwen2_moe", "mpmoe"):  # megatron's MoE layers, named explicitly
        kinds = [int(i not in conf["mlp_only_layers"]) for i in range(3)]
        freq = {"2": [1, 0, 1], "3": [1, 0, 0]}
        expect = next((freq[f] for f in freq if "--moe-layer-freq" in flags and f in flags), [0, 1, 1])
        assert kinds == expect and conf["decoder_sparse_step"] == 1
        assert conf["norm_topk_prob"] == ("--moe-router-pre-softmax" not in flags)
    gen = torch.Generator().manual_seed(0)
    hf = hf_model(out, trust_remote_code=model_type == "mpmoe")
    for ids in (torch.randint(0, VOCAB, (2, 32), generator=gen), real_text_ids(tok_dir)):
        ref = megatron_logits(model, ids)
        got = hf_logits(hf, ids)
        assert ref.abs().max() > 1.0  # logits of a size where a mapping error shows
        assert (got - ref).abs().max().item() <= TOL


def test_mope_export_is_sensitive_to_routing(tmp_path, tok_dir):
    """The MoPE folder matches MoPE routing, and the same weights routed top-k differ by far more."""
    from mpmoe.megatron.router import iter_routers

    _, model = build(["--moe-router-load-balancing-type", "otep"], seed=3, sigma_seed=11)
    export_model(model, "mope", tmp_path / "hf", tok_dir)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    got = hf_logits(tmp_path / "hf", ids, trust_remote_code=True)
    mope = megatron_logits(model, ids)
    for router in iter_routers(model):
        router.config.moe_otep_inference_topk = True
    topk = megatron_logits(model, ids)
    assert (got - mope).abs().max().item() <= TOL
    assert (got - topk).abs().max().item() > 100 * TOL
    # and the exported top-k folder of the same weights is the top-k model
    export_model(model, "topk", tmp_path / "hf-topk", tok_dir)
    assert (hf_logits(tmp_path / "hf-topk", ids) - topk).abs().max().item() <= TOL


def test_experts_implementations_agree(tmp_path, tok_dir):
    """transformers 5 runs qwen2_moe experts grouped by default; eager gives the same logits."""
    _, model = build([], seed=5)
    export_model(model, "topk", tmp_path / "hf", tok_dir)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    ref = megatron_logits(model, ids)
    for impl in ("eager", "grouped_mm"):
        got = hf_logits(tmp_path / "hf", ids, experts_implementation=impl)
        assert (got - ref).abs().max().item() <= TOL, impl


def test_bf16_export_keeps_sigma_fp32(tmp_path, tok_dir):
    from safetensors import safe_open

    _, model = build(["--moe-router-load-balancing-type", "otep"], seed=4, sigma_seed=2)
    export_model(model, "mope", tmp_path / "hf", tok_dir, dtype="bf16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as fh:
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}
    assert dtypes["model.layers.1.mlp.sigma"] == torch.float32
    assert dtypes["model.layers.1.mlp.gate.weight"] == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- remote-code OTEP
@pytest.mark.parametrize("tokens,experts,k", [(3000, 8, 2), (40, 16, 4), (500, 64, 8)])
def test_template_otep_matches_otep_select(tmp_path, tokens, experts, k):
    from mpmoe.routing import otep_select
    from mpmoe.routing.cooccurrence import covariance_from_counts

    otep = import_template(tmp_path).otep_select
    gen = torch.Generator().manual_seed(tokens + experts)
    probs = torch.softmax(torch.randn(tokens, experts, generator=gen) * 2, dim=-1)
    m = torch.zeros(2000, experts).scatter_(1, torch.randn(2000, experts, generator=gen).topk(k, 1).indices, 1.0)
    m[:, 1] = m[:, 0]  # an exact duplicate expert: a singular Sigma
    sigma = covariance_from_counts(torch.tensor(2000.0, dtype=torch.float64), m.sum(0).double(),
                                   (m.t() @ m).double(), 1e-12).float()
    picks = otep(probs, sigma, k)
    ref = otep_select(probs, sigma, k)
    got = torch.zeros_like(ref).scatter_(1, picks, True)
    assert picks.shape == (tokens, k)
    assert torch.equal(got, ref)
    # identity Sigma: top-k of p; the first pick maximises p^2 / diag
    assert torch.equal(otep(probs, torch.eye(experts), k).sort(1).values, probs.topk(k, 1).indices.sort(1).values)
    assert torch.equal(picks[:, 0], (probs ** 2 / sigma.diagonal().clamp_min(1e-12)).argmax(1))


def test_template_does_not_import_mpmoe():
    from mpmoe.export.hf import HF_CODE_DIR

    for f in HF_CODE_DIR.glob("*.py"):
        text = f.read_text()
        assert "import mpmoe" not in text and "from mpmoe" not in text, f.name


# ----------------------------------------------------------------------------- refusals
REFUSALS = {
    "LayerNorm": (["--normalization", "LayerNorm"], "normalization LayerNorm"),
    "learned positions": (["--position-embedding-type", "learned_absolute"], "position_embedding_type"),
    "not SwiGLU": (["--no-swiglu"], "SwiGLU"),
    "capacity factor": (["--moe-expert-capacity-factor", "1.5"], "moe_expert_capacity_factor"),
    "sigmoid scores": (["--moe-router-score-function", "sigmoid"], "moe_router_score_function sigmoid"),
    "ReMoE": (["--moe-relu-routing", "--moe-router-load-balancing-type", "none"], "ReMoE"),
    "expert bias": (["--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "none"], "expert bias"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals(name):
    from mpmoe.export.hf import ExportError, hf_kind

    flags, words = REFUSALS[name]
    _, model = build(flags)
    with pytest.raises(ExportError, match=words):
        hf_kind(model, "topk")


def test_save_safetensors_streams_a_file_safetensors_reads(tmp_path):
    """The streaming writer's file, read by safetensors: each tensor cast to the asked
    dtype (bf16 exactly as torch casts), ``.sigma`` kept fp32, non-contiguous views too."""
    from safetensors import safe_open

    from mpmoe.export.hf import save_safetensors

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen)
    tensors = {"a.weight": base[:, 1:7], "b.weight": base.t(), "c.bias": torch.randn(5, generator=gen).bfloat16(),
               "model.layers.1.mlp.sigma": torch.randn(3, 3, generator=gen), "d": torch.ones(1, 1)}
    for cast in (torch.float32, torch.bfloat16):
        path = tmp_path / f"{cast}.safetensors"
        save_safetensors(tensors, path, cast)
        with safe_open(str(path), framework="pt") as fh:
            assert sorted(fh.keys()) == sorted(tensors) and fh.metadata() == {"format": "pt"}
            for key, t in tensors.items():
                want = t.float() if key.endswith(".sigma") else t.to(cast)
                got = fh.get_tensor(key)
                assert got.dtype == want.dtype and torch.equal(got, want), key


def test_state_left_over_is_refused():
    """A tensor the mapping does not know (e.g. a future router's state) is never dropped silently."""
    from mpmoe.export.hf import ExportError, hf_state_dict

    _, model = build([])
    model.decoder.layers[1].mlp.router.register_buffer("novel_state", torch.zeros(3))
    with pytest.raises(ExportError, match="novel_state"):
        hf_state_dict(model, vocab_size=VOCAB, routing="topk")
