"""The router registry and the routing settings table (mpmoe.megatron.routers / .settings):
every launcher exposes the same settings under the same names and defaults, the command
line's router rule, and one-line errors for settings that cannot apply."""

import argparse
import dataclasses
import importlib.util
import math

import pytest

from mpmoe.megatron import routers, settings
from mpmoe.megatron.settings import SETTINGS, Choice, Flag, Range
from mpmoe.run.args import ConfigError, build_parser, parse_args


def _args(*flags):
    return parse_args(["--preset", "tiny-cpu", "--train-iters", "4", *flags])


def _actions(parser):
    return {a.dest: a for a in parser._actions}


# ---------------------------------------------------------------- registry
def test_every_router_kind_has_a_router_with_its_statistics_tag():
    assert list(routers.KINDS)[:3] == ["topk", "mope", "remoe"] and routers.DEFAULT == "topk"
    for kind in routers.KINDS.values():
        cls = routers.router_class(kind.name)
        assert cls.stats_kind == kind.stats_tag
        values = routers.select(dict(routers.MARKS, num_experts=4), kind.name)
        assert routers.kind_of(values) == kind.name and values["router"] == kind.name


def test_labels_and_kinds_from_configs_and_records():
    remoe = argparse.Namespace(num_experts=8, moe_router_load_balancing_type="aux_loss", moe_relu_routing=True)
    assert routers.kind_of(remoe) == "remoe" and routers.label(remoe) == "ReMoE"  # was labelled "top-k"
    mope_bias = {"num_experts": 8, "moe_router_load_balancing_type": "otep", "moe_router_enable_expert_bias": True}
    assert routers.label(mope_bias) == "MoPE + bias"
    assert routers.label({"num_experts": None}) == "dense"
    assert [routers.label_of(t) for t in ("moe", "mope", "remoe", "topk")] == ["top-k", "MoPE", "ReMoE", "top-k"]
    with pytest.raises(ValueError, match="exclude each other"):
        routers.kind_of({"num_experts": 8, "moe_router_load_balancing_type": "otep", "moe_relu_routing": True})


# ---------------------------------------------------------------- the command line's rule
@pytest.mark.parametrize("flags, kind, lbt", [
    ([], "mope", "otep"),                                              # tiny-cpu's router
    (["--moe-relu-routing"], "remoe", "aux_loss"),                     # a mark wins over the preset's
    (["--router", "remoe"], "remoe", "aux_loss"),
    (["--router", "topk"], "topk", "aux_loss"),
    (["--moe-router-load-balancing-type", "seq_aux_loss"], "topk", "seq_aux_loss"),
    (["--router", "topk", "--moe-router-load-balancing-type", "none"], "topk", "none"),
    (["--router", "mope", "--moe-router-load-balancing-type", "otep"], "mope", "otep"),
])
def test_a_flag_naming_a_router_wins_over_the_preset(flags, kind, lbt):
    a = _args(*flags)
    assert (a.router, a.moe_router_load_balancing_type, a.moe_relu_routing) == (kind, lbt, kind == "remoe")
    # the preset's MoPE-only value is dropped when another router is chosen
    assert a.moe_otep_warmup_fraction == (0.05 if kind == "mope" else 0.01)


@pytest.mark.parametrize("flags, match", [
    (["--router", "mope", "--moe-relu-routing"], "name different routers"),
    (["--router", "remoe", "--moe-router-load-balancing-type", "otep"], "name different routers"),
    (["--moe-relu-routing", "--moe-router-load-balancing-type", "otep"], "exclude each other"),
    (["--router", "topk", "--moe-relu-l1-reg-coeff-init", "0.1"], "ReMoE setting, the router is top-k"),
    (["--moe-router-bias-update-rate", "0.01"], "needs --moe-router-enable-expert-bias"),
    (["--router", "topk", "--moe-sigma-shrinkage", "0.1"], "MoPE setting, the router is top-k"),
    (["--router", "topk", "--moe-sigma-decay-rate", "0.1"], "MoPE setting"),
    (["--router", "topk", "--moe-otep-warmup-fraction", "0.1"], "MoPE setting"),
    (["--router", "topk", "--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"],
     "--moe-router-pre-softmax does not apply: it needs --moe-router-score-function softmax"),
    (["--router", "remoe", "--moe-router-pre-softmax"], "the router is ReMoE"),
    (["--router", "remoe", "--moe-router-enable-expert-bias"], "the router is ReMoE"),
    (["--router", "remoe", "--moe-dynamic-mask-mode", "random"], "the router is ReMoE"),
])
def test_a_setting_that_cannot_apply_is_a_one_line_error(flags, match):
    with pytest.raises(ConfigError, match=match) as exc:
        _args(*flags)
    assert "\n" not in str(exc.value)


