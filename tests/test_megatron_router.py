"""MoPE / top-k routers in a megatron MoELayer on CPU (1-rank gloo group)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_megatron_router_support import build_moe_layer, make_config, single_process_group

from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker  # noqa: E402

from mpmoe.megatron.compat import moe_metrics  # noqa: E402

from mpmoe.megatron.config import MoPEConfig  # noqa: E402
from mpmoe.megatron.router import (  # noqa: E402
    MoPERouter,
    TopKStatsRouter,
    is_counted_forward,
    iter_routers,
    set_training_progress,
    sync_routing_state,
)
from mpmoe.routing import covariance_from_counts, otep, otep_select  # noqa: E402

H = 32
E = 8
K = 2


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    with single_process_group():
        yield


def tokens(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n // 2, 2, H, generator=g)


def logits_of(router, x):
    with torch.no_grad():
        return F.linear(x.reshape(-1, H).float(), router.weight.float())


def correlated_sigma(num_experts=E):
    """A Sigma in which experts come in strongly correlated pairs (2i, 2i+1)."""
    s = torch.eye(num_experts) * 0.2
    for i in range(0, num_experts, 2):
        s[i, i + 1] = s[i + 1, i] = 0.19
    return s


def topk_reference(logits, k=K):
    vals, idx = logits.topk(k, dim=1)
    probs = torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, dim=1))
    return probs, torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)


def masked_softmax_reference(logits, selection):
    w = torch.softmax(logits.masked_fill(~selection, -math.inf), dim=1)
    return w.masked_fill(~selection, 0.0)


def capture(router):
    maps = []

    def hook(_m, _inp, out):
        maps.append((out[0].detach().clone(), out[1].detach().clone()))

    handle = router.register_forward_hook(hook)
    return maps, handle


# ---------------------------------------------------------------- config
def test_config_accepts_otep_with_capacity_and_restores_type():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_expert_capacity_factor=1.5)
    assert cfg.moe_router_load_balancing_type == "otep" and cfg.is_mope
    assert cfg.moe_expert_capacity_factor == 1.5
    cfg2 = make_config(moe_mask_experts='{"1": [3, 1]}', moe_stats_layers="2, 1", moe_dynamic_mask_layers=[3],
                       moe_dynamic_mask_mode="random")
    assert cfg2.moe_mask_experts == {1: (1, 3)}
    assert cfg2.moe_stats_layers == (1, 2) and cfg2.moe_dynamic_mask_layers == (3,)
    assert not cfg2.is_mope


@pytest.mark.parametrize(
    "field,value",
    [
        ("moe_otep_warmup_fraction", 1.5),
        ("moe_otep_warmup_fraction", float("nan")),
        ("moe_sigma_update_every", 0),
        ("moe_plot_every", -3),
        ("moe_otep_eps", 0.0),
        ("moe_stats_layers", "a,b"),
        ("moe_stats_layers", [0]),
        ("moe_dynamic_mask_layers", [True]),
        ("moe_mask_experts", "{not json"),
        ("moe_mask_experts", {"1": [99]}),
        ("moe_dynamic_mask_mode", "sometimes"),
        ("moe_dynamic_mask_mode", "cooccurrence"),  # needs moe_cooccurrence_stats_dir
        ("moe_dynamic_mask_seed", -1),
        ("moe_stats_dir", ""),
        ("moe_otep_inference_topk", "yes"),
    ],
)
def test_config_rejects_bad_values_with_field_name(field, value):
    with pytest.raises(ValueError) as info:
        make_config(**{field: value})
    msg = str(info.value)
    assert "\n" not in msg
    assert field in msg


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(moe_router_score_function="sigmoid"), "moe_router_score_function"),
        (dict(moe_router_num_groups=2, moe_router_group_topk=1), "moe_router_num_groups"),
        (dict(moe_router_load_balancing_type=["otep", "aux_loss"], moe_aux_loss_coeff=[0.1, 0.1]), "moe_router_load_balancing_type"),
    ],
)
def test_config_rejects_unsupported_otep_combinations(overrides, field):
    kw = dict(moe_router_load_balancing_type="otep")
    kw.update(overrides)
    with pytest.raises(ValueError, match=field):
        make_config(**kw)


def test_mope_router_requires_otep_config():
    with pytest.raises(ValueError, match="moe_router_load_balancing_type"):
        MoPERouter(make_config())


# ---------------------------------------------------------------- routing
def test_topk_stats_router_equals_plain_topk():
    layer = build_moe_layer(make_config())
    assert isinstance(layer.router, TopKStatsRouter) and not isinstance(layer.router, MoPERouter)
    x = tokens()
    probs, rmap = layer.router(x)
    ref_probs, ref_map = topk_reference(logits_of(layer.router, x))
    assert torch.equal(rmap, ref_map)
    torch.testing.assert_close(probs, ref_probs)


def test_mope_warmup_is_topk_then_otep():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_otep_warmup_fraction=0.1)
    layer = build_moe_layer(cfg)
    router = layer.router
    router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    x = tokens(64, seed=3)
    logits = logits_of(router, x)
    # Warm-up: steps 0..9 of 100 route top-k (Sigma is ignored).
    set_training_progress(layer, step=9, total_steps=100)
    router._since_refresh = -(10**9)  # keep the injected Sigma for this test
    probs, rmap = router(x)
    ref_probs, ref_map = topk_reference(logits)
    assert torch.equal(rmap, ref_map)
    torch.testing.assert_close(probs, ref_probs)
    # After warm-up: OTEP on the layer's probabilities and Sigma.
    set_training_progress(layer, step=10, total_steps=100)
    probs, rmap = router(x)
    expected = otep_select(torch.softmax(logits, dim=1), correlated_sigma(), K)
    assert torch.equal(rmap, expected)
    assert not torch.equal(rmap, ref_map), "the test Sigma must change some selections"
    torch.testing.assert_close(probs, masked_softmax_reference(logits, expected))
    assert torch.all(rmap.sum(1) == K)


def test_progress_never_set_means_warmup_over():
    layer = build_moe_layer(make_config(moe_router_load_balancing_type="otep", moe_otep_warmup_fraction=1.0))
    assert layer.router.otep_active()
    set_training_progress(layer, 5, 10)
    assert not layer.router.otep_active()
    set_training_progress(layer, 5, None)
    assert layer.router.otep_active()
    with pytest.raises(ValueError, match="step"):
        set_training_progress(layer, -1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        set_training_progress(layer, 1, 0)


def test_sigma_equals_counters_of_routing_maps():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_sigma_update_every=2)
    layer = build_moe_layer(cfg)
    router = layer.router
    maps, handle = capture(router)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(5):
        x = tokens(24, seed=10 + step)
        out, _ = layer(x)
        (out**2).sum().backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:
            # Sigma in use was rebuilt at the start of a forward after an even number of
            # counted forwards: it reflects exactly the maps before that forward.
            pass
    handle.remove()
    # 5 counted forwards, refreshes at the starts of forwards 3 and 5: totals = first 4.
    m = torch.cat([rm for _, rm in maps[:4]]).double()
    assert torch.equal(router.cooccurrence_stats.num_tokens, torch.tensor(float(m.shape[0]), dtype=torch.float64))
    assert torch.equal(router.cooccurrence_stats.usage, m.sum(0))
    assert torch.equal(router.cooccurrence_stats.cooccurrence, m.t() @ m)
    expected = covariance_from_counts(torch.tensor(float(m.shape[0]), dtype=torch.float64), m.sum(0), m.t() @ m)
    torch.testing.assert_close(router.current_sigma(), expected.float())
    # sync folds in the 5th forward and rebuilds.
    sync_routing_state(layer)
    m5 = torch.cat([rm for _, rm in maps]).double()
    torch.testing.assert_close(
        router.current_sigma(),
        covariance_from_counts(torch.tensor(float(m5.shape[0]), dtype=torch.float64), m5.sum(0), m5.t() @ m5).float(),
    )
    assert not torch.allclose(router.current_sigma(), torch.eye(E))


def test_aux_and_z_loss_use_unmasked_probabilities():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    layer = build_moe_layer(cfg, layer_number=2)
    router = layer.router
    router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    router._since_refresh = -(10**9)
    x = tokens(64, seed=5)
    logits = logits_of(router, x)
    clear_aux_losses_tracker()
    probs, rmap = router(x)
    probs.sum().backward()  # the autoscaler attaches the losses' gradients
    tracker = moe_metrics()
    aux = tracker["load_balancing_loss"][1]
    z = tracker["z_loss"][1]
    p = torch.softmax(logits, dim=1)
    t = logits.shape[0]
    ref_aux = E / (K * t * t) * (p.sum(0) * rmap.float().sum(0)).sum()
    torch.testing.assert_close(aux, ref_aux)
    masked_p = masked_softmax_reference(logits, rmap)
    assert not torch.allclose(aux, E / (K * t * t) * (masked_p.sum(0) * rmap.float().sum(0)).sum())
    ref_z = torch.logsumexp(logits, dim=1).square().mean()
    torch.testing.assert_close(z, ref_z)
    assert router.weight.grad is not None and torch.isfinite(router.weight.grad).all()
    clear_aux_losses_tracker()


def test_aux_loss_gradient_matches_topk_router_during_warmup():
    """In warm-up MoPE is exactly megatron's aux_loss routing (same gradients)."""
    cfg_m = make_config(moe_router_load_balancing_type="otep", moe_aux_loss_coeff=0.1, moe_otep_warmup_fraction=0.5)
    cfg_t = make_config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)
    lm, lt = build_moe_layer(cfg_m, seed=7), build_moe_layer(cfg_t, seed=7)
    set_training_progress(lm, 0, 10)
    x = tokens(32, seed=8)
    for layer in (lm, lt):
        out, _ = layer(x)
        (out**2).sum().backward()
    torch.testing.assert_close(lm.router.weight.grad, lt.router.weight.grad)


