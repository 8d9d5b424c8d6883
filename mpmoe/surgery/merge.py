"""Merging the experts of one MoE layer (M-SMoE, the "merge" of MC-SMoE), as tensor math.

Shapes follow megatron-core's expert MLPs: ``fc1`` is ``linear_fc1.weight`` ``[2F, H]``
for SwiGLU (rows ``0..F-1`` the gate, ``F..2F-1`` the up projection) or ``[F, H]`` without
a gated unit; ``fc2`` is ``linear_fc2.weight`` ``[H, F]``. A layer's experts are stacked
``[E, ...]``. Nothing here imports megatron; drivers load, call and save.

The steps, in the order the driver runs them:

1. :func:`weight_matching_permutation` / :func:`permute_expert`: neuron alignment by weight
   matching (a linear assignment maximising the inner products of matched neurons). A
   SwiGLU neuron is the triple (gate row, up row, down column), so ONE permutation moves
   all three; the expert computes the same function afterwards.
2. :func:`usage_frequencies` (routed selections per expert, normalised) and
   :func:`logit_similarity` ((cos + 1) / 2 between the columns of the router logits,
   from the accumulated Gram matrix ``Z^T Z`` so that calibration streams).
3. :func:`global_group_counts` (one frequency threshold over all layers) and
   :func:`dominant_grouping` (the K most used experts lead; every other expert joins its
   most similar leader); :func:`random_grouping` and :func:`labels_from_groups` for the
   baselines and explicit groups.
4. :func:`merge_layer`: align, then average every group's weights weighted by frequency.
5. :func:`membership_matrix` and :func:`push_forward_counters`: MoPE's co-occurrence
   counters of the grouped experts (``N, A u, A C A^T``), from which Sigma is rebuilt.
6. :func:`fold_probabilities`: the router's probabilities summed over each group's members
   (fold-then-select routing over the groups, an evaluation option of collapsed merges).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "ALIGN_MODES", "WEIGHTINGS", "weight_matching_permutation", "permute_expert",
    "usage_frequencies", "logit_similarity", "global_group_counts", "dominant_grouping",
    "random_grouping", "labels_from_groups", "canonical_labels", "group_dominants", "merge_layer",
    "membership_matrix", "push_forward_counters", "fold_probabilities",
]

ALIGN_MODES = ("first", "dominant", "none")
WEIGHTINGS = ("frequency", "uniform")


def _neurons(fc1: torch.Tensor, fc2: torch.Tensor, gated: bool) -> torch.Tensor:
    """One feature row per hidden neuron: [gate row | up row | down column] -> [F, *]."""
    f = fc2.shape[1]
    if fc1.shape[0] != (2 * f if gated else f):
        raise ValueError(f"fc1 has {fc1.shape[0]} rows, expected {2 * f if gated else f} "
                         f"for F={f} ({'gated' if gated else 'not gated'})")
    parts = [fc1[:f], fc1[f:]] if gated else [fc1]
    return torch.cat(parts + [fc2.t()], dim=1)


def weight_matching_permutation(ref_fc1: torch.Tensor, ref_fc2: torch.Tensor, fc1: torch.Tensor,
                                fc2: torch.Tensor, *, gated: bool = True) -> torch.Tensor:
    """The neuron permutation ``perm`` [F] aligning an expert to a reference expert.

    ``permute_expert(fc1, fc2, perm)`` puts the expert's neuron ``perm[i]`` in slot ``i``,
    the slot of the reference neuron it matches best: ``perm`` maximises
    ``sum_i <n_ref[i], n[perm[i]]>`` over neuron features (gate row, up row and down column
    for SwiGLU: one permutation for all three), solved exactly by
    ``scipy.optimize.linear_sum_assignment``.
    """
    return _match(_neurons(ref_fc1, ref_fc2, gated).double(), _neurons(fc1, fc2, gated).double())


def _match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`weight_matching_permutation` on neuron features ``a`` (reference), ``b`` [F, *]."""
    from scipy.optimize import linear_sum_assignment

    cost = (a @ b.t()).cpu().numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_expert(fc1: torch.Tensor, fc2: torch.Tensor, perm: torch.Tensor, *,
                   gated: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same expert with its hidden neurons reordered: neuron ``perm[i]`` moves to ``i``."""
    f = fc2.shape[1]
    perm = perm.to(fc1.device)
    new_fc1 = torch.cat([fc1[:f][perm], fc1[f:][perm]]) if gated else fc1[perm]
    return new_fc1, fc2[:, perm]


def usage_frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Selections per expert ``[..., E]`` normalised to sum 1 over the last dim (float64).

    A layer that routed nothing gets the uniform distribution (the reference would divide
    by zero)."""
    c = counts.double()
    total = c.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(c, 1.0 / c.shape[-1])
    return torch.where(total > 0, c / total.clamp_min(1e-300), uniform)


def logit_similarity(gram: torch.Tensor) -> torch.Tensor:
    """``(cos(Z[:, i], Z[:, j]) + 1) / 2`` for all expert pairs, from ``gram = Z^T Z`` [E, E].

    Equals the reference's pairwise loop over the columns of the router logits Z
    ``[tokens, E]``; a zero column has cosine 0 (similarity 0.5)."""
    g = gram.double()
    norm = g.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norm, norm)
    cos = torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))
    return (cos.clamp(-1.0, 1.0) + 1.0) / 2.0


