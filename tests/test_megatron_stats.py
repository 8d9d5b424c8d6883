"""Routing-statistics windows, npz files, eval dumps and the files the dynamic mask reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_megatron_router_support import build_moe_layer, make_config, single_process_group

from mpmoe.megatron.router import set_training_progress  # noqa: E402
from mpmoe.megatron.stats import (  # noqa: E402
    RoutingStatsTracker,
    load_layer_cooccurrence,
    read_stats_file,
    stats_file_name,
)
from mpmoe.routing import dynamic_drop_one  # noqa: E402

E = 8


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    with single_process_group():
        yield


def batch(seed, n=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n // 2, 2, 32, generator=g)


def two_layers(stats_dir, **extra):
    """Layer 1 MoPE, layer 2 top-k, both tracked unless told otherwise."""
    mope = build_moe_layer(
        make_config(moe_router_load_balancing_type="otep", moe_stats_dir=str(stats_dir), moe_plot_every=2, **extra),
        layer_number=1,
        seed=1,
    )
    topk = build_moe_layer(make_config(moe_stats_dir=str(stats_dir), moe_plot_every=2, **extra), layer_number=2, seed=2)
    return torch.nn.ModuleList([mope, topk])


def train(model, tracker, steps, maps, sigmas, micro=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handles = []
    for layer in model:
        layer_maps = maps.setdefault(layer.router.layer_number, [])

        def hook(_m, _i, out, layer_maps=layer_maps):
            layer_maps[-1].append(out[1].detach().clone())

        handles.append(layer.router.register_forward_hook(hook))
    written = []
    for step in range(steps):
        set_training_progress(model, step, steps)
        for layer_maps in maps.values():
            layer_maps.append([])
        for m in range(micro):
            x = batch(100 * step + m)
            for layer in model:
                out, _ = layer(x)
                (out**2).sum().backward()
        opt.step()
        opt.zero_grad()
        sigmas.append(model[0].router.current_sigma().clone())
        written += tracker.on_optimizer_step(step + 1)
    for h in handles:
        h.remove()
    return written


def test_windows_written_with_independent_counts(tmp_path):
    model = two_layers(tmp_path)
    tracker = RoutingStatsTracker(model)
    assert tracker.interval == 2 and tracker.out_dir == tmp_path
    maps, sigmas = {}, []
    written = train(model, tracker, steps=5, maps=maps, sigmas=sigmas)
    names = sorted(p.name for p in written)
    assert names == sorted(
        [stats_file_name(1, s, "mope") for s in (0, 1)] + [stats_file_name(2, s, "moe") for s in (0, 1)]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing for the unfinished window
    for layer, kind in ((1, "mope"), (2, "moe")):
        for seg in (0, 1):
            data = read_stats_file(tmp_path / stats_file_name(layer, seg, kind))
            window = torch.cat([m for step_maps in maps[layer][2 * seg : 2 * seg + 2] for m in step_maps])
            w = window.to(torch.int64)
            assert data["expert_counts"].dtype == np.int64
            np.testing.assert_array_equal(data["expert_counts"], w.sum(0).numpy())
            np.testing.assert_array_equal(data["cooccurrence_matrix"], (w.t() @ w).numpy())
            assert int(data["num_tokens"]) == window.shape[0] == 2 * 2 * 20
            if kind == "mope":
                np.testing.assert_array_equal(data["cov_matrix"], sigmas[2 * seg + 1].numpy())
            else:
                assert "cov_matrix" not in data
    # The window of step 5 is still open on the routers.
    assert float(model[1].router.window_tokens) == 2 * 20


def test_stats_layers_selects_layers(tmp_path):
    model = two_layers(tmp_path, moe_stats_layers=[2])
    tracker = RoutingStatsTracker(model)
    train(model, tracker, steps=2, maps={}, sigmas=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == [stats_file_name(2, 0, "moe")]
    assert float(model[0].router.window_tokens) == 0  # untracked layers do not count


def test_eval_forwards_do_not_count_and_dump_routing(tmp_path):
    dump = tmp_path / "eact"
    cfg = make_config(moe_router_load_balancing_type="otep", moe_stats_dir=str(tmp_path / "s"), moe_eval_dump_dir=str(dump))
    layer = build_moe_layer(cfg, layer_number=3)
    x = batch(1)
    out, _ = layer(x)
    out.sum().backward()
    assert not dump.exists()  # training forwards are not dumped
    counted = float(layer.router.window_tokens)
    layer.eval()
    with torch.no_grad():
        probs, rmap = layer.router(x)
        probs2, rmap2 = layer.router(batch(2))
    assert float(layer.router.window_tokens) == counted
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["layer3_rank0_fwd000000.npz", "layer3_rank0_fwd000001.npz"]
    with np.load(dump / files[0]) as d:
        experts, weights = d["experts"], d["weights"]
    assert experts.shape == (20, 2) and weights.shape == (20, 2)
    for t in range(20):
        routed = set(torch.nonzero(rmap[t]).flatten().tolist())
        assert set(experts[t].tolist()) == routed
        for e, w in zip(experts[t], weights[t]):
            assert w == pytest.approx(float(probs[t, e]))
        assert weights[t, 0] >= weights[t, 1]


def test_load_layer_cooccurrence_sums_windows(tmp_path):
    c0 = np.arange(E * E, dtype=np.int64).reshape(E, E)
    np.savez(tmp_path / stats_file_name(4, 0, "moe"), cooccurrence_matrix=c0, expert_counts=c0.diagonal())
    np.savez(tmp_path / stats_file_name(4, 1, "moe"), cooccurrence_matrix=2 * c0, expert_counts=c0.diagonal())
    np.savez(tmp_path / stats_file_name(4, 0, "mope"), cooccurrence_matrix=7 * c0, expert_counts=c0.diagonal())
    np.savez(tmp_path / stats_file_name(5, 0, "mope"), cooccurrence_matrix=5 * c0, expert_counts=c0.diagonal())
    np.testing.assert_array_equal(load_layer_cooccurrence(tmp_path, 4, prefer="moe"), 3 * c0)
    np.testing.assert_array_equal(load_layer_cooccurrence(tmp_path, 4, prefer="mope"), 7 * c0)
    np.testing.assert_array_equal(load_layer_cooccurrence(tmp_path, 5, prefer="moe"), 5 * c0)
    with pytest.raises(ValueError, match="layer6"):
        load_layer_cooccurrence(tmp_path, 6)
    with pytest.raises(ValueError, match="not a directory"):
        load_layer_cooccurrence(tmp_path / "missing", 4)


def test_dynamic_mask_reads_tracker_files(tmp_path):
    stats = tmp_path / "stats"
    model = two_layers(stats, moe_router_topk=3)
    train(model, RoutingStatsTracker(model), steps=4, maps={}, sigmas=[])
    total = sum(
        read_stats_file(stats / stats_file_name(2, s, "moe"))["cooccurrence_matrix"].astype(np.float64) for s in (0, 1)
    )
    base = dict(moe_router_topk=3)
    plain = build_moe_layer(make_config(**base), layer_number=2, seed=9)
    masked = build_moe_layer(
        make_config(**base, moe_dynamic_mask_mode="cooccurrence", moe_cooccurrence_stats_dir=str(stats)),
        layer_number=2,
        seed=9,
    )
    x = batch(77, n=40)
    p0, m0 = plain.router(x)
    p1, m1 = masked.router(x)
    ep, em = dynamic_drop_one(p0.detach(), m0, "cooccurrence", cooccurrence=torch.as_tensor(total))
    assert torch.equal(m1, em)
    torch.testing.assert_close(p1, ep)
    assert torch.all(m1.sum(1) == 2)


def test_tracker_needs_a_directory_and_positive_interval(tmp_path):
    layer = build_moe_layer(make_config())
    with pytest.raises(ValueError, match="moe_stats_dir"):
        RoutingStatsTracker(layer)
    with pytest.raises(ValueError, match="interval"):
        RoutingStatsTracker(layer, out_dir=tmp_path, interval=0)
    assert RoutingStatsTracker(layer, out_dir=tmp_path, interval=3).on_optimizer_step(2) == []
