"""Presets construct with the published FLAME-MoE shapes; config errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpmoe.run.args import ConfigError, model_config_kwargs, parse_args
from mpmoe.run.presets import list_presets, load_preset

# FLAME-MoE model cards: (active, total) parameters and layers.
CARDS = {
    "flame-moe-38m": (38e6, 100e6, 9),
    "flame-moe-98m": (98e6, 349e6, 9),
    "flame-moe-115m": (115e6, 459e6, 12),
    "flame-moe-290m": (290e6, 1.3e9, 9),
    "flame-moe-419m": (419e6, 2.2e9, 15),
    "flame-moe-721m": (721e6, 3.8e9, 12),
    "flame-moe-1.7b": (1.7e9, 10.3e9, 18),
}


def test_all_presets_present():
    assert set(CARDS) | {"tiny-cpu"} <= set(list_presets())


@pytest.mark.parametrize("name", sorted(CARDS))
def test_flame_preset_shape(name):
    p = load_preset(name)
    active, total, layers = CARDS[name]
    assert p["num_layers"] == layers
    assert p["num_experts"] == 64 and p["moe_router_topk"] == 6
    # 2 shared experts of the routed experts' size, dense first layer, seq 2048, WSD 3e-4 -> 3e-5
    assert p["moe_shared_expert_intermediate_size"] == 2 * p["moe_ffn_hidden_size"]
    assert p["moe_layer_freq"] == [0] + [1] * (layers - 1)
    assert p["seq_length"] == 2048 and p["global_batch_size"] == 1024
    assert (p["lr"], p["min_lr"], p["lr_decay_style"]) == (3e-4, 3e-5, "WSD")


# The MP-MoE authors' scripts: (layers, hidden, train iterations); counts as flame-moe-*'s
# with top-8 routed experts instead of 6.
PAPER = {"mp-moe-38m": (9, 256, 2121), "mp-moe-98m": (9, 512, 2424), "mp-moe-290m": (9, 1024, 5473),
         "mp-moe-419m": (15, 1024, 5685)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_shape(name):
    p = load_preset(name)
    layers, hidden, iters = PAPER[name]
    assert (p["num_layers"], p["hidden_size"], p["train_iters"]) == (layers, hidden, iters)
    assert p["num_experts"] == 64 and p["moe_router_topk"] == 8 and p["moe_router_pre_softmax"]
    assert p["moe_shared_expert_intermediate_size"] == 2 * p["moe_ffn_hidden_size"]
    assert p["global_batch_size"] == 960 and p["lr_wsd_decay_fraction"] == 0.1
    assert p["moe_router_load_balancing_type"] == "otep" and p["num_attention_heads"] == 16
    flame = load_preset(name.replace("mp-moe", "flame-moe"))
    for key in ("ffn_hidden_size", "moe_ffn_hidden_size", "moe_layer_freq", "seq_length", "lr", "min_lr"):
        assert p[key] == flame[key], key


def test_paper_preset_builds():
    counts, model = _build_on_meta(["--preset", "mp-moe-38m", "--train-iters", "1", "--no-bf16",
                                    "--global-batch-size", "4", "--micro-batch-size", "4"])
    assert model.config.moe_router_pre_softmax and model.config.moe_router_topk == 8
    assert model.config.layernorm_epsilon == 1e-6
    # 2 more routed experts of 3 x 256 x 176 (SwiGLU) in each of the 8 MoE layers than flame-moe-38m
    assert abs(counts["active"] - 38.0e6 - 8 * 2 * 3 * 256 * 176) < 0.5e6, counts


def _build_on_meta(argv):
    """Build the preset's GPTModel on the meta device (no memory) and count its parameters."""
    from mpmoe.megatron import build_gpt_model, destroy_distributed, init_distributed
    from mpmoe.megatron.config import MoPEConfig
    from mpmoe.run.model import count_parameters

    args = parse_args(argv)
    init_distributed(seed=1)
    try:
        kw = model_config_kwargs(args)
        kw.update(perform_initialization=False, params_dtype=torch.float32, bf16=False,
                  pipeline_dtype=torch.float32)
        config = MoPEConfig(**kw)
        with torch.device("meta"):
            model = build_gpt_model(config, vocab_size=args.vocab_size,
                                    max_sequence_length=args.max_position_embeddings,
                                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
        return count_parameters(model), model
    finally:
        destroy_distributed()


@pytest.mark.parametrize("router", ["aux_loss", "otep"])
@pytest.mark.parametrize("name", sorted(CARDS))
def test_flame_preset_parameter_counts(name, router):
    """Every preset builds as MoE and as MoPE; counts within 5% of the model card."""
    active, total, layers = CARDS[name]
    counts, model = _build_on_meta(["--preset", name, "--train-iters", "1", "--no-bf16",
                                    "--global-batch-size", "4", "--micro-batch-size", "4",
                                    "--moe-router-load-balancing-type", router])
    assert len(model.decoder.layers) == layers
    assert abs(counts["active"] / active - 1) < 0.05, counts
    assert abs(counts["total"] / total - 1) < 0.05, counts


def test_tiny_cpu_preset_is_mope():
    counts, model = _build_on_meta(["--preset", "tiny-cpu"])
    from mpmoe.megatron.router import MoPERouter, iter_routers

    routers = list(iter_routers(model))
    assert len(routers) == 3 and all(isinstance(r, MoPERouter) for r in routers)
    assert counts["active"] < counts["total"]


@pytest.mark.parametrize("argv, message", [
    (["--moe-router-topk", "9"], "--moe-router-topk 9 must be between 1 and --num-experts 8"),
    (["--expert-model-parallel-size", "3"], "--num-experts 8 is not divisible by --expert-model-parallel-size 3"),
    (["--data-path", "/nonexistent/prefix", "--vocab-size", "100"], "/nonexistent/prefix.bin/.idx not found"),
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["--load", "/nonexistent/ckpt"], "--load: /nonexistent/ckpt is not a directory"),
])
def test_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def test_micro_batch_is_lowered_to_fit_the_global_batch(capsys):
    from mpmoe.run.args import validate

    args = parse_args(["--global-batch-size", "10", "--micro-batch-size", "4"])
    assert args.micro_batch_size == 2
    assert capsys.readouterr().err.splitlines() == [
        "mpmoe train: --micro-batch-size 4 -> 2: --global-batch-size 10 is not divisible by "
        "4 x data-parallel size 1"]
    # torchrun --nproc-per-node 2 -m mpmoe train: tiny-cpu's 8 x 2 does not divide 8
    args = parse_args([], check=False)
    validate(args, world_size=2)
    assert (args.global_batch_size, args.micro_batch_size) == (8, 4)
    args = parse_args(["--global-batch-size", "9"], check=False)
    with pytest.raises(ConfigError, match="--global-batch-size 9 is not divisible by the data-parallel size 2"):
        validate(args, world_size=2)


