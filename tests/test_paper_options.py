"""The paper's knobs: pre-softmax gates, compact masks, the reference dynamic-mask source,
the Sigma prior (shrinkage), Sigma decay, --last-trainable-layers and the ablation flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_megatron_router_support import build_moe_layer, make_config, single_process_group

from mpmoe.megatron.router import set_training_progress, sync_routing_state
from mpmoe.routing import CooccurrenceStats, covariance_from_counts, dynamic_drop_one, otep_select, parse_expert_mask
from mpmoe.run.args import ConfigError, parse_args

H, E = 32, 8


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    with single_process_group():
        yield


def _x(n=64, seed=3):
    return torch.randn(n // 2, 2, H, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- pre-softmax
def test_pre_softmax_topk_weights_sum_to_the_topk_mass():
    cfg = make_config(moe_router_topk=3, moe_router_pre_softmax=True)
    layer = build_moe_layer(cfg)
    x = _x()
    probs, rmap = layer.router(x)
    with torch.no_grad():
        p = torch.softmax(torch.nn.functional.linear(x.reshape(-1, H), layer.router.weight), dim=-1)
    mass = p.topk(3, dim=-1).values.sum(-1)
    torch.testing.assert_close(probs.sum(-1), mass)
    assert (mass < 0.99).all()  # really not normalised to one


@pytest.mark.parametrize("in_warmup", [True, False])
def test_mope_pre_softmax(in_warmup):
    """Warm-up follows megatron's pre-softmax top-k; after it OTEP is unaffected by construction."""
    out = {}
    for pre in (False, True):
        cfg = make_config(moe_router_load_balancing_type="otep", moe_router_topk=3,
                          moe_router_pre_softmax=pre, moe_otep_warmup_fraction=0.5)
        layer = build_moe_layer(cfg)
        sigma = torch.eye(E) * 0.2
        sigma[0, 1] = sigma[1, 0] = 0.19
        layer.router.cooccurrence_stats.covariance.copy_(sigma)
        layer.router._since_refresh = -(10**9)
        set_training_progress(layer, 0 if in_warmup else 10, 10)
        out[pre] = layer.router(_x())
    (p0, m0), (p1, m1) = out[False], out[True]
    assert torch.equal(m0, m1)
    if in_warmup:
        assert (p1.sum(-1) < 0.99).all() and torch.allclose(p0.sum(-1), torch.ones(p0.shape[0]))
    else:
        torch.testing.assert_close(p0, p1)


# ---------------------------------------------------------------- masks
def test_compact_mask_form_and_errors():
    assert parse_expert_mask("2:3,17;5:0") == {2: (3, 17), 5: (0,)}
    assert parse_expert_mask("2:3,17;5:0;") == parse_expert_mask('{"2": [3, 17], "5": [0]}')
    with pytest.raises(ValueError, match="LAYER:ID"):
        parse_expert_mask("2:x")


def test_dynamic_mask_renormalize_sums_to_one():
    probs = torch.tensor([[0.3, 0.1, 0.1, 0.0], [0.2, 0.0, 0.0, 0.0]])
    rmap = probs > 0
    gen = torch.Generator().manual_seed(0)
    kept, new = dynamic_drop_one(probs, rmap, "random", generator=gen, renormalize=True)
    assert new.sum(1).tolist() == [2, 1]
    torch.testing.assert_close(kept.sum(1), torch.tensor([1.0, 0.2]))  # untouched token keeps its weight
    kept2, _ = dynamic_drop_one(probs, rmap, "random", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept2.sum(1), torch.tensor([0.5, 0.2]))


def test_reference_source_reads_the_latest_window(tmp_path):
    from mpmoe.megatron.stats import load_layer_cooccurrence

    for seg, value in ((1, 5.0), (0, 1.0), (10, 3.0)):
        c = np.full((E, E), value)
        np.savez(tmp_path / f"layer2_seg{seg}_moe.npz", cooccurrence_matrix=c)
    assert load_layer_cooccurrence(tmp_path, 2, latest_only=True)[0, 0] == 3.0
    assert load_layer_cooccurrence(tmp_path, 2)[0, 0] == 9.0


