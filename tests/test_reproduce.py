"""scripts/reproduce/paper_tiny.sh --quick: the whole pipeline end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_paper_tiny_quick(tmp_path, embedded_cache):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for var in ("WORLD_SIZE", "RANK", "MOE_MASK_EXPERTS", "MOE_DYNAMIC_MASK_MODE", "EACT_SAVE"):
        env.pop(var, None)
    r = subprocess.run([str(REPO / "scripts/reproduce/paper_tiny.sh"), str(out), "--quick", "--jobs", "2",
                        "--train-flags", f"--embedded-cache-dir {embedded_cache}"],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    # --jobs 2: each seed trained in a process of its own, then reused by the report
    assert sorted(p.name for p in (out / "runs").glob("train-seed*.log")) == ["train-seed1.log", "train-seed2.log"]
    summary = json.loads((out / "summary.json").read_text())
    val = summary["val_loss"]
    assert len(val["MoPE"]["per_seed"]) == len(val["top-k"]["per_seed"]) == 2
    assert all(3 < v < 10 for v in val["MoPE"]["per_seed"] + val["top-k"]["per_seed"])
    for label in ("MoPE", "top-k"):
        for abl in summary["ablations"][label]:
            assert set(abl["knockout"]) == {"2", "3"}  # the MoE layers of the quick model
            assert set(abl["dynamic"]) == {"cooccurrence", "random"}
            # dropping one of two experts per token changes the loss
            assert abl["dynamic"]["random"] != 0.0
    assert "topk_routing" in summary["ablations"]["MoPE"][0]
    assert len(summary["eval_tasks"]) == 3 and all(summary["eval_tasks"].values())
    report = (out / "report.md").read_text()
    for text in ("## Validation loss", "Paper claims next to what was measured", "Winner by validation loss",
                 "MoPE + prior", "co-activation concentration MoPE"):
        assert text in report
    for png in ("learning_curves.png", "ablations.png"):
        assert (out / png).stat().st_size > 5000
    assert list((out / "analysis_stats").glob("*.png")) and list((out / "analysis_checkpoint").glob("*.png"))


def test_paper_tiny_usage_error():
    r = subprocess.run([str(REPO / "scripts/reproduce/paper_tiny.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def _paper_tiny():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_tiny", REPO / "scripts/reproduce/paper_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_shape_is_the_papers_expert_shape_with_four_methods():
    """--shape paper: 64 experts top-8 + a shared MLP, pre-softmax, >= 1,500 iterations, 3 seeds,
    MoPE / top-k / top-k + bias / ReMoE with the same k (equal active compute)."""
    from mpmoe.run.args import parse_args

    cfg = _paper_tiny().CONFIGS["paper"]
    assert cfg["iters"] >= 1500 and len(cfg["seeds"]) >= 3
    args = parse_args(["--preset", cfg["preset"], *cfg["flags"]])
    assert (args.num_experts, args.moe_router_topk) == (64, 8)
    assert args.moe_shared_expert_intermediate_size == 2 * args.moe_ffn_hidden_size
    assert args.moe_router_pre_softmax and args.moe_router_score_function == "softmax"
    assert args.hidden_size <= 128
    methods = cfg["methods"]
    assert set(methods) == {"top-k + bias", "ReMoE"}
    for routing, extra in methods.values():
        parse_args(["--preset", cfg["preset"], *cfg["flags"], "--moe-router-load-balancing-type", routing, *extra])


def test_paper_shape_and_quick_exclude_each_other(tmp_path, capsys):
    assert _paper_tiny().main([str(tmp_path), "--quick", "--shape", "paper"]) == 2
    assert "exclude each other" in capsys.readouterr().err
