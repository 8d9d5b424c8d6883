"""Two processes (gloo on 127.0.0.1) give what one process gives on the same global batch.

The reference runs the global batch in one process as two micro-batches (the halves
each rank sees), with ``moe_sigma_update_every=2`` so that Sigma is rebuilt at the
same points as the 2-rank run (interval 1, one forward per rank per step). Compared
per optimizer step: losses, router and expert gradients (after megatron-style
gradient all-reduce), Sigma; at the end the rank-summed counters and the statistics
files (written by rank 0 only).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_megatron_router_support import (
    build_moe_layer,
    destroy_parallel,
    find_free_port as free_port,
    init_parallel,
    make_config,
    single_process_group,
)

from megatron.core import parallel_state  # noqa: E402

from mpmoe.megatron.router import set_training_progress, sync_routing_state  # noqa: E402
from mpmoe.megatron.stats import RoutingStatsTracker, read_stats_file  # noqa: E402

E = 8
STEPS = 3
WORLD = 2


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 2 * WORLD, 32, generator=g)  # [seq, batch, hidden]


def config(stats_dir, sigma_every):
    return make_config(
        moe_router_load_balancing_type="otep",
        moe_otep_warmup_fraction=0.3,  # step 0 is warm-up (top-k), steps 1-2 OTEP
        moe_sigma_update_every=sigma_every,
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        moe_stats_dir=str(stats_dir),
        moe_plot_every=1,
    )


def load_global_weights(layer, state, ep_rank, num_local):
    own = layer.state_dict()
    new = {}
    for key in own:
        if key.endswith("_extra_state"):
            new[key] = own[key]
        elif key.startswith("experts.local_experts."):
            rest = key[len("experts.local_experts.") :]
            local, tail = rest.split(".", 1)
            new[key] = state[f"experts.local_experts.{ep_rank * num_local + int(local)}.{tail}"]
        else:
            new[key] = state[key]
    layer.load_state_dict(new)


def run(layer, microbatches_per_step, ep_rank, num_local, tracker):
    """Train STEPS steps; returns per-step records (gradients keyed by global expert id)."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    records = []
    dp = parallel_state.get_data_parallel_group()
    edp = parallel_state.get_expert_data_parallel_group()
    for step in range(STEPS):
        set_training_progress(layer, step, STEPS)
        losses = []
        for x in microbatches_per_step(step):
            out, _ = layer(x)
            loss = (out**2).sum()
            loss.backward()
            losses.append(loss.detach())
        for name, p in layer.named_parameters():
            group = edp if name.startswith("experts.") else dp
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
        grads = {"router": layer.router.weight.grad.clone()}
        for name, p in layer.named_parameters():
            if name.startswith("experts.local_experts."):
                local, tail = name[len("experts.local_experts.") :].split(".", 1)
                grads[f"{ep_rank * num_local + int(local)}.{tail}"] = p.grad.clone()
        opt.step()
        opt.zero_grad()
        written = tracker.on_optimizer_step(step + 1)
        records.append(
            {
                "losses": losses,
                "grads": grads,
                "sigma": layer.router.current_sigma().clone(),
                "otep": layer.router.otep_active(),
                "written": [os.path.basename(p) for p in written],
            }
        )
    sync_routing_state(layer)
    s = layer.router.cooccurrence_stats
    final = {k: getattr(s, k).clone() for k in ("num_tokens", "usage", "cooccurrence", "covariance")}
    return records, final


def _worker(rank, port, ep, state_path, out_dir):
    torch.set_num_threads(1)
    from mpmoe.megatron import cpu_compat

    cpu_compat.enable()  # megatron's allgather dispatcher allocates on CUDA otherwise
    init_parallel(rank, WORLD, port, ep=ep)
    try:
        layer = build_moe_layer(config(os.path.join(out_dir, "stats"), sigma_every=1), seed=rank + 50)
        num_local = E // ep
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        load_global_weights(layer, torch.load(state_path), ep_rank, num_local)
        tracker = RoutingStatsTracker(layer)

        def mbs(step):
            return [global_batch(step)[:, 2 * rank : 2 * rank + 2].contiguous()]

        records, final = run(layer, mbs, ep_rank, num_local, tracker)
        torch.save((records, final), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_parallel()


@pytest.mark.parametrize("ep", [2, 1], ids=["ep2", "dp2"])
def test_two_ranks_equal_one_process(tmp_path, ep):
    ref_dir = tmp_path / "ref"
    with single_process_group():
        ref = build_moe_layer(config(ref_dir / "stats", sigma_every=WORLD), seed=0)
        state = {k: v.clone() for k, v in ref.state_dict().items() if torch.is_tensor(v)}
        torch.save(state, tmp_path / "state.pt")
        tracker = RoutingStatsTracker(ref)

        def mbs(step):
            x = global_batch(step)
            return [x[:, 2 * r : 2 * r + 2].contiguous() for r in range(WORLD)]

        ref_records, ref_final = run(ref, mbs, 0, E, tracker)

    out_dir = tmp_path / "dist"
    out_dir.mkdir()
    mp.start_processes(
        _worker, args=(free_port(), ep, str(tmp_path / "state.pt"), str(out_dir)), nprocs=WORLD, start_method="spawn"
    )
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]

    assert [r["otep"] for r in ref_records] == [False, True, True]
    for step in range(STEPS):
        ref_rec = ref_records[step]
        for rank, (records, _) in enumerate(results):
            rec = records[step]
            torch.testing.assert_close(rec["losses"][0], ref_rec["losses"][rank], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rec["sigma"], ref_rec["sigma"], rtol=0, atol=0)
            torch.testing.assert_close(rec["grads"]["router"], ref_rec["grads"]["router"], rtol=1e-4, atol=1e-6)
            for key, g in rec["grads"].items():
                torch.testing.assert_close(g, ref_rec["grads"][key], rtol=1e-4, atol=1e-6, msg=f"step {step} {key}")
        # Every global expert's gradient was produced by some rank.
        produced = set().union(*(set(records[step]["grads"]) for records, _ in results))
        assert produced == set(ref_rec["grads"])
        assert results[0][0][step]["written"] == ref_rec["written"] == [f"layer1_seg{step}_mope.npz"]
        assert results[1][0][step]["written"] == []  # one rank writes
    assert not torch.allclose(ref_records[-1]["sigma"], torch.eye(E))
    for _, final in results:
        for k, v in ref_final.items():
            torch.testing.assert_close(final[k], v, rtol=0, atol=0, msg=k)
    assert float(ref_final["num_tokens"]) == STEPS * 6 * 2 * WORLD
    for step in range(STEPS):
        a = read_stats_file(ref_dir / "stats" / f"layer1_seg{step}_mope.npz")
        b = read_stats_file(out_dir / "stats" / f"layer1_seg{step}_mope.npz")
        assert set(a) == set(b) == {"expert_counts", "cooccurrence_matrix", "num_tokens", "cov_matrix",
                                    "experts_per_token"}
        for k in a:
            assert (a[k] == b[k]).all(), k
        assert int(a["num_tokens"]) == 6 * 2 * WORLD
        assert a["experts_per_token"].tolist() == [0, 0, 6 * 2 * WORLD] + [0] * (E - 2)  # top-2
