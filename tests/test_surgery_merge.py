"""Expert-merging math (mpmoe.surgery.merge): exact identities and planted cases."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpmoe.routing.cooccurrence import covariance_from_counts
from mpmoe.surgery import merge as M


def _swiglu(x, fc1, fc2):
    f = fc2.shape[1]
    h = x @ fc1.t()
    return (torch.nn.functional.silu(h[:, :f]) * h[:, f:]) @ fc2.t()


def _experts(e, f, h, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, 2 * f, h, generator=g, dtype=dtype) * 0.3,
            torch.randn(e, h, f, generator=g, dtype=dtype) * 0.3)


def test_permutation_keeps_the_function_and_is_recovered_exactly():
    fc1, fc2 = _experts(1, 24, 16)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    p1, p2 = M.permute_expert(fc1[0], fc2[0], perm)
    x = torch.randn(7, 16, dtype=torch.float64)
    assert torch.allclose(_swiglu(x, p1, p2), _swiglu(x, fc1[0], fc2[0]), atol=1e-12)
    back = M.weight_matching_permutation(fc1[0], fc2[0], p1, p2)
    r1, r2 = M.permute_expert(p1, p2, back)
    assert torch.equal(r1, fc1[0]) and torch.equal(r2, fc2[0])
    # the recovered permutation is the inverse of the planted one
    assert torch.equal(perm[back], torch.arange(24))


def test_swiglu_gate_and_up_move_together():
    fc1, fc2 = _experts(1, 8, 6)
    perm = torch.roll(torch.arange(8), 1)
    p1, _ = M.permute_expert(fc1[0], fc2[0], perm)
    assert torch.equal(p1[:8], fc1[0, :8][perm]) and torch.equal(p1[8:], fc1[0, 8:][perm])


def _layer(x, fc1, fc2, gates):
    """sum_e gates[:, e] * expert_e(x) (a layer with fixed routing weights)."""
    return sum(gates[:, e:e + 1] * _swiglu(x, fc1[e], fc2[e]) for e in range(fc1.shape[0]))


def _bound(merged1, merged2, labels):
    return merged1[labels], merged2[labels]


@pytest.mark.parametrize("align", ["first", "dominant"])
def test_planted_duplicates_aligned_merge_reproduces_unaligned_does_not(align):
    e, f, h = 8, 32, 16
    fc1, fc2 = _experts(e, f, h, seed=1)
    g = torch.Generator().manual_seed(2)
    for i in range(4, 8):  # experts 4-7: randomly permuted copies of 0-3
        fc1[i], fc2[i] = M.permute_expert(fc1[i - 4], fc2[i - 4], torch.randperm(f, generator=g))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    freq = torch.tensor([.2, .1, .15, .05, .1, .2, .1, .1], dtype=torch.float64)
    x = torch.randn(50, h, generator=g, dtype=torch.float64)
    gates = torch.softmax(torch.randn(50, e, generator=g, dtype=torch.float64), -1)
    ref = _layer(x, fc1, fc2, gates)
    m1, m2, _, _ = M.merge_layer(fc1, fc2, labels, freq, align=align)
    aligned = _layer(x, *_bound(m1, m2, labels), gates)
    n1, n2, _, _ = M.merge_layer(fc1, fc2, labels, freq, align="none")
    unaligned = _layer(x, *_bound(n1, n2, labels), gates)
    assert (aligned - ref).abs().max() <= 1e-10
    assert (unaligned - ref).abs().max() > 0.1


def test_identity_grouping_is_bit_for_bit():
    fc1, fc2 = _experts(6, 10, 8, dtype=torch.float32)
    freq = torch.rand(6, dtype=torch.float64)
    m1, m2, perms, coef = M.merge_layer(fc1, fc2, torch.arange(6), freq, align="first")
    assert torch.equal(m1, fc1) and torch.equal(m2, fc2)
    assert torch.equal(perms, torch.arange(10).repeat(6, 1)) and torch.equal(coef, torch.ones(6, dtype=torch.float64))


def test_merge_is_the_frequency_weighted_average_of_the_aligned_members():
    fc1, fc2 = _experts(5, 6, 4)
    labels = torch.tensor([0, 1, 0, 0, 1])
    freq = torch.tensor([.4, .1, .2, .1, .2], dtype=torch.float64)
    m1, m2, perms, coef = M.merge_layer(fc1, fc2, labels, freq, align="dominant")
    assert torch.allclose(coef, torch.tensor([.4 / .7, .1 / .3, .2 / .7, .1 / .7, .2 / .3], dtype=torch.float64))
    expect = sum(coef[i] * M.permute_expert(fc1[i], fc2[i], perms[i])[0] for i in (0, 2, 3))
    assert torch.allclose(m1[0], expect, atol=1e-12)
    assert torch.equal(perms[0], torch.arange(6)) and torch.equal(perms[4], torch.arange(6))
    u1, _, _, ucoef = M.merge_layer(fc1, fc2, labels, freq, align="none", weighting="uniform")
    assert torch.allclose(u1[1], (fc1[1] + fc1[4]) / 2) and torch.allclose(ucoef[labels == 0], torch.full((3,), 1 / 3, dtype=torch.float64))
    # never-used group: plain mean instead of the reference's division by ~0
    _, _, _, zcoef = M.merge_layer(fc1, fc2, labels, torch.tensor([.5, 0, .3, .2, 0.]), align="none")
    assert torch.allclose(zcoef[[1, 4]], torch.tensor([.5, .5], dtype=torch.float64))


def test_logit_similarity_equals_pairwise_cosines():
    z = torch.randn(40, 5, dtype=torch.float64)
    z[:, 3] = 2.5 * z[:, 1]
    sim = M.logit_similarity(z.t() @ z)
    for i in range(5):
        for j in range(5):
            c = torch.nn.functional.cosine_similarity(z[:, i], z[:, j], dim=0)
            assert abs(float(sim[i, j]) - (float(c) + 1) / 2) < 1e-12
    assert abs(float(sim[1, 3]) - 1.0) < 1e-12


def test_usage_frequencies():
    f = M.usage_frequencies(torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(f[0], torch.tensor([.75, .25, 0, 0], dtype=torch.float64))
    assert torch.equal(f[1], torch.full((4,), .25, dtype=torch.float64))


def test_global_group_counts_hand_computed():
    # 2 layers, 4 experts, on average 2 groups -> 4 groups in all.
    # layer 0 freqs .5 .3 .15 .05 -> max forced to 1.0: 1.0 .3 .15 .05
    # layer 1 freqs .25 .25 .25 .25 -> 1.0 .25 .25 .25
    # sorted: 1.0 1.0 .3 .25 | .25 .25 .15 .05; threshold = 5th largest = .25
    # layer 0: {1.0, .3} > .25 -> 2; layer 1: {1.0} -> 1 (ties: 3 groups, not 4)
    freqs = [torch.tensor([.5, .3, .15, .05]), torch.tensor([.25, .25, .25, .25])]
    assert M.global_group_counts(freqs, 2) == [2, 1]
    # distinct frequencies: exactly num_groups * layers in all
    freqs = [torch.tensor([.4, .3, .2, .1]), torch.tensor([.7, .15, .1, .05])]
    counts = M.global_group_counts(freqs, 2)
    assert counts == [3, 1] and sum(counts) == 4
    assert M.global_group_counts(freqs, 4) == [4, 4]
    assert M.global_group_counts(freqs, 1) == [1, 1]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.data())
def test_dominant_grouping_invariants(e, data):
    k = data.draw(st.integers(1, e))
    seed = data.draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(e, generator=g, dtype=torch.float64)
    z = torch.randn(30, e, generator=g, dtype=torch.float64)
    sim = M.logit_similarity(z.t() @ z)
    labels, dom = M.dominant_grouping(freq, sim, k)
    assert sorted(set(labels.tolist())) == list(range(k)) and len(dom) == k
    top = torch.argsort(freq, descending=True, stable=True)[:k].tolist()
    assert sorted(dom) == sorted(top)
    for gi, d in enumerate(dom):
        assert int(labels[d]) == gi
    firsts = [int((labels == g).nonzero()[0]) for g in range(k)]
    assert firsts == sorted(firsts)  # groups numbered by their lowest member
    for i in range(e):
        if i not in dom:
            best = max(float(sim[i, d]) for d in dom)
            assert float(sim[i, dom[int(labels[i])]]) == best
    assert M.group_dominants(labels, freq) == dom
    assert torch.equal(M.dominant_grouping(freq, sim, e)[0], torch.arange(e))  # E' = E: identity
    r = M.random_grouping(e, k, torch.Generator().manual_seed(seed))
    assert sorted(set(r.tolist())) == list(range(k))


def test_labels_from_groups_validation():
    assert M.labels_from_groups([[0, 2], [1]], 3).tolist() == [0, 1, 0]
    for bad, msg in (([[0, 5], [1, 2]], "names expert 5"), ([[0, 1], [1, 2]], "two groups"),
                     ([[0], [1]], "in no group"), ([[0, 1, 2], []], "empty")):
        with pytest.raises(ValueError, match=msg):
            M.labels_from_groups(bad, 3)


def test_sigma_push_forward_equals_recount():
    g = torch.Generator().manual_seed(5)
    e, t = 8, 300
    probs = torch.rand(t, e, generator=g)
    top = probs.topk(3, dim=1).indices
    routing = torch.zeros(t, e).scatter_(1, top, 1.0).double()
    n, u, c = torch.tensor(float(t), dtype=torch.float64), routing.sum(0), routing.t() @ routing
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0])
    a = M.membership_matrix(labels)
    n2, u2, c2 = M.push_forward_counters(n, u, c, a)
    grouped = routing @ a.t()  # recount: members selected per group and token
    assert torch.equal(u2, grouped.sum(0)) and torch.equal(c2, grouped.t() @ grouped) and n2 == n
    sigma = covariance_from_counts(n, u, c)
    assert torch.allclose(covariance_from_counts(n2, u2, c2), a @ sigma @ a.t(), atol=1e-12)
    # shrinkage acts on the rebuilt Sigma, not on a transformed one: they differ
    shrunk = covariance_from_counts(n2, u2, c2, shrinkage=0.1)
    transformed = a @ covariance_from_counts(n, u, c, shrinkage=0.1) @ a.t()
    assert (shrunk - transformed).abs().max() > 1e-3


def test_expert_groups_setting_round_trip_and_refusals():
    groups = {3: [0, 1, 0, -1], 2: [1, 0, 2, 2]}
    text = M.format_expert_groups(groups)
    assert text == "2:1,0,2,2;3:0,1,0,-1" and M.parse_expert_groups(text) == groups
    assert M.parse_expert_groups(None) == {} and M.parse_expert_groups("") == {}
    for bad, msg in (("2:0,1;3:0", "same number"), ("2:-2,0", "labels"), ("x", "LAYER:LABELS"),
                     ("2:a,b", "not integers"), ("0:0,1", "1-based"), ("2:-1,-1", "kept")):
        with pytest.raises(ValueError, match=msg):
            M.parse_expert_groups(bad)
    from mpmoe.surgery.compress import parse_compression

    assert parse_compression("32:0.1") == (32, 0.1) and parse_compression(None) is None
    for bad in ("32", "0:0.1", "4:1.5", "a:b"):
        with pytest.raises(ValueError, match="moe_expert_compression"):
            parse_compression(bad)