def test_capacity_dropping_applies_after_otep():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_expert_capacity_factor=0.5)
    layer = build_moe_layer(cfg)
    router = layer.router
    router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    router._since_refresh = -(10**9)
    x = tokens(64, seed=9)
    _, rmap = router(x)
    expected = otep_select(torch.softmax(logits_of(router, x), dim=1), correlated_sigma(), K)
    assert not torch.any(rmap & ~expected)  # only OTEP-selected experts survive
    capacity = math.ceil(64 * K / E * 0.5)
    assert int(rmap.sum(0).max()) <= capacity
    assert int(rmap.sum()) < int(expected.sum())


# ---------------------------------------------------------------- counting rules
def test_eval_forward_does_not_count_and_uses_stored_sigma():
    layer = build_moe_layer(make_config(moe_router_load_balancing_type="otep"))
    router = layer.router
    x = tokens()
    for _ in range(3):
        out, _ = layer(x)
        out.sum().backward()
    sync_routing_state(layer)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    sigma = router.current_sigma().clone()
    layer.eval()
    with torch.no_grad():
        _, rmap = router(x)
    after = router.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(router.cooccurrence_stats._pending_tokens, torch.zeros((), dtype=torch.float64))
    expected = otep_select(torch.softmax(logits_of(router, x), dim=1), sigma, K)
    assert torch.equal(rmap, expected)


