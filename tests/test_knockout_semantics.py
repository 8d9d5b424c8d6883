"""Static knock-out under MoPE: mpmoe's semantics (a knocked-out expert is never picked) and
the MP-MoE authors' (``--moe-mask-experts-semantics reference``: its logit is the dtype's
lowest finite value, so p_j = 0, but OTEP can still pick it through Sigma's off-diagonal
terms; it then gets gate weight 0 and the token runs on fewer than k experts)."""

from __future__ import annotations

import pytest
import torch

from test_megatron_router_support import build_moe_layer, make_config, single_process_group

from mpmoe.megatron.router import set_training_progress
from mpmoe.routing import covariance_from_counts

E, K, H = 64, 8, 32
MASKED = list(range(0, E, 8))  # 8 of 64 experts knocked out in layer 1


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    with single_process_group():
        yield


def _structured_sigma() -> torch.Tensor:
    """Sigma of a routing where experts co-fire in blocks of 8 (each token: 7 of one block +
    1 random expert; each block's first expert is a knocked-out one), far from the identity
    as a trained MoPE layer's Sigma is."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    maps = torch.zeros(n, E, dtype=torch.bool)
    blocks = torch.randint(0, E // 8, (n,), generator=g)
    for t in range(n):
        maps[t, int(blocks[t]) * 8 + torch.randperm(8, generator=g)[:7]] = True
        maps[t, int(torch.randint(0, E, (1,), generator=g))] = True
    m = maps.double()
    return covariance_from_counts(torch.tensor(float(n), dtype=torch.float64), m.sum(0), m.t() @ m).float()


def _route(semantics: str, sigma: torch.Tensor, pre_softmax: bool):
    cfg = make_config(num_moe_experts=E, moe_router_topk=K, moe_router_load_balancing_type="otep",
                      moe_mask_experts={"1": MASKED}, moe_mask_experts_semantics=semantics,
                      moe_router_pre_softmax=pre_softmax, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    layer = build_moe_layer(cfg, layer_number=1, seed=5)
    with torch.no_grad():  # a trained router's spread of logits (std ~2), not init's ~0.1
        layer.router.weight.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(2))
    layer.router.cooccurrence_stats.covariance.copy_(sigma)
    layer.router.eval()  # routes with the stored Sigma, counts nothing
    x = torch.randn(256, 2, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return layer.router(x)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_reference_knockout_picks_masked_experts_with_zero_weight_on_a_structured_sigma(pre_softmax):
    sigma = _structured_sigma()
    probs_m, map_m = _route("mpmoe", sigma, pre_softmax)
    probs_r, map_r = _route("reference", sigma, pre_softmax)
    # mpmoe: never picked, every token on k experts with weight
    assert not map_m[:, MASKED].any()
    assert ((probs_m > 0) & map_m).sum(-1).eq(K).all()
    # reference: OTEP still picks knocked-out experts for most tokens, with gate weight 0, so
    # those tokens run on fewer than k weighted experts
    assert probs_r[:, MASKED].abs().max() == 0
    assert map_r.sum(-1).eq(K).all()  # k experts dispatched, as megatron's top-k always does
    weighted = ((probs_r > 0) & map_r).sum(-1)
    short = weighted < K
    assert short.float().mean() > 0.5, short.float().mean()
    assert weighted.min() >= K - len(MASKED)
    if not pre_softmax:
        # the dispatched experts are exactly OTEP's picks, knocked-out ones included
        assert torch.equal(map_r[:, MASKED].any(-1), short)
    # (pre-softmax: a picked knocked-out expert's score is 0 like every unpicked expert's, so
    # megatron's top-k may dispatch the token to any of them - with weight 0 all the same)
    assert not torch.equal(probs_m, probs_r)


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_knockout_semantics_agree_with_identity_sigma(pre_softmax):
    # Sigma = I: OTEP maximises sum p_S^2, a p_j = 0 expert adds nothing, so it is never picked
    sigma = torch.eye(E)
    probs_m, map_m = _route("mpmoe", sigma, pre_softmax)
    probs_r, map_r = _route("reference", sigma, pre_softmax)
    assert torch.equal(map_m, map_r)
    torch.testing.assert_close(probs_m, probs_r)
    assert not map_r[:, MASKED].any()


def test_semantics_flag_on_train_and_eval_and_its_errors():
    from mpmoe.eval.cli import build_parser as eval_parser
    from mpmoe.run.args import ConfigError, model_config_kwargs, parse_args

    args = parse_args(["--train-iters", "1", "--moe-mask-experts", "2:1", "--moe-mask-experts-semantics",
                       "reference"])
    assert model_config_kwargs(args)["moe_mask_experts_semantics"] == "reference"
    assert parse_args(["--train-iters", "1"]).moe_mask_experts_semantics == "mpmoe"
    with pytest.raises(ConfigError, match="needs --moe-mask-experts set"):
        parse_args(["--train-iters", "1", "--moe-mask-experts-semantics", "reference"])
    action = eval_parser()._option_string_actions["--moe-mask-experts-semantics"]
    assert action.choices == ["mpmoe", "reference"] and action.default == "mpmoe"