def test_cli_error_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mpmoe.train.cli", "--moe-router-topk", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mpmoe train: error: --moe-router-topk 20 must be between 1 and --num-experts 8"]


def test_layer_freq_megatron_syntax():
    args = parse_args(["--preset", "flame-moe-38m", "--no-bf16", "--train-iters", "1", "--global-batch-size", "4",
                       "--micro-batch-size", "4", "--moe-layer-freq", "([0]*1+[1]*8)"])
    assert args.moe_layer_freq == [0] + [1] * 8


# The MP-MoE authors' optimizer and schedule (github.com/kxlkxl1999/MP-MoE, commit d2195b7).
# flame-moe/configs/train/flame-moe.sh passes --lr 3e-4 --min-lr 3e-5 --lr-decay-style WSD
# --lr-warmup-fraction 0.01 --lr-wsd-decay-iters $((TRAIN_ITERS / 10)); everything else is the
# default of their fork's megatron-lm/megatron/training/arguments.py: --weight-decay 0.01,
# --adam-beta1 0.9, --adam-beta2 0.999, --adam-eps 1e-08, --clip-grad 1.0,
# --lr-wsd-decay-style exponential, --eval-iters 100; flame-moe/scripts/training/
# flame-mope_local.sh passes --split 90,5,5. TRAIN_ITERS: flame-moe/scripts/release/*.sh.
AUTHORS = {"lr": 3e-4, "min_lr": 3e-5, "lr_decay_style": "WSD", "lr_wsd_decay_style": "exponential",
           "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "clip_grad": 1.0,
           "split": "90,5,5", "eval_iters": 100, "global_batch_size": 960}


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("iters", [None, 1000, 3001])
def test_paper_presets_resolve_to_the_authors_optimizer_in_both_launchers(name, iters):
    from mpmoe.megatron_lm.flags import preset_flags
    from mpmoe.run.args import parse_args
    from mpmoe.run.args import schedule_lengths

    train_iters = iters or PAPER[name][2]
    argv = ["--preset", name] + ([] if iters is None else ["--train-iters", str(iters)])
    args = parse_args(argv, check=False)
    for key, value in AUTHORS.items():
        assert getattr(args, key) == value, key
    n = schedule_lengths(args)
    assert n["wsd_decay"] == train_iters // 10  # the authors' $((TRAIN_ITERS / 10))
    assert n["warmup"] == pytest.approx(0.01 * train_iters)  # Megatron-LM: fraction x steps, unrounded
    flags = preset_flags(name, train_iters=iters)
    pairs = dict(zip(flags, flags[1:]))
    for key, value in AUTHORS.items():
        assert pairs["--" + key.replace("_", "-")] == str(value), key
    assert pairs["--lr-wsd-decay-iters"] == str(train_iters // 10)
    assert pairs["--train-iters"] == str(train_iters)


def test_fraction_of_iters_rounds_down_like_the_launchers():
    from mpmoe.run.presets import fraction_of_iters

    for n in range(1, 20000, 7):
        assert fraction_of_iters(0.1, n) == max(1, n // 10)


def test_router_constants_stay_on_cpu_when_first_imported_under_meta():
    """Importing the router inside a meta-device block must not leave meta constants behind
    (a meta -inf made every later CPU run in the process fail)."""
    import importlib
    import sys

    saved = sys.modules.pop("mpmoe.megatron.router")
    try:
        with torch.device("meta"):
            fresh = importlib.import_module("mpmoe.megatron.router")
        assert fresh._NEG_INF.device.type == "cpu"
    finally:
        sys.modules["mpmoe.megatron.router"] = saved
        sys.modules["mpmoe.megatron"].router = saved  # the import rebound the package attribute
