"""HEMoE: split a dense FFN into experts of different sizes (pure PyTorch + SciPy).

The pipeline (``docs/experts.md``, section Split), one layer at a time:

1. :func:`neuron_scores`: per sample, the first-order estimate of removing each FFN neuron,
   from the weights and their gradients; :func:`accumulate_importance` takes its absolute
   value per sample and sums over samples (one column per domain);
2. :func:`normalize_importance`: ``log1p`` then each domain's column L2-normalised over all
   layers x neurons;
3. :func:`balanced_kmeans`: neurons (their L2-normalised gate rows) into ``M`` modules of
   exactly equal size; :func:`module_scores` sums each module's neurons;
4. :func:`solve_split_ilp`: the per-layer ILP (modules -> experts, experts -> domains),
   linearised and solved with ``scipy.optimize.milp`` (HiGHS) under a time limit;
5. :func:`expert_of_neuron` / :func:`split_ffn`: each expert is its neurons' rows of
   ``linear_fc1`` (gate and up halves alike) and columns of ``linear_fc2``: all experts
   together are the dense FFN.

Baseline partitioners (neuron -> expert labels): :func:`moefication_partition` (balanced
k-means of the gate rows into E equal experts), :func:`random_homogeneous`,
:func:`random_heterogeneous` (given sizes), :func:`contiguous_partition` (megatron's
upcycling split: contiguous neuron ranges).

Conventions: megatron's weights: ``linear_fc1.weight`` is ``[2F, H]`` for SwiGLU (gate rows
``[:F]``, up rows ``[F:]``) or ``[F, H]``; ``linear_fc2.weight`` is ``[H, F]``. Labels are
int64 tensors ``[F]`` with values in ``0..E-1``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "IlpResult",
    "accumulate_importance",
    "balanced_kmeans",
    "check_ilp_inputs",
    "contiguous_partition",
    "expert_of_neuron",
    "format_expert_sizes",
    "ilp_size_bounds",
    "module_scores",
    "moefication_partition",
    "neuron_scores",
    "normalize_importance",
    "parse_expert_sizes",
    "random_heterogeneous",
    "random_homogeneous",
    "solve_split_ilp",
    "split_ffn",
    "split_objective",
]


# --------------------------------------------------------------------------- importance
def neuron_scores(fc1_weight: torch.Tensor, fc1_grad: torch.Tensor, fc2_weight: torch.Tensor,
                  fc2_grad: torch.Tensor, *, gated: bool = True) -> dict:
    """Per-neuron first-order terms ``sum_h W * dL/dW`` of one sample's loss.

    Returns ``{"gate": [F] or None, "up": [F], "down": [F], "total": [F]}`` (float64):
    ``down[n] = sum_h W2[h, n] G2[h, n]`` and ``up[n] = sum_h W_up[n, h] G_up[n, h]`` both equal
    ``dL/d(alpha_n)`` for a scalar ``alpha_n`` scaling neuron ``n``'s activation (the up
    projection enters the activation linearly); ``gate[n]`` is ``dL/d(beta_n)`` for
    ``beta_n`` scaling the neuron's gate row (SwiGLU: not linear, so not equal to the
    others). ``total = gate + up + down``: HEMoE's per-sample score before the absolute value.
    """
    w1, g1 = fc1_weight.detach().double(), fc1_grad.detach().double()
    w2, g2 = fc2_weight.detach().double(), fc2_grad.detach().double()
    f = w2.shape[1]
    rows = (w1 * g1).sum(dim=1)
    if gated:
        if rows.shape[0] != 2 * f:
            raise ValueError(f"gated fc1 has {rows.shape[0]} rows, expected 2 x {f}")
        gate, up = rows[:f], rows[f:]
    else:
        if rows.shape[0] != f:
            raise ValueError(f"fc1 has {rows.shape[0]} rows, expected {f}")
        gate, up = None, rows
    down = (w2 * g2).sum(dim=0)
    total = up + down + (gate if gate is not None else 0.0)
    return {"gate": gate, "up": up, "down": down, "total": total}


def accumulate_importance(acc: Optional[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
    """``acc + |total|``: HEMoE takes the absolute value per sample, then sums."""
    value = total.detach().double().abs()
    return value if acc is None else acc + value


def normalize_importance(scores: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``log1p`` then each domain column L2-normalised over all layers x neurons.

    ``scores``: one ``[F_l, D]`` non-negative tensor per layer; returns the same shapes.
    A column that is all zero stays zero.
    """
    logged = [torch.log1p(s.double()) for s in scores]
    norms = torch.cat(logged, dim=0).norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return [s / norms for s in logged]


