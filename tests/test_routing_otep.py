"""OTEP selection against the spec's invariants and a direct-solve reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpmoe.routing import otep_select, otep_select_indices
from routing_reference import covariance_reference, greedy_gains, mahalanobis, otep_reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def routing_covariance(num_experts: int, seed: int, density: float = 0.25, tokens: int = 4000) -> torch.Tensor:
    """A realistic Sigma: covariance of random, correlated routing maps (float64)."""
    g = torch.Generator().manual_seed(seed)
    # Correlated experts: a few latent "topics" switch groups of experts on together.
    topics = torch.rand(tokens, 4, generator=g) < 0.5
    loading = torch.rand(4, num_experts, generator=g) < 0.3
    base = torch.rand(tokens, num_experts, generator=g) < density
    maps = base | ((topics.float() @ loading.float()) > 0) & (torch.rand(tokens, num_experts, generator=g) < 0.5)
    return covariance_reference(maps) + 1e-3 * torch.eye(num_experts, dtype=torch.float64)


def random_probs(tokens: int, num_experts: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(tokens, num_experts, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)


def check_greedy(probs, sigma, idx, rel_tol):
    """Each pick's gain is the best gain by direct solves (up to rel_tol), and f grows by it."""
    for row in range(probs.shape[0]):
        chosen: list[int] = []
        for j in idx[row].tolist():
            gains = greedy_gains(probs[row], sigma, chosen)
            best = float(gains.max())
            assert float(gains[j]) >= best - rel_tol * max(best, 1e-30), (row, chosen, j, best)
            chosen.append(j)
        # f(S) accumulated from gains equals a direct solve of the final set.
        f_direct = mahalanobis(probs[row], sigma, chosen)
        total = 0.0
        for t, j in enumerate(chosen):
            total += float(greedy_gains(probs[row], sigma, chosen[:t])[j])
        assert math.isclose(total, f_direct, rel_tol=1e-6), (total, f_direct)


def assert_exactly_k(mask: torch.Tensor, k: int) -> None:
    assert mask.dtype == torch.bool
    assert torch.equal(mask.sum(dim=1), torch.full((mask.shape[0],), k))


# ---------------------------------------------------------------- reference equality