def test_decode_steps_route_as_the_whole_batch():
    # One token at a time (decode, OTEP's small-batch loop and the router's memo of Sigma's
    # factor rows) gives the routing of all tokens at once (the blocked loop).
    layer = build_moe_layer(make_config(moe_router_load_balancing_type="otep"))
    router = layer.router
    router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    layer.eval()
    x = tokens(2 * (otep.SMALL_BATCH + 8), seed=5).reshape(-1, 1, H)  # [tokens, batch 1, H]
    with torch.no_grad():
        probs, rmap = router(x)
        steps = [router(x[i : i + 1]) for i in range(x.shape[0])]
    assert torch.equal(torch.cat([m for _, m in steps]), rmap)
    # (the gate weights only to rounding: a [1, H] and an [n, H] matmul round differently)
    torch.testing.assert_close(torch.cat([p for p, _ in steps]), probs)
    assert len(router._otep_cache) > 1  # the memo was used


def test_router_reads_the_otep_backend_variable_once(monkeypatch):
    layer = build_moe_layer(make_config(moe_router_load_balancing_type="otep"))
    layer.eval()
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", "fast")
    with pytest.raises(ValueError, match="MPMOE_OTEP_BACKEND"), torch.no_grad():
        layer.router(tokens(4))
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", "torch")
    with torch.no_grad():
        layer.router(tokens(4))
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", "fast")  # read at the first OTEP forward, not again
    with torch.no_grad():
        layer.router(tokens(4))
    assert layer.router._otep_backend == "torch"


