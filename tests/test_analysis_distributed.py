"""A 2-process (EP=2) run's statistics and checkpoint are analysed on one CPU process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron_testing import run_distributed
from train_testing import make_indexed_dataset, tiny_flags

from mpmoe.analysis.cli import main as analyze


def _train(rank, world_size, flags):
    import os

    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    os.environ["WORLD_SIZE"] = str(world_size)
    train(parse_args(flags))
    return None


@pytest.mark.slow
def test_ep2_run_statistics_and_checkpoint(tmp_path):
    prefix = make_indexed_dataset(tmp_path / "data")
    run = tmp_path / "run"
    model = {"num-layers": 3, "moe-layer-freq": "[0,1,1]", "num-experts": 8}
    flags = tiny_flags(prefix, run, **model, **{
        "train-iters": 4, "moe-plot-every": 2, "moe-stats-dir": str(run / "stats"), "save": str(tmp_path / "ckpt"),
        "eval-interval": 100, "no-progress": True, "expert-model-parallel-size": 2})
    run_distributed(_train, 2, flags)

    out = tmp_path / "stats-report"
    assert analyze(["stats", str(run), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    for layer in summary["layers"].values():
        # the windows hold both ranks' tokens: 2 windows x 2 steps x 4 sequences x 32 tokens
        assert layer["tokens"] == pytest.approx(2 * 2 * 4 * 32)
        assert layer["experts_per_token"] == pytest.approx(2.0)

    ck = tmp_path / "ck-report"
    argv = tiny_flags(prefix, tmp_path / "x", **model)  # loaded with EP=1 on one process
    assert analyze(["checkpoint", "--load", str(tmp_path / "ckpt"), "--out", str(ck), "--num-tokens", "64",
                    "--ot-samples", "0", "--no-progress"] + argv) == 0
    layers = json.loads((ck / "summary.json").read_text())["runs"][0]["layers"]
    assert set(layers) == {"2", "3"}
    for layer in layers.values():
        assert layer["num_experts"] == 8 and np.isfinite(layer["mean_offdiag_output_similarity"])
        assert "cka_similarity_vs_sigma" in layer
