"""``mpmoe export hf`` from checkpoints: folder contents, one-line refusals that leave
nothing behind, and lm-eval's ``hf`` model on the folder against ``mpmoe eval``."""

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

from export_testing import build, hf_home  # noqa: E402,F401 (hf_home: an autouse fixture)


def save_checkpoint(root: Path, flags, embedded_cache, *, sigma_seed=None, seed=0, dense=False):
    """A model-only checkpoint of a randomly initialised model (no training needed)."""
    from mpmoe.data import prepare_embedded
    from mpmoe.store import save_model

    tok = prepare_embedded(embedded_cache, progress=False).tokenizer_dir
    args, model = build(flags, seed=seed, sigma_seed=sigma_seed, dense=dense)
    save_model(root, model, args=args, tokenizer_dir=tok)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, embedded_cache):
    root = tmp_path_factory.mktemp("ckpts")
    long = ["--seq-length", "128", "--max-position-embeddings", "128"]
    return {
        "mope": save_checkpoint(root / "mope", ["--moe-router-load-balancing-type", "otep", *long],
                                embedded_cache, sigma_seed=5, seed=1),
        "topk": save_checkpoint(root / "topk", long, embedded_cache, seed=2),
        "remoe": save_checkpoint(root / "remoe", ["--moe-relu-routing", "--moe-router-load-balancing-type", "none"],
                                 embedded_cache, seed=3),
    }


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "mpmoe", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_export_folder_contents(checkpoints, tmp_path):
    from mpmoe import __version__
    from mpmoe.export.hf import export_hf

    out = export_hf(checkpoints["mope"], tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "mpmoe_export.json", "configuration_mpmoe.py", "modeling_mpmoe.py"} <= names
    prov = json.loads((out / "mpmoe_export.json").read_text())
    assert prov["iteration"] == 0 and prov["routing"] == "mope" and prov["mpmoe_version"] == __version__
    assert len(prov["tokenizer_sha256"]) == 64
    conf = json.loads((out / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_mpmoe.MpmoeForCausalLM"
    assert conf["max_position_embeddings"] == 128 and conf["eos_token_id"] == conf["bos_token_id"] == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and gen["do_sample"] is False
    # the same MoPE checkpoint routed top-k: stock qwen2_moe, no remote code, no Sigma
    plain = export_hf(checkpoints["mope"], tmp_path / "hf-topk", routing="topk")
    assert json.loads((plain / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert not (plain / "modeling_mpmoe.py").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_bf16_checkpoint_exports_its_own_weights(tmp_path, embedded_cache):
    """A bf16 checkpoint is read in bf16 (no fp32 copy of the model): the fp32 folder holds
    its weights upcast exactly, the bf16 folder the same bits, Sigma fp32 in both, and the
    fp32 folder's logits equal mpmoe's forward of the checkpoint in fp32."""
    from safetensors import safe_open

    from export_testing import hf_logits, real_text_ids
    from mpmoe import store
    from mpmoe.data import prepare_embedded
    from mpmoe.export.hf import export_hf

    tok = prepare_embedded(embedded_cache, progress=False).tokenizer_dir
    args, model = build(["--moe-router-load-balancing-type", "otep"], seed=4, sigma_seed=9)
    model.bfloat16()
    args.bf16 = True
    ckpt = store.save_model(tmp_path / "ckpt", model, args=args, tokenizer_dir=tok)
    folders = {d: export_hf(ckpt, tmp_path / f"hf-{d}", dtype=d) for d in ("fp32", "bf16")}
    files = {d: safe_open(str(f / "model.safetensors"), framework="pt") for d, f in folders.items()}
    assert set(files["fp32"].keys()) == set(files["bf16"].keys())
    sigmas = [k for k in files["fp32"].keys() if k.endswith(".sigma")]
    assert len(sigmas) == 2
    for key in files["fp32"].keys():
        a, b = files["fp32"].get_tensor(key), files["bf16"].get_tensor(key)
        if key in sigmas:
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
        else:
            assert (a.dtype, b.dtype) == (torch.float32, torch.bfloat16) and torch.equal(a, b.float()), key
    loaded = store.load_model(ckpt, dtype="fp32")
    ids = real_text_ids(tok)
    ref = loaded.forward(ids).float()
    got = hf_logits(folders["fp32"], ids, trust_remote_code=True)
    assert ref.abs().max() > 1.0 and (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case,words", [
    ("remoe", "ReMoE"),
    ("topk-as-mope", "no Sigma"),
    ("out-exists", "exists and is not an empty folder"),
])
def test_export_refusals_leave_nothing(case, words, checkpoints, tmp_path):
    out = tmp_path / "hf"
    argv = ["export", "hf", "--load", str(checkpoints["remoe" if case == "remoe" else "topk"]), "--out", str(out)]
    if case == "topk-as-mope":
        argv += ["--routing", "mope"]
    if case == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    r = _cli(*argv)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("mpmoe export: error: ") and words in lines[-1] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["hf"] if case == "out-exists" else [])
    if case == "out-exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_extra_is_one_line(monkeypatch, capsys):
    from mpmoe import cli, deps

    monkeypatch.setattr(deps, "_installed", lambda name: name != "safetensors")
    assert cli.main(["export", "hf", "--load", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mpmoe[export]" in err and "safetensors" in err


# ----------------------------------------------------------------------------- lm-eval on the folder
def _task_values(results: dict) -> dict:
    out = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in name and name != "alias":
                out[f"{task}/{name}"] = float(value)
    return out


def _compare_lm_eval(checkpoint, tmp_path, limit):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mpmoe.eval import TASKS_DIR
    from mpmoe.eval.cli import main as eval_main
    from mpmoe.export.hf import export_hf

    folder = export_hf(checkpoint, tmp_path / "hf")
    argv = ["--load", str(checkpoint), "--tasks", "mpmoe_local", "--output-path", str(tmp_path / "mpmoe"),
            "--bootstrap-iters", "0", "--no-progress", "--device", "cpu", "--dtype", "fp32"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    assert eval_main(argv) == 0
    ours = _task_values(json.loads((tmp_path / "mpmoe" / "results.json").read_text()))
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", device="cpu",
              logits_cache=False, batch_size=16)  # what `lm_eval --model hf --model_args ...` builds
    theirs = lm_eval.simple_evaluate(
        model=hf, tasks=["mpmoe_local"], limit=limit, bootstrap_iters=0,
        task_manager=TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False),
        random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    theirs = _task_values(theirs)
    assert set(ours) == set(theirs) and len(ours) >= 4
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value, abs=1e-4, rel=1e-5), key


def test_lm_eval_hf_equals_mpmoe_eval_limit(checkpoints, tmp_path):
    """``lm_eval --model hf ... logits_cache=False`` on the exported MoPE folder scores
    the offline tasks as ``mpmoe eval`` does on the checkpoint (a few documents)."""
    _compare_lm_eval(checkpoints["mope"], tmp_path, limit=6)


@pytest.mark.slow
def test_lm_eval_hf_equals_mpmoe_eval_full(checkpoints, tmp_path):
    _compare_lm_eval(checkpoints["mope"], tmp_path, limit=None)
