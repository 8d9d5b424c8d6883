"""Round-3 leftovers (issues 23, 28): variable experts per token and the token dispatcher,
output paths checked before the work; fast, in-process."""

from __future__ import annotations

import pytest

from mpmoe.megatron import settings
from mpmoe.run.args import ConfigError, parse_args

TINY = ["--train-iters", "1", "--num-layers", "2", "--moe-layer-freq", "1", "--num-experts", "4", "--moe-router-topk", "2"]
REMOE = ["--moe-relu-routing", "--moe-router-load-balancing-type", "none"]


@pytest.fixture(autouse=True)
def _no_mask_variables(monkeypatch):
    for var in ("MOE_MASK_EXPERTS", "MOE_DYNAMIC_MASK_MODE", "MOE_DYNAMIC_MASK_LAYERS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("flags, what", [
    (["--moe-dynamic-mask", "random"], "--moe-dynamic-mask-mode random"),
    (["--moe-dynamic-mask-mode", "random", "--router", "topk"], "--moe-dynamic-mask-mode random"),
    (REMOE, "remoe routing"),
])
def test_variable_experts_per_token_with_the_flex_dispatcher_is_refused(flags, what):
    with pytest.raises(ConfigError) as err:
        parse_args([*TINY, *flags, "--moe-token-dispatcher-type", "flex"])
    msg = str(err.value)
    assert msg.startswith(f"{what} routes a variable number of experts per token")
    assert "--moe-token-dispatcher-type flex" in msg and msg.endswith("use --moe-token-dispatcher-type alltoall")
    for dispatcher in settings.VARIABLE_K_DISPATCHERS:  # the dispatchers that carry them
        parse_args([*TINY, *flags, "--moe-token-dispatcher-type", dispatcher])


def test_flex_without_variable_experts_per_token_passes_the_settings_check():
    args = parse_args([*TINY, "--moe-token-dispatcher-type", "flex"])
    assert args.moe_token_dispatcher_type == "flex" and args.moe_dynamic_mask_mode is None


def test_the_config_view_names_config_fields():
    """MoPEConfig (mpmoe train, mpmoe eval, the Megatron-LM patch set's check_args) checks
    the same rule, naming the fields."""
    with pytest.raises(ConfigError, match=r"^moe_dynamic_mask_mode random routes .* "
                                          r"moe_token_dispatcher_type=flex would route exactly k"):
        settings.check({"moe_dynamic_mask_mode": "random"}, "mope", num_experts=4, topk=2, dispatcher="flex")
    with pytest.raises(ConfigError, match=r"^moe_expert_groups \(merged experts\) routes"):
        settings.check({"moe_expert_groups": {"1": [0, 0, 1, 1]}}, "topk", num_experts=2, topk=1,
                       dispatcher="flex")
    assert settings.check({"moe_dynamic_mask_mode": "random"}, "mope", num_experts=4, topk=2,
                          dispatcher="alltoall") == {"moe_dynamic_mask_mode": "random"}


def test_mope_config_refuses_the_dynamic_mask_with_flex():
    from mpmoe.megatron.config import MoPEConfig

    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=4, moe_router_topk=2,
              moe_ffn_hidden_size=64, moe_router_load_balancing_type="otep", moe_dynamic_mask_mode="random")
    with pytest.raises(ValueError, match="moe_token_dispatcher_type=flex would route exactly k"):
        MoPEConfig(**kw, moe_token_dispatcher_type="flex")
    assert MoPEConfig(**kw, moe_token_dispatcher_type="alltoall").moe_dynamic_mask_mode == "random"


# --------------------------------------------------------------------------- stop signals in set-up
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_in_set_up_is_one_line_of_its_own_and_leaves_no_run_folder(sig, tmp_path, monkeypatch,
                                                                                 capsys):
    """Ctrl-C / SIGTERM while the model is built: `mpmoe train`'s own line (not the generic
    one), 130 / 143, and the default run folder it had claimed is gone."""
    import os
    import signal

    from train_testing import make_indexed_dataset, tiny_flags

    from mpmoe.run import model as run_model
    from mpmoe.train import cli

    prefix = make_indexed_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    real = run_model.build_model

    def interrupted(*a, **kw):
        assert any((tmp_path / "runs").iterdir())  # the run folder is claimed by now
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **kw)  # (SIGINT and SIGTERM raise in the handler, before this)

    monkeypatch.setattr(run_model, "build_model", interrupted)
    code = cli.main(tiny_flags(prefix, None, **{"run-dir": None}))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 128 + getattr(signal, sig)
    assert err[-1] == f"mpmoe train: stopped by {sig} before training started; nothing was saved"
    assert "Traceback" not in "\n".join(err)
    assert list((tmp_path / "runs").iterdir()) == []


# --------------------------------------------------------------------------- output paths, before the work
UNWRITABLE = "/proc/mpmoe-no-such/out"  # root passes os.access there; creating anything fails


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
def test_folder_problem_tries_writing_and_leaves_nothing(tmp_path):
    from mpmoe.errors import folder_problem

    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert list(tmp_path.iterdir()) == []  # no probe file, no folder made
    assert folder_problem(UNWRITABLE).startswith("/proc is not writable (")
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "f") == "exists and is not a folder"
    assert folder_problem(tmp_path / "f" / "sub") == f"{tmp_path / 'f'} is a file, not a folder"


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("verb, argv, flag", [
    ("train", [*TINY, "--moe-stats-dir", UNWRITABLE], "--moe-stats-dir"),
    ("train", [*TINY, "--tensorboard-dir", UNWRITABLE], "--tensorboard-dir"),
    ("analyze", ["stats", "/nonexistent/stats", "--out", UNWRITABLE], "--out"),
    ("analyze", ["checkpoint", "--load", "/nonexistent/ck", "--out", UNWRITABLE], "--out"),
    ("data", ["tokenizer", "--input", "/nonexistent/text", "--output-dir", UNWRITABLE], "--output-dir"),
    ("data", ["prepare", "--input", "/nonexistent/text", "--output-prefix", UNWRITABLE + "/p"], "--output-prefix"),
    ("export", ["hf", "--load", "/nonexistent/ck", "--out", UNWRITABLE], "--out"),
    ("experts", ["compress", "--load", "/nonexistent/ck", "--save", "/proc/mpmoe-no-such"], "--save"),
    ("eval", ["--load", "LOAD", "--tasks", "mpmoe_docs_mc", "--output-path", UNWRITABLE], "--output-path"),
])
def test_unwritable_outputs_are_refused_before_the_work(verb, argv, flag, capsys, tmp_path):
    """Checked first: the inputs (missing here; eval checks that --load is a folder) are not
    even read."""
    from mpmoe.cli import main

    assert main([verb, *[str(tmp_path) if a == "LOAD" else a for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpmoe {verb}: error: {flag} ") and "/proc is not writable" in err[0]
