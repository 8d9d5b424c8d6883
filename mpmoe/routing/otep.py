"""OTEP: greedy Mahalanobis ensemble pruning, the selection rule of MoPE routing.

For one token with router probabilities ``p`` (E,) and an expert covariance
``Sigma`` (E, E), MoPE routes to the k experts ``S`` that greedily maximise

    f(S) = p_S^T  Sigma_SS^-1  p_S.

Greedy step (paper, Alg. "OTEP"; spec ``docs/design.md``): with ``L``
the Cholesky factor of ``Sigma_SS`` and ``z = L^-1 p_S`` (so ``f(S) = ||z||^2``), a
candidate ``j`` adds

    gain_j = (p_j - a_j^T z)^2 / s_j,    a_j = L^-1 Sigma_Sj,    s_j = Sigma_jj - ||a_j||^2

and ``f(S + {j}) = f(S) + gain_j``. The first pick is ``argmax_j p_j^2 / Sigma_jj``,
the same formula with ``S`` empty.

The demo code recomputes ``a_j`` for every candidate in every round (O(T E k^3)).
Here every candidate carries its residual ``r_j = p_j - a_j^T z`` and its Schur
complement ``s_j`` from round to round, and each round appends one entry to every
``a_j`` (a pivoted partial Cholesky factorisation of Sigma whose pivot rule is the
gain). That is O(T E k^2) work and touches only [T, E] tensors, so it vectorises over
tokens with no per-token Python and no host synchronisation.

Implementation notes, in the order they matter for speed on CPU and GPU:

* Everything is laid out [tokens, experts] and updated in place.
* ``torch.argmax`` over a short last dimension is slow on CPU, ``amax`` is not. Gains
  are non-negative floats, whose IEEE-754 bit patterns order like integers, so the
  arg-max is taken as ``amax`` of an int64 key ``(bits(gain) << B) | tag(expert)``;
  the tag decodes the expert and breaks exact ties towards the lowest index (or a
  seeded random order). Selected experts get a gain of -0.0 (negative key), so a
  selection never repeats; disallowed experts get a gain of exactly 0 and a tag
  below every allowed expert, so they are picked only when nothing else is left.

Three paths make the same picks (``tests/test_routing_otep_paths.py``): this blocked
loop; for T <= ``SMALL_BATCH`` tokens on CPU (decode) the loop of
:mod:`mpmoe.routing.otep_small`, which memoises the Sigma-only part of the state by pick
prefix in an :class:`OtepCache` (the caller keeps one per Sigma across calls); on CUDA
the fused Triton kernel of :mod:`mpmoe.routing.otep_triton` when Triton is importable.
``backend=`` or the environment variable ``MPMOE_OTEP_BACKEND`` forces one.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from mpmoe.routing import otep_triton
from mpmoe.routing.otep_small import OtepCache, otep_small

__all__ = ["otep_select", "otep_select_indices", "OtepCache", "DEFAULT_EPS", "BACKENDS", "default_backend"]

#: Values of ``backend=`` / ``MPMOE_OTEP_BACKEND``.
BACKENDS = ("auto", "torch", "triton")
#: Largest batch of tokens that takes the lean small-batch loop on CPU (decode).
SMALL_BATCH = 64

#: Floor for diagonal entries and Schur complements (the demo code's value).
DEFAULT_EPS = 1e-12

# Default size of one [tokens, E] state tensor of a block (bytes): 4096 tokens at
# E = 64. Measured on 2 cores (bench_otep): blocks of 4096 beat 2048 and 8192 by 10-15%
# (fewer, larger ops against a state that still fits the last-level cache).
_CHUNK_BYTES = 1024 * 1024


def _as_generator(tie_break, device) -> torch.Generator | None:
    if tie_break is None:
        return None
    if isinstance(tie_break, torch.Generator):
        return tie_break
    if isinstance(tie_break, bool) or not isinstance(tie_break, int):
        raise TypeError(
            f"tie_break must be None, an int seed or a torch.Generator, got {type(tie_break).__name__}"
        )
    gen = torch.Generator(device=device)
    gen.manual_seed(tie_break)
    return gen


def _all_finite(x: torch.Tensor) -> bool:
    if x.dtype == torch.float64:
        return bool(torch.isfinite(x).all())
    # A float64 sum of finite fp32/bf16/fp16 values cannot overflow, so it is finite
    # exactly when every entry is, and it is much cheaper than isfinite().all().
    return bool(torch.isfinite(x.sum(dtype=torch.float64)))


def _validate(probs: torch.Tensor, sigma: torch.Tensor, k: int, allowed, check_finite) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"otep_select: probs must be a 2-D tensor [tokens, experts], got {shape}")
    num_experts = probs.shape[1]
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"otep_select: sigma must be a square 2-D tensor [experts, experts], got {shape}")
    if sigma.shape[0] != num_experts:
        raise ValueError(
            f"otep_select: sigma is {tuple(sigma.shape)} but probs has {num_experts} experts"
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"otep_select: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"otep_select: k must be in [1, {num_experts}] (the number of experts), got {k}")
    if not probs.is_floating_point() or not sigma.is_floating_point():
        raise TypeError(
            f"otep_select: probs and sigma must be floating point, got {probs.dtype} and {sigma.dtype}"
        )
    if allowed is not None:
        if allowed.dtype != torch.bool:
            raise TypeError(f"otep_select: allowed must be a bool tensor, got {allowed.dtype}")
        if allowed.shape not in ((num_experts,), tuple(probs.shape)):
            raise ValueError(
                f"otep_select: allowed must be [experts] or [tokens, experts] = {tuple(probs.shape)}, "
                f"got {tuple(allowed.shape)}"
            )
    if check_finite is None:
        # A finiteness check is free on the host and a device sync elsewhere.
        check_finite = probs.device.type == "cpu" and sigma.device.type == "cpu"
    if check_finite:
        if not _all_finite(probs):
            raise ValueError("otep_select: probs contain NaN or inf")
        if not _all_finite(sigma):
            raise ValueError("otep_select: sigma contains NaN or inf")


def otep_select_indices(
    probs: torch.Tensor,
    sigma: torch.Tensor,
    k: int,
    *,
    tie_break: int | torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    check_finite: bool | None = None,
    backend: str | None = None,
    cache: OtepCache | None = None,
) -> torch.Tensor:
    """Greedy OTEP selection; returns the chosen expert ids [T, k] in pick order.

    Same arguments as :func:`otep_select`. Column ``t`` holds the expert picked in
    greedy round ``t``, so ``indices[:, :t]`` is the greedy selection of size ``t``.
    The selection is not differentiable (it records no autograd graph).
    """
    return _select(probs, sigma, k, tie_break, allowed, eps, chunk_size, check_finite, backend, cache, False)


def _select(probs, sigma, k, tie_break, allowed, eps, chunk_size, check_finite, backend, cache, want_mask):
    """Validate, pick a path (Triton kernel, small-batch loop, blocked loop), run it.

    Returns the indices [T, k], or the bool map [T, E] when ``want_mask``.
    """
    _validate(probs, sigma, k, allowed, check_finite)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"otep_select: chunk_size must be >= 1, got {chunk_size}")
    path = _choose_path(backend, probs, k, tie_break, allowed)
    if path == "small":  # NumPy, and in-place ops on tensors that need no grad
        return otep_small(probs, sigma, k, eps, _compute_dtype(probs, sigma), want_mask, cache)
    with torch.no_grad():
        if path == "triton":
            idx, mask = otep_triton.otep_triton(probs, sigma, k, allowed=allowed, eps=eps, want_mask=want_mask)
            return mask if want_mask else idx
        return _select_blocked(probs, sigma, k, tie_break, allowed, eps, chunk_size, want_mask)


def _compute_dtype(probs, sigma) -> torch.dtype:
    """fp32 at least (bf16/fp16 inputs are upcast), fp64 when given fp64."""
    return torch.promote_types(torch.promote_types(probs.dtype, sigma.dtype), torch.float32)


def _select_blocked(probs, sigma, k, tie_break, allowed, eps, chunk_size, want_mask):
    num_tokens, num_experts = probs.shape
    device = probs.device
    dtype = _compute_dtype(probs, sigma)
    gen = _as_generator(tie_break, device)
    sig = sigma.to(device=device, dtype=dtype)
    sig = 0.5 * (sig + sig.t())  # the math assumes symmetry; be robust to round-off
    diag = sig.diagonal().clamp_min(eps)

    out = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    if num_tokens:
        if chunk_size is None:
            # Blocks of tokens whose [block, E] state tensors stay cache-resident.
            row_bytes = num_experts * torch.finfo(dtype).bits // 8
            chunk_size = max(64, _CHUNK_BYTES // row_bytes)
        _otep_blocked(probs, sig, diag, k, allowed, eps, gen, chunk_size, dtype, out)
    if not want_mask:
        return out
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=device)
    return mask.scatter_(1, out, True)


def _otep_blocked(probs, sig, diag, k, allowed, eps, gen, chunk_size, dtype, out):
    num_tokens, num_experts = probs.shape
    work = _Workspace(min(chunk_size, num_tokens), num_experts, k, dtype, probs.device, gen is not None)
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        allowed_chunk = allowed
        if allowed is not None and allowed.dim() == 2:
            allowed_chunk = allowed[start:stop]
        _otep_block(work, probs[start:stop], sig, diag, k, allowed_chunk, eps, gen, out[start:stop])


def otep_select(
    probs: torch.Tensor,
    sigma: torch.Tensor,
    k: int,
    *,
    tie_break: int | torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
    check_finite: bool | None = None,
    backend: str | None = None,
    cache: OtepCache | None = None,
) -> torch.Tensor:
    """Select exactly ``k`` experts per token by greedy OTEP; returns a bool map [T, E].

    Args:
        probs: router probabilities [T, E] (softmax over all experts); fp32, fp64,
            bf16 or fp16 (computed in fp32 at least).
        sigma: expert covariance [E, E] (see :class:`mpmoe.routing.CooccurrenceStats`).
            The identity gives top-k of ``probs``; a diagonal gives top-k of
            ``probs**2 / diag``.
        k: experts per token, ``1 <= k <= E``.
        tie_break: ``None`` resolves exactly equal gains to the lowest expert index;
            an int seed or a ``torch.Generator`` picks uniformly among them instead.
        allowed: optional bool [E] or [T, E]; experts that are not allowed (e.g. a
            masked expert with a ``-inf`` logit) are picked only if fewer than ``k``
            experts are allowed for the token.
        eps: floor for ``diag(sigma)`` and for Schur complements (degenerate or
            singular ``sigma`` stays finite).
        chunk_size: tokens processed at once (bounds memory to about
            ``(k + 6) * E * chunk_size`` floats); default: ``2**18 // E`` tokens
            (4096 at E = 64), a block whose state stays in cache.
        check_finite: raise ``ValueError`` on NaN/inf input. ``None`` checks only on
            CPU, where it costs no device synchronisation.
        backend: ``"auto"`` (default), ``"torch"`` or ``"triton"``; ``None`` reads the
            environment variable ``MPMOE_OTEP_BACKEND`` (default ``auto``). ``auto`` runs
            the fused Triton kernel on CUDA tensors when Triton is importable, E <= 256,
            k <= 16 and ``tie_break`` is None; on CPU it runs the small-batch loop for
            T <= 64 tokens (decode) without ``allowed`` or ``tie_break``, and the blocked
            loop otherwise. ``torch`` forces the CPU/PyTorch loops, ``triton`` the kernel
            (an error where it cannot run).
        cache: an :class:`OtepCache` kept by the caller for this ``sigma`` (e.g. one per
            MoE layer): the small-batch loop memoises its Sigma-only state there across
            calls (it rebuilds itself when ``sigma`` changes). ``None``: a fresh one per call.

    Returns:
        ``torch.bool`` tensor [T, E] with exactly ``k`` True entries per row.
    """
    return _select(probs, sigma, k, tie_break, allowed, eps, chunk_size, check_finite, backend, cache, True)


def default_backend() -> str:
    """What ``backend=None`` means: ``MPMOE_OTEP_BACKEND`` (validated), ``"auto"`` when unset.

    Reading the environment costs about a microsecond, which a one-token decode step
    notices: a caller on the hot path (the MoPE router) reads it once and passes it on.
    """
    value = os.environ.get("MPMOE_OTEP_BACKEND")
    value = (value.strip().lower() if value else "") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"otep_select: MPMOE_OTEP_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def _choose_path(backend, probs, k, tie_break, allowed=None) -> str:
    """"triton", "small" (CPU, T <= SMALL_BATCH, no mask, no seeded tie-break) or "blocked"."""
    if backend is None:
        backend = default_backend()
    elif backend not in BACKENDS:
        raise ValueError(f"otep_select: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = probs.device.type
    if backend == "triton":
        if not otep_triton.available():
            raise RuntimeError("otep_select: backend 'triton' needs Triton (pip install triton)")
        if tie_break is not None:
            raise ValueError("otep_select: backend 'triton' has no seeded tie-break; use tie_break=None")
        if device == "cpu" and not otep_triton.interpreting():
            raise ValueError("otep_select: backend 'triton' runs on CUDA tensors (on CPU only with TRITON_INTERPRET=1)")
        return "triton"
    if device == "cpu":
        small = probs.shape[0] <= SMALL_BATCH and tie_break is None and allowed is None
        return "small" if small else "blocked"
    if (
        backend == "auto"
        and device == "cuda"
        and tie_break is None
        and otep_triton.available()
        and otep_triton.supports(probs.shape[1], k)
    ):
        return "triton"
    return "blocked"


class _Workspace:
    """Buffers for one block of tokens, allocated once per call and reused by blocks."""

    def __init__(self, rows, num_experts, k, dtype, device, seeded):
        self.index_bits = max(1, math.ceil(math.log2(num_experts)))
        # fp32 gains are ranked through packed int64 keys (module docstring).
        self.packed = dtype == torch.float32 and self.index_bits <= 24
        self.rand_bits = (_TAG_BITS - 1 - self.index_bits) if (self.packed and seeded) else 0
        # Slots of [rows, E]: r, s, then the k - 1 factor rows; one flat index per
        # (slot, token) then reads all of a pick's entries in a single ``take``.
        self.rows = rows
        self.state = torch.empty(k + 1, rows, num_experts, device=device, dtype=dtype)
        self.slot_offsets = (torch.arange(k + 1, device=device) * (rows * num_experts)).unsqueeze(1)
        self.token_offsets = torch.arange(rows, device=device) * num_experts
        self.tag_written = False  # low key halves hold a chunk-invariant tag already
        self.minus_inf = torch.full((rows, k), -math.inf, device=device, dtype=dtype)
        if self.packed:
            # key = bits(gain) * 2^32 + tag. The gain is written straight into the
            # high 32-bit halves (as fp32), the tag sits in the low halves.
            self.key = torch.empty(rows, num_experts, device=device, dtype=torch.int64)
            halves = self.key.view(torch.int32).view(rows, num_experts, 2)
            hi, lo = (1, 0) if sys.byteorder == "little" else (0, 1)
            self.gain = halves[..., hi].view(dtype)
            self.key_lo = halves[..., lo]
        else:
            self.gain = torch.empty(rows, num_experts, device=device, dtype=dtype)


def _otep_block(work, probs, sig, diag, k, allowed, eps, gen, out):
    """OTEP for one block of tokens, writing the picks into ``out`` [T, k]."""
    num_tokens, num_experts = probs.shape
    device = probs.device
    index_bits, rand_bits, packed = work.index_bits, work.rand_bits, work.packed

    # Tag of each candidate, the tie-break order under the gain: an "allowed" bit,
    # then (seeded tie-break) random bits drawn per round, then the reversed index
    # (reversed: the lowest index wins exact ties under amax).
    rev = torch.arange(num_experts - 1, -1, -1, device=device, dtype=torch.int64)
    allowed_bit = 1 << (index_bits + rand_bits)
    if allowed is None:
        tag = (rev | allowed_bit).expand(num_tokens, num_experts)
    else:
        tag = (rev | allowed.to(torch.int64) * allowed_bit).expand(num_tokens, num_experts)

    # Running state, one entry per (token, candidate expert j):
    #   r[j]: residual p_j - a_j^T z     s[j]: Schur complement Sigma_jj - ||a_j||^2
    #   state[2 + i][j]: entry i of a_j = L^-1 Sigma_Sj (row i of the partial
    #   Cholesky factor; its entries at the selected experts are L itself)
    state = work.state
    r, s = state[0, :num_tokens], state[1, :num_tokens]
    gain, minus_inf = work.gain[:num_tokens], work.minus_inf[:num_tokens]
    token_offsets = work.token_offsets[:num_tokens]
    r.copy_(probs)
    s.copy_(diag)
    if allowed is not None:
        # Disallowed experts: gain exactly 0 for good (r^2 / inf), ranked below
        # every allowed expert by the allowed bit of their tag.
        blocked = ~allowed if allowed.dim() == 2 else (~allowed).expand(num_tokens, num_experts)
        s.masked_fill_(blocked, math.inf)
    if packed:
        key, key_lo = work.key[:num_tokens], work.key_lo[:num_tokens]
        per_token_tag = allowed is not None and allowed.dim() == 2
        if per_token_tag or not work.tag_written:
            key_lo.copy_(tag)
            work.tag_written = not per_token_tag

    for t in range(k):
        torch.mul(r, r, out=gain)
        gain.div_(s)
        if t:  # selected experts rank last (-inf has a negative bit pattern)
            gain.scatter_(1, out[:, :t], minus_inf)
        if packed:
            if rand_bits:
                noise = torch.randint(
                    0, 1 << rand_bits, gain.shape, generator=gen, device=device, dtype=torch.int64
                )
                key_lo.copy_(tag + (noise << index_bits))
            best = key.amax(dim=1)
            j = (num_experts - 1) - (best & ((1 << index_bits) - 1))
        else:
            j = _argmax_generic(gain, tag >> (index_bits + rand_bits), gen)
        out[:, t] = j
        if t == k - 1:
            break
        # Everything needed at the pick, in one gather: r_j*, s_j* (>= eps: floored)
        # and the pick's entries a_j*[i] of the earlier factor rows.
        picked = torch.take(state, work.slot_offsets[: t + 2] + (token_offsets + j))  # [t + 2, T]
        r_j, s_j = picked[0].unsqueeze(1), picked[1].unsqueeze(1)
        # New factor row: a[t] = (Sigma[j*, :] - sum_i a[i] * a_j*[i]) / sqrt(s_j*)
        col = state[2 + t, :num_tokens]
        torch.index_select(sig, 0, j, out=col)
        for i in range(t):
            col.addcmul_(state[2 + i, :num_tokens], picked[2 + i].unsqueeze(1), value=-1.0)
        inv_l = s_j.rsqrt_()
        col.mul_(inv_l)
        # Schur complements shrink by the new entry squared; floor them at eps.
        s.addcmul_(col, col, value=-1.0).clamp_min_(eps)
        # Residuals lose the projection on the new direction: z_t = r_j* / l.
        r.addcmul_(col, r_j.mul_(inv_l), value=-1.0)


# Bits of the tag (allowed bit, random bits, index) in a packed key's low half.
_TAG_BITS = 31


def _argmax_generic(gain, allowed_bit, gen):
    """The order of the packed path without bit packing (fp64 gains)."""
    best = gain.amax(dim=1, keepdim=True)
    cand = gain == best
    # Among exact ties prefer allowed experts.
    cand &= allowed_bit >= torch.where(cand, allowed_bit, 0).amax(dim=1, keepdim=True)
    if gen is not None:
        score = torch.rand(gain.shape, generator=gen, device=gain.device, dtype=gain.dtype)
        return score.masked_fill_(~cand, -1.0).argmax(dim=1)
    return cand.to(torch.uint8).argmax(dim=1)  # first True: the lowest index