def test_inference_topk_flag_routes_plain_topk():
    cfg = make_config(moe_router_load_balancing_type="otep", moe_otep_inference_topk=True)
    layer = build_moe_layer(cfg)
    layer.router.cooccurrence_stats.covariance.copy_(correlated_sigma())
    layer.eval()
    x = tokens(64, seed=3)
    with torch.no_grad():
        probs, rmap = layer.router(x)
    ref_probs, ref_map = topk_reference(logits_of(layer.router, x))
    assert torch.equal(rmap, ref_map)


def _train_steps(layer, steps, wrap=None, seed=20):
    grads = []
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(steps):
        x = tokens(24, seed=seed + step).requires_grad_(True)
        out, _ = (wrap or layer)(x)
        (out**2).sum().backward()
        grads.append(layer.router.weight.grad.clone())
        opt.step()
        opt.zero_grad()
    return grads


def test_activation_recompute_counts_once_and_routes_identically():
    from mpmoe.megatron import cpu_compat

    cpu_compat.enable()
    try:
        plain = build_moe_layer(make_config(moe_router_load_balancing_type="otep"), seed=4)
        recomp = build_moe_layer(
            make_config(moe_router_load_balancing_type="otep", recompute_granularity="selective", recompute_modules=["moe"]),
            seed=4,
        )
        assert recomp.moe_layer_recompute
        g_plain = _train_steps(plain, 4)
        g_recomp = _train_steps(recomp, 4)
    finally:
        cpu_compat.disable()
    for a, b in zip(g_plain, g_recomp):
        torch.testing.assert_close(a, b)
    sp, sr = plain.router.cooccurrence_stats, recomp.router.cooccurrence_stats
    assert torch.equal(sp.num_tokens, sr.num_tokens) and torch.equal(sp.cooccurrence, sr.cooccurrence)
    assert torch.equal(sp._pending_tokens, sr._pending_tokens)
    assert float(sp.num_tokens + sp._pending_tokens) == 4 * 24


def _plain_and_torch_checkpointed(cfg, use_reentrant: bool, steps: int = 3):
    """Two identical layers trained ``steps`` steps, the second under torch.utils.checkpoint;
    asserts equal gradients and returns both layers."""
    import torch.utils.checkpoint as cp

    plain = build_moe_layer(cfg, seed=4)
    ckpt = build_moe_layer(cfg, seed=4)

    def wrapped(x):
        return cp.checkpoint(lambda t: ckpt(t)[0], x, use_reentrant=use_reentrant), None

    g_plain = _train_steps(plain, steps)
    g_ckpt = _train_steps(ckpt, steps, wrap=wrapped)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b)
    return plain, ckpt


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_checkpoint_counts_once(use_reentrant):
    _, ckpt = _plain_and_torch_checkpointed(make_config(moe_router_load_balancing_type="otep"), use_reentrant)
    s = ckpt.router.cooccurrence_stats
    assert float(s.num_tokens + s._pending_tokens) == 3 * 24
    assert ckpt.router._counted_forwards == 3