@SETTINGS
@given(
    num_experts=st.integers(2, 24),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_matches_direct_solve_reference_fp64(num_experts, data, seed):
    k = data.draw(st.integers(1, min(num_experts, 8)))
    sigma = routing_covariance(num_experts, seed)
    probs = random_probs(6, num_experts, seed + 1, torch.float64)
    idx = otep_select_indices(probs, sigma, k)
    for row in range(probs.shape[0]):
        ref = otep_reference(probs[row], sigma, k)
        if idx[row].tolist() != ref:
            # Only a numerical near-tie may differ: the pick must still be greedy-optimal.
            check_greedy(probs[row : row + 1], sigma, idx[row : row + 1], rel_tol=1e-9)


@SETTINGS
@given(num_experts=st.integers(2, 32), seed=st.integers(0, 2**16))
def test_fp32_is_greedy_optimal(num_experts, seed):
    k = min(num_experts, 6)
    sigma = routing_covariance(num_experts, seed)
    probs = random_probs(5, num_experts, seed + 7)
    idx = otep_select_indices(probs, sigma.float(), k)
    check_greedy(probs.double(), sigma, idx, rel_tol=1e-4)


@pytest.mark.parametrize("num_experts,k", [(64, 8), (128, 12), (256, 16)])
def test_large_expert_counts_match_reference(num_experts, k):
    sigma = routing_covariance(num_experts, seed=num_experts, density=0.1, tokens=6000)
    probs = random_probs(3, num_experts, seed=5, dtype=torch.float64)
    idx = otep_select_indices(probs, sigma, k)
    for row in range(probs.shape[0]):
        ref = otep_reference(probs[row], sigma, k)
        if idx[row].tolist() != ref:
            check_greedy(probs[row : row + 1], sigma, idx[row : row + 1], rel_tol=1e-9)
    # fp32 and fp64 agree on these well-separated instances
    idx32 = otep_select_indices(probs.float(), sigma.float(), k)
    assert (idx32.sort(1).values == idx.sort(1).values).float().mean() > 0.95


def test_greedy_objective_increases_each_round():
    sigma = routing_covariance(16, seed=3)
    probs = random_probs(20, 16, seed=4, dtype=torch.float64)
    idx = otep_select_indices(probs, sigma, 6)
    for row in range(20):
        values = [mahalanobis(probs[row], sigma, idx[row, : t + 1].tolist()) for t in range(6)]
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------- spec invariants


@SETTINGS
@given(
    tokens=st.integers(1, 40),
    num_experts=st.integers(1, 70),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_exactly_k_distinct_experts(tokens, num_experts, data, seed):
    k = data.draw(st.integers(1, num_experts))
    sigma = routing_covariance(num_experts, seed, tokens=500).float()
    probs = random_probs(tokens, num_experts, seed)
    mask = otep_select(probs, sigma, k)
    assert mask.shape == (tokens, num_experts)
    assert_exactly_k(mask, k)
    idx = otep_select_indices(probs, sigma, k)
    assert all(len(set(r)) == k for r in idx.tolist())


@SETTINGS
@given(num_experts=st.integers(2, 80), data=st.data(), seed=st.integers(0, 2**16))
def test_identity_sigma_is_topk(num_experts, data, seed):
    k = data.draw(st.integers(1, num_experts))
    probs = random_probs(30, num_experts, seed)
    idx = otep_select_indices(probs, torch.eye(num_experts), k)
    expected = probs.topk(k, dim=1).indices
    assert torch.equal(idx, expected)  # same order too: greedy picks by probability


@SETTINGS
@given(num_experts=st.integers(2, 64), data=st.data(), seed=st.integers(0, 2**16))
def test_diagonal_sigma_is_topk_of_p2_over_diag(num_experts, data, seed):
    k = data.draw(st.integers(1, num_experts))
    g = torch.Generator().manual_seed(seed)
    diag = torch.rand(num_experts, generator=g, dtype=torch.float64) + 0.05
    probs = random_probs(30, num_experts, seed, torch.float64)
    mask = otep_select(probs, torch.diag(diag), k)
    expected = torch.zeros_like(mask).scatter_(1, (probs**2 / diag).topk(k, dim=1).indices, True)
    assert torch.equal(mask, expected)


def test_identity_ties_resolve_to_lowest_index():
    probs = torch.full((4, 10), 0.1)
    idx = otep_select_indices(probs, torch.eye(10), 3)
    assert idx.tolist() == [[0, 1, 2]] * 4
    idx64 = otep_select_indices(probs.double(), torch.eye(10, dtype=torch.float64), 3)
    assert idx64.tolist() == [[0, 1, 2]] * 4


@SETTINGS
@given(num_experts=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_permuting_experts_permutes_selection(num_experts, seed):
    k = max(1, num_experts // 3)
    sigma = routing_covariance(num_experts, seed)
    probs = random_probs(8, num_experts, seed + 3, torch.float64)
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    mask = otep_select(probs, sigma, k)
    mask_perm = otep_select(probs[:, perm], sigma[perm][:, perm], k)
    assert torch.equal(mask_perm, mask[:, perm])


def test_correlated_duplicate_is_skipped():
    """The echo chamber: a near-copy of a chosen expert loses to a less likely, different one.

    Experts 0 and 1 almost always fire together, and the router scores 1 about as
    Sigma predicts from expert 0 (residual p_1 - 0.995 p_0 ~ 0), so it adds little.
    """
    sigma = torch.eye(4, dtype=torch.float64) * 0.2
    sigma[0, 1] = sigma[1, 0] = 0.199
    probs = torch.tensor([[0.4, 0.39, 0.15, 0.06]], dtype=torch.float64)
    assert probs.topk(2).indices.tolist() == [[0, 1]]
    assert otep_select_indices(probs, sigma, 2).tolist() == [[0, 2]]
    assert otep_select_indices(probs.float(), sigma.float(), 2).tolist() == [[0, 2]]


# ---------------------------------------------------------------- degenerate Sigma


def degenerate_sigmas(num_experts: int):
    g = torch.Generator().manual_seed(num_experts)
    base = routing_covariance(num_experts, seed=num_experts)
    # singular: rank 2
    v = torch.randn(num_experts, 2, generator=g, dtype=torch.float64)
    yield "rank2", v @ v.t()
    # zero rows/columns: experts never routed
    z = base.clone()
    z[:3] = 0
    z[:, :3] = 0
    yield "zero_rows", z
    # duplicated experts: 1 is a copy of 0, 3 of 2
    d = base.clone()
    d[1], d[:, 1] = d[0], d[:, 0]
    d[1, 1] = d[0, 0]
    d[3], d[:, 3] = d[2], d[:, 2]
    d[3, 3] = d[2, 2]
    yield "duplicates", d
    yield "all_zero", torch.zeros(num_experts, num_experts, dtype=torch.float64)
    yield "all_ones", torch.ones(num_experts, num_experts, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (16, 8), (64, 8), (256, 16)])
def test_degenerate_sigma_gives_exactly_k_finite(num_experts, k, dtype):
    probs = random_probs(32, num_experts, seed=1, dtype=dtype)
    for name, sigma in degenerate_sigmas(num_experts):
        mask = otep_select(probs, sigma.to(dtype), k)
        assert_exactly_k(mask, k), name


def test_exact_duplicate_with_equal_probability_is_not_picked_twice():
    sigma = torch.eye(6, dtype=torch.float64) * 0.1
    sigma[0, 1] = sigma[1, 0] = 0.1  # expert 1 is an exact copy of expert 0
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.05, 0.05]], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        idx = otep_select_indices(probs.to(dtype), sigma.to(dtype), 3)
        assert set(idx[0].tolist()) == {0, 2, 3}, dtype


def test_zero_rows_rank_by_probability_alone():
    """Never-routed experts (zero rows) get diag = eps: any probability makes them win."""
    sigma = routing_covariance(6, seed=0)
    sigma[5] = 0
    sigma[:, 5] = 0
    probs = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.09, 0.01]], dtype=torch.float64)
    idx = otep_select_indices(probs, sigma, 2)
    assert idx[0, 0].item() == 5


