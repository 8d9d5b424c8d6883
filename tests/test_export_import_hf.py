"""``mpmoe import hf``: Llama / Qwen2 / Qwen2-MoE / Mixtral folders -> mpmoe checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from export_testing import VOCAB, hf_home, hf_logits, real_text_ids, tiny_hf_folder  # noqa: E402,F401 (hf_home: an autouse fixture)

TOL = 1e-4
KINDS = ("llama", "qwen2", "qwen2_moe", "mixtral")


@pytest.fixture(scope="module")
def tok_dir(embedded_cache):
    from mpmoe.data import prepare_embedded

    return prepare_embedded(embedded_cache, progress=False).tokenizer_dir


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tok_dir):
    """kind -> (HF model, HF folder, imported checkpoint)."""
    from mpmoe.export.hf_import import import_hf

    out = {}
    for i, kind in enumerate(KINDS):
        root = tmp_path_factory.mktemp(kind)
        model = tiny_hf_folder(kind, root / "hf", tok_dir, seed=i)
        import_hf(root / "hf", root / "ckpt")
        out[kind] = (model, root / "hf", root / "ckpt")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_import_parity(kind, imported, tok_dir):
    """mpmoe's forward on the imported checkpoint equals the HF model's logits."""
    from mpmoe.eval.loader import load_eval_model

    hf, _, ckpt = imported[kind]
    m = load_eval_model(ckpt, dtype="fp32")
    assert m.iteration == 0 and m.vocab_size == VOCAB and m.eod_id == 0
    assert m.trained_routing == ("dense" if kind in ("llama", "qwen2") else "topk")
    for ids in (torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)),
                real_text_ids(tok_dir)):
        ref = hf_logits(hf, ids)
        assert ref.abs().max() > 1.0
        assert (m.forward(ids).float() - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_import_records_flags_and_tokenizer(kind, imported, tok_dir):
    from mpmoe.run.checkpoint import saved_run_info

    _, hf_dir, ckpt = imported[kind]
    info = saved_run_info(ckpt / "iter_0000000")
    args, data = info["args"], info["data"]
    assert info["model_only"] and info["hf_import"]["model_type"] == kind
    assert args["num_layers"] == 3 and args["hidden_size"] == 64 and args["num_query_groups"] == 2
    assert args["add_qkv_bias"] == (kind in ("qwen2", "qwen2_moe"))
    assert args["rotary_base"] == (1e6 if kind in ("qwen2", "mixtral") else 1e4)
    if kind == "qwen2_moe":
        assert args["moe_layer_freq"] == [0, 1, 1] and args["moe_router_pre_softmax"] is True
        assert args["moe_shared_expert_gate"] is True
    if kind == "mixtral":
        assert args["moe_layer_freq"] == [1, 1, 1] and args["moe_router_pre_softmax"] is False
        assert args["moe_shared_expert_intermediate_size"] is None
    assert data["vocab_size"] == VOCAB and data["eod_id"] == 0
    assert (ckpt / "tokenizer" / "tokenizer.json").read_bytes() == (Path(tok_dir) / "tokenizer.json").read_bytes()
    assert (ckpt / "mpmoe_import.toml").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_import_export_round_trip(kind, imported, tmp_path):
    """import -> export reproduces the original folder's tensors exactly (Mixtral comes back
    in the Qwen2-MoE layout: the same tensors plus a shared expert that outputs 0)."""
    from mpmoe.export.hf import export_hf
    from mpmoe.export.hf_import import read_hf_tensors

    _, hf_dir, ckpt = imported[kind]
    out = export_hf(ckpt, tmp_path / "back")
    before, after = read_hf_tensors(hf_dir), read_hf_tensors(out)
    expect = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2_moe", "mixtral": "qwen2_moe"}[kind]
    assert json.loads((out / "config.json").read_text())["model_type"] == expect
    extra = set(after) - set(before)
    assert set(before) <= set(after)
    assert all(".shared_expert" in k and not after[k].any() for k in extra) and (kind == "mixtral") == bool(extra)
    for key, value in before.items():
        assert after[key].dtype == torch.float32
        assert torch.equal(after[key], value.float()), key


def test_tokenizer_ids_equal(imported, tok_dir):
    """The exported folder's HF tokenizer gives mpmoe's ids on the task texts."""
    from transformers import AutoTokenizer

    from mpmoe.data import load_tokenizer
    from mpmoe.export.hf import export_hf

    _, _, ckpt = imported["qwen2_moe"]
    out = export_hf(ckpt, Path(ckpt).parent / "tok-check")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(tok_dir).build()
    data = Path(__import__("mpmoe.eval", fromlist=["x"]).__file__).parent / "tasks" / "data"
    texts = [v for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines()[:20]
             for v in json.loads(line).values() if isinstance(v, str)]
    assert len(texts) > 40
    for text in texts:
        assert hf_tok(text, add_special_tokens=True)["input_ids"] == ours.encode(text).ids


def test_qwen2_moe_plain_shared_expert(tmp_path, tok_dir):
    """A Qwen2-MoE whose shared-expert gate is 0 imports without megatron's gate (down / 2)
    and exports back bit-identically; an all-zero shared expert imports as none."""
    from mpmoe.eval.loader import load_eval_model
    from mpmoe.export.hf import export_hf
    from mpmoe.export.hf_import import import_hf, read_hf_tensors
    from mpmoe.run.checkpoint import saved_run_info

    hf = tiny_hf_folder("qwen2_moe", tmp_path / "hf", tok_dir, seed=5)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for k in list(sd):
        if k.endswith("shared_expert_gate.weight"):
            sd[k] = torch.zeros_like(sd[k])
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    args = saved_run_info(tmp_path / "ckpt" / "iter_0000000")["args"]
    assert args["moe_shared_expert_gate"] is False and args["moe_shared_expert_intermediate_size"] == 48
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    m = load_eval_model(tmp_path / "ckpt", dtype="fp32")
    assert (m.forward(ids).float() - hf_logits(hf, ids)).abs().max().item() <= TOL
    back = read_hf_tensors(export_hf(tmp_path / "ckpt", tmp_path / "back"))
    assert all(torch.equal(back[k], v) for k, v in read_hf_tensors(tmp_path / "hf").items())


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind,field,value", [
    ("llama", "hidden_act", "gelu"),
    ("llama", "attention_bias", True),
    ("llama", "head_dim", 32),
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("mixtral", "sliding_window", 16),
])
def test_import_refusals_name_the_field(kind, field, value, tmp_path, tok_dir):
    from mpmoe.export.hf import ExportError
    from mpmoe.export.hf_import import import_hf

    tiny_hf_folder(kind, tmp_path / "hf", tok_dir)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    conf[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ExportError, match=field.split("_")[0]):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_unknown_model_type(tmp_path):
    from mpmoe.export.hf import ExportError
    from mpmoe.export.hf_import import import_hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    with pytest.raises(ExportError, match="model_type='olmoe'"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- other verbs accept it
def _cli(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "mpmoe", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_eval_and_analyze_accept_an_import(imported, tmp_path):
    from mpmoe.eval.cli import main as eval_main

    _, _, ckpt = imported["qwen2_moe"]
    assert eval_main(["--load", str(ckpt), "--tasks", "mpmoe_docs_lastword", "--limit", "4",
                      "--output-path", str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]) == 0
    r = _cli("analyze", "checkpoint", "--load", str(ckpt), "--out", str(tmp_path / "an"), "--num-tokens", "256",
             "--ot-samples", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "an" / "summary.json").is_file()


@pytest.mark.parametrize("router", [pytest.param("aux_loss", marks=pytest.mark.slow), "otep"])
def test_train_continues_from_an_import(router, imported, tmp_path, embedded_cache):
    """Fine-tune an imported Qwen2-MoE, also switching its router to MoPE (Sigma warm-up)."""
    _, _, ckpt = imported["qwen2_moe"]
    r = _cli("train", "--preset", str(ckpt / "mpmoe_import.toml"), "--load", str(ckpt), "--no-load-optim",
             "--moe-router-load-balancing-type", router,
             *(["--moe-otep-warmup-fraction", "0.5"] if router == "otep" else []),  # a MoPE-only setting
             "--train-iters", "2", "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "32",
             "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1", "--save", str(tmp_path / "ft"),
             "--run-dir", str(tmp_path / "run"), "--no-tensorboard", "--no-progress",
             "--embedded-cache-dir", embedded_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ft" / "iter_0000002").is_dir()
