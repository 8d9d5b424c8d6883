"""Static expert knock-out and the dynamic k -> k-1 masks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmoe.routing import (
    apply_static_mask,
    dynamic_drop_one,
    normalized_cooccurrence,
    otep_select,
    parse_expert_mask,
)


def routed(tokens, num_experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g)
    top = logits.topk(k, dim=1)
    probs = torch.zeros_like(logits).scatter_(1, top.indices, top.values.softmax(-1))
    return probs, probs > 0


# ---------------------------------------------------------------- static mask


def test_parse_expert_mask_forms(tmp_path):
    assert parse_expert_mask(None) == {}
    assert parse_expert_mask("") == {}
    assert parse_expert_mask('{"2": [5, 0, 5], "9": 3}') == {2: (0, 5), 9: (3,)}
    assert parse_expert_mask({3: [1, 2]}) == {3: (1, 2)}
    path = tmp_path / "mask.json"
    path.write_text(json.dumps({"5": [7]}))
    assert parse_expert_mask(str(path)) == {5: (7,)}
    assert parse_expert_mask(path) == {5: (7,)}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"x": [1]}', "not an integer"),
        ('{"1": [-1]}', "non-negative"),
        ('{"1": [1.5]}', "non-negative"),
    ],
)
def test_parse_expert_mask_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_expert_mask(spec)


def test_static_mask_sets_minus_inf_and_excludes_experts_from_routing():
    logits = torch.randn(20, 8)
    masked = apply_static_mask(logits, [1, 6])
    assert torch.isinf(masked[:, [1, 6]]).all() and (masked[:, [1, 6]] < 0).all()
    assert torch.equal(masked[:, [0, 2, 3, 4, 5, 7]], logits[:, [0, 2, 3, 4, 5, 7]])
    assert apply_static_mask(logits, []) is logits
    probs = masked.softmax(-1)
    mask = otep_select(probs, torch.eye(8), 4, allowed=torch.isfinite(masked[0]))
    assert not mask[:, [1, 6]].any()
    with pytest.raises(ValueError, match="out of range"):
        apply_static_mask(logits, [8])


# ---------------------------------------------------------------- dynamic mask


def test_normalized_cooccurrence():
    c = torch.tensor([[4.0, 2.0, 0.0], [2.0, 8.0, 1.0], [0.0, 1.0, 0.0]])
    n = normalized_cooccurrence(c)
    expected = torch.tensor([[0.0, 0.5, 0.0], [0.25, 0.0, 0.125], [0.0, 1.0, 0.0]])  # row 2: max(C22, 1) = 1
    assert torch.equal(n, expected)
    with pytest.raises(ValueError):
        normalized_cooccurrence(torch.ones(2, 3))


def test_cooccurrence_mode_removes_most_echoed_expert_by_hand():
    # C_norm rows: from expert 0, expert 2 co-fires 90% of the time; 1 is rarely with either
    c = torch.tensor(
        [
            [100.0, 10.0, 90.0, 0.0],
            [10.0, 100.0, 20.0, 0.0],
            [90.0, 20.0, 200.0, 0.0],
            [0.0, 0.0, 0.0, 50.0],
        ]
    )
    probs = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    new_probs, new_map = dynamic_drop_one(probs, probs > 0, "cooccurrence", cooccurrence=c)
    # token 0: pairs (0->2)=0.9, (2->0)=0.45, (1->2)=0.2, ... -> drop 2
    assert new_map[0].tolist() == [True, True, False, False]
    torch.testing.assert_close(new_probs[0], torch.tensor([0.5, 0.2, 0.0, 0.0]) / 0.7)
    # token 1: (0->1)=0.1 vs (1->0)=0.1 tie -> drop the lowest id, 0
    assert new_map[1].tolist() == [False, True, False, False]
    torch.testing.assert_close(new_probs[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # token 2 has one expert: untouched
    assert torch.equal(new_map[2], probs[2] > 0) and torch.equal(new_probs[2], probs[2])


def brute_force_drop(probs_row, map_row, c_norm):
    experts = [e for e in range(len(map_row)) if map_row[e]]
    best, drop = -1.0, None
    for j in experts:  # ascending j: ties keep the lowest id
        for i in experts:
            if i != j and c_norm[i, j] > best:
                best, drop = float(c_norm[i, j]), j
    return drop


@settings(max_examples=40, deadline=None)
@given(num_experts=st.integers(2, 16), data=st.data(), seed=st.integers(0, 999))
def test_cooccurrence_mode_matches_brute_force(num_experts, data, seed):
    k = data.draw(st.integers(1, num_experts))
    probs, rmap = routed(30, num_experts, k, seed)
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 50, (num_experts, num_experts), generator=g).float()
    c = c + c.t()
    new_probs, new_map = dynamic_drop_one(probs, rmap, "cooccurrence", cooccurrence=c, max_routed=k)
    c_norm = normalized_cooccurrence(c)
    for t in range(30):
        if k < 2:
            assert torch.equal(new_map[t], rmap[t])
            continue
        drop = brute_force_drop(probs[t], rmap[t], c_norm)
        expected = rmap[t].clone()
        expected[drop] = False
        assert torch.equal(new_map[t], expected), (t, drop)
    # without the hint (reads k from the map) gives the same
    assert torch.equal(dynamic_drop_one(probs, rmap, "cooccurrence", cooccurrence=c)[1], new_map)
    torch.testing.assert_close(new_probs.sum(1), probs.sum(1))


def test_random_mode_is_seeded_uniform_and_renormalises():
    probs, rmap = routed(4000, 8, 4, 0)
    a = dynamic_drop_one(probs, rmap, "random", generator=torch.Generator().manual_seed(3))
    b = dynamic_drop_one(probs, rmap, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    new_probs, new_map = a
    assert torch.equal(new_map.sum(1), torch.full((4000,), 3))
    assert not (new_map & ~rmap).any()
    torch.testing.assert_close(new_probs.sum(1), torch.ones(4000))
    # which of the 4 routed slots was dropped, ranked by router weight: uniform
    removed = rmap & ~new_map
    rank_of_removed = (probs * rmap > (probs * removed).sum(1, keepdim=True)).sum(1)
    counts = torch.bincount(rank_of_removed, minlength=4).double()
    assert ((counts - 1000).abs() < 6 * math.sqrt(1000 * 0.75)).all(), counts


def test_dynamic_mask_errors():
    probs, rmap = routed(4, 6, 2, 0)
    with pytest.raises(ValueError, match="mode"):
        dynamic_drop_one(probs, rmap, "nope")
    with pytest.raises(ValueError, match="needs a co-occurrence"):
        dynamic_drop_one(probs, rmap, "cooccurrence")
    with pytest.raises(ValueError, match=r"expected \(6, 6\)"):
        dynamic_drop_one(probs, rmap, "cooccurrence", cooccurrence=torch.ones(5, 5))
    with pytest.raises(ValueError, match="must both be"):
        dynamic_drop_one(probs, rmap[:, :5], "random")
