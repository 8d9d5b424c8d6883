"""2 processes (gloo, 127.0.0.1) give the same losses and gradients as 1 process.

One global batch of 4 sequences; 3 Adam steps. Cases:

* EP=2 with the allgather dispatcher (world 2: the dense part is then data-parallel 2,
  each rank holds 4 of the 8 experts);
* EP=2 with the alltoall dispatcher;
* DP=2, EP=1 (every rank holds all experts).

Gradients are synchronised with :func:`megatron_testing.allreduce_gradients` (megatron's
DDP needs CUDA in 0.16.1). The load-balancing aux loss is off here: megatron computes it
per rank over the tensor/context group, so with data parallelism it is, by design, not
the aux loss of the global batch.
"""

from __future__ import annotations

import pytest
import torch

from megatron_testing import (
    allreduce_gradients,
    global_param_name,
    make_batch,
    run_distributed,
    shard_experts,
    tiny_config,
)

VOCAB, SEQ, BATCH, STEPS, SEED = 128, 32, 4, 3, 7
CASES = {
    "ep2_allgather": dict(ep=2, dispatcher="allgather"),
    "ep2_alltoall": dict(ep=2, dispatcher="alltoall"),
    "dp2": dict(ep=1, dispatcher="allgather"),
}


def train_scenario(rank, world_size, ep, dispatcher, init_state=None):
    """Build, (load ``init_state``), train STEPS steps on this rank's slice of the batch.

    Returns the initial full state dict (when ``init_state`` is None), the global loss
    per step, and the step-0 gradients keyed by single-process parameter names.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mpmoe.megatron import build_gpt_model, init_distributed

    init_distributed(expert_model_parallel_size=ep, seed=SEED)
    cfg = tiny_config(expert_model_parallel_size=ep, moe_token_dispatcher_type=dispatcher)
    model = build_gpt_model(cfg, vocab_size=VOCAB, max_sequence_length=SEQ)
    n_local = cfg.num_moe_experts // ep
    ep_rank = ps.get_expert_model_parallel_rank()
    state = model.state_dict()
    own_experts = {
        global_param_name(k, ep_rank, n_local): v.clone()
        for k, v in state.items()
        if ".local_experts." in k and torch.is_tensor(v)
    }
    initial = None
    if init_state is None:
        initial = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    else:
        model.load_state_dict(shard_experts(init_state, list(state), ep_rank, n_local))

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens, pos, labels = make_batch(SEED, BATCH, SEQ, VOCAB)
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(tokens[rows], pos[rows], None, labels=labels[rows]).mean()
        loss.backward()
        allreduce_gradients(model)
        global_loss = loss.detach().clone()
        if dp > 1:
            dist.all_reduce(global_loss, group=ps.get_data_parallel_group())
            global_loss /= dp
        losses.append(global_loss.item())
        if step == 0:
            for name, p in model.named_parameters():
                grads[global_param_name(name, ep_rank, n_local)] = p.grad.detach().clone()
        opt.step()
    from mpmoe.megatron import token_parallel_world_size

    return dict(initial=initial, losses=losses, grads=grads, own_experts=own_experts,
                token_group_size=token_parallel_world_size(cfg.sequence_parallel))


def _reference():
    """Single process (world 1, in this process): EP=1, the whole batch."""
    from mpmoe.megatron import destroy_distributed

    try:
        return train_scenario(0, 1, ep=1, dispatcher="allgather")
    finally:
        destroy_distributed()


def _two_ranks(init_state):
    """All three cases in one pair of spawned processes (saves process start-ups)."""
    return run_distributed(_all_cases, 2, init_state)


def _all_cases(rank, world_size, init_state):
    from mpmoe.megatron import destroy_distributed

    out = {}
    for name, case in CASES.items():
        out[name] = train_scenario(rank, world_size, init_state=init_state, **case)
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def results():
    ref = _reference()
    per_rank = _two_ranks(ref["initial"])
    return ref, per_rank


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(results, case):
    ref, per_rank = results
    for rank_out in per_rank:
        got = rank_out[case]
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=2e-5
        )
    merged = {}
    for rank_out in per_rank:
        for name, g in rank_out[case]["grads"].items():
            if name in merged:  # replicated parameter: identical on every rank after sync
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0)
            merged[name] = g
    assert set(merged) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(merged[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the loss went down over the steps in every case
    assert ref["losses"][-1] < ref["losses"][0]


def test_expert_parallel_ranks_hold_different_experts(results):
    _, per_rank = results
    names0 = {n for n in per_rank[0]["ep2_allgather"]["grads"] if ".local_experts." in n}
    names1 = {n for n in per_rank[1]["ep2_allgather"]["grads"] if ".local_experts." in n}
    assert names0 and names1 and not names0 & names1
    assert ".local_experts.4." in " ".join(sorted(names1))


@pytest.mark.parametrize("case", list(CASES))
def test_expert_initialisation_does_not_depend_on_expert_parallelism(results, case):
    """Built from scratch, each rank's experts equal the single-process experts."""
    ref, per_rank = results
    for rank_out in per_rank:
        own = rank_out[case]["own_experts"]
        assert own
        for name, value in own.items():
            torch.testing.assert_close(value, ref["initial"][name], rtol=0, atol=0, msg=name)


def test_token_parallel_group_spans_both_ranks(results):
    ref, per_rank = results
    assert ref["token_group_size"] == 1
    for rank_out in per_rank:
        for case in CASES:
            assert rank_out[case]["token_group_size"] == 2


def _four_rank_cases(rank, world_size, init_state):
    from mpmoe.megatron import destroy_distributed

    out = {d: train_scenario(rank, world_size, ep=2, dispatcher=d, init_state=init_state)
           for d in ("allgather", "alltoall")}
    destroy_distributed()
    return out


@pytest.mark.slow
def test_four_processes_ep2_times_dp2_match_one(results):
    """World 4: EP=2 and expert-data-parallel 2 (dense part DP=4)."""
    ref, _ = results
    per_rank = run_distributed(_four_rank_cases, 4, ref["initial"], timeout=400)
    for dispatcher in ("allgather", "alltoall"):
        merged = {}
        for rank_out in per_rank:
            got = rank_out[dispatcher]
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]),
                                       rtol=0, atol=2e-5)
            for name, g in got["grads"].items():
                if name in merged:
                    torch.testing.assert_close(g, merged[name], rtol=0, atol=0)
                merged[name] = g
            assert got["token_group_size"] == 4
        assert set(merged) == set(ref["grads"])
        for name, g in ref["grads"].items():
            torch.testing.assert_close(merged[name], g, rtol=1e-4, atol=1e-6, msg=name)
