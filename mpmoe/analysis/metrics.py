"""Numbers about experts: similarity, co-occurrence normalisations, CKA, load, OT.

All functions take and return numpy arrays (float64) and work on CPU. Conventions:
``E`` experts; a co-occurrence matrix ``C`` is ``[E, E]`` counts with ``C[i, i]`` the
tokens routed to ``i`` (the statistics files' ``cooccurrence_matrix``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "coactivation_concentration",
    "cosine_similarity_matrix",
    "covariance_to_correlation",
    "effective_num_experts",
    "linear_cka",
    "load_imbalance",
    "matrix_cka",
    "matrix_cka_baseline",
    "mean_offdiagonal",
    "mean_std",
    "ot_distance",
    "ot_distance_matrix",
    "pmi_cooccurrence",
    "row_normalized_cooccurrence",
    "top_pairs",
]


def _square(m, name: str) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square [E, E] matrix, got shape {a.shape}")
    return a


def cosine_similarity_matrix(x, eps: float = 1e-12) -> np.ndarray:
    """``S[i, j] = cos(x_i, x_j)`` for the rows of ``x`` ([E, D], or [E, ...] flattened).

    A zero row has similarity 0 with everything (and 0 with itself).
    """
    a = np.asarray(x, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    norms = np.linalg.norm(a, axis=1)
    unit = a / np.maximum(norms, eps)[:, None]
    sim = unit @ unit.T
    return np.clip(sim, -1.0, 1.0)


def mean_offdiagonal(m, absolute: bool = False) -> float:
    """Mean of the off-diagonal entries of a square matrix (``absolute``: of their |.|)."""
    a = _square(m, "matrix")
    n = a.shape[0]
    if n < 2:
        return float("nan")
    off = a[~np.eye(n, dtype=bool)]
    return float(np.mean(np.abs(off) if absolute else off))


def row_normalized_cooccurrence(c) -> np.ndarray:
    """The paper's normalisation: ``C[i, j] / max(C[i, i], 1)`` with a zero diagonal.

    Row ``i`` reads "of the tokens routed to ``i``, the fraction also routed to ``j``"
    (the same as :func:`mpmoe.routing.normalized_cooccurrence`, in float64).
    """
    a = _square(c, "co-occurrence matrix")
    out = a / np.maximum(np.diag(a), 1.0)[:, None]
    np.fill_diagonal(out, 0.0)
    return out


def pmi_cooccurrence(c, num_tokens: float, *, normalized: bool = True) -> np.ndarray:
    """Pointwise mutual information of co-activation, zero diagonal.

    With ``p_ij = C[i, j] / N`` and ``p_i = C[i, i] / N``:
    ``PMI = log(p_ij / (p_i p_j))`` (0: independent, > 0: routed together more often
    than chance). ``normalized`` gives NPMI = PMI / -log(p_ij) in [-1, 1]; pairs never
    seen together get -1 (NPMI) or 0 (PMI, undefined there), as do unused experts.
    """
    a = _square(c, "co-occurrence matrix")
    n = float(num_tokens)
    if n <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    p = np.diag(a) / n
    pij = a / n
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(pij / np.outer(p, p))
        if normalized:
            denom = -np.log(pij)
            out = np.where(denom > 0, pmi / denom, 0.0)
            out = np.where(pij >= 1.0, 1.0, out)  # always together: perfectly associated
            out = np.where(pij > 0, out, -1.0)
            out = np.clip(out, -1.0, 1.0)
        else:
            out = np.where(pij > 0, pmi, 0.0)
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(out, 0.0)
    return out


def covariance_to_correlation(sigma, eps: float = 1e-12) -> np.ndarray:
    """``Sigma_ij / sqrt(Sigma_ii Sigma_jj)`` (Sigma = MoPE's routing covariance)."""
    s = _square(sigma, "Sigma")
    d = np.sqrt(np.maximum(np.diag(s), eps))
    return np.clip(s / np.outer(d, d), -1.0, 1.0)


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) between representations ``x`` [n, p] and ``y`` [n, q].

    Rows are the same n samples (for two [E, E] matrices: the experts, each described by
    its row). ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
    ``Xc, Yc``; 1 for identical inputs (and any rotation or isotropic scaling of them),
    near 0 for independent ones. 0 when either input is constant.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"linear_cka: x and y need the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    a, b = _center(a), _center(b)
    # Gram form: tr(Kx Ky) / (||Kx|| ||Ky||), cheap when n is small.
    kx, ky = a @ a.T, b @ b.T
    denom = np.linalg.norm(kx) * np.linalg.norm(ky)
    if denom <= 0:
        return 0.0
    return float(np.sum(kx * ky) / denom)