# --------------------------------------------------------------------------- modules
def _generator(seed: int) -> np.random.Generator:
    return np.random.default_rng(int(seed))


def balanced_kmeans(features: torch.Tensor, num_clusters: int, *, seed: int = 0,
                    max_iter: int = 30) -> torch.Tensor:
    """Cluster the rows of ``features`` into ``num_clusters`` clusters of exactly equal size.

    Size-constrained k-means: each assignment step is a min-cost assignment of the rows to
    ``num_clusters x (n / num_clusters)`` slots (``scipy.optimize.linear_sum_assignment`` on
    squared distances), each update step the slots' means; k-means++ seeding from ``seed``.
    Deterministic for a seed. Returns int64 labels ``[n]``.
    """
    from scipy.optimize import linear_sum_assignment

    x = features.detach().double().cpu().numpy()
    n = x.shape[0]
    if num_clusters < 1 or n % num_clusters:
        raise ValueError(f"{n} rows cannot form {num_clusters} equal clusters")
    size = n // num_clusters
    rng = _generator(seed)
    centers = [x[rng.integers(n)]]
    for _ in range(1, num_clusters):  # k-means++
        d2 = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(x[rng.choice(n, p=p)])
    centers = np.asarray(centers)
    labels = None
    for _ in range(max_iter):
        cost = ((x[:, None, :] - centers[None]) ** 2).sum(-1)  # [n, K]
        rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
        new = np.empty(n, dtype=np.int64)
        new[rows] = slots // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([x[labels == k].mean(0) for k in range(num_clusters)])
    return torch.from_numpy(labels)


def module_scores(scores: torch.Tensor, module_labels: torch.Tensor, num_modules: int) -> torch.Tensor:
    """``[M, D]``: the sum of each module's neurons' scores (``scores`` ``[F, D]``)."""
    out = torch.zeros(num_modules, scores.shape[1], dtype=torch.float64)
    return out.index_add_(0, module_labels.long(), scores.double())


