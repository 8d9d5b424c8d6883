"""Expert masks: the static knock-out and the dynamic k -> k-1 ablations of MP-MoE.

* Static mask (spec step 1): for the layers and experts the user lists, router
  logits are set to -inf, so those experts are never routed to.
* Dynamic mask (spec step 5): after routing, every token with at least two routed
  experts loses one, and its remaining gate weights are renormalised:

  - ``"cooccurrence"``: with C a saved co-occurrence matrix of the layer and
    ``C_norm[i, j] = C[i, j] / max(C[i, i], 1)`` (zero diagonal), find among the
    token's routed experts the ordered pair (i, j) with the largest ``C_norm[i, j]``
    and remove j (the expert most "echoed" by another routed one; exact ties
    remove the lowest expert id);
  - ``"random"``: remove a uniformly random routed expert (seedable).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "DYNAMIC_MASK_MODES",
    "parse_expert_mask",
    "apply_static_mask",
    "normalized_cooccurrence",
    "dynamic_drop_one",
]

DYNAMIC_MASK_MODES = ("cooccurrence", "random")


def parse_expert_mask(spec: str | os.PathLike | Mapping | None) -> dict[int, tuple[int, ...]]:
    """Parse a static expert mask: layer -> expert ids to knock out.

    Accepts ``None`` (no mask), a mapping, JSON text (``'{"2": [0, 5], "5": [1]}'``,
    the demo's ``MOE_MASK_EXPERTS`` format), the command line's compact form
    ``"2:0,5;5:1"`` (``layer:ids`` groups separated by ``;``) or the path of a JSON file. Layer numbers
    are as megatron counts them (1-based); expert ids are global ids. Raises
    ``ValueError`` with a one-line reason on malformed input.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        raw = spec
    else:
        text = os.fspath(spec)
        if not text.strip():
            return {}
        if not text.lstrip().startswith("{") and os.path.isfile(text):
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        elif ":" in text and not text.lstrip().startswith("{"):
            text = _compact_to_json(text)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expert mask: not valid JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"expert mask: expected a JSON object layer -> [expert ids], got {type(raw).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for layer, experts in raw.items():
        try:
            layer_id = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"expert mask: layer key {layer!r} is not an integer") from None
        if isinstance(experts, (int, str)) or not isinstance(experts, Iterable):
            experts = [experts]
        ids = []
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise ValueError(f"expert mask: layer {layer_id}: expert id {e!r} is not a non-negative int")
            ids.append(e)
        out[layer_id] = tuple(sorted(set(ids)))
    return out


def _compact_to_json(text: str) -> str:
    """``"2:3,17;5:0"`` -> ``'{"2": [3, 17], "5": [0]}'`` (raises ValueError on bad groups)."""
    out = {}
    for group in (g.strip() for g in text.split(";")):
        if not group:
            continue
        layer, sep, ids = group.partition(":")
        try:
            if not sep:
                raise ValueError
            out[str(int(layer))] = [int(e) for e in ids.replace(" ", "").split(",") if e]
        except ValueError:
            raise ValueError(f"expert mask: expected LAYER:ID,ID;LAYER:ID..., got group {group!r}") from None
    return json.dumps(out)


#: Static knock-out semantics (``moe_mask_experts_semantics``): "mpmoe" sets the knocked-out
#: experts' logits to -inf and OTEP never picks them; "reference" (the MP-MoE authors' code)
#: sets them to the dtype's lowest finite value, so p_j = 0 but OTEP can still pick them through
#: Sigma's off-diagonal terms, with gate weight 0 (the token then runs on fewer than k experts).
STATIC_MASK_SEMANTICS = ("mpmoe", "reference")


def apply_static_mask(logits: torch.Tensor, expert_ids: Iterable[int], *, finite: bool = False) -> torch.Tensor:
    """Return ``logits`` [T, E] with the listed experts' columns set to -inf, or with
    ``finite`` to the dtype's lowest finite value (the reference's ``finfo.min``)."""
    ids = list(expert_ids)
    if not ids:
        return logits
    num_experts = logits.shape[-1]
    bad = [e for e in ids if not 0 <= e < num_experts]
    if bad:
        raise ValueError(f"static mask: expert ids {bad} out of range for {num_experts} experts")
    mask = torch.zeros(num_experts, dtype=torch.bool, device=logits.device)
    mask[ids] = True
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min if finite else -math.inf)


