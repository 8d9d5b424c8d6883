"""Presets as Megatron-LM flags (mpmoe.megatron_lm.flags) and the launcher that uses them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpmoe.megatron_lm.flags import expert_parallel_size, main, preset_flags
from mpmoe.train.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "scripts" / "megatron_lm" / "pretrain.sh"


def _pairs(flags):
    out, i = {}, 0
    while i < len(flags):
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            out[flags[i]] = flags[i + 1]
            i += 2
        else:
            out[flags[i]] = True
            i += 1
    return out


def test_expert_parallel_size_is_the_largest_common_divisor_up_to_the_world():
    assert expert_parallel_size(64, 8) == 8
    assert expert_parallel_size(64, 6) == 2
    assert expert_parallel_size(8, 1) == 1
    assert expert_parallel_size(6, 12) == 6


def test_flame_moe_38m_flags_carry_the_preset_shapes():
    preset = load_preset("flame-moe-38m")
    flags = _pairs(preset_flags("flame-moe-38m", "mope", train_iters=1000, world_size=8, mock_data=True))
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "moe_router_topk",
                "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "global_batch_size"):
        assert flags["--" + key.replace("_", "-")] == str(preset[key])
    assert flags["--moe-layer-freq"] == "[0,1,1,1,1,1,1,1,1]"
    assert flags["--moe-router-load-balancing-type"] == "otep"
    assert flags["--lr-wsd-decay-iters"] == "100"  # 0.1 of the run
    assert flags["--expert-model-parallel-size"] == "8"
    assert flags["--swiglu"] is True and flags["--bf16"] is True and flags["--disable-bias-linear"] is True
    assert flags["--vocab-size"] == "50304" and flags["--tokenizer-type"] == "NullTokenizer"


def test_topk_flags_are_stock_megatron_lm_flags():
    flags = preset_flags("tiny-cpu", "moe")
    assert _pairs(flags)["--moe-router-load-balancing-type"] == "aux_loss"
    assert not [f for f in flags if f.startswith("--moe-otep") or f == "--moe-sigma-update-every"]
    assert "--moe-otep-warmup-fraction" in preset_flags("tiny-cpu", "mope")


def test_cli_errors_are_one_line(capsys):
    assert main(["flame-moe-38m"]) == 2  # WSD decay is a fraction of --train-iters
    assert "give --train-iters" in capsys.readouterr().err
    assert main(["no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def _fake_python(tmp_path):
    """A PYTHON for the launcher that prints torchrun's command line instead of running it."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2" == "-m torch.distributed.run" ]]; then printf "%s\\n" "$PWD" "$@"; exit 0; fi\n'
        'if [[ "$1" == "-c" ]]; then echo 0; exit 0; fi\n'  # no GPUs
        f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