# ---------------------------------------------------------------- masks, dtypes, ties


def test_disallowed_experts_are_never_picked_when_enough_allowed():
    probs = random_probs(50, 16, seed=2)
    sigma = routing_covariance(16, seed=2).float()
    allowed = torch.ones(16, dtype=torch.bool)
    allowed[[0, 3, 7]] = False
    probs = probs.masked_fill(~allowed, 0.0)  # a -inf logit has probability 0
    mask = otep_select(probs, sigma, 8, allowed=allowed)
    assert_exactly_k(mask, 8)
    assert not mask[:, ~allowed].any()
    # per-token allowed
    allowed_t = torch.rand(50, 16, generator=torch.Generator().manual_seed(0)) < 0.7
    allowed_t[:, :8] = True
    mask = otep_select(probs, sigma, 8, allowed=allowed_t)
    assert not (mask & ~allowed_t).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fewer_allowed_than_k_fills_with_lowest_disallowed(dtype):
    probs = random_probs(5, 8, seed=0, dtype=dtype)
    allowed = torch.tensor([False, True, False, True, False, False, False, False])
    idx = otep_select_indices(probs, routing_covariance(8, 0).to(dtype), 4, allowed=allowed)
    assert set(idx[:, :2].flatten().tolist()) <= {1, 3}
    assert idx[:, 2:].sort(1).values.tolist() == [[0, 2]] * 5


def test_bf16_and_fp16_inputs_compute_in_fp32():
    sigma = routing_covariance(32, seed=9).float()
    probs = random_probs(64, 32, seed=9)
    for dtype in (torch.bfloat16, torch.float16):
        low = probs.to(dtype)
        assert torch.equal(otep_select(low, sigma.to(dtype), 8), otep_select(low.float(), sigma.to(dtype).float(), 8))


