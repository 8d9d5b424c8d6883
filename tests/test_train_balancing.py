"""ReMoE and expert-bias balancing through ``mpmoe train``: 2 processes (gloo, EP=2), the
update rules checked step by step against the routing statistics, and SIGKILL + --load."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_testing import run_distributed
from test_train_loop import kill_and_resume
from train_testing import make_indexed_dataset, read_metrics, tiny_flags

E = 4
ITERS = 5
LAYERS = (2, 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_indexed_dataset(tmp_path_factory.mktemp("data"))


def _train_recording(rank, world_size, flags):
    """Train; after every optimizer step record each router's coefficient and bias."""
    import os

    from mpmoe.megatron import remoe as balancing
    from mpmoe.megatron.router import iter_routers
    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    os.environ["WORLD_SIZE"] = str(world_size)
    records, update = [], balancing.update_balancing_state

    def recording_update(models):
        update(models)
        records.append({r.layer_number: {
            "coeff": float(r.relu_l1_coeff) if hasattr(r, "relu_l1_coeff") else None,
            "bias": None if r.expert_bias is None else r.expert_bias.tolist()} for r in iter_routers(models)})

    balancing.update_balancing_state = recording_update
    try:
        train(parse_args(flags))
    finally:
        balancing.update_balancing_state = update
    return records


def _flags(dataset, tmp_path, name, **extra):
    return tiny_flags(dataset, tmp_path / name, **{
        "num-layers": 3, "moe-layer-freq": "[0,1,1]", "train-iters": ITERS, "eval-interval": 3,
        "no-progress": True, "moe-stats-dir": str(tmp_path / name / "stats"), "moe-plot-every": 1,
        "moe-router-load-balancing-type": "none", "expert-model-parallel-size": 2, **extra})


def _window(tmp_path, name, layer, step, kind):
    with np.load(tmp_path / name / "stats" / f"layer{layer}_seg{step}_{kind}.npz") as f:
        return {k: f[k] for k in f.files}


def test_remoe_coefficient_rule_on_two_processes_ep2(tmp_path, dataset):
    records = run_distributed(_train_recording, 2, _flags(
        dataset, tmp_path, "remoe", **{"moe-relu-routing": True, "moe-relu-l1-reg-coeff-init": 1e-3,
                                       "moe-relu-l1-reg-coeff-multiplier": 1.5}))
    assert records[0] == records[1]  # every rank holds the same coefficients
    coeff = 1e-3
    for step, rec in enumerate(records[0]):
        windows = [_window(tmp_path, "remoe", layer, step, "remoe") for layer in LAYERS]
        # sparsity of the step from the rank-summed statistics (both ranks' tokens)
        sparsity = np.mean([1 - w["expert_counts"].sum() / (w["num_tokens"] * E) for w in windows])
        assert all(w["num_tokens"] == 4 * 32 for w in windows)
        assert all(w["experts_per_token"].sum() == w["num_tokens"] for w in windows)
        coeff = coeff * 1.5 if sparsity < 0.5 else coeff / 1.5
        for layer in LAYERS:
            assert rec[layer]["coeff"] == pytest.approx(coeff, rel=1e-12), (step, sparsity)
    metrics = read_metrics(tmp_path / "remoe")
    assert metrics[-1]["remoe/l1_coeff/layer_2"] == pytest.approx(coeff, rel=1e-12)
    assert {"remoe/sparsity/layer_3", "remoe/experts_per_token/layer_3", "remoe/l1_loss/layer_3"} <= set(metrics[-1])
    assert metrics[-1]["remoe/l1_loss/layer_3"] > 0


