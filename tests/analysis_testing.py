"""Helpers for the analysis tests (no tests here): synthetic statistics windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def synthetic_routing(rng, tokens: int, experts: int, k: int, skew: float = 0.0) -> np.ndarray:
    """A bool [tokens, experts] map with exactly k experts per token (Gumbel top-k)."""
    logits = skew * np.linspace(1.0, 0.0, experts)[None, :] + rng.gumbel(size=(tokens, experts))
    idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    m = np.zeros((tokens, experts), dtype=bool)
    np.put_along_axis(m, idx, True, axis=1)
    return m


def write_stats(directory, *, layers=(2, 3), experts: int = 8, k: int = 2, windows: int = 3,
                tokens: int = 256, kind: str = "mope", seed: int = 0, skew: float = 1.0,
                with_num_tokens: bool = True) -> Path:
    """Write layer{L}_seg{S}_{kind}.npz files the way mpmoe.megatron.stats does."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for layer in layers:
        for seg in range(windows):
            m = synthetic_routing(rng, tokens, experts, k, skew).astype(np.int64)
            arrays = {"expert_counts": m.sum(0), "cooccurrence_matrix": m.T @ m}
            if with_num_tokens:
                arrays["num_tokens"] = np.int64(tokens)
            if kind == "mope":
                f = m.astype(np.float64)
                mean = f.mean(0)
                arrays["cov_matrix"] = (f.T @ f / tokens - np.outer(mean, mean)).astype(np.float32)
            np.savez(out / f"layer{layer}_seg{seg}_{kind}.npz", **arrays)
    return out