def test_cli_exit_code_and_format(capsys):
    from mpmoe.cli import main

    assert main(["train", "--train-iters", "4", "--router", "topk", "--moe-sigma-shrinkage", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mpmoe train: error: --moe-sigma-shrinkage does not apply: it is a MoPE setting, "
                   "the router is top-k"]


@pytest.mark.parametrize("setting", [s for s in SETTINGS if isinstance(s.type, Range) and s.type.kind is float],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_non_finite_values_are_rejected(setting, text):
    with pytest.raises(ConfigError, match="finite"):
        _args(f"{setting.flag}={text}")
    with pytest.raises(ValueError, match="finite"):
        settings.check({setting.name: float(text)}, "mope")


# ---------------------------------------------------------------- declared once
def test_mpmoe_train_exposes_every_setting_with_the_tables_default():
    actions = _actions(build_parser())
    for s in SETTINGS:
        if not s.train:  # an evaluation option only (e.g. fold-then-select over merged experts)
            assert s.name not in actions and s.eval, s.name
            continue
        a = actions[s.name]
        assert a.option_strings[0] == s.flag and a.default == s.default and a.help == s.help, s.name
    eval_actions = _actions(_eval_parser())
    assert {s.name for s in SETTINGS if s.eval} <= set(eval_actions)
    for s in SETTINGS:
        if s.eval:
            assert eval_actions[s.name].default == s.default


def _eval_parser():
    from mpmoe.eval.cli import build_parser as eval_parser

    return eval_parser()


def test_mope_config_fields_are_the_tables():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mpmoe.megatron.config import MoPEConfig

    fields = {f.name: f.default for f in dataclasses.fields(MoPEConfig)}
    megatron = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    for s in SETTINGS:
        if s.config:
            assert fields[s.name] == s.default, s.name
            if s.megatron:  # Megatron's own field: mpmoe mirrors its default
                assert megatron[s.name] == s.default, s.name
            else:
                assert s.name not in megatron, s.name
    for name, default in routers.MARKS.items():
        assert fields[name] == default


def test_config_validation_is_the_tables():
    from test_megatron_router_support import make_config

    with pytest.raises(ValueError, match="moe_relu_l1_reg_coeff_init does not apply"):
        make_config(moe_relu_l1_reg_coeff_init=0.1)
    with pytest.raises(ValueError, match="moe_otep_eps must be a finite number"):
        make_config(moe_router_load_balancing_type="otep", moe_otep_eps=math.inf)
    cfg = make_config(moe_relu_routing=True, moe_relu_l1_reg_coeff_init=0.1)
    assert cfg.router_kind == "remoe" and cfg.moe_relu_l1_reg_coeff_init == 0.1


def _megatron_lm_parser():
    from megatron.training.arguments import add_megatron_arguments

    from mpmoe.megatron_lm.args import add_mpmoe_args

    return add_mpmoe_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


megatron_lm = pytest.mark.skipif(importlib.util.find_spec("megatron.training") is None,
                                 reason="needs megatron.training (Python 3.12 + megatron-core 0.19)")


@megatron_lm
@pytest.mark.slow
def test_megatron_lm_parser_exposes_every_setting_like_mpmoe_train():
    meg = _actions(_megatron_lm_parser())
    train = _actions(build_parser())
    for s in SETTINGS:
        if not s.config or not s.train:  # a run option of mpmoe's trainer (freezing needs its model
            assert s.name not in meg, s.name  # builder), or an evaluation option only
            continue
        a = meg[s.name]
        assert s.flag in a.option_strings and set(s.aliases) <= set(a.option_strings), s.name
        assert a.default == train[s.name].default == s.default, s.name
        if isinstance(s.type, Choice):  # Megatron-LM's own may offer more than mpmoe runs
            assert set(s.type.choices) <= set(a.choices) if s.megatron else set(a.choices) == set(s.type.choices)
        if isinstance(s.type, Flag):
            assert a.nargs == 0, s.name
    for name, default in routers.MARKS.items():
        assert meg[name].default == default or [default] == meg[name].default