@pytest.mark.parametrize("routing", ["aux_loss", "otep"])
def test_expert_bias_rule_on_two_processes_ep2(tmp_path, dataset, routing):
    """Softmax top-k and MoPE: bias_t = bias_(t-1) + u * sign(mean(n_t) - n_t), n_t = the
    step's tokens per expert over both ranks (the statistics window of that step)."""
    u = 0.01
    records = run_distributed(_train_recording, 2, _flags(
        dataset, tmp_path, routing, **{"moe-router-enable-expert-bias": True,
                                       "moe-router-bias-update-rate": u,
                                       "moe-router-load-balancing-type": routing,
                                       # a MoPE setting: an error on top-k (docs/routing.md)
                                       **({"moe-otep-warmup-fraction": 0.2} if routing == "otep" else {})}))
    assert records[0] == records[1]
    kind = "mope" if routing == "otep" else "moe"
    bias = {layer: np.zeros(E) for layer in LAYERS}
    for step, rec in enumerate(records[0]):
        for layer in LAYERS:
            n = _window(tmp_path, routing, layer, step, kind)["expert_counts"].astype(np.float64)
            bias[layer] = bias[layer] + u * np.sign(n.mean() - n)
            np.testing.assert_allclose(rec[layer]["bias"], bias[layer], atol=1e-6, err_msg=f"step {step}")
    assert any(np.abs(b).max() > 0 for b in bias.values())


@pytest.mark.parametrize("method", ["remoe", "mope-bias"])
def test_kill_and_resume_keeps_the_balancing_state(tmp_path, dataset, method):
    """SIGKILL after the first checkpoint; --load continues the same losses and the same
    coefficient / bias trajectory as the uninterrupted run."""
    extra = ({"moe-relu-routing": True, "moe-router-load-balancing-type": "none",
              "moe-relu-l1-reg-coeff-init": 1e-3, "moe-relu-l1-reg-coeff-multiplier": 1.5}
             if method == "remoe" else
             {"moe-router-enable-expert-bias": True, "moe-router-bias-update-rate": 0.01})
    common = {"train-iters": 16, "save-interval": 4, "eval-interval": 8, "no-progress": True, **extra}
    ref, got, start = kill_and_resume(tmp_path, dataset, common)
    assert min(got) == start + 1 and max(got) == 16
    key = "remoe/l1_coeff/layer_2" if method == "remoe" else "moe/expert_bias_absmax/layer_2"
    for it, m in got.items():
        assert abs(m["loss"] - ref[it]["loss"]) <= 1e-6, (it, m["loss"], ref[it]["loss"])
        assert m[key] == ref[it][key], (it, key)
    assert len({ref[i][key] for i in ref}) > (3 if method == "remoe" else 1)  # the state moves


def test_remoe_checkpoint_evaluates_with_relu_routing(tmp_path, embedded_cache):
    """`mpmoe eval` rebuilds a ReMoE model from its checkpoint and routes with ReLU gates."""
    import json

    from eval_testing import train_checkpoint
    from mpmoe.eval.cli import main

    save = train_checkpoint(tmp_path / "ck", embedded_cache, iters=2, extra=(
        "--moe-relu-routing", "--moe-router-load-balancing-type", "none"))
    out, dump = tmp_path / "eval", tmp_path / "dump"
    assert main(["--load", str(save), "--tasks", "mpmoe_docs_lastword", "--limit", "4", "--output-path",
                 str(out), "--routing-dump-dir", str(dump), "--no-progress", "--bootstrap-iters", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mpmoe"]["routing"] == "remoe"
    experts = np.load(sorted(dump.glob("layer2_rank0_fwd*.npz"))[0])["experts"]
    assert experts.shape[1] == 8 and len(set((experts >= 0).sum(axis=1).tolist())) > 1  # variable k
    assert main(["--load", str(save), "--tasks", "mpmoe_docs_lastword", "--routing", "topk",
                 "--output-path", str(tmp_path / "e2")]) == 2


@pytest.mark.parametrize("flags, match", [
    (["--moe-relu-routing", "--moe-router-load-balancing-type", "otep"], "exclude each other"),
    (["--moe-relu-routing", "--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias"],
     "does not apply"),
    (["--moe-relu-routing", "--moe-router-load-balancing-type", "none", "--moe-relu-l1-reg-coeff-init", "0"],
     "must be > 0"),
    (["--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "-1"], "must be >= 0"),
    (["--moe-router-score-function", "sigmoid"], "--moe-router-score-function does not apply: .* router is MoPE"),
])
def test_flag_errors_are_one_line(flags, match):
    from mpmoe.run.args import ConfigError, parse_args

    with pytest.raises(ConfigError, match=match):
        parse_args(flags)