def _launch(tmp_path, *args):
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), PATH="/usr/bin:/bin")
    return subprocess.run(["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_launcher_runs_patched_pretrain_gpt_with_the_preset(tmp_path):
    tree = tmp_path / "Megatron-LM"
    tree.mkdir()
    (tree / "pretrain_gpt.py").write_text("from mpmoe import megatron_lm as mpmoe_megatron_lm\n")
    proc = _launch(tmp_path, "flame-moe-38m", "mope", str(tree), "--train-iters", "20", "--lr", "1e-3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(tree)  # runs in the checkout
    argv = lines[lines.index("pretrain_gpt.py") + 1:]
    flags = _pairs(argv)
    assert flags["--moe-router-load-balancing-type"] == "otep"
    assert flags["--num-experts"] == "64" and flags["--train-iters"] == "20"
    assert flags["--mock-data"] is True  # no --data-path given
    assert flags["--expert-model-parallel-size"] == "1" and flags["--distributed-backend"] == "gloo"
    assert argv[-2:] == ["--lr", "1e-3"]  # the user's flags come last and win


@pytest.mark.parametrize("args, message", [
    (["flame-moe-38m", "sinkhorn", "."], "unknown router"),
    (["flame-moe-38m", "mope", "/nonexistent"], "pretrain_gpt.py not found"),
])
def test_launcher_errors(tmp_path, args, message):
    proc = _launch(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_launcher_refuses_an_unpatched_checkout(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("# stock\n")
    proc = _launch(tmp_path, "tiny-cpu", "mope", str(tmp_path))
    assert proc.returncode == 2 and "not patched" in proc.stderr


# ---------------------------------------------------------------- one preset, one model and optimizer
#: mpmoe train option -> Megatron-LM's dest for the same flag
RENAMED = {"norm_epsilon": "layernorm_epsilon"}

#: options allowed to differ between `mpmoe train --preset P` and Megatron-LM parsing
#: `python -m mpmoe.megatron_lm.flags P`, and why
ALLOWED_TO_DIFFER = {
    "router": "mpmoe's router selector; Megatron-LM gets the router's marks, compared below",
    "lr_wsd_decay_fraction": "mpmoe-only; emitted as --lr-wsd-decay-iters, compared below",
    "lr_wsd_decay_iters": "compared against the length mpmoe train computes (schedule_lengths)",
    "last_trainable_layers": "mpmoe's trainer only (freezing needs its model builder); None in every preset",
    "recompute_modules": "used only with --recompute-granularity selective, which no preset sets",
    "num_query_groups": "None (mpmoe: attention heads = groups) is Megatron-LM's 1 without "
                        "--group-query-attention; compared below",
}


def _megatron_lm_parser():
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from mpmoe.megatron_lm.args import add_mpmoe_args

    parser = add_mpmoe_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    for action in parser._actions:  # what patch 0001 does to Megatron-LM's parser
        if action.dest == "moe_router_load_balancing_type":
            action.choices = [*action.choices, "otep"]
    return parser


def _one(value):
    """Megatron-LM takes a list for the balancing type and its coefficient (one per type)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("megatron.training") is None,
                    reason="needs megatron.training (Python 3.12 + megatron-core 0.19)")
def test_every_preset_resolves_to_the_same_hyperparameters_in_both_launchers():
    from mpmoe.megatron import routers
    from mpmoe.megatron_lm.flags import HYPERPARAMETER_GROUPS
    from mpmoe.train.args import build_parser, fill_defaults, parse_args
    from mpmoe.train.optim import schedule_lengths
    from mpmoe.train.presets import list_presets

    megatron = _megatron_lm_parser()
    groups = [g for g in build_parser()._action_groups if g.title in HYPERPARAMETER_GROUPS]
    keys = [a.dest for g in groups for a in g._group_actions]
    assert {"weight_decay", "adam_beta2", "lr", "global_batch_size", "num_layers", "moe_router_topk",
            "moe_otep_warmup_fraction"} <= set(keys)
    for preset in list_presets():
        for router in (None, *routers.KINDS):
            flags = preset_flags(preset, router, train_iters=1000, mock_data=True)
            mine = parse_args(["--preset", preset, "--train-iters", "1000",
                               *(["--router", router] if router else [])], check=False)
            fill_defaults(mine)
            theirs = vars(megatron.parse_args(flags))
            where = f"{preset} --router {router}"
            differ = {key: (getattr(mine, key), _one(theirs[RENAMED.get(key, key)])) for key in keys
                      if key not in ALLOWED_TO_DIFFER and _one(theirs[RENAMED.get(key, key)]) != getattr(mine, key)}
            assert not differ, f"{where}: mpmoe train vs Megatron-LM: {differ}"
            assert theirs["group_query_attention"] == (mine.num_query_groups is not None), where
            if mine.num_query_groups is not None:
                assert theirs["num_query_groups"] == mine.num_query_groups, where
            assert theirs["lr_wsd_decay_iters"] == schedule_lengths(mine)["wsd_decay"] or mine.lr_decay_style != "WSD"
            assert routers.kind_of({**theirs, "moe_router_load_balancing_type":
                                    _one(theirs["moe_router_load_balancing_type"])}) == mine.router, where
            assert theirs["vocab_size"] == mine.vocab_size and theirs["add_bias_linear"] is False
