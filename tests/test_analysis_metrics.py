"""mpmoe.analysis.metrics against hand-computed values on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpmoe.analysis import metrics as M
from mpmoe.routing import normalized_cooccurrence


def test_cosine_similarity_hand_values():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    s = M.cosine_similarity_matrix(x)
    r = 1 / math.sqrt(2)
    expected = np.array([[1, 0, r, 0], [0, 1, r, 0], [r, r, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(s, expected, atol=1e-12)
    # flattened per-expert tensors (weights [E, out, in])
    w = np.arange(24, dtype=float).reshape(2, 3, 4)
    assert M.cosine_similarity_matrix(w).shape == (2, 2)


def test_row_normalised_cooccurrence_hand_values_and_routing_agreement():
    c = np.array([[4, 2, 1], [2, 2, 0], [1, 0, 0]])
    n = M.row_normalized_cooccurrence(c)
    expected = np.array([[0, 0.5, 0.25], [1.0, 0, 0], [1.0, 0, 0]])  # C[2,2]=0 -> divide by 1
    np.testing.assert_allclose(n, expected)
    np.testing.assert_allclose(n, normalized_cooccurrence(torch.tensor(c)).numpy(), rtol=1e-6)


def test_pmi_hand_values():
    # 10 tokens; expert 0 on 5, expert 1 on 4, both on 2 -> p01 = 0.2, p0 p1 = 0.2 -> PMI 0
    # expert 2 on 2, both 0 and 2 on 2 -> p02 = 0.2, p0 p2 = 0.1 -> PMI log 2, NPMI log2/-log0.2
    c = np.array([[5, 2, 2], [2, 4, 0], [2, 0, 2]])
    pmi = M.pmi_cooccurrence(c, 10, normalized=False)
    assert pmi[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert pmi[0, 2] == pytest.approx(math.log(2))
    assert pmi[1, 2] == 0.0 and pmi[0, 0] == 0.0
    npmi = M.pmi_cooccurrence(c, 10)
    assert npmi[0, 2] == pytest.approx(math.log(2) / -math.log(0.2))
    assert npmi[1, 2] == -1.0  # never together
    np.testing.assert_allclose(npmi, npmi.T)
    with pytest.raises(ValueError):
        M.pmi_cooccurrence(c, 0)


def test_linear_cka_identical_rotated_and_independent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert M.linear_cka(x, x) == pytest.approx(1.0)
    assert M.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # rotation + isotropic scale
    y = rng.normal(size=(400, 6))
    assert M.linear_cka(x, y) < 0.05
    assert M.linear_cka(x, np.ones((400, 3))) == 0.0
    # hand value: one feature each, CKA = squared Pearson correlation
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 3.0, 2.0, 4.0])
    assert M.linear_cka(a[:, None], b[:, None]) == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2)
    with pytest.raises(ValueError):
        M.linear_cka(x, y[:10])


def test_linear_cka_of_identical_experts_similarity_is_one():
    """Experts' similarity matrix vs itself (or a Sigma with the same structure) gives 1."""
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(8, 32))
    s = M.cosine_similarity_matrix(emb)
    assert M.linear_cka(s, s) == pytest.approx(1.0)
    other = M.cosine_similarity_matrix(rng.normal(size=(8, 32)))
    assert M.linear_cka(s, other) < M.linear_cka(s, s)


def test_effective_experts_and_imbalance():
    assert M.effective_num_experts([5, 5, 5, 5]) == pytest.approx(4.0)
    assert M.effective_num_experts([9, 0, 0, 0]) == pytest.approx(1.0)
    assert M.effective_num_experts([1, 1, 2]) == pytest.approx(math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))))
    assert M.effective_num_experts([0, 0]) == 0.0
    imb = M.load_imbalance([2, 2, 4, 0])
    assert imb["max_over_mean"] == pytest.approx(2.0)
    assert imb["unused"] == 1 and imb["min_fraction"] == 0.0
    assert imb["cv"] == pytest.approx(np.std([2, 2, 4, 0]) / 2.0)


