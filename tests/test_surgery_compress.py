"""Low-rank + row-sparse compression math (mpmoe.surgery.compress)."""

import pytest
import torch

from mpmoe.surgery import compress as C


def test_full_rank_keep_all_reproduces_the_weight():
    w = torch.randn(12, 7, dtype=torch.float64)
    left, right, res = C.low_rank_init(w, 7)
    assert res.abs().max() < 1e-12
    m = C.LowRankSparseLinear.from_factors(left, right, res, torch.ones(12, dtype=torch.bool))
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(m(x), x @ w.t(), atol=1e-12)
    assert torch.allclose(m.dense_weight(), w, atol=1e-12)


def test_low_rank_plus_kept_rows_is_exact_on_kept_rows():
    w = torch.randn(10, 6, dtype=torch.float64)
    left, right, res = C.low_rank_init(w, 2)
    assert torch.allclose(left @ right + res, w, atol=1e-12)
    # the rank-2 part is the best rank-2 approximation (Eckart-Young)
    s = torch.linalg.svdvals(w)
    assert abs(float(torch.linalg.matrix_norm(res)) - float(s[2:].square().sum().sqrt())) < 1e-10
    kept = torch.zeros(10, dtype=torch.bool)
    kept[[1, 4, 9]] = True
    m = C.LowRankSparseLinear.from_factors(left, right, res, kept)
    dense = m.dense_weight()
    assert torch.allclose(dense[kept], w[kept], atol=1e-12)
    assert torch.allclose(dense[~kept], (left @ right)[~kept], atol=1e-12)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.allclose(m(x), x @ dense.t(), atol=1e-12)
    n = sum(p.numel() for p in m.parameters())
    assert n == C.factorised_param_count(10, 6, 2, 3) == 2 * (10 + 6) + 3 * 6


def test_cubic_schedule():
    total, final = 20, 0.1
    r = [C.cubic_keep_ratio(s, total, final) for s in range(1, total + 1)]
    assert r[0] == 1.0 and all(x == final for x in r[-4:])
    assert all(a >= b for a, b in zip(r, r[1:]))
    span = total - 1 - 4
    assert abs(r[5] - (final + (1 - final) * (1 - 5 / span) ** 3)) < 1e-15  # step 6


def test_platon_keeps_the_most_sensitive_rows():
    pr = C.PlatonRowPruner(beta1=0.85)
    res = torch.ones(6, 4, dtype=torch.float64)
    grad = torch.tensor([1., 5, 2, 0, 4, 3], dtype=torch.float64)[:, None].expand(6, 4)
    for _ in range(3):
        pr.update("w", res, grad)
    kept = pr.mask("w", res, 0.5)
    assert kept.tolist() == [False, True, False, False, True, True]
    assert res[~kept].abs().sum() == 0 and res[kept].abs().min() == 1
    assert C.kept_row_count(10, 0.1) == 1 and C.kept_row_count(10, 0.0) == 0 and C.kept_row_count(7, 1.0) == 7


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        C.low_rank_init(torch.zeros(4, 3), 4)
