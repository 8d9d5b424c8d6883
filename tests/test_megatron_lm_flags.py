"""Presets as Megatron-LM flags (mpmoe.megatron_lm.flags) and the launcher that uses them."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpmoe.megatron_lm.flags import expert_parallel_size, main, preset_flags
from mpmoe.run.presets import load_preset

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


@pytest.mark.parametrize("argv, message", [
    (["--train-iters"], "--train-iters needs a value"),
    (["--train-iters", "--log-interval", "1"], "--train-iters needs a value"),
    (["--lr", "1e-3", "--micro-batch-size"], "--micro-batch-size needs a value"),
    (["--expert-model-parallel-size"], "--expert-model-parallel-size needs a value"),
    (["--data-path"], "--data-path needs a value"),
    (["--moe-sigma-shrinkage"], "--moe-sigma-shrinkage needs a value"),  # a setting the patch set adds
    (["--train-iters", "abc"], "--train-iters 'abc' is not an integer"),
    (["--train-iters="], "--train-iters '' is not an integer"),
    (["--num-experts", "x"], "--num-experts 'x' is not an integer"),
])
def test_plan_refuses_a_valued_flag_without_its_value(argv, message):
    """A bare flag would reach megatron's parser (its whole usage text, once per rank)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        plan("tiny-cpu", "mope", argv, {}, 0)


def test_plan_accepts_flags_without_values_and_negative_numbers():
    args = plan("tiny-cpu", "mope", ["--recompute-modules", "--mock-data", "--lr-warmup-init", "-1",
                                     "--use-flash-attn"], {}, 0).args
    assert args[-5:] == ["--recompute-modules", "--mock-data", "--lr-warmup-init", "-1", "--use-flash-attn"]