def test_coactivation_concentration():
    uniform = np.ones((4, 4)) * 3
    assert M.coactivation_concentration(uniform) == pytest.approx(0.0, abs=1e-12)
    one_pair = np.diag([5, 5, 1, 1]).astype(float)
    one_pair[0, 1] = one_pair[1, 0] = 5
    assert M.coactivation_concentration(one_pair) == pytest.approx(1.0)
    # two of six pairs equally: 1 - log 2 / log 6
    two = np.diag([1.0] * 4)
    two[0, 1] = two[1, 0] = two[2, 3] = two[3, 2] = 1
    assert M.coactivation_concentration(two) == pytest.approx(1 - math.log(2) / math.log(6))
    assert math.isnan(M.coactivation_concentration(np.diag([3.0, 4.0, 5.0])))  # top-1: no pairs


def test_sigma_to_correlation_and_offdiag_and_top_pairs():
    sigma = np.array([[4.0, 2.0, 0.0], [2.0, 1.0, -0.5], [0.0, -0.5, 1.0]])
    corr = M.covariance_to_correlation(sigma)
    assert corr[0, 1] == pytest.approx(1.0) and corr[1, 2] == pytest.approx(-0.5)
    assert M.mean_offdiagonal(corr) == pytest.approx((1.0 + 0 - 0.5) * 2 / 6)
    assert M.mean_offdiagonal(corr, absolute=True) == pytest.approx((1.0 + 0 + 0.5) * 2 / 6)
    assert M.top_pairs(corr, 1) == [(0, 1, pytest.approx(1.0))]


def test_ot_distance_identical_zero_and_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    assert M.ot_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert M.ot_distance(x, x[::-1]) == pytest.approx(0.0, abs=1e-6)  # same set, other order
    shift = np.array([3.0, 0.0, 4.0])
    assert M.ot_distance(x, x + shift) == pytest.approx(5.0, rel=1e-6)  # W2 of a translation = |shift|
    # 1-D hand value: {0, 1} vs {2, 4}: sorted matching, W1 = (2 + 3) / 2
    assert M.ot_distance([[0.0], [1.0]], [[2.0], [4.0]], p=1) == pytest.approx(2.5)
    d = M.ot_distance_matrix(np.stack([x, x, x + shift]))
    np.testing.assert_allclose(d, [[0, 0, 5], [0, 0, 5], [5, 5, 0]], atol=1e-5)


def test_matrix_cka_ignores_the_diagonal():
    rng = np.random.default_rng(2)

    def sym(e):
        a = rng.normal(size=(e, e))
        s = (a + a.T) / 2
        np.fill_diagonal(s, 1.0)
        return s

    a, b = sym(32), sym(32)
    assert M.matrix_cka(a, a) == pytest.approx(1.0)
    assert M.matrix_cka(a, 2.0 * a + 5.0 * np.eye(32)) == pytest.approx(1.0)  # diagonal and scale ignored
    chance = M.matrix_cka_baseline(a, b)
    assert abs(M.matrix_cka(a, b) - chance) < 0.15  # unrelated: at chance level
    assert 0.1 < chance < 0.8 and M.matrix_cka_baseline(a, a) < 0.8
    # plain linear CKA is pulled up by the shared unit diagonal; matrix_cka is not
    weak_a, weak_b = np.eye(32) + 0.01 * (a - np.eye(32)), np.eye(32) + 0.01 * (b - np.eye(32))
    assert M.linear_cka(weak_a, weak_b) > 0.9
    assert M.matrix_cka(weak_a, weak_b) == pytest.approx(M.matrix_cka(a, b))
    with pytest.raises(ValueError):
        M.matrix_cka(a, b[:4, :4])


def test_mean_std_is_the_sample_mean_and_std_of_the_finite_values():
    import statistics

    xs = [6.79, 6.81, 6.74]
    m, s = M.mean_std([*xs, None, float("nan")])
    assert m == pytest.approx(statistics.fmean(xs), rel=1e-12)
    assert s == pytest.approx(statistics.stdev(xs), rel=1e-12)  # ddof 1: the seed spread
    assert M.mean_std([2.5]) == (2.5, 0.0)
    assert all(math.isnan(v) for v in M.mean_std([None, float("inf")]))