def test_is_counted_forward_rules():
    layer = build_moe_layer(make_config())
    assert is_counted_forward(layer.router)
    layer.eval()
    assert not is_counted_forward(layer.router)


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_restores_routing():
    cfg = make_config(moe_router_load_balancing_type="otep")
    layer = build_moe_layer(cfg, seed=1)
    _train_steps(layer, 4)
    sync_routing_state(layer)
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in layer.state_dict().items()}
    assert "router.cooccurrence_stats.cooccurrence" in sd and "router.cooccurrence_stats.covariance" in sd
    fresh = build_moe_layer(cfg, seed=99)
    fresh.load_state_dict(sd)
    x = tokens(48, seed=77)
    layer.eval()
    fresh.eval()
    with torch.no_grad():
        p1, m1 = layer.router(x)
        p2, m2 = fresh.router(x)
    assert torch.equal(m1, m2) and torch.equal(p1, p2)
    fresh_untrained = build_moe_layer(cfg, seed=1)
    fresh_untrained.eval()
    with torch.no_grad():
        _, m3 = fresh_untrained.router(x)
    # Same weights, identity Sigma: plain top-k, which differs from the trained Sigma's routing.
    assert torch.equal(m3, topk_reference(logits_of(fresh_untrained.router, x))[1])


def test_sharded_state_dict_has_replicated_counters(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    # megatron's filesystem writer calls torch.cuda.synchronize() unconditionally; this
    # is not about the router, so it is neutralised here for the CPU run.
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    from megatron.core.dist_checkpointing import ShardedTensor

    cfg = make_config(moe_router_load_balancing_type="otep")
    layer = build_moe_layer(cfg, seed=1)
    _train_steps(layer, 3)
    sync_routing_state(layer)
    ssd = layer.sharded_state_dict(prefix="decoder.layers.0.mlp.")
    keys = [k for k in ssd if "cooccurrence_stats" in k]
    assert sorted(k.rsplit(".", 1)[1] for k in keys) == ["cooccurrence", "covariance", "num_tokens", "usage"]
    for k in keys:
        assert isinstance(ssd[k], ShardedTensor)
    dist_checkpointing.save(ssd, str(tmp_path))
    fresh = build_moe_layer(cfg, seed=5)
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(prefix="decoder.layers.0.mlp."), str(tmp_path))
    fresh.load_state_dict({k.removeprefix("decoder.layers.0.mlp."): v for k, v in loaded.items()})
    for name in ("num_tokens", "usage", "cooccurrence", "covariance"):
        a = getattr(layer.router.cooccurrence_stats, name)
        b = getattr(fresh.router.cooccurrence_stats, name)
        assert torch.equal(a, b), name


def test_half_precision_cast_keeps_float64_counters():
    layer = build_moe_layer(make_config(moe_router_load_balancing_type="otep"))
    layer.bfloat16()
    s = layer.router.cooccurrence_stats
    assert s.cooccurrence.dtype == torch.float64 and s.num_tokens.dtype == torch.float64
    assert s.covariance.dtype == torch.float32
    assert layer.router.window_usage.dtype == torch.float64
    assert layer.router.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- hot path