def global_group_counts(freqs: Sequence[torch.Tensor], num_groups: int) -> List[int]:
    """Groups per layer from one frequency threshold over all layers (``globally_group``).

    As the reference: each layer's most used expert counts as frequency 1.0 (every layer
    keeps a group); the threshold is the ``(num_groups * L + 1)``-th largest frequency over
    all layers; a layer gets as many groups as it has frequencies strictly above it. Ties
    at the threshold give fewer groups than asked in total. ``num_groups == E`` keeps every
    expert (the reference's special case can drop the least used one). Raises
    ``ValueError`` when the threshold is 1.0.
    """
    rows = [f.double().clone() for f in freqs]
    if not rows:
        return []
    num_experts = rows[0].numel()
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"num_groups must be in [1, {num_experts}], got {num_groups}")
    if num_groups == num_experts:
        return [num_experts] * len(rows)
    for r in rows:
        r[int(torch.argmax(r))] = 1.0
    everything = torch.sort(torch.cat(rows), descending=True).values
    total = num_groups * len(rows)
    threshold = everything[total]
    if float(threshold) == 1.0:
        raise ValueError("the global frequency threshold is 1.0: too many groups asked for")
    return [int((r > threshold).sum()) for r in rows]


def dominant_grouping(freq: torch.Tensor, similarity: torch.Tensor,
                      num_groups: int) -> Tuple[torch.Tensor, List[int]]:
    """Labels ``[E]`` and the dominant expert of each group.

    The ``num_groups`` most used experts are the dominants (ties: the lower expert id
    first); every other expert joins the dominant it is most similar to (ties: the more
    used dominant). Groups are numbered by their lowest member (:func:`canonical_labels`;
    the reference numbers them by their dominant's rank, which only renames them)."""
    e = freq.numel()
    if not 1 <= num_groups <= e:
        raise ValueError(f"num_groups must be in [1, {e}], got {num_groups}")
    order = sorted(range(e), key=lambda i: (-float(freq[i]), i))
    dominants = order[:num_groups]
    labels = torch.empty(e, dtype=torch.long)
    dom = torch.tensor(dominants, dtype=torch.long)
    for g, d in enumerate(dominants):
        labels[d] = g
    for i in order[num_groups:]:
        labels[i] = int(torch.argmax(similarity[i, dom]))  # argmax returns the first maximum
    return canonical_labels(labels, dominants)


def canonical_labels(labels: torch.Tensor, dominants: Sequence[int]) -> Tuple[torch.Tensor, List[int]]:
    """The same partition with groups numbered by their lowest member (so that E' = E keeps
    every expert in its slot); ``dominants`` renumbered alike."""
    firsts = sorted(range(int(labels.max()) + 1), key=lambda g: int((labels == g).nonzero()[0]))
    new_of = {old: new for new, old in enumerate(firsts)}
    out = torch.tensor([new_of[int(x)] for x in labels], dtype=torch.long)
    doms = [0] * len(firsts)
    for old, d in enumerate(dominants):
        doms[new_of[old]] = d
    return out, doms