# ---------------------------------------------------------------- Sigma prior and decay
def _unseen_expert_counts(num_tokens=4096, seed=0):
    """Routing maps of a top-2-of-8 run in which expert 7 was never routed."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, E, generator=g)
    scores[:, 7] = -1
    idx = scores.topk(2, dim=1).indices
    m = torch.zeros(num_tokens, E).scatter_(1, idx, 1.0)
    return torch.tensor(float(num_tokens), dtype=torch.float64), m.sum(0).double(), (m.t() @ m).double()


def test_sigma_prior_fixes_the_unseen_expert_pathology():
    n, u, c = _unseen_expert_counts()
    p = torch.softmax(torch.randn(2000, E, generator=torch.Generator().manual_seed(1)), dim=-1)
    first_pick_share = {}
    for lam in (0.0, 0.1):
        sigma = covariance_from_counts(n, u, c, shrinkage=lam).float()
        sel = otep_select(p, sigma, 1)
        first_pick_share[lam] = sel[:, 7].float().mean().item()
    assert first_pick_share[0.0] > 0.95  # Sigma_77 = eps: nearly every token's first pick
    assert first_pick_share[0.1] < 0.5
    # top-1 by probability alone would pick expert 7 for ~1/8 of the tokens
    assert (p.argmax(-1) == 7).float().mean().item() < 0.25


def test_shrinkage_zero_is_the_reference_and_keeps_psd():
    n, u, c = _unseen_expert_counts(512)
    torch.testing.assert_close(covariance_from_counts(n, u, c), covariance_from_counts(n, u, c, shrinkage=0.0))
    s = covariance_from_counts(n, u, c, shrinkage=0.3)
    assert torch.linalg.eigvalsh(s).min() > 0


def test_sigma_decay_forgets_exponentially():
    maps = [torch.rand(16, E, generator=torch.Generator().manual_seed(i)) > 0.7 for i in range(5)]
    plain, decayed = CooccurrenceStats(E), CooccurrenceStats(E, decay_rate=0.25)
    for i, m in enumerate(maps):
        plain.update(m)
        decayed.update(m)
        if i == 2:  # folding in between does not change the result
            decayed.all_reduce()
    plain.all_reduce()
    decayed.all_reduce()
    weights = [0.75 ** (4 - i) for i in range(5)]
    expect_c = sum(w * (m.double().t() @ m.double()) for w, m in zip(weights, maps))
    torch.testing.assert_close(decayed.cooccurrence, expect_c)
    torch.testing.assert_close(decayed.num_tokens, torch.tensor(16.0 * sum(weights), dtype=torch.float64))
    assert plain.num_tokens.item() == 80
    with pytest.raises(ValueError, match="decay_rate"):
        CooccurrenceStats(E, decay_rate=1.0)


def test_router_uses_the_configured_prior_and_decay():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_sigma_shrinkage=0.2, moe_sigma_decay_rate=0.1)
    layer = build_moe_layer(cfg)
    stats = layer.router.cooccurrence_stats
    assert stats.shrinkage == 0.2 and stats.decay_rate == 0.1
    layer.train()
    layer.router(_x())
    layer.router(_x(seed=4))
    sync_routing_state(layer)
    assert stats.num_tokens.item() == pytest.approx(64 * 0.9 + 64)
    with pytest.raises(ValueError, match="moe_sigma_shrinkage"):
        make_config(moe_sigma_shrinkage=1.0)


# ---------------------------------------------------------------- command line
def _args(*flags):
    return parse_args(["--preset", "tiny-cpu", "--train-iters", "4", *flags])


def test_train_flags_reach_the_config():
    from mpmoe.run.args import model_config_kwargs

    a = _args("--moe-router-pre-softmax", "--moe-mask-experts", "2:3;3:0,1", "--moe-dynamic-mask", "random",
              "--moe-dynamic-mask-layers", "2,4", "--moe-sigma-shrinkage", "0.1", "--moe-sigma-decay-rate",
              "0.01", "--last-trainable-layers", "2", "--moe-dynamic-mask-source", "reference")
    kw = model_config_kwargs(a)
    assert kw["moe_router_pre_softmax"] and kw["moe_mask_experts"] == {"2": [3], "3": [0, 1]}
    assert kw["moe_dynamic_mask_mode"] == "random" and kw["moe_dynamic_mask_layers"] == [2, 4]
    assert kw["moe_sigma_shrinkage"] == 0.1 and kw["moe_dynamic_mask_source"] == "reference"
    from mpmoe.megatron.config import MoPEConfig

    cfg = MoPEConfig(**kw)
    assert cfg.moe_mask_experts == {2: (3,), 3: (0, 1)} and cfg.moe_dynamic_mask_layers == (2, 4)


@pytest.mark.parametrize("flags, match", [
    (["--moe-mask-experts", "2:99"], "expert ids \\[99\\] >= --num-experts 8"),
    (["--moe-mask-experts", "2:a"], "--moe-mask-experts"),
    (["--moe-dynamic-mask", "cooccurrence"], "needs --moe-cooccurrence-stats-dir"),
    (["--moe-dynamic-mask", "cooccurrence", "--moe-cooccurrence-stats-dir", "/nonexistent"], "not a directory"),
    (["--moe-dynamic-mask-layers", "2"], "needs --moe-dynamic-mask-mode"),
    (["--moe-dynamic-mask", "random", "--moe-router-topk", "1"], "top-k >= 2"),
    (["--moe-sigma-shrinkage", "1.5"], "--moe-sigma-shrinkage"),
    (["--moe-sigma-decay-rate", "-0.1"], "--moe-sigma-decay-rate"),
    (["--last-trainable-layers", "9"], "--last-trainable-layers"),
])
def test_bad_flags_are_one_line_errors(flags, match):
    with pytest.raises(ConfigError, match=match) as exc:
        _args(*flags)
    assert "\n" not in str(exc.value)


def test_demo_environment_variables(monkeypatch, capsys):
    monkeypatch.setenv("MOE_MASK_EXPERTS", '{"2": [1]}')
    monkeypatch.setenv("MOE_DYNAMIC_MASK_MODE", "random")
    a = _args()
    assert a.moe_mask_experts == {"2": [1]} and a.moe_dynamic_mask_mode == "random"
    assert "MOE_MASK_EXPERTS" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="disagree"):
        _args("--moe-mask-experts", "3:0")
    monkeypatch.setenv("MOE_DYNAMIC_MASK_MODE", "sometimes")
    with pytest.raises(ConfigError, match="MOE_DYNAMIC_MASK_MODE='sometimes': expected"):
        _args()
    monkeypatch.setenv("MOE_DYNAMIC_MASK_MODE", "random")
    monkeypatch.setenv("EACT_SAVE", "/tmp/x")
    with pytest.raises(ConfigError, match="EACT_SAVE"):
        _args()


def test_last_trainable_layers_freezes_the_rest():
    from mpmoe.train.optim import freeze_all_but_last_layers
    from mpmoe.run.model import build_model

    a = _args("--num-layers", "3", "--moe-layer-freq", "[0,1,1]", "--hidden-size", "32",
              "--ffn-hidden-size", "64", "--num-attention-heads", "2", "--seq-length", "16")
    _, model, _ = build_model(a, 256)
    assert freeze_all_but_last_layers(model, -1) == 0
    frozen = freeze_all_but_last_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen > 0 and trainable
    assert all(n.startswith(("decoder.layers.2.", "decoder.final_layernorm", "output_layer")) for n in trainable)
    assert any(n.startswith("decoder.layers.2.") for n in trainable)