def test_chunking_does_not_change_the_result():
    sigma = routing_covariance(64, seed=11).float()
    probs = random_probs(1000, 64, seed=11)
    full = otep_select_indices(probs, sigma, 8, chunk_size=1000)
    for chunk in (1, 7, 128, 999):
        assert torch.equal(otep_select_indices(probs, sigma, 8, chunk_size=chunk), full)
    assert torch.equal(otep_select_indices(probs, sigma, 8), full)


def test_fp32_packed_and_fp64_paths_agree():
    sigma = routing_covariance(48, seed=12)
    probs = random_probs(300, 48, seed=12, dtype=torch.float64)
    a = otep_select(probs, sigma, 6)
    b = otep_select(probs.float(), sigma.float(), 6)
    assert (a == b).all(dim=1).float().mean() > 0.98


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_tie_break_is_reproducible_and_random(dtype):
    probs = torch.full((2000, 8), 0.125, dtype=dtype)
    eye = torch.eye(8, dtype=dtype)
    a = otep_select_indices(probs, eye, 2, tie_break=123)
    b = otep_select_indices(probs, eye, 2, tie_break=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, otep_select_indices(probs, eye, 2, tie_break=124))
    counts = torch.bincount(a[:, 0], minlength=8).double()
    # uniform over the 8 tied experts: 250 each, loose 6-sigma band
    assert ((counts - 250).abs() < 6 * math.sqrt(250)).all(), counts
    # ties only: a unique best still wins
    probs2 = probs.clone()
    probs2[:, 5] = 0.3
    assert (otep_select_indices(probs2, eye, 1, tie_break=1)[:, 0] == 5).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be in"),
        (dict(k=9), "k must be in"),
        (dict(probs=torch.rand(4)), "2-D"),
        (dict(sigma=torch.rand(8, 7)), "square"),
        (dict(sigma=torch.eye(6)), "8 experts"),
        (dict(probs=torch.tensor([[float("nan")] + [0.1] * 7])), "NaN or inf"),
        (dict(probs=torch.tensor([[float("inf")] + [0.1] * 7])), "NaN or inf"),
        (dict(sigma=torch.eye(8).index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan")))), "NaN or inf"),
        (dict(allowed=torch.ones(7, dtype=torch.bool)), "allowed must be"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = dict(probs=torch.rand(3, 8), sigma=torch.eye(8), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        otep_select(args.pop("probs"), args.pop("sigma"), args.pop("k"), **args)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError):
        otep_select(torch.rand(3, 8), torch.eye(8), 2.0)
    with pytest.raises(TypeError):
        otep_select(torch.randint(0, 3, (3, 8)), torch.eye(8), 2)
    with pytest.raises(TypeError):
        otep_select(torch.rand(3, 8), torch.eye(8), 2, tie_break="x")
    with pytest.raises(TypeError):
        otep_select(torch.rand(3, 8), torch.eye(8), 2, allowed=torch.ones(8))


def test_probs_that_require_grad_are_accepted():
    probs = random_probs(10, 8, seed=0).requires_grad_()
    mask = otep_select(probs, torch.eye(8), 3)
    assert not mask.requires_grad
    assert torch.equal(mask, otep_select(probs.detach(), torch.eye(8), 3))


def test_empty_batch():
    assert otep_select(torch.rand(0, 8), torch.eye(8), 3).shape == (0, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sigma = routing_covariance(64, seed=21).float()
    probs = random_probs(4096, 64, seed=21)
    cpu = otep_select(probs, sigma, 8)
    gpu = otep_select(probs.cuda(), sigma.cuda(), 8, check_finite=False)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() == cpu).all(dim=1).float().mean() > 0.999
    bf = otep_select(probs.cuda().bfloat16(), sigma.cuda(), 8)
    assert bf.sum(1).eq(8).all()