def normalized_cooccurrence(cooccurrence: torch.Tensor) -> torch.Tensor:
    """``C_norm[i, j] = C[i, j] / max(C[i, i], 1)`` with a zero diagonal (float32)."""
    c = torch.as_tensor(cooccurrence).to(torch.float32)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"co-occurrence matrix must be square [E, E], got {tuple(c.shape)}")
    norm = c / c.diagonal().clamp_min(1.0).unsqueeze(1)
    norm.fill_diagonal_(0.0)
    return norm


def dynamic_drop_one(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    mode: str,
    *,
    cooccurrence: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_routed: int | None = None,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove one routed expert from every token that has at least two (k -> k-1).

    Args:
        probs: gate weights [T, E], zero outside the routing map.
        routing_map: bool [T, E].
        mode: ``"cooccurrence"`` (needs ``cooccurrence``, the raw [E, E] counts of
            the layer, normalised here) or ``"random"`` (uses ``generator``, which
            must live on the device of ``probs``).
        max_routed: the most experts any token is routed to (the router's k). Pass
            it on a device: without it, "cooccurrence" reads it from the map, a
            host synchronisation.
    Returns:
        ``(probs, routing_map)``, new tensors. The removed expert's weight is zeroed
        and the remaining weights of the token are rescaled to the token's
        original total (so softmax-normalised weights still sum to one), or, with
        ``renormalize``, to sum to one (the reference code's choice; the two differ
        only when the weights did not sum to one, e.g. under
        ``moe_router_pre_softmax``). Tokens with fewer than two routed experts are
        unchanged.
    """
    if mode not in DYNAMIC_MASK_MODES:
        raise ValueError(f"dynamic mask mode must be one of {DYNAMIC_MASK_MODES}, got {mode!r}")
    if probs.shape != routing_map.shape or probs.dim() != 2:
        raise ValueError(
            f"dynamic mask: probs {tuple(probs.shape)} and routing_map {tuple(routing_map.shape)} "
            "must both be [tokens, experts]"
        )
    num_experts = probs.shape[1]
    routed = routing_map.to(torch.bool)
    if mode == "cooccurrence":
        if cooccurrence is None:
            raise ValueError("dynamic mask mode 'cooccurrence' needs a co-occurrence matrix")
        if tuple(cooccurrence.shape) != (num_experts, num_experts):
            raise ValueError(
                f"dynamic mask: co-occurrence matrix is {tuple(cooccurrence.shape)}, "
                f"expected ({num_experts}, {num_experts})"
            )
        c_norm = normalized_cooccurrence(cooccurrence).to(probs.device)
        # score[t, j] = max_{i routed, i != j} C_norm[i, j] over the token's routed
        # experts i; only routed j compete. Via the [T, k] indices of routed experts
        # (memory O(T k^2), not O(T E^2)).
        if max_routed is None:
            max_routed = int(routed.sum(dim=1).max()) if routed.numel() else 0
        k = min(max_routed, num_experts)
        if k < 2:
            return probs.clone(), routed.clone()
        order = routed.to(torch.int8).topk(k, dim=1)
        # Slots in expert order (unused slots last), so ties go to the lowest id.
        idx = order.indices.masked_fill(~order.values.bool(), num_experts).sort(dim=1).values
        valid = idx < num_experts  # [T, k]
        idx = idx.clamp_max(num_experts - 1)
        pair = c_norm[idx.unsqueeze(2), idx.unsqueeze(1)]  # [T, k(i), k(j)]
        pair = pair.masked_fill(~(valid.unsqueeze(2) & valid.unsqueeze(1)), -1.0)
        pair.diagonal(dim1=1, dim2=2).fill_(-1.0)
        best_j_slot = pair.amax(dim=1).masked_fill(~valid, -2.0).argmax(dim=1)  # [T]
        drop = idx.gather(1, best_j_slot.unsqueeze(1)).squeeze(1)
    else:
        noise = torch.rand(probs.shape, generator=generator, device=probs.device)
        noise = noise.masked_fill(~routed, -1.0)
        drop = noise.argmax(dim=1)
    eligible = routed.sum(dim=1) >= 2
    remove = torch.zeros_like(routed).scatter_(1, drop.unsqueeze(1), True) & eligible.unsqueeze(1)
    new_map = routed & ~remove
    total = probs.sum(dim=1, keepdim=True)
    if renormalize:
        total = torch.where(eligible.unsqueeze(1), torch.ones_like(total), total)
    kept = probs.masked_fill(~new_map, 0.0)
    kept_total = kept.sum(dim=1, keepdim=True)
    scale = torch.where(kept_total > 0, total / kept_total.clamp_min(torch.finfo(probs.dtype).tiny), 1.0)
    return kept * scale, new_map
