"""mpmoe analyze on a real tiny training run: statistics report and checkpoint ablations."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from test_analysis_stats import png_size
from train_testing import make_indexed_dataset, tiny_flags

from mpmoe.analysis.cli import main as analyze


def _model_flags(prefix, run_dir, kind):
    return tiny_flags(prefix, run_dir, **{"moe-router-load-balancing-type": kind, "num-layers": 3,
                                          "moe-layer-freq": "[0,1,1]", "num-experts": 8})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A MoPE and a top-k run: 4 iterations each, statistics every 2, final checkpoint."""
    from mpmoe.train.cli import main as train

    root = tmp_path_factory.mktemp("analysis-runs")
    prefix = make_indexed_dataset(root / "data")
    out = {"prefix": prefix, "root": root}
    for kind in ("otep", "aux_loss"):
        run = root / f"run-{kind}"
        flags = _model_flags(prefix, run, kind) + [
            "--train-iters", "4", "--moe-plot-every", "2", "--moe-stats-dir", str(run / "stats"),
            "--save", str(root / f"ckpt-{kind}"), "--eval-interval", "100", "--no-progress"]
        assert train(flags) == 0
        out[kind] = run
    return out


def test_stats_report_from_real_run(runs, tmp_path):
    report = tmp_path / "report"
    rc = analyze(["stats", str(runs["otep"]), "--compare", str(runs["aux_loss"] / "stats"), "--name", "mope",
                  "--compare-name", "moe", "--out", str(report), "--no-progress"])
    assert rc == 0
    summary = json.loads((report / "summary.json").read_text())
    mope, moe = summary["runs"]
    assert set(mope["layers"]) == {"2", "3"} and set(moe["layers"]) == {"2", "3"}
    for layer in mope["layers"].values():
        assert layer["kind"] == "mope" and layer["windows"] == 2
        assert layer["experts_per_token"] == pytest.approx(2.0)  # top-2: every token has 2 experts
        assert 1.0 <= layer["effective_experts"] <= 8.0
        assert "sigma_mean_abs_offdiag_correlation" in layer
    assert all(v["kind"] == "moe" for v in moe["layers"].values())
    for name in summary["images"]:
        w, h = png_size(report / name)
        assert w == 1200 and h >= 200
        assert (report / name).stat().st_size > 5000


def test_checkpoint_ablations_mope_vs_moe(runs, tmp_path):
    report = tmp_path / "ck"
    prefix = runs["prefix"]
    rc = analyze(["checkpoint", "--load", str(runs["root"] / "ckpt-otep"),
                  "--compare-load", str(runs["root"] / "ckpt-aux_loss"),
                  "--compare-args", shlex.join(_model_flags(prefix, tmp_path / "x", "aux_loss")),
                  "--name", "mope", "--compare-name", "moe", "--out", str(report), "--num-tokens", "128",
                  "--ot-samples", "32", "--no-progress"] + _model_flags(prefix, tmp_path / "x", "otep"))
    assert rc == 0
    summary = json.loads((report / "summary.json").read_text())
    mope, moe = summary["runs"]
    assert mope["iteration"] == 4 and mope["routing"] == "mope" and moe["routing"] == "topk"
    for run in (mope, moe):
        assert set(run["layers"]) == {"2", "3"}
        for layer in run["layers"].values():
            assert -1.0 <= layer["mean_offdiag_output_similarity"] <= 1.0
            assert layer["tokens"] == 128 and layer["ot_samples"] == 32
            assert layer["mean_offdiag_ot_distance"] > 0
            assert 0.0 <= layer["cka_output_vs_weight_similarity"] <= 1.0 + 1e-9
    assert all("cka_similarity_vs_sigma" in v for v in mope["layers"].values())
    assert not any("cka_similarity_vs_sigma" in v for v in moe["layers"].values())
    for name in ("expert_matrices.png", "expert_matrices_compare.png", "cka_heatmap.png", "tsne.png", "pca.png"):
        assert name in summary["images"]
        w, h = png_size(report / name)
        assert w == 1200 and h >= 200
    assert "pca.png" in (report / "index.md").read_text()


def test_checkpoints_record_the_flags_the_analysis_needs(runs, tmp_path):
    """No trainer flags: each checkpoint's recorded flags rebuild its own model."""
    report = tmp_path / "ck"
    rc = analyze(["checkpoint", "--load", str(runs["root"] / "ckpt-otep"),
                  "--compare-load", str(runs["root"] / "ckpt-aux_loss"), "--out", str(report),
                  "--num-tokens", "64", "--ot-samples", "0", "--layers", "2", "--no-progress"])
    assert rc == 0
    mope, moe = json.loads((report / "summary.json").read_text())["runs"]
    assert mope["routing"] == "mope" and moe["routing"] == "topk"
    assert set(mope["layers"]) == {"2"} and "cka_similarity_vs_sigma" in mope["layers"]["2"]


def test_all_experts_bypass_matches_routed_outputs(runs):
    """The bypass equals each expert's own MLP applied to the captured MoE input."""
    import torch

    from mpmoe.analysis.checkpoint import collect_expert_outputs, load_model
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    try:
        model, args, _, _ = load_model(runs["root"] / "ckpt-aux_loss",
                                       _model_flags(runs["prefix"], runs["root"] / "y", "aux_loss"))
        tokens = torch.randint(1, 100, (2, 32))
        pos = torch.arange(32).unsqueeze(0).expand(2, 32)
        probes = collect_expert_outputs(model, tokens, pos)
        moe = [m for m in model.modules() if type(m).__name__ == "MoELayer" and m.layer_number == 2][0]
        captured = {}
        h = moe.register_forward_pre_hook(lambda mod, inp: captured.__setitem__("x", inp[0]))
        with torch.no_grad():
            model(tokens, pos, None)
            h.remove()
            x = captured["x"].reshape(-1, captured["x"].shape[-1])
            for e in (0, 5):
                ref, _ = moe.experts.local_experts[e](x, torch.ones(x.shape[0]))
                np.testing.assert_allclose(probes[2].outputs[e], ref.numpy(), rtol=1e-5, atol=1e-6)
        p = probes[2]
        assert p.outputs.shape == (8, 64, 32)
        np.testing.assert_array_equal(np.diag(p.cooccurrence).sum(), 2 * 64)  # top-2 of 64 tokens
        assert p.weights.shape[0] == 8 and p.sigma is None
    finally:
        destroy_distributed()


def test_checkpoint_errors(runs, tmp_path, capsys):
    flags = _model_flags(runs["prefix"], tmp_path / "x", "otep")
    assert analyze(["checkpoint", "--load", str(tmp_path / "none"), "--out", str(tmp_path / "o")] + flags) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert analyze(["checkpoint", "--load", str(tmp_path / "empty"), "--out", str(tmp_path / "o")] + flags) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # a MoPE checkpoint loaded into a model the flags describe differently (16 experts)
    bad = _model_flags(runs["prefix"], tmp_path / "x", "otep") + ["--num-experts", "16"]
    assert analyze(["checkpoint", "--load", str(runs["root"] / "ckpt-otep"), "--out", str(tmp_path / "o")] + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mpmoe analyze: error:") and "holds another model (--num-experts 8 -> 16" in err[-1]