@pytest.mark.parametrize("script, args", [
    (LAUNCHER, ["tiny-cpu", "mope", "TREE", "--lr", "1e-3", "--train-iters"]),
    (ROOT / "scripts" / "train.sh", ["tiny-cpu", "--lr", "1e-3", "--train-iters"]),
])
def test_scripts_refuse_a_valued_flag_without_its_value_in_one_line(tmp_path, script, args):
    tree = tmp_path / "Megatron-LM"
    tree.mkdir()
    (tree / "pretrain_gpt.py").write_text("from mpmoe import megatron_lm as mpmoe_megatron_lm\n")
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)), PATH="/usr/bin:/bin")
    proc = subprocess.run(["bash", str(script), *[str(tree) if a == "TREE" else a for a in args]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"{script.name}: error: --train-iters needs a value\n"
    env["PYTHON"] = str(tmp_path / "no-such-python")
    proc = subprocess.run(["bash", str(script), *[str(tree) if a == "TREE" else a for a in args]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"{script.name}: error: PYTHON ")
    assert len(proc.stderr.splitlines()) == 1


def test_launcher_refuses_an_unpatched_checkout(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("# stock\n")
    proc = _launch(tmp_path, "tiny-cpu", "mope", str(tmp_path))
    assert proc.returncode == 2 and "not patched" in proc.stderr


# --------------------------------------------------------------------------- the launch plan
from mpmoe.layout import expert_parallel_size as ep_size, fit_micro_batch, visible_gpus  # noqa: E402
from mpmoe.megatron_lm.args import run_checks  # noqa: E402
from mpmoe.megatron_lm.launch import main as launch_main, plan  # noqa: E402


@pytest.mark.parametrize("value, expected", [
    (None, 8), ("", 0), ("-1", 0), ("0,1", 2), ("3,1,0", 3), ("0,1,-1,2", 2), ("0,0", 0),
    ("1,9,2", 1),  # ordinal 9 does not exist on an 8-GPU node: the list stops there
    ("3gpu,4", 2), ("GPU-aa,GPU-bb", 2), ("MIG-a,MIG-a", 0), ("x", 0),
])
def test_visible_gpus_counts_as_torch_does(value, expected):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_gpus(env, 8) == expected


def test_expert_parallel_size_leaves_room_for_model_parallelism():
    assert ep_size(64, 8, tp=2) == 4  # was 8: EP 8 x ETP 2 = 16 ranks > 8
    assert ep_size(64, 8, tp=2, etp=1) == 4  # within the data-parallel size
    assert ep_size(64, 16, pp=2) == 8 and ep_size(64, 16, cp=4) == 4
    assert ep_size(8, 6, cp=3) == 2
    for ep, kw in ((ep_size(64, 8, tp=2), {"tp": 2}), (ep_size(64, 16, pp=2), {"pp": 2})):
        etp, pp = kw.get("tp", 1), kw.get("pp", 1)
        assert (8 if "tp" in kw else 16) % (ep * etp * pp) == 0
    with pytest.raises(ValueError, match="not divisible by TP x PP x CP = 4 x 1 x 1"):
        ep_size(8, 6, tp=4)


def test_fit_micro_batch_lowers_to_the_largest_that_divides():
    assert fit_micro_batch(960, 16, 8) == (15, "--micro-batch-size 16 -> 15: --global-batch-size 960 "
                                                "is not divisible by 16 x data-parallel size 8")
    assert fit_micro_batch(960, 16, 4)[0] == 16 and fit_micro_batch(960, 16, 4)[1] is None
    assert fit_micro_batch(8, 8, 2)[0] == 4
    for gbs, mbs, dp in ((960, 16, 16), (100, 7, 5), (8, 8, 8)):
        m, _ = fit_micro_batch(gbs, mbs, dp)
        assert gbs % (m * dp) == 0 and all(gbs % (k * dp) for k in range(m + 1, mbs + 1))
    with pytest.raises(ValueError, match="--global-batch-size 9 is not divisible by the data-parallel size 2"):
        fit_micro_batch(9, 4, 2)


def test_plan_mp_moe_38m_on_8_and_16_gpus_lowers_the_micro_batch():
    for world in (8, 16):
        p = plan("mp-moe-38m", "mope", ["--train-iters", "100"], {}, world)
        flags = _pairs(p.args)
        assert (p.nproc, p.gpus) == (world, world)
        assert flags["--micro-batch-size"] == "15" and flags["--global-batch-size"] == "960"
        assert p.notes == [f"--micro-batch-size 16 -> 15: --global-batch-size 960 is not divisible by "
                           f"16 x data-parallel size {world}"]
        assert "--distributed-backend" not in flags


def test_plan_honours_cuda_visible_devices_tp_and_the_users_flags():
    p = plan("tiny-cpu", "mope", ["--tensor-model-parallel-size", "2", "--micro-batch-size", "3"],
             {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}, 8)
    flags = _pairs(p.args)
    assert (p.nproc, p.gpus) == (4, 4)
    assert flags["--expert-model-parallel-size"] == "2"  # dp = 4 / TP 2
    assert flags["--micro-batch-size"] == "2"  # the user's 3 x dp 2 does not divide 8
    assert p.args.count("--micro-batch-size") == 2  # the preset's, then the fitted one last
    assert p.args[-2:] == ["--micro-batch-size", "2"]
    cpu = plan("tiny-cpu", "moe", [], {"NPROC_PER_NODE": "2"}, 0)
    assert cpu.nproc == 2 and _pairs(cpu.args)["--distributed-backend"] == "gloo"
    assert _pairs(cpu.args)["--micro-batch-size"] == "4"


@pytest.mark.parametrize("data", [["--data-path", "d"], ["--train-data-path", "t", "--valid-data-path", "v"],
                                  ["--mock-data"], ["--per-split-data-args-path=x.json"]])
def test_plan_adds_mock_data_only_without_a_data_source(data):
    p = plan("tiny-cpu", "mope", data, {}, 0)
    assert p.args.count("--mock-data") == data.count("--mock-data")
    assert "NullTokenizer" not in p.args
    assert "--mock-data" in plan("tiny-cpu", "mope", [], {}, 0).args


def test_launch_cli_prints_the_plan_and_one_line_errors(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launch_main(["tiny-cpu", "mope", "--physical-gpus", "8", "--", "--lr", "1e-3"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[:2] == ["2", "2"] and lines[-4:] == ["--lr", "1e-3", "--micro-batch-size", "4"]
    assert out.err.splitlines() == ["pretrain.sh: --micro-batch-size 8 -> 4: --global-batch-size 8 is not "
                                    "divisible by 8 x data-parallel size 2"]
    assert launch_main(["tiny-cpu", "mope", "--physical-gpus", "8", "--",
                        "--tensor-model-parallel-size", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pretrain.sh: error: world size 2 is not divisible by TP x PP x CP = 3 x 1 x 1")


def _ns(**kw):
    base = dict(cuda_graph_impl="none", cuda_graph_modules=[], rerun_mode="validate_results")
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("impl, modules", [("local", []), ("transformer_engine", ["moe_router"]),
                                           ("local", ["attn", "moe"]), ("full_iteration", []),
                                           ("transformer_engine", ["moe_preprocess", "moe_router"])])
def test_cuda_graphs_that_capture_the_router_are_refused(impl, modules):
    with pytest.raises(ValueError, match=f"--cuda-graph-impl {impl} .*captures the router"):
        run_checks(_ns(cuda_graph_impl=impl, cuda_graph_modules=modules))


def test_cuda_graphs_of_attention_only_and_the_rerun_state_machine():
    class Module:  # megatron's CudaGraphModule members have a .name
        name = "attn"

    args = _ns(cuda_graph_impl="transformer_engine", cuda_graph_modules=[Module()])
    assert run_checks(args) == [
        "mpmoe: --rerun-mode validate_results -> disabled (a re-run iteration would count the routing "
        "statistics twice; NaN/inf losses still stop the run)"]
    assert args.rerun_mode == "disabled"
    assert run_checks(args) == []  # already off: nothing to say


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
    "trainable_params": "mpmoe's trainer only (routers-only training of split models needs its model builder); \"all\" in every preset",
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
    from mpmoe.run.args import build_parser, fill_defaults, parse_args
    from mpmoe.run.args import schedule_lengths
    from mpmoe.run.presets import list_presets

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
