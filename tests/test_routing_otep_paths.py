"""The three OTEP paths pick the same experts: blocked PyTorch loop (the reference path),
the small-batch CPU loop (decode, T <= 64) and the Triton kernel (under TRITON_INTERPRET=1
on CPU tensors here; on CUDA in the cuda-marked tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpmoe.routing import OtepCache, otep, otep_select, otep_select_indices
from mpmoe.routing import otep_triton
from routing_reference import otep_reference
from test_routing_otep import degenerate_sigmas, random_probs, routing_covariance

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def blocked(probs, sigma, k, **kw):
    """The blocked loop (the path large batches take), whatever T is."""
    saved, otep.SMALL_BATCH = otep.SMALL_BATCH, -1
    try:
        return otep_select_indices(probs, sigma, k, backend="torch", **kw)
    finally:
        otep.SMALL_BATCH = saved


def some_allowed(draw_kind, tokens, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    if draw_kind == "none":
        return None
    if draw_kind == "experts":
        return torch.rand(num_experts, generator=g) < 0.6
    return torch.rand(tokens, num_experts, generator=g) < 0.6


# ---------------------------------------------------------------- small-batch CPU loop


@SETTINGS
@given(
    tokens=st.integers(1, 64),
    num_experts=st.integers(1, 70),
    data=st.data(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    allowed_kind=st.sampled_from(["none", "experts", "tokens"]),
)
def test_small_batch_loop_matches_blocked_loop(tokens, num_experts, data, seed, dtype, allowed_kind):
    k = data.draw(st.integers(1, num_experts))
    sigma = routing_covariance(num_experts, seed, tokens=300).to(dtype)
    probs = random_probs(tokens, num_experts, seed + 1).to(dtype)
    allowed = some_allowed(allowed_kind, tokens, num_experts, seed)
    assert otep._choose_path(None, probs, k, None) == "small"
    small = otep_select_indices(probs, sigma, k, allowed=allowed)
    assert torch.equal(small, blocked(probs, sigma, k, allowed=allowed))


@pytest.mark.parametrize("num_experts,k", [(8, 2), (13, 13), (64, 8)])
def test_small_batch_loop_on_degenerate_sigma_and_ties(num_experts, k):
    probs = random_probs(16, num_experts, seed=3)
    for name, sigma in degenerate_sigmas(num_experts):
        for dtype in (torch.float32, torch.float64):
            a = otep_select_indices(probs.to(dtype), sigma.to(dtype), k)
            assert torch.equal(a, blocked(probs.to(dtype), sigma.to(dtype), k)), name
    ties = torch.full((5, num_experts), 1.0 / num_experts)
    assert otep_select_indices(ties, torch.eye(num_experts), k).tolist() == [list(range(k))] * 5


@SETTINGS
@given(
    num_experts=st.integers(1, 40),
    data=st.data(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    max_nodes=st.sampled_from([2, 5, 1 << 14]),
)
def test_cache_kept_across_calls_matches_blocked_loop(num_experts, data, seed, dtype, max_nodes):
    # One OtepCache over many calls of 1..64 tokens, as a MoPE layer keeps it while decoding:
    # every call picks what the blocked loop picks, whether its prefixes were memoised by
    # earlier calls, are new, or the cache had to start over (max_nodes).
    k = data.draw(st.integers(1, num_experts))
    sigma = routing_covariance(num_experts, seed, tokens=300).to(dtype)
    cache = OtepCache(max_nodes=max_nodes)
    for call, tokens in enumerate(data.draw(st.lists(st.sampled_from([1, 1, 2, 7, 64]), min_size=2, max_size=6))):
        probs = random_probs(tokens, num_experts, seed + 1 + call).to(dtype)
        got = otep_select_indices(probs, sigma, k, cache=cache)
        assert torch.equal(got, blocked(probs, sigma, k)), call
        assert torch.equal(otep_select(probs, sigma, k, cache=cache), otep_select(probs, sigma, k, backend="torch"))
    assert 1 <= len(cache) <= max(max_nodes, 1 + 64 * (k - 1))


def test_cache_follows_sigma_changes():
    # The cache belongs to one Sigma: an in-place update (as Sigma's rebuild in training), a
    # new tensor, another eps or dtype each start it over; an unchanged Sigma reuses it.
    probs = random_probs(1, 12, seed=1)
    sigma = routing_covariance(12, seed=2)
    cache = OtepCache()
    otep_select(probs, sigma, 4, cache=cache)
    held = len(cache)
    assert held == 4  # the root and three picks
    assert torch.equal(otep_select_indices(probs, sigma, 4, cache=cache), blocked(probs, sigma, 4))
    assert len(cache) == held  # the same prefixes: nothing added
    sigma.copy_(routing_covariance(12, seed=3))
    assert torch.equal(otep_select_indices(probs, sigma, 4, cache=cache), blocked(probs, sigma, 4))
    other = routing_covariance(12, seed=4)
    assert torch.equal(otep_select_indices(probs, other, 4, cache=cache), blocked(probs, other, 4))
    assert torch.equal(otep_select_indices(probs, other, 4, eps=1e-3, cache=cache), blocked(probs, other, 4, eps=1e-3))
    assert torch.equal(otep_select_indices(probs.double(), other.double(), 4, cache=cache),
                       blocked(probs.double(), other.double(), 4))
    with torch.inference_mode():  # inference tensors keep no version: never reused, still right
        frozen = routing_covariance(12, seed=5)
        assert torch.equal(otep_select_indices(probs, frozen, 4, cache=cache), blocked(probs, frozen, 4))
    with pytest.raises(ValueError, match="max_nodes"):
        OtepCache(max_nodes=1)


def test_small_batch_loop_keeps_no_graph_and_leaves_inputs_alone():
    probs = random_probs(3, 8, seed=2).requires_grad_()
    sigma = routing_covariance(8, seed=2)
    before = (probs.detach().clone(), sigma.clone())
    for rows in (probs[:1], probs):
        mask = otep_select(rows, sigma, 3, cache=OtepCache())
        assert not mask.requires_grad and mask.grad_fn is None
    assert torch.equal(probs.detach(), before[0]) and torch.equal(sigma, before[1])


def test_backend_flag_and_environment_variable(monkeypatch):
    probs, sigma = random_probs(4, 8, seed=0), torch.eye(8)
    with pytest.raises(ValueError, match="backend"):
        otep_select(probs, sigma, 2, backend="cuda")
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", "fast")
    with pytest.raises(ValueError, match="MPMOE_OTEP_BACKEND"):
        otep_select(probs, sigma, 2)
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", "torch")
    assert otep._choose_path(None, probs, 2, None) == "small"
    assert otep.default_backend() == "torch"
    monkeypatch.setenv("MPMOE_OTEP_BACKEND", " Auto ")
    assert otep.default_backend() == "auto"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if otep_triton.available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            otep_select(probs, sigma, 2, backend="triton")
        with pytest.raises(ValueError, match="tie-break"):
            otep_select(probs, sigma, 2, backend="triton", tie_break=1)
    # large CPU batches, seeded tie-breaks and CUDA without Triton take the blocked loop
    assert otep._choose_path("auto", random_probs(65, 8, seed=0), 2, None) == "blocked"
    assert otep._choose_path("auto", probs, 2, 7) == "blocked"


def test_routing_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from mpmoe.routing import otep_select, otep_triton\n"
        "assert not otep_triton.available()\n"
        "m = otep_select(torch.rand(3, 8).softmax(-1), torch.eye(8), 2)\n"
        "assert m.sum().item() == 6\n"
        "try:\n"
        "    otep_select(torch.rand(3, 8), torch.eye(8), 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('backend=triton without Triton did not raise')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- Triton kernel, interpreted

needs_triton = pytest.mark.skipif(
    not otep_triton.available(), reason="Triton is not installed (pip install triton; Linux x86-64/aarch64)"
)


@pytest.fixture
def interpret():
    if not otep_triton.interpreting():
        pytest.skip("Triton's interpreter is off (tests/conftest.py sets TRITON_INTERPRET=1 where CUDA is absent)")


def kernel(probs, sigma, k, **kw):
    return otep_select_indices(probs, sigma, k, backend="triton", **kw)


@needs_triton
@pytest.mark.parametrize(
    "tokens,num_experts,k",
    [(7, 8, 2), (40, 13, 5), (3, 13, 1), (5, 13, 13), (33, 64, 8), (2, 256, 16), (9, 100, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_torch_paths(interpret, tokens, num_experts, k, dtype):
    sigma = routing_covariance(num_experts, seed=num_experts, tokens=500).to(dtype)
    probs = random_probs(tokens, num_experts, seed=tokens, dtype=dtype)
    ref = blocked(probs, sigma, k)
    assert torch.equal(kernel(probs, sigma, k), ref)
    assert torch.equal(otep_select(probs, sigma, k, backend="triton"), otep_select(probs, sigma, k))


@needs_triton
def test_kernel_matches_direct_solve_reference(interpret):
    sigma = routing_covariance(12, seed=4)
    probs = random_probs(6, 12, seed=5, dtype=torch.float64)
    idx = kernel(probs, sigma, 5)
    assert idx.tolist() == [otep_reference(probs[row], sigma, 5) for row in range(6)]


@needs_triton
def test_kernel_ties_masks_and_degenerate_sigma(interpret):
    # exact ties: lowest index first
    ties = torch.full((4, 10), 0.1)
    assert kernel(ties, torch.eye(10), 3).tolist() == [[0, 1, 2]] * 4
    # allowed masks, [E] and [T, E], and fewer allowed than k
    probs = random_probs(20, 12, seed=6)
    sigma = routing_covariance(12, seed=6).float()
    for allowed in (
        torch.tensor([True, False] * 6),
        torch.rand(20, 12, generator=torch.Generator().manual_seed(1)) < 0.5,
        torch.tensor([False, True, False, True] + [False] * 8),
    ):
        got = kernel(probs.masked_fill(~allowed, 0.0), sigma, 4, allowed=allowed)
        assert torch.equal(got, blocked(probs.masked_fill(~allowed, 0.0), sigma, 4, allowed=allowed))
    # degenerate Sigma: singular, zero rows, duplicates, all zero, all ones
    probs = random_probs(8, 16, seed=7)
    for name, sig in degenerate_sigmas(16):
        for dtype in (torch.float32, torch.float64):
            p, s = probs.to(dtype), sig.to(dtype)
            got, want = kernel(p, s, 8), blocked(p, s, 8)
            # Once the chosen experts span Sigma's range (rank 2, a duplicate, a zero row)
            # every Schur complement left is rounding noise floored at eps, so later picks
            # follow the last bit of each library's arithmetic: bit-equal on Triton 3.9 +
            # torch 2.13, not on Triton 3.8 + torch 2.14. Portable: the same first pick and
            # k distinct experts (test_routing_otep holds both paths to the invariants).
            assert torch.equal(got[:, 0], want[:, 0]), (name, dtype)
            assert all(len(set(row)) == 8 for row in got.tolist()), (name, dtype)


@needs_triton
def test_kernel_low_precision_inputs_compute_in_fp32(interpret):
    sigma = routing_covariance(24, seed=8).float()
    probs = random_probs(10, 24, seed=8)
    for dtype in (torch.bfloat16, torch.float16):
        low_p, low_s = probs.to(dtype), sigma.to(dtype)
        assert torch.equal(kernel(low_p, low_s, 6), blocked(low_p, low_s, 6))
        assert torch.equal(kernel(low_p, low_s, 6), kernel(low_p.float(), low_s.float(), 6))


@needs_triton
def test_kernel_range_is_checked(interpret):
    with pytest.raises(ValueError, match="k <= 16"):
        kernel(random_probs(2, 32, seed=0), torch.eye(32), 17)
    assert otep_triton.supports(256, 16) and not otep_triton.supports(257, 2)


# ---------------------------------------------------------------- CUDA (gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not otep_triton.available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("tokens,num_experts,k", [(4096, 64, 8), (1024, 128, 8), (257, 256, 16), (64, 13, 13), (1, 8, 2)])
def test_cuda_kernel_matches_torch(tokens, num_experts, k):
    sigma = routing_covariance(num_experts, seed=num_experts, density=0.1, tokens=2000).float().cuda()
    probs = random_probs(tokens, num_experts, seed=1).cuda()
    assert otep._choose_path(None, probs, k, None) == "triton"
    fused = otep_select(probs, sigma, k)
    ref = otep_select(probs, sigma, k, backend="torch")
    assert fused.sum(1).eq(k).all()
    # FMA contraction on the GPU may flip exact near-ties, nothing more
    assert (fused == ref).all(dim=1).float().mean() > 0.999
    allowed = torch.rand(num_experts, device="cuda") < 0.7
    allowed[:k] = True
    masked = otep_select(probs, sigma, k, allowed=allowed)
    assert not (masked & ~allowed).any()
    bf = otep_select(probs.bfloat16(), sigma.bfloat16(), k)
    assert bf.sum(1).eq(k).all()
