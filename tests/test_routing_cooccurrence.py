"""CooccurrenceStats: counters, Sigma, state dict, and cross-rank sums over gloo."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmoe.routing import CooccurrenceStats, covariance_from_counts
from routing_reference import covariance_reference


def random_maps(tokens: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(tokens, num_experts, generator=g).topk(k, dim=1).indices
    return torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, idx, True)


def test_identity_before_any_token():
    stats = CooccurrenceStats(5)
    assert torch.equal(stats.sigma(), torch.eye(5))
    assert torch.equal(stats.covariance, torch.eye(5))
    stats.update(random_maps(10, 5, 2, 0))
    # pending counts do not move Sigma until they are folded in
    assert torch.equal(stats.sigma(), torch.eye(5))


@settings(max_examples=30, deadline=None)
@given(num_experts=st.integers(1, 20), chunks=st.lists(st.integers(0, 50), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_sigma_equals_textbook_covariance(num_experts, chunks, seed):
    k = max(1, num_experts // 3)
    stats = CooccurrenceStats(num_experts)
    maps = [random_maps(n, num_experts, k, seed + i) for i, n in enumerate(chunks)]
    for m in maps:
        stats.update(m)
    stats.refresh()
    all_maps = torch.cat(maps)
    expected = covariance_reference(all_maps) if len(all_maps) else torch.eye(num_experts, dtype=torch.float64)
    torch.testing.assert_close(stats.covariance.double(), expected, rtol=1e-5, atol=1e-7)
    assert stats.num_tokens.item() == len(all_maps)
    assert torch.equal(stats.usage, all_maps.double().sum(0))
    assert torch.equal(stats.cooccurrence, all_maps.double().t() @ all_maps.double())


def test_formula_by_hand():
    m = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    stats = CooccurrenceStats(3)
    stats.update(m)
    sigma = stats.refresh().double()
    x = m.double().numpy()
    mean = x.mean(0)
    expected = x.T @ x / 4 - np.outer(mean, mean)  # biased covariance of the indicators
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-6)
    # expert 1 (used 3/4) has variance 3/16; experts 0 and 2 never co-fire
    assert sigma[1, 1].item() == pytest.approx(3 / 16)
    assert sigma[0, 2].item() == pytest.approx(0 - 0.5 * 0.5)


def test_never_used_expert_has_floored_diagonal_and_psd():
    m = random_maps(200, 6, 2, 1)
    m[:, 5] = False
    stats = CooccurrenceStats(6, eps=1e-9)
    stats.update(m)
    sigma = stats.refresh().double()
    assert sigma[5, 5].item() == pytest.approx(1e-9)
    assert torch.equal(sigma[5, :5], torch.zeros(5, dtype=torch.float64))
    assert torch.linalg.eigvalsh(sigma).min() > -1e-6


def test_counts_stay_exact_beyond_fp32_integer_range():
    stats = CooccurrenceStats(2)
    m = torch.ones(1 << 20, 2, dtype=torch.bool)
    for _ in range(20):  # 2^24 + ... tokens: float32 counters would stop counting
        stats.update(m)
    stats.all_reduce()
    assert stats.num_tokens.item() == 20 * (1 << 20)
    assert stats.cooccurrence[0, 1].item() == 20 * (1 << 20)


def test_state_dict_round_trip_restores_sigma():
    stats = CooccurrenceStats(8)
    stats.update(random_maps(100, 8, 3, 4))
    stats.refresh()
    sd = stats.state_dict()
    assert set(sd) == {"num_tokens", "usage", "cooccurrence", "covariance"}
    fresh = CooccurrenceStats(8)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.covariance, stats.covariance)
    assert torch.equal(fresh.sigma(), stats.sigma())
    # counting continues from the restored totals
    more = random_maps(50, 8, 3, 5)
    fresh.update(more)
    stats.update(more)
    assert torch.equal(fresh.refresh(), stats.refresh())


def test_reset_and_bad_input():
    stats = CooccurrenceStats(4)
    stats.update(random_maps(10, 4, 2, 0))
    stats.refresh()
    stats.reset()
    assert stats.num_tokens.item() == 0 and torch.equal(stats.covariance, torch.eye(4))
    with pytest.raises(ValueError, match=r"\[tokens, 4\]"):
        stats.update(torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        CooccurrenceStats(0)


def test_covariance_from_counts_has_no_python_branch_on_values():
    # N == 0 -> identity, N > 0 -> covariance, from the same code path (torch.where)
    e = 3
    zero = covariance_from_counts(torch.tensor(0.0, dtype=torch.float64), torch.zeros(e, dtype=torch.float64), torch.zeros(e, e, dtype=torch.float64))
    assert torch.equal(zero, torch.eye(e, dtype=torch.float64))


# ---------------------------------------------------------------- across ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, maps: torch.Tensor, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stats = CooccurrenceStats(maps.shape[1])
        shard = maps[rank::world]
        half = len(shard) // 2
        stats.update(shard[:half])
        stats.update(shard[half:])
        sigma = stats.refresh()
        out[rank] = (stats.state_dict(), sigma.clone())
    finally:
        dist.destroy_process_group()


def test_sum_over_ranks_equals_single_process():
    maps = random_maps(301, 12, 4, 7)
    single = CooccurrenceStats(12)
    single.update(maps)
    expected = single.refresh()
    port = _free_port()
    with mp.get_context("spawn").Manager() as manager:  # not fork()ed from a threaded process
        out = manager.dict()
        mp.spawn(_rank_worker, args=(2, port, maps, out), nprocs=2, join=True)
        results = dict(out)
    for rank in range(2):
        sd, sigma = results[rank]
        torch.testing.assert_close(sigma, expected, rtol=1e-6, atol=1e-8)
        assert sd["num_tokens"].item() == 301
        assert torch.equal(sd["cooccurrence"], single.cooccurrence)