def random_grouping(num_experts: int, num_groups: int, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
    """Uniformly random labels with every group non-empty (the ``random`` baseline)."""
    if not 1 <= num_groups <= num_experts:
        raise ValueError(f"num_groups must be in [1, {num_experts}], got {num_groups}")
    perm = torch.randperm(num_experts, generator=generator)
    labels = torch.empty(num_experts, dtype=torch.long)
    labels[perm[:num_groups]] = torch.arange(num_groups)
    rest = perm[num_groups:]
    labels[rest] = torch.randint(0, num_groups, (len(rest),), generator=generator)
    return labels


def labels_from_groups(groups: Sequence[Sequence[int]], num_experts: int) -> torch.Tensor:
    """Labels from explicit groups (lists of expert ids); each expert in exactly one group."""
    labels = torch.full((num_experts,), -1, dtype=torch.long)
    for g, members in enumerate(groups):
        if not members:
            raise ValueError(f"group {g} is empty")
        for m in members:
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < num_experts:
                raise ValueError(f"group {g} names expert {m!r}, not one of 0..{num_experts - 1}")
            if labels[m] >= 0:
                raise ValueError(f"expert {m} is in two groups")
            labels[m] = g
    missing = (labels < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"experts {missing} are in no group")
    return labels


def group_dominants(labels: torch.Tensor, freq: torch.Tensor) -> List[int]:
    """The most used member of each group (ties: lowest id)."""
    out = []
    for g in range(int(labels.max()) + 1):
        members = (labels == g).nonzero().flatten().tolist()
        out.append(min(members, key=lambda i: (-float(freq[i]), i)))
    return out


def merge_layer(fc1: torch.Tensor, fc2: torch.Tensor, labels: torch.Tensor, freq: torch.Tensor, *,
                align: str = "first", weighting: str = "frequency", dominants: Optional[List[int]] = None,
                gated: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge a layer's experts ``fc1 [E, 2F, H]``, ``fc2 [E, H, F]`` into ``G`` groups.

    ``align``: ``"first"`` aligns every expert to expert 0 (the reference), ``"dominant"``
    each to its group's dominant, ``"none"`` not at all; members of one-expert groups are
    never reordered (the reference reorders them too, which changes no function but every
    bit). ``weighting``: ``"frequency"``
    (``W_g = sum f_i W_i / sum f_i``; a group whose members were never used falls back to
    the plain mean) or ``"uniform"``. Returns ``(fc1 [G, ...], fc2 [G, ...], perms [E, F],
    coefficients [E])``: expert ``e``'s aligned weights enter its group's average with
    ``coefficients[e]`` (the coefficients of a group sum to 1), so that
    ``fc1_g = sum_{e in g} coef[e] * permute(fc1[e], perms[e])[0]``.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    e, f = fc1.shape[0], fc2.shape[2]
    groups = int(labels.max()) + 1
    if dominants is None:
        dominants = group_dominants(labels, freq)
    perms = torch.arange(f).repeat(e, 1)
    sizes = torch.bincount(labels, minlength=groups)
    features = {}  # neuron features of each expert, computed once (a reference serves many)

    def feats(i):
        if i not in features:
            features[i] = _neurons(fc1[i], fc2[i], gated).double()
        return features[i]

    for i in range(e):
        if sizes[int(labels[i])] < 2:
            continue  # a singleton group is the expert itself: no reordering (bit for bit)
        ref = 0 if align == "first" else dominants[int(labels[i])] if align == "dominant" else i
        if ref != i:
            perms[i] = _match(feats(ref), feats(i))
    w = freq.double() if weighting == "frequency" else torch.ones(e, dtype=torch.float64)
    coef = torch.zeros(e, dtype=torch.float64)
    for g in range(groups):
        m = labels == g
        total = w[m].sum()
        coef[m] = w[m] / total if total > 0 else 1.0 / int(m.sum())
    out1 = torch.zeros((groups,) + tuple(fc1.shape[1:]), dtype=torch.float64)
    out2 = torch.zeros((groups,) + tuple(fc2.shape[1:]), dtype=torch.float64)
    for i in range(e):
        a1, a2 = permute_expert(fc1[i], fc2[i], perms[i], gated=gated)
        out1[int(labels[i])] += coef[i] * a1.double()
        out2[int(labels[i])] += coef[i] * a2.double()
    return out1.to(fc1.dtype), out2.to(fc2.dtype), perms, coef


def membership_matrix(labels: torch.Tensor, num_groups: Optional[int] = None,
                      dtype=torch.float64) -> torch.Tensor:
    """``A [G, E]`` with ``A[g, e] = 1`` when expert ``e`` is in group ``g``."""
    groups = int(labels.max()) + 1 if num_groups is None else num_groups
    a = torch.zeros(groups, labels.numel(), dtype=dtype)
    a[labels, torch.arange(labels.numel())] = 1
    return a


def push_forward_counters(num_tokens: torch.Tensor, usage: torch.Tensor, cooccurrence: torch.Tensor,
                          membership: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoPE counters of grouped experts: ``(N, A u, A C A^T)``.

    Exactly the counters a recount would give if every token's group indicator were the
    number of its selected experts in the group (``M A^T``; two members selected count
    twice, as the bound layout runs the merged expert twice). Sigma is then rebuilt from
    them with :func:`mpmoe.routing.cooccurrence.covariance_from_counts` (shrinkage applied
    after, never to a transformed Sigma).
    """
    a = membership.to(usage.dtype)
    return num_tokens.clone(), a @ usage, a @ cooccurrence @ a.t()


def fold_probabilities(probs: torch.Tensor, labels: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[T, E]`` router probabilities -> ``[T, G]``: each group's members' probabilities summed
    (``probs A^T``; experts labelled ``-1``, dropped, count in no group). The first step of
    fold-then-select routing over merged experts (``moe_expert_group_routing``)."""
    labels = labels.to(probs.device)
    kept = labels >= 0
    out = torch.zeros(probs.shape[:-1] + (num_groups,), dtype=probs.dtype, device=probs.device)
    return out.index_add_(-1, labels[kept], probs[..., kept])


def format_expert_groups(groups: dict) -> str:
    """``{layer: labels}`` -> ``"2:0,1,0,-1;3:..."`` (the ``moe_expert_groups`` setting).

    Layer numbers are megatron's (1-based); ``labels[e]`` is expert ``e``'s group, ``-1``
    for an expert that is dropped (never routed to)."""
    return ";".join(f"{int(layer)}:{','.join(str(int(x)) for x in labels)}"
                    for layer, labels in sorted(groups.items()))


def parse_expert_groups(text) -> dict:
    """The inverse of :func:`format_expert_groups` (``None``/``""`` -> ``{}``); one-line
    ``ValueError`` on malformed text, on maps of different lengths, or on a map with a label
    below -1 or no kept expert."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, dict):
        items = text.items()
    else:
        items = []
        for part in str(text).split(";"):
            layer, sep, labels = part.partition(":")
            if not sep:
                raise ValueError(f"moe_expert_groups: expected LAYER:LABELS;..., got {part!r}")
            try:
                items.append((int(layer), [int(x) for x in labels.split(",")]))
            except ValueError:
                raise ValueError(f"moe_expert_groups: not integers in {part!r}") from None
    out, width = {}, None
    for layer, labels in items:
        labels = [int(x) for x in labels]
        if int(layer) < 1:
            raise ValueError(f"moe_expert_groups: layer numbers are 1-based, got {layer}")
        if width is not None and len(labels) != width:
            raise ValueError("moe_expert_groups: every layer must map the same number of experts")
        width = len(labels)
        if not labels or min(labels) < -1 or max(labels) < 0:
            raise ValueError(f"moe_expert_groups: layer {layer}: labels are group ids >= 0 "
                             "(-1 = dropped) with at least one kept expert")
        out[int(layer)] = labels
    return out
