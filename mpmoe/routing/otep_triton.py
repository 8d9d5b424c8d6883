"""Fused OTEP selection in Triton: one program per block of tokens, the whole greedy loop.

The same arithmetic as :func:`mpmoe.routing.otep._otep_block`, op for op and in the same
order, so the picks are bit-identical to the PyTorch path on CPU (checked under Triton's
interpreter): PyTorch's ``addcmul_`` rounds once (an FMA), so the kernel calls ``tl.fma``
there; divisions and square roots are IEEE-rounded as PyTorch's are. On a GPU, PyTorch's
CUDA path may round differently, which can only flip near-ties (cuda-marked tests).

Per program, a block of ``BLOCK_T`` tokens keeps in registers the residuals ``r``, the
Schur complements ``s``, the picked set and the new factor row; the earlier factor rows
``a_i`` (written once, read once per later round by the same program) live in a
per-program scratch buffer of ``(k - 1) * BLOCK_T * E`` floats, which stays in L1/L2:
Triton has no dynamically indexable register arrays, and round ``t`` must subtract rows
``0 .. t-1`` in order to match the reference bit for bit.

Tie-breaking and masks as in ``otep_select``: exact ties go to an allowed expert, then to
the lowest index; picked experts rank last; experts outside ``allowed`` have ``s = inf``
(gain exactly 0) and are picked only when fewer than ``k`` are allowed. Inputs in bf16 or
fp16 are computed in fp32, fp64 in fp64. Seeded random tie-breaking is not implemented
here (``otep_select`` falls back to PyTorch for it).

Triton is optional: importing this module never fails; :func:`available` says whether
the kernel can run. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations  # the kernel's tl.constexpr annotations stay strings

import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

#: Largest expert count and k the kernel handles (``otep_select`` falls back beyond).
MAX_EXPERTS = 256
MAX_K = 16
# Elements of one [BLOCK_T, E] register tile: a few such tiles live at once.
_TILE = 2048


def available() -> bool:
    return triton is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton fixes interpreter mode for its own library when it is first imported.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreting() -> bool:
    """Whether kernels run under Triton's interpreter (CPU tensors): TRITON_INTERPRET=1
    both now and when Triton was imported."""
    return triton is not None and _INTERPRET_AT_IMPORT and _interpret_env()


def supports(num_experts: int, k: int) -> bool:
    return num_experts <= MAX_EXPERTS and k <= MAX_K


def _div(a, b, FP64: tl.constexpr):
    # IEEE-rounded division and square root, as PyTorch's (Triton's defaults are approximate).
    if FP64:
        return a / b
    return tl.div_rn(a, b)


def _sqrt(a, FP64: tl.constexpr):
    if FP64:
        return tl.sqrt(a)
    return tl.sqrt_rn(a)


def _otep_kernel(
    probs_ptr, sig_ptr, allowed_ptr, idx_ptr, mask_ptr, scratch_ptr,
    num_tokens, num_experts, allowed_stride, eps_ptr,
    K: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_ALLOWED: tl.constexpr, WRITE_MASK: tl.constexpr, FP64: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: T * E and the scratch can pass 2^31
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    e = tl.arange(0, E_PAD)  # [EP]
    tok_ok = tok < num_tokens
    e_ok = e < num_experts
    tok2 = tok[:, None]
    e2 = e[None, :]
    valid = tok_ok[:, None] & e_ok[None, :]
    cdt = tl.float64 if FP64 else tl.float32
    inf = float("inf")
    eps = tl.load(eps_ptr)  # in the compute dtype (a Python float argument would be fp32)

    # Sigma symmetrised on the fly: 0.5 * (Sigma + Sigma^T), diagonal floored at eps.
    d = tl.load(sig_ptr + e * num_experts + e, mask=e_ok, other=1.0).to(cdt)
    diag = tl.maximum(0.5 * (d + d), eps, propagate_nan=tl.PropagateNan.ALL)
    r = tl.load(probs_ptr + tok2 * num_experts + e2, mask=valid, other=0.0).to(cdt)
    s = tl.zeros([BLOCK_T, E_PAD], dtype=cdt) + diag[None, :]
    if HAS_ALLOWED:
        ok = tl.load(allowed_ptr + tok2 * allowed_stride + e2, mask=valid, other=0) != 0
        s = tl.where(ok, s, inf)
    else:
        ok = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1) == 0
    ok = ok & e_ok[None, :]
    picked = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
    # Scratch rows of this program: [K - 1, BLOCK_T, E_PAD], row i at i * BLOCK_T * E_PAD.
    scratch = scratch_ptr + pid * ((K - 1) * BLOCK_T * E_PAD) + tl.arange(0, BLOCK_T)[:, None] * E_PAD + e2
    for t in tl.static_range(K):
        gain = _div(r * r, s, FP64)
        gain = tl.where(picked | (e2 >= num_experts), -inf, gain)
        # NaN (overflow on a degenerate Sigma) ranks first, as in torch.argmax.
        nan = gain != gain
        any_nan = tl.max(nan.to(tl.int32), axis=1)
        best = tl.max(tl.where(nan, -inf, gain), axis=1)
        cand = tl.where(any_nan[:, None] != 0, nan, gain == best[:, None])
        # Among exact ties an allowed expert first, then the lowest index.
        any_ok = tl.max((cand & ok).to(tl.int32), axis=1)
        cand = cand & (ok | (any_ok[:, None] == 0))
        j = tl.min(tl.where(cand, e2, E_PAD), axis=1)  # [BT]
        tl.store(idx_ptr + tok * K + t, j.to(tl.int64), mask=tok_ok)
        hit = e2 == j[:, None]
        picked = picked | hit
        if t < K - 1:
            r_j = tl.max(tl.where(hit, r, -inf), axis=1)
            s_j = tl.max(tl.where(hit, s, -inf), axis=1)
            a = tl.load(sig_ptr + j[:, None] * num_experts + e2, mask=valid, other=0.0).to(cdt)
            b = tl.load(sig_ptr + e2 * num_experts + j[:, None], mask=valid, other=0.0).to(cdt)
            col = 0.5 * (a + b)
            for i in tl.static_range(t):
                a_i = tl.load(scratch + i * (BLOCK_T * E_PAD))
                a_ij = tl.max(tl.where(hit, a_i, -inf), axis=1)
                col = tl.fma(-a_i, a_ij[:, None], col)
            inv_l = _div(tl.zeros_like(s_j) + 1.0, _sqrt(s_j, FP64), FP64)
            col = col * inv_l[:, None]
            if t < K - 2:  # the last row is never read again
                tl.store(scratch + t * (BLOCK_T * E_PAD), col)
            s = tl.maximum(tl.fma(-col, col, s), eps, propagate_nan=tl.PropagateNan.ALL)
            r = tl.fma(-col, (r_j * inv_l)[:, None], r)
    if WRITE_MASK:
        tl.store(mask_ptr + tok2 * num_experts + e2, picked.to(tl.uint8), mask=valid)


_KERNEL = []


def _kernel():
    """The jitted kernel, built on first use."""
    global _div, _sqrt
    if not _KERNEL:
        _div, _sqrt = triton.jit(_div), triton.jit(_sqrt)
        _KERNEL.append(triton.jit(_otep_kernel))
    return _KERNEL[0]


_EPS: dict = {}


def _eps_tensor(eps: float, dtype, device) -> torch.Tensor:
    """eps as a one-element tensor of the compute dtype, made once per (eps, dtype, device)."""
    key = (eps, dtype, str(device))
    if key not in _EPS:
        _EPS[key] = torch.full((1,), eps, dtype=dtype, device=device)
    return _EPS[key]


def otep_triton(probs, sigma, k, *, allowed=None, eps, want_mask):
    """Run the kernel; returns (indices [T, k] int64, bool mask [T, E] or None).

    Arguments are validated by the caller (``otep_select``); ``sigma`` is used as given
    (the kernel symmetrises it and floors its diagonal).
    """
    if triton is None:
        raise RuntimeError("otep_select: the Triton kernel needs Triton (pip install triton)")
    num_tokens, num_experts = probs.shape
    if not supports(num_experts, k):
        raise ValueError(
            f"otep_select: the Triton kernel handles E <= {MAX_EXPERTS} and k <= {MAX_K}, "
            f"got E = {num_experts}, k = {k}"
        )
    device = probs.device
    fp64 = torch.float64 in (probs.dtype, sigma.dtype)
    probs = probs.detach().contiguous()
    sigma = sigma.detach().to(device).contiguous()
    e_pad = triton.next_power_of_2(num_experts)
    block_t = max(1, min(triton.next_power_of_2(max(num_tokens, 1)), _TILE // e_pad))
    grid = triton.cdiv(num_tokens, block_t)
    idx = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    mask = torch.empty(num_tokens, num_experts, dtype=torch.bool, device=device) if want_mask else idx
    if num_tokens == 0:
        return idx, (mask if want_mask else None)
    cdt = torch.float64 if fp64 else torch.float32
    scratch = torch.empty(max(1, grid * (k - 1) * block_t * e_pad), dtype=cdt, device=device)
    if allowed is not None:
        allowed_arg = allowed.to(device).contiguous().view(torch.uint8)
        allowed_stride = num_experts if allowed.dim() == 2 else 0
    else:
        allowed_arg, allowed_stride = idx, 0
    _kernel()[(grid,)](
        probs, sigma, allowed_arg, idx, mask.view(torch.uint8) if want_mask else idx, scratch,
        num_tokens, num_experts, allowed_stride, _eps_tensor(float(eps), cdt, device),
        K=k, E_PAD=e_pad, BLOCK_T=block_t,
        HAS_ALLOWED=allowed is not None, WRITE_MASK=want_mask, FP64=fp64,
    )
    return idx, (mask if want_mask else None)