def gate_features(fc1_weight: torch.Tensor, *, gated: bool = True) -> torch.Tensor:
    """The neurons' clustering features: their L2-normalised gate rows (HEMoE) ``[F, H]``."""
    w = fc1_weight.detach().double()
    rows = w[: w.shape[0] // 2] if gated else w
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- the ILP
@dataclasses.dataclass
class IlpResult:
    """The solved split of one layer."""

    expert_of_module: torch.Tensor   # [M] int64, experts ordered by size (largest first)
    domains: torch.Tensor            # [E, D] bool: expert e serves domain d
    sizes: List[int]                 # modules per expert
    status: str                      # "optimal", "time_limit", "time_limit_fallback"
    objective: float                 # sum_e sum_d y[e,d] sum_m s[m,d] x[m,e]
    bound: Optional[float]           # the solver's dual bound (None: none)
    mip_gap: Optional[float]         # (bound - objective) / |objective|
    seconds: float

    def as_json(self) -> dict:
        return {"status": self.status, "objective": self.objective, "bound": self.bound,
                "mip_gap": self.mip_gap, "sizes_modules": list(self.sizes), "seconds": round(self.seconds, 3),
                "domains": [[int(d) for d in torch.nonzero(row).flatten()] for row in self.domains]}


def ilp_size_bounds(num_modules: int, num_experts: int, size_ratio: float) -> Tuple[int, int]:
    """HEMoE's size bounds ``round(avg / sqrt(R))`` .. ``round(avg * sqrt(R))`` (avg = M / E),
    tightened to what ``M`` modules in ``E`` experts can reach."""
    avg = num_modules / num_experts
    lo = max(1, int(round(avg / math.sqrt(size_ratio))))
    hi = max(lo, int(round(avg * math.sqrt(size_ratio))))
    return lo, hi


def split_objective(scores: torch.Tensor, expert_of_module: torch.Tensor, domains: torch.Tensor) -> float:
    """``sum_e sum_d y[e,d] sum_m s[m,d] x[m,e]`` for an assignment (independent of the ILP)."""
    s = scores.double()
    total = 0.0
    for e in range(domains.shape[0]):
        mass = s[expert_of_module == e].sum(0)  # [D]
        total += float((mass * domains[e].double()).sum())
    return total


def check_ilp_inputs(m: int, d: int, e: int, size_ratio: float, coherence: float) -> Tuple[int, int, int]:
    """``(lo, hi, cap)`` for M modules, D domains, E experts; ValueError (one line) when no
    split can satisfy the constraints."""
    if e < 1 or e > m:
        raise ValueError(f"{e} experts cannot be made from {m} modules (need 1 <= experts <= modules)")
    if not size_ratio >= 1:
        raise ValueError(f"size ratio must be >= 1, got {size_ratio}")
    lo, hi = ilp_size_bounds(m, e, size_ratio)
    if lo * e > m or hi * e < m:
        raise ValueError(f"{m} modules do not fit {e} experts of {lo}..{hi} modules each")
    cap = max(1, int(round(coherence * e / d)))
    if cap * d < e:
        raise ValueError(f"{e} experts cannot each serve a domain when each of {d} domains "
                         f"serves at most {cap} experts")
    return lo, hi, cap


def _fallback(s: np.ndarray, e: int, lo: int, hi: int, cap: int) -> Tuple[np.ndarray, np.ndarray]:
    """A feasible split without the solver: contiguous modules of near-equal size (clipped to
    the bounds), each expert serving the domains its mass is largest for (within the caps)."""
    m, d = s.shape
    sizes = np.clip(np.full(e, m // e), lo, hi)
    sizes[: m - sizes.sum()] += 1
    assign = np.repeat(np.arange(e), sizes)
    mass = np.stack([s[assign == k].sum(0) for k in range(e)])  # [E, D]
    y = np.zeros((e, d), dtype=bool)
    used = np.zeros(d, dtype=int)
    for k in range(e):  # one domain each, within the caps
        for dd in np.argsort(-mass[k]):
            if used[dd] < cap:
                y[k, dd] = True
                used[dd] += 1
                break
    for k, dd in sorted(((k, dd) for k in range(e) for dd in range(d)), key=lambda t: -mass[t]):
        if not y[k, dd] and used[dd] < cap and mass[k, dd] > 0:
            y[k, dd] = True
            used[dd] += 1
    return assign, y


def solve_split_ilp(scores: torch.Tensor, num_experts: int, *, size_ratio: float = 4.0,
                    coherence: float = 2.0, time_limit: float = 60.0) -> IlpResult:
    """HEMoE's per-layer ILP, linearised, solved with HiGHS (``scipy.optimize.milp``).

    Variables: ``x[m,e]`` (module m in expert e), ``y[e,d]`` (expert e serves domain d) and
    ``z[m,e,d]`` standing for the product ``x[m,e] y[e,d]``::

        maximise   sum_{m,e,d} s[m,d] z[m,e,d]
        s.t.       sum_e x[m,e] = 1                         (each module in one expert)
                   sum_d y[e,d] >= 1                        (each expert serves a domain)
                   lo <= sum_m x[m,e] <= hi                 (size bounds, ratio R)
                   sum_e y[e,d] <= round(coherence * E / D) (each domain, few experts)
                   z <= x,  z <= y,  (z >= x + y - 1 where s < 0)
                   sum_m x[m,e] >= sum_m x[m,e+1]           (experts ordered by size)

    The last line only removes expert permutations (symmetry). ``scores``: ``[M, D]``.
    A solver stopped by ``time_limit`` with a solution reports ``"time_limit"`` and its MIP
    gap; with none, a feasible fallback split is returned (``"time_limit_fallback"``).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    s = scores.detach().double().cpu().numpy()
    m, d = s.shape
    e = int(num_experts)
    lo, hi, cap = check_ilp_inputs(m, d, e, size_ratio, coherence)
    nx, ny, nz = m * e, e * d, m * e * d
    xi = lambda mm, ee: mm * e + ee  # noqa: E731
    yi = lambda ee, dd: nx + ee * d + dd  # noqa: E731
    zi = lambda mm, ee, dd: nx + ny + (mm * e + ee) * d + dd  # noqa: E731
    n = nx + ny + nz
    c = np.zeros(n)
    for mm in range(m):
        for ee in range(e):
            for dd in range(d):
                c[zi(mm, ee, dd)] = -s[mm, dd]
    rows, cols, vals, lb, ub = [], [], [], [], []
    r = 0

    def add(entries, low, high):
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lb.append(low)
        ub.append(high)
        r += 1

    for mm in range(m):
        add([(xi(mm, ee), 1.0) for ee in range(e)], 1, 1)
    for ee in range(e):
        add([(yi(ee, dd), 1.0) for dd in range(d)], 1, np.inf)
        add([(xi(mm, ee), 1.0) for mm in range(m)], lo, hi)
        if ee + 1 < e:
            add([(xi(mm, ee), 1.0) for mm in range(m)] + [(xi(mm, ee + 1), -1.0) for mm in range(m)], 0, np.inf)
    for dd in range(d):
        add([(yi(ee, dd), 1.0) for ee in range(e)], -np.inf, cap)
    for mm in range(m):
        for ee in range(e):
            for dd in range(d):
                z = zi(mm, ee, dd)
                add([(z, 1.0), (xi(mm, ee), -1.0)], -np.inf, 0)
                add([(z, 1.0), (yi(ee, dd), -1.0)], -np.inf, 0)
                if s[mm, dd] < 0:
                    add([(z, 1.0), (xi(mm, ee), -1.0), (yi(ee, dd), -1.0)], -1, np.inf)
    a = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    integrality = np.concatenate([np.ones(nx + ny), np.zeros(nz)])  # z is integral at any vertex
    start = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(a, lb, ub), integrality=integrality,
               bounds=Bounds(0, 1), options={"time_limit": float(time_limit), "disp": False})
    seconds = time.perf_counter() - start
    if res.x is not None:
        x = res.x[:nx].reshape(m, e) > 0.5
        assign = x.argmax(1)
        y = res.x[nx:nx + ny].reshape(e, d) > 0.5
        status = "optimal" if res.status == 0 else "time_limit"
        dual = getattr(res, "mip_dual_bound", None)
        bound = None if dual is None or not np.isfinite(dual) else float(-dual)
    else:
        if res.status not in (1,):  # not a time/iteration limit: infeasible or an error
            raise ValueError(f"the split ILP failed: {res.message}")
        assign, y = _fallback(s, e, lo, hi, cap)
        status, bound = "time_limit_fallback", None
    # order experts by size, largest first (the solver's symmetry cut already does, modulo ties)
    sizes = np.bincount(assign, minlength=e)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(e, dtype=np.int64)
    rank[order] = np.arange(e)
    expert_of_module = torch.from_numpy(rank[assign].astype(np.int64))
    domains = torch.from_numpy(y[order].copy())
    objective = split_objective(torch.from_numpy(s), expert_of_module, domains)
    gap = None
    if bound is not None:
        gap = 0.0 if status == "optimal" else max(0.0, (bound - objective) / max(abs(objective), 1e-12))
    return IlpResult(expert_of_module=expert_of_module, domains=domains,
                     sizes=[int(v) for v in sizes[order]], status=status, objective=objective,
                     bound=bound, mip_gap=gap, seconds=seconds)


# --------------------------------------------------------------------------- partitions
def expert_of_neuron(module_labels: torch.Tensor, expert_of_module: torch.Tensor) -> torch.Tensor:
    """Neuron -> expert labels from neuron -> module and module -> expert."""
    return expert_of_module.long()[module_labels.long()]


def moefication_partition(fc1_weight: torch.Tensor, num_experts: int, *, gated: bool = True,
                          seed: int = 0) -> torch.Tensor:
    """MoEfication-style: the neurons' normalised gate rows, balanced k-means into E equal experts."""
    return balanced_kmeans(gate_features(fc1_weight, gated=gated), num_experts, seed=seed)


def random_homogeneous(num_neurons: int, num_experts: int, *, seed: int = 0) -> torch.Tensor:
    """Random neurons, E experts of equal size."""
    if num_neurons % num_experts:
        raise ValueError(f"{num_neurons} neurons do not split into {num_experts} equal experts")
    return random_heterogeneous(num_neurons, [num_neurons // num_experts] * num_experts, seed=seed)


def random_heterogeneous(num_neurons: int, sizes: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    """Random neurons into experts of the given sizes (e.g. the ILP's)."""
    if sum(sizes) != num_neurons or min(sizes) < 1:
        raise ValueError(f"expert sizes {list(sizes)} do not partition {num_neurons} neurons")
    perm = _generator(seed).permutation(num_neurons)
    labels = np.empty(num_neurons, dtype=np.int64)
    labels[perm] = np.repeat(np.arange(len(sizes)), sizes)
    return torch.from_numpy(labels)


def contiguous_partition(num_neurons: int, num_experts: int) -> torch.Tensor:
    """megatron's upcycling split: contiguous neuron ranges (``tensor_split``), no scaling."""
    chunks = torch.tensor_split(torch.arange(num_neurons), num_experts)
    labels = torch.empty(num_neurons, dtype=torch.int64)
    for k, idx in enumerate(chunks):
        labels[idx] = k
    return labels


def split_ffn(fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, labels: torch.Tensor, num_experts: int,
              *, gated: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(fc1_e, fc2_e)]``: expert e's neurons (ascending) as rows of fc1 (gate and up halves
    alike) and columns of fc2. Summing the experts' outputs gives the dense FFN's."""
    f = fc2_weight.shape[1]
    out = []
    for k in range(num_experts):
        idx = torch.nonzero(labels == k).flatten()
        rows = torch.cat([idx, idx + f]) if gated else idx
        out.append((fc1_weight[rows].clone(), fc2_weight[:, idx].clone()))
    return out


# --------------------------------------------------------------------------- recorded sizes
def parse_expert_sizes(value: Any, num_experts: Optional[int] = None) -> Optional[Dict[int, Tuple[int, ...]]]:
    """``None``/``""`` -> None; text (``"L:s,s,...;L:..."`` or JSON) or a mapping -> ``{layer: sizes}``.

    One-line ValueError for a malformed value, a layer number < 1, a size < 1 or a layer
    with other than ``num_experts`` sizes.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"moe_expert_ffn_sizes: not valid JSON ({exc.msg})") from None
        else:
            parsed = {}
            for part in filter(None, (p.strip() for p in text.split(";"))):
                layer, sep, sizes = part.partition(":")
                if not sep:
                    raise ValueError(f"moe_expert_ffn_sizes: expected 'LAYER:SIZE,SIZE,...', got {part!r}")
                parsed[layer.strip()] = [s.strip() for s in sizes.split(",") if s.strip()]
            value = parsed
    if not isinstance(value, Mapping):
        raise ValueError(f"moe_expert_ffn_sizes: expected a mapping layer -> sizes, got {value!r}")
    out: Dict[int, Tuple[int, ...]] = {}
    for layer, sizes in value.items():
        try:
            layer_i = int(layer)
            sizes_t = tuple(int(s) for s in sizes)
        except (TypeError, ValueError):
            raise ValueError(f"moe_expert_ffn_sizes: layer {layer!r}: expected int sizes, got {sizes!r}") from None
        if layer_i < 1:
            raise ValueError(f"moe_expert_ffn_sizes: layer numbers are 1-based, got {layer_i}")
        if not sizes_t or min(sizes_t) < 1:
            raise ValueError(f"moe_expert_ffn_sizes: layer {layer_i}: sizes must be >= 1, got {list(sizes_t)}")
        if num_experts is not None and len(sizes_t) != num_experts:
            raise ValueError(f"moe_expert_ffn_sizes: layer {layer_i} has {len(sizes_t)} sizes, "
                             f"num_moe_experts is {num_experts}")
        out[layer_i] = sizes_t
    return out or None


def format_expert_sizes(sizes: Optional[Mapping[int, Tuple[int, ...]]]) -> Optional[str]:
    """The text form of :func:`parse_expert_sizes` (None for None)."""
    if not sizes:
        return None
    return ";".join(f"{layer}:{','.join(str(s) for s in sizes[layer])}" for layer in sorted(sizes))
