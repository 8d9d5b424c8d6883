"""mpmoe analyze stats on synthetic statistics windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from analysis_testing import synthetic_routing, write_stats

from mpmoe.analysis.cli import main
from mpmoe.analysis.stats import AnalysisError, load_stats, summarize


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_load_and_summary_hand_values(tmp_path):
    d = tmp_path / "stats"
    d.mkdir()
    # layer 2, one window: 4 tokens, routed to {0,1}, {0,1}, {0,2}, {1,2}
    m = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.int64)
    np.savez(d / "layer2_seg0_moe.npz", expert_counts=m.sum(0), cooccurrence_matrix=m.T @ m, num_tokens=np.int64(4))
    np.savez(d / "layer2_seg1_moe.npz", expert_counts=m.sum(0), cooccurrence_matrix=m.T @ m)  # no num_tokens
    s = load_stats(d)
    ls = s.layers[2]
    assert ls.kind == "moe" and ls.segments == [0, 1]
    np.testing.assert_array_equal(ls.num_tokens, [4, 4])  # 2nd window: trace^2 / sum = 8^2 / 16
    summ = summarize(s)["layers"]["2"]
    assert summ["experts_per_token"] == pytest.approx(2.0)
    counts = np.array([3, 3, 2]) / 8
    assert summ["effective_experts"] == pytest.approx(np.exp(-(counts * np.log(counts)).sum()))
    assert summ["load_max_over_mean"] == pytest.approx(3 / (8 / 3))
    # pairs (0,1): 2, (0,2): 1, (1,2): 1 -> q = (.5,.25,.25)
    q = np.array([0.5, 0.25, 0.25])
    assert summ["coactivation_concentration"] == pytest.approx(1 + (q * np.log(q)).sum() / np.log(3))
    assert summ["top_cooccurring_pairs"][0][:2] == [0, 1]


def test_multi_rank_folders_are_summed(tmp_path):
    write_stats(tmp_path / "run" / "rank0", seed=1, kind="moe")
    write_stats(tmp_path / "run" / "rank1", seed=2, kind="moe")
    both = load_stats(tmp_path / "run")
    r0, r1 = load_stats(tmp_path / "run" / "rank0"), load_stats(tmp_path / "run" / "rank1")
    for layer in both.layers:
        np.testing.assert_array_equal(both.layers[layer].cooccurrence,
                                      r0.layers[layer].cooccurrence + r1.layers[layer].cooccurrence)
        np.testing.assert_array_equal(both.layers[layer].num_tokens, 2 * r0.layers[layer].num_tokens)
        assert both.layers[layer].sources == 2


def test_run_dir_config_points_to_stats(tmp_path):
    stats = write_stats(tmp_path / "elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"args": {"moe_stats_dir": str(stats)}}))
    (run / "metrics.jsonl").write_text("")
    assert sorted(load_stats(run).layers) == [2, 3]


def test_inconsistent_and_missing_inputs(tmp_path):
    with pytest.raises(AnalysisError, match="no such file"):
        load_stats(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no statistics files"):
        load_stats(tmp_path / "empty")
    d = write_stats(tmp_path / "bad", layers=(1,), windows=1, kind="moe")
    np.savez(d / "layer1_seg1_moe.npz", expert_counts=np.ones(4, np.int64), cooccurrence_matrix=np.eye(4, dtype=np.int64))
    with pytest.raises(AnalysisError, match="experts"):
        load_stats(d)


def test_cli_errors_one_line_exit_2(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpmoe analyze: error:") and "nope" in err[0]
    assert main(["stats", str(tmp_path)]) == 2  # --out missing
    assert "required" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_cli_report_with_compare(tmp_path):
    a = write_stats(tmp_path / "mope", layers=(2, 3, 4), experts=8, k=2, windows=5, kind="mope", seed=0)
    b = write_stats(tmp_path / "moe", layers=(2, 3, 4), experts=8, k=2, windows=5, kind="moe", seed=1, skew=4.0)
    out = tmp_path / "report"
    assert main(["stats", str(a), "--compare", str(b), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["MoPE (mope)", "top-k (moe)"]
    # the skewed (moe) run uses fewer experts effectively than the near-uniform one
    for layer in ("2", "3", "4"):
        eff = summary["comparison"][layer]["effective_experts"]
        assert eff[1] < eff[0]
        assert "sigma_mean_abs_offdiag_correlation" in summary["runs"][0]["layers"][layer]
        assert "sigma_mean_abs_offdiag_correlation" not in summary["runs"][1]["layers"][layer]
    for name in summary["images"]:
        w, h = png_size(out / name)
        assert w == 1200 and h >= 200, name
        assert (out / name).stat().st_size > 5000
    for name in ("sigma.png", "compare_cooccurrence.png", "load_heatmap.png", "imbalance_curves.png"):
        assert name in summary["images"]
    index = (out / "index.md").read_text()
    assert all(f"]({n})" in index for n in summary["images"])
    assert all(f'src="{n}"' in (out / "index.html").read_text() for n in summary["images"])


def test_synthetic_routing_has_k_per_token():
    m = synthetic_routing(np.random.default_rng(0), 50, 8, 3)
    assert (m.sum(1) == 3).all()


def test_import_is_light():
    """Importing the package and running the CLI's parser pulls in neither matplotlib nor megatron."""
    import subprocess
    import sys

    code = ("import sys, mpmoe.analysis, mpmoe.analysis.stats, mpmoe.analysis.cli as c; "
            "assert c.main(['stats', '/nonexistent-dir', '--out', '/tmp/x']) == 2; "
            "bad = [m for m in ('matplotlib', 'megatron', 'sklearn', 'ot', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_remoe_windows_with_variable_experts_per_token(tmp_path):
    """ReMoE files (kind remoe): a variable number of experts per token; the histogram
    feeds the summary and the experts-per-token plot, load and co-occurrence stay exact."""
    rng = np.random.default_rng(0)
    d = tmp_path / "remoe"
    d.mkdir()
    m = rng.random((300, 8)) < np.linspace(0.05, 0.6, 8)  # 0..8 experts per token
    k = m.sum(1)
    np.savez(d / "layer2_seg0_remoe.npz", expert_counts=m.sum(0), cooccurrence_matrix=m.T.astype(int) @ m,
             num_tokens=np.int64(300), experts_per_token=np.bincount(k, minlength=9))
    out = tmp_path / "report"
    assert main(["stats", str(d), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    layer = summary["runs"][0]["layers"]["2"]
    assert layer["kind"] == "remoe"
    assert layer["experts_per_token"] == pytest.approx(k.mean())
    assert layer["experts_per_token_std"] == pytest.approx(k.std())
    assert layer["experts_per_token_max"] == k.max()
    assert layer["tokens_with_no_expert_fraction"] == pytest.approx((k == 0).mean())
    assert "experts_per_token.png" in summary["images"]


def test_runs_are_named_by_routing_and_run_not_by_generic_folder(tmp_path):
    from mpmoe.analysis.stats import load_stats

    a = write_stats(tmp_path / "seed1-a" / "stats", layers=(2,), experts=4, k=2, windows=2, kind="mope", seed=0)
    b = write_stats(tmp_path / "seed1-b" / "stats", layers=(2,), experts=4, k=2, windows=2, kind="moe", seed=0)
    assert load_stats(a).name == "MoPE (seed1-a)" and load_stats(b).name == "top-k (seed1-b)"
    out = tmp_path / "report"
    assert main(["stats", str(a), "--compare", str(b), "--out", str(out), "--no-progress"]) == 0
    assert [r["name"] for r in json.loads((out / "summary.json").read_text())["runs"]] == \
        ["MoPE (seed1-a)", "top-k (seed1-b)"]


def test_window_axes_have_integer_ticks():
    from mpmoe.analysis.plotting import integer_ticks, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1, 2, 3])
    integer_ticks(ax)
    fig.canvas.draw()
    ticks = ax.get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    plt.close(fig)