def matrix_cka(a, b) -> float:
    """Linear CKA between two expert x expert matrices, on their off-diagonal structure.

    Each expert is described by its row with the diagonal zeroed: similarity and
    correlation matrices all have a (near) constant diagonal that would otherwise
    dominate and push every CKA towards 1. 1 for matrices with the same off-diagonal
    pattern (up to scale), near 0 for unrelated ones.
    """
    x = _square(a, "matrix").copy()
    y = _square(b, "matrix").copy()
    if x.shape != y.shape:
        raise ValueError(f"matrix_cka: shapes differ {x.shape} vs {y.shape}")
    np.fill_diagonal(x, 0.0)
    np.fill_diagonal(y, 0.0)
    return linear_cka(x, y)


def matrix_cka_baseline(a, b, *, permutations: int = 20, seed: int = 0) -> float:
    """Mean :func:`matrix_cka` of ``a`` against ``b`` with its experts randomly relabelled.

    With E experts, CKA compares E samples of E features, so unrelated matrices do not
    give 0 (about 0.3-0.5 for E = 8..64); this is the chance level to read a CKA against.
    """
    y = _square(b, "matrix")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(permutations):
        p = rng.permutation(y.shape[0])
        vals.append(matrix_cka(a, y[np.ix_(p, p)]))
    return float(np.mean(vals))


def effective_num_experts(counts) -> float:
    """``exp(entropy)`` of the load distribution (E for a uniform load, 1 for one expert)."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def load_imbalance(counts) -> dict:
    """Load-balance numbers of one layer's per-expert token counts.

    ``max_over_mean`` (1 = balanced), ``cv`` (std / mean), ``min_fraction`` (least-used
    expert's share), ``unused`` (experts with no token), ``effective_experts``.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    mean = c.mean() if c.size else 0.0
    total = c.sum()
    return {
        "max_over_mean": float(c.max() / mean) if mean > 0 else float("nan"),
        "cv": float(c.std() / mean) if mean > 0 else float("nan"),
        "min_fraction": float(c.min() / total) if total > 0 else float("nan"),
        "unused": int(np.sum(c == 0)),
        "effective_experts": effective_num_experts(c),
    }


def coactivation_concentration(c) -> float:
    """How concentrated co-activation is on few expert pairs, in [0, 1].

    Over the unordered pairs i < j, ``q_ij = C[i, j] / sum C[i<j]``; the concentration
    is ``1 - H(q) / log(#pairs)``: 0 when every pair is co-activated equally often,
    1 when all co-activation falls on one pair ("echo chamber"). NaN without any
    co-activation (e.g. top-1 routing).
    """
    a = _square(c, "co-occurrence matrix")
    n = a.shape[0]
    iu = np.triu_indices(n, k=1)
    pairs = a[iu]
    total = pairs.sum()
    if n < 3 or total <= 0:
        return float("nan") if total <= 0 else 1.0
    q = pairs[pairs > 0] / total
    h = -np.sum(q * np.log(q))
    return float(1.0 - h / np.log(len(pairs)))


def top_pairs(m, k: int = 5) -> list[tuple[int, int, float]]:
    """The ``k`` largest off-diagonal entries of a symmetric matrix as (i, j, value), i < j."""
    a = _square(m, "matrix")
    iu = np.triu_indices(a.shape[0], k=1)
    vals = a[iu]
    order = np.argsort(-vals, kind="stable")[:k]
    return [(int(iu[0][o]), int(iu[1][o]), float(vals[o])) for o in order]


def ot_distance(x, y, *, p: int = 2, a=None, b=None) -> float:
    """Wasserstein-p distance between two empirical distributions (POT's exact ``emd2``).

    ``x`` [n, d] and ``y`` [m, d] are samples (e.g. one expert's outputs on n tokens),
    uniformly weighted unless ``a``/``b`` are given. 0 for identical samples.
    """
    import ot  # POT

    xs = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    ys = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"ot_distance: dimensions differ ({xs.shape[1]} vs {ys.shape[1]})")
    wa = np.full(len(xs), 1.0 / len(xs)) if a is None else np.asarray(a, dtype=np.float64)
    wb = np.full(len(ys), 1.0 / len(ys)) if b is None else np.asarray(b, dtype=np.float64)
    cost = ot.dist(xs, ys, metric="euclidean") ** p
    value = float(ot.emd2(wa, wb, cost, numItermax=1_000_000))
    return max(value, 0.0) ** (1.0 / p)


def ot_distance_matrix(samples, *, p: int = 2, progress: bool = False) -> np.ndarray:
    """Pairwise :func:`ot_distance` between experts: ``samples`` [E, n, d] -> [E, E]."""
    s = np.asarray(samples, dtype=np.float64)
    e = s.shape[0]
    out = np.zeros((e, e))
    pairs = [(i, j) for i in range(e) for j in range(i + 1, e)]
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc="OT distances", unit="pair", leave=False)
    for i, j in it:
        out[i, j] = out[j, i] = ot_distance(s[i], s[j], p=p)
    return out


def mean_std(xs) -> tuple:
    """``(mean, sample std)`` of the finite values of ``xs`` (``None`` and NaN skipped): std 0.0
    for one value, ``(nan, nan)`` for none. The seed spread of the experiment scripts."""
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