_SYNC = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("variant", ["otep", "otep_masks", "topk"])
def test_no_host_sync_on_router_hot_path(monkeypatch, variant):
    kw = dict(moe_router_load_balancing_type="aux_loss" if variant == "topk" else "otep", moe_z_loss_coeff=1e-3)
    if variant == "otep_masks":
        kw.update(moe_mask_experts={"1": [2]}, moe_dynamic_mask_mode="random", moe_router_topk=3, moe_stats_dir="/nonexistent")
    layer = build_moe_layer(make_config(**kw))
    router = layer.router
    # More tokens than OTEP's small-batch CPU loop takes: that loop (decode steps, T <= 64)
    # works on host memory through NumPy by design and never runs for device tensors.
    n = otep.SMALL_BATCH + 16
    assert otep._choose_path("auto", torch.empty(8, 8, device="meta"), 2, None) == "blocked"
    x = tokens(n).requires_grad_(True)
    # One warm-up forward, so that the timed one also rebuilds Sigma (a collective).
    probs, _ = router(x)
    probs.sum().backward()

    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name} on the router hot path")

        return f

    for name in _SYNC:
        monkeypatch.setattr(torch.Tensor, name, boom(name))
    probs, rmap = router(x)
    probs.sum().backward()
    monkeypatch.undo()
    assert router._counted_forwards == 2
    if variant != "topk":
        assert float(router.cooccurrence_stats.num_tokens) == n  # the refresh happened


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("kind", ["aux_loss", "otep"])
def test_static_mask_knocks_out_experts(kind):
    cfg = make_config(moe_router_load_balancing_type=kind, moe_mask_experts={"1": [0, 5]}, moe_router_topk=3)
    layer = build_moe_layer(cfg)
    router = layer.router
    if kind == "otep":
        router.cooccurrence_stats.covariance.copy_(correlated_sigma())
        router._since_refresh = -(10**9)
    x = tokens(64, seed=4)
    probs, rmap = router(x)
    assert not rmap[:, [0, 5]].any()
    logits = logits_of(router, x)
    masked = logits.clone()
    masked[:, [0, 5]] = -math.inf
    if kind == "aux_loss":
        ref_probs, ref_map = topk_reference(masked, 3)
    else:
        allowed = torch.ones(E, dtype=torch.bool)
        allowed[[0, 5]] = False
        ref_map = otep_select(torch.softmax(masked, 1), correlated_sigma(), 3, allowed=allowed)
        ref_probs = masked_softmax_reference(masked, ref_map)
    assert torch.equal(rmap, ref_map)
    torch.testing.assert_close(probs, ref_probs)
    # Other layers are untouched.
    layer2 = build_moe_layer(cfg, layer_number=2)
    _, rmap2 = layer2.router(x)
    assert torch.equal(rmap2, topk_reference(logits_of(layer2.router, x), 3)[1]) or kind == "otep"


def _expected_drop_cooccurrence(probs, rmap, counts):
    """Straight from the spec: per token, the routed ordered pair (i, j) with the largest
    C_norm[i, j] loses j (ties: lowest j, then lowest i); weights renormalised."""
    c = counts.double()
    cn = c / c.diagonal().clamp_min(1).unsqueeze(1)
    cn.fill_diagonal_(0)
    out_p, out_m = probs.clone(), rmap.clone()
    for t in range(probs.shape[0]):
        routed = [int(e) for e in torch.nonzero(rmap[t]).flatten()]
        if len(routed) < 2:
            continue
        best = max(((cn[i, j].item(), -j) for i in routed for j in routed if i != j))
        j = -best[1]
        total = probs[t].sum()
        out_m[t, j] = False
        out_p[t, j] = 0
        out_p[t] = out_p[t] * total / out_p[t].sum()
    return out_p, out_m


@pytest.mark.parametrize("kind", ["aux_loss", "otep"])
def test_dynamic_cooccurrence_mask(tmp_path, kind):
    import numpy as np

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (E, E), generator=g)
    counts = counts + counts.t()
    counts.fill_diagonal_(60)
    np.savez(tmp_path / "layer1_seg0_moe.npz", expert_counts=np.full(E, 60), cooccurrence_matrix=counts.numpy())
    base = dict(moe_router_load_balancing_type=kind, moe_router_topk=3)
    plain = build_moe_layer(make_config(**base), seed=2)
    masked = build_moe_layer(
        make_config(**base, moe_dynamic_mask_mode="cooccurrence", moe_cooccurrence_stats_dir=str(tmp_path)), seed=2
    )
    x = tokens(40, seed=6)
    p0, m0 = plain.router(x)
    p1, m1 = masked.router(x)
    ep, em = _expected_drop_cooccurrence(p0.detach(), m0, counts)
    assert torch.equal(m1, em)
    torch.testing.assert_close(p1, ep)
    assert torch.all(m1.sum(1) == 2)


