"""A tiny GPT with MoPE layers (the model half's build_gpt_model) trained on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_testing import make_batch, tiny_config

from mpmoe.megatron import build_gpt_model, destroy_distributed, init_distributed  # noqa: E402
from mpmoe.megatron.config import MoPEConfig  # noqa: E402
from mpmoe.megatron.router import MoPERouter, iter_routers, set_training_progress, sync_routing_state  # noqa: E402
from mpmoe.routing import covariance_from_counts, otep_select  # noqa: E402

VOCAB, SEQ, STEPS = 128, 16, 6


@pytest.fixture(scope="module", autouse=True)
def single_process():
    init_distributed(seed=1234)
    yield
    destroy_distributed()


def mope_config(**overrides):
    kw = dict(
        num_query_groups=None,
        moe_router_load_balancing_type="otep",
        moe_aux_loss_coeff=1e-2,
        moe_router_dtype="fp32",
        moe_otep_warmup_fraction=0.34,  # steps 0-2 top-k, 3-5 OTEP
    )
    kw.update(overrides)
    return tiny_config(MoPEConfig, **kw)


def test_tiny_gpt_mope_training_routes_as_specified():
    torch.manual_seed(0)
    model = build_gpt_model(mope_config(), VOCAB, SEQ)
    routers = list(iter_routers(model))
    assert len(routers) == 2 and all(isinstance(r, MoPERouter) for r in routers)
    assert [r.layer_number for r in routers] == [1, 2]
    records = {r.layer_number: [] for r in routers}

    def hook(router, inputs, out):
        with torch.no_grad():
            logits = F.linear(inputs[0].reshape(-1, router.weight.shape[1]).float(), router.weight.float())
        records[router.layer_number].append(
            (router._step, logits, router.current_sigma().clone(), out[1].detach().clone())
        )

    handles = [r.register_forward_hook(hook) for r in routers]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        set_training_progress(model, step, STEPS)
        tokens, pos, labels = make_batch(step % 2, batch=4, seq=SEQ, vocab=VOCAB)
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    for h in handles:
        h.remove()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    differs = 0
    for layer, recs in records.items():
        assert len(recs) == STEPS
        for step, logits, sigma, rmap in recs:
            assert torch.all(rmap.sum(1) == 2)
            if step < 3:  # warm-up: top-k
                expected = torch.zeros_like(rmap).scatter(1, logits.topk(2, dim=1).indices, True)
            else:
                expected = otep_select(torch.softmax(logits, dim=1), sigma, 2)
                topk = torch.zeros_like(rmap).scatter(1, logits.topk(2, dim=1).indices, True)
                differs += int((expected != topk).any(1).sum())
            assert torch.equal(rmap, expected), (layer, step)
        # Sigma equals what the counters give.
        sync_routing_state(model)
        router = routers[layer - 1]
        m = torch.cat([r[3] for r in recs]).double()
        n = torch.tensor(float(m.shape[0]), dtype=torch.float64)
        assert torch.equal(router.cooccurrence_stats.cooccurrence, m.t() @ m)
        torch.testing.assert_close(router.current_sigma(), covariance_from_counts(n, m.sum(0), m.t() @ m).float())
    assert differs > 0, "OTEP never differed from top-k: the check above would be vacuous"

    # State dict round trip restores routing (and so the eval logits).
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    fresh = build_gpt_model(mope_config(), VOCAB, SEQ)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    tokens, pos, _ = make_batch(9, batch=2, seq=SEQ, vocab=VOCAB)
    with torch.no_grad():
        a = model(tokens, pos, None)
        b = fresh(tokens, pos, None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for r1, r2 in zip(iter_routers(model), iter_routers(fresh)):
        assert torch.equal(r1.current_sigma(), r2.current_sigma())
