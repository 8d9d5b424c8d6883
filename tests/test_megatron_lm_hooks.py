"""mpmoe.megatron_lm's hooks and spec function, on both megatron-core stacks (no
megatron.training needed): what the patched Megatron-LM calls, called directly."""

import argparse
from types import SimpleNamespace

import pytest
import torch

from megatron_testing import tiny_config
from mpmoe.megatron import MoPEConfig, build_gpt_model, destroy_distributed, init_distributed
from mpmoe.megatron.compat import moe_submodules
from mpmoe.megatron.router import MoPERouter, TopKStatsRouter, iter_routers
from mpmoe.megatron_lm import add_mpmoe_args, hooks, uses_mpmoe
from mpmoe.megatron_lm.spec import gpt_block_spec


@pytest.fixture(scope="module", autouse=True)
def single_process():
    init_distributed(seed=1234)
    yield
    destroy_distributed()


def _args(*argv, lbt="aux_loss", num_experts=8):
    args = add_mpmoe_args(argparse.ArgumentParser()).parse_args(list(argv))
    args.moe_router_load_balancing_type, args.num_experts = lbt, num_experts
    return args


def test_only_runs_using_mpmoe_routers_get_mpmoe_config():
    assert hooks.transformer_config_class(_args(lbt="otep")) is MoPEConfig
    assert hooks.transformer_config_class(_args("--moe-stats-dir", "s")) is MoPEConfig
    assert hooks.transformer_config_class(_args()) is None  # megatron's own choice
    assert hooks.transformer_config_class(_args(lbt="otep", num_experts=None)) is None
    # another Megatron-LM script of a patched tree: its parser has no mpmoe flags
    assert not uses_mpmoe(argparse.Namespace(num_experts=8, moe_router_load_balancing_type="aux_loss"))
    assert hooks.moe_track_names(_args(lbt="otep")) == ["load_balancing_loss"]
    assert hooks.moe_track_names(_args()) == []


def test_spec_function_takes_megatron_lms_model_config():
    config = tiny_config(MoPEConfig, moe_router_load_balancing_type="otep", moe_layer_freq=[0, 1])
    config.transformer_impl = "local"
    spec = gpt_block_spec(SimpleNamespace(transformer=config), vp_stage=None)
    moe = [moe_submodules(s.submodules.mlp) for s in spec.layer_specs]
    routers = [m.router if m is not None else None for m in moe]
    assert routers == [None, MoPERouter]


def test_hooks_drive_mope_routers_and_leave_other_models_alone(tmp_path):
    config = tiny_config(MoPEConfig, moe_router_load_balancing_type="otep",
                         moe_stats_dir=str(tmp_path), moe_plot_every=2)
    model = build_gpt_model(config, vocab_size=128, max_sequence_length=16)
    chunks = [model]
    hooks.before_train_step(chunks, 3, 100)
    assert {(r._step, r._total_steps) for r in iter_routers(chunks)} == {(3, 100)}
    tokens = torch.randint(0, 128, (2, 16))
    model(tokens, torch.arange(16).expand_as(tokens), None, labels=tokens).mean().backward()
    hooks.after_train_step(chunks, 1)
    assert not list(tmp_path.iterdir())  # window not over
    hooks.before_save_checkpoint(chunks)
    hooks.after_train_step(chunks, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer1_seg0_mope.npz", "layer2_seg0_mope.npz"]

    plain = [torch.nn.Linear(2, 2)]  # no mpmoe routers: every hook is a no-op
    hooks.before_train_step(plain, 0, 10)
    hooks.after_train_step(plain, 1)
    hooks.before_evaluate(plain)
    assert not any(isinstance(m, TopKStatsRouter) for m in plain[0].modules())


def test_every_entry_point_building_an_otep_model_gets_mpmoes_spec_or_stops(capsys):
    """core_transformer_config_from_args (text generation, converters, --use-checkpoint-args)
    asks transformer_config_class: mpmoe's --spec when none is given, a foreign one refused."""
    from mpmoe.megatron_lm.args import SPEC

    args = _args(lbt="otep")
    args.spec = None
    assert hooks.transformer_config_class(args) is MoPEConfig and args.spec == SPEC
    args.spec = ["mpmoe.megatron_lm.spec", "gpt_block_spec"]
    assert hooks.transformer_config_class(args) is MoPEConfig
    args.spec = ["megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"]
    with pytest.raises(SystemExit) as exc:
        hooks.transformer_config_class(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "builds megatron's routers, not mpmoe's" in err[0]
    topk = _args()
    topk.spec = None
    assert hooks.transformer_config_class(topk) is None and topk.spec is None  # untouched


def test_hooks_module_imports_nothing_heavy():
    """megatron/training/training.py imports it for every script of the patched tree."""
    import subprocess
    import sys

    code = ("import sys; import mpmoe.megatron_lm.hooks; "
            "print(sorted(m for m in ('torch', 'megatron', 'mpmoe.megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_routing_metrics_per_layer(tmp_path):
    config = tiny_config(MoPEConfig, moe_router_load_balancing_type="otep", moe_layer_freq=[0, 1])
    model = build_gpt_model(config, vocab_size=128, max_sequence_length=16)
    chunks = [model]
    hooks.before_train_step(chunks, 0, 100)  # warm-up: top-k
    tokens = torch.randint(0, 128, (2, 16))
    model(tokens, torch.arange(16).expand_as(tokens), None, labels=tokens).mean().backward()
    m = hooks.routing_metrics(chunks)
    k = config.moe_router_topk
    assert m["moe/experts_per_token/layer_2"] == pytest.approx(k)  # exactly k per token
    assert m["mope/otep/layer_2"] == 0.0  # still in the warm-up
    assert m["moe/load_max_over_mean/layer_2"] >= 1.0
    assert {"mope/sigma_offdiag_abs_mean/layer_2", "mope/sigma_max_corr/layer_2"} <= set(m)
    assert hooks.routing_metrics(chunks)["moe/load_min/layer_2"] == 0.0  # window reset: no tokens