def test_dynamic_random_mask_seeded_and_layer_selected():
    base = dict(moe_router_topk=3, moe_dynamic_mask_mode="random", moe_dynamic_mask_layers=[1])
    a = build_moe_layer(make_config(**base, moe_dynamic_mask_seed=5), seed=2)
    b = build_moe_layer(make_config(**base, moe_dynamic_mask_seed=5), seed=2)
    c = build_moe_layer(make_config(**base, moe_dynamic_mask_seed=6), seed=2)
    other = build_moe_layer(make_config(**base), layer_number=2, seed=2)
    x = tokens(64, seed=1)
    pa, ma = a.router(x)
    pb, mb = b.router(x)
    pc, mc = c.router(x)
    assert torch.equal(ma, mb) and torch.equal(pa, pb)
    assert not torch.equal(ma, mc)
    assert torch.all(ma.sum(1) == 2)
    ref_p, ref_m = topk_reference(logits_of(a.router, x), 3)
    assert not torch.any(ma & ~ref_m)
    torch.testing.assert_close(pa.sum(1), ref_p.sum(1))
    _, mo = other.router(x)
    assert torch.all(mo.sum(1) == 3)


def test_iter_routers_finds_all():
    layers = torch.nn.ModuleList([build_moe_layer(make_config(), layer_number=i) for i in (1, 2)])
    assert [r.layer_number for r in iter_routers(layers)] == [1, 2]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_random_dynamic_mask_is_reproduced_by_recompute(use_reentrant):
    cfg = make_config(moe_router_load_balancing_type="otep", moe_router_topk=3, moe_dynamic_mask_mode="random")
    plain, ckpt = _plain_and_torch_checkpointed(cfg, use_reentrant)
    sp, sc = plain.router.cooccurrence_stats, ckpt.router.cooccurrence_stats
    assert torch.equal(sp.cooccurrence, sc.cooccurrence) and torch.equal(sp._pending_cooccurrence, sc._pending_cooccurrence)
    # Different forwards draw different experts; eval forwards too.
    x = tokens(64, seed=2)
    plain.eval()
    with torch.no_grad():
        _, m1 = plain.router(x)
        _, m2 = plain.router(x)
    assert not torch.equal(m1, m2)


def test_recompute_after_later_forwards_replays_their_sigma():
    """Pipeline-style order (F0 F1 B0 B1) with megatron's MoE recompute: each
    recomputation routes with the Sigma (and dynamic-mask draw) of its own forward."""
    from mpmoe.megatron import cpu_compat

    base = dict(moe_router_load_balancing_type="otep", moe_router_topk=3, moe_dynamic_mask_mode="random")
    cpu_compat.enable()
    try:
        plain = build_moe_layer(make_config(**base), seed=4)
        recomp = build_moe_layer(
            make_config(**base, recompute_granularity="selective", recompute_modules=["moe"]), seed=4
        )
        assert recomp.router.recomputed and not plain.router.recomputed
        grads = {}
        for name, layer in (("plain", plain), ("recomp", recomp)):
            opt = torch.optim.SGD(layer.parameters(), lr=0.5)
            grads[name] = []
            for step in range(3):
                set_training_progress(layer, step, 3)
                outs = [layer(tokens(24, seed=40 + 2 * step + i).requires_grad_(True))[0] for i in range(2)]
                for out in outs:
                    (out**2).sum().backward()
                grads[name].append(layer.router.weight.grad.clone())
                opt.step()
                opt.zero_grad()
            assert not layer.router._replay or name == "recomp"
    finally:
        cpu_compat.disable()
    for a, b in zip(grads["plain"], grads["recomp"]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(recomp.router.current_sigma(), torch.eye(E))
