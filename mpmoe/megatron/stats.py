"""Routing statistics for every MoE layer (top-k or MoPE): windows, npz files, eval dumps.

Each router (:class:`mpmoe.megatron.router.TopKStatsRouter` and its MoPE subclass)
adds the routing map of every counted forward (training mode, not an activation
recomputation) to device-resident window counters when its layer is tracked
(``moe_stats_dir`` set, layer in ``moe_stats_layers`` or that list None). The trainer
drives a :class:`RoutingStatsTracker`: after each optimizer step it calls
``tracker.on_optimizer_step(step)``; every ``moe_plot_every`` steps the window counters
are summed over the ranks that see different tokens and written, by one rank, as

    {moe_stats_dir}/layer{L}_seg{S}_{moe|mope|remoe}.npz

with keys ``expert_counts`` (int64 [E], tokens routed to each expert),
``cooccurrence_matrix`` (int64 [E, E], tokens routed to both i and j; diagonal =
``expert_counts``), ``num_tokens`` (int64, tokens counted), ``experts_per_token`` (int64
[E+1], tokens routed to 0, 1, ..., E experts: a spike at k for top-k and MoPE, spread
under ReMoE; kind ``remoe``) and, for MoPE layers,
``cov_matrix`` (float32 [E, E], the Sigma the layer routes with). ``L`` is megatron's
1-based layer number, ``S`` the 0-based window index (window S covers optimizer steps
``S*N+1 .. (S+1)*N``). The dynamic "cooccurrence" mask reads these files back with
:func:`load_layer_cooccurrence`.

With ``moe_eval_dump_dir`` set, every forward in eval mode writes, per rank and layer,
``layer{L}_rank{R}_fwd{N:06d}.npz`` with ``experts`` (int64 [T, k], routed expert ids by
decreasing weight, -1 where a token has fewer) and ``weights`` (float32 [T, k]).
This copies to the host (evaluation only, never in training).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mpmoe.megatron.router import TopKStatsRouter, iter_routers

__all__ = [
    "RoutingStatsTracker",
    "stats_file_name",
    "load_layer_cooccurrence",
    "read_stats_file",
    "write_eval_dump",
]

_FILE_RE = re.compile(r"^layer(\d+)_seg(\d+)_(moe|mope|remoe)\.npz$")


def stats_file_name(layer: int, segment: int, kind: str) -> str:
    """``layer{L}_seg{S}_{kind}.npz`` (kind "moe" or "mope")."""
    return f"layer{layer}_seg{segment}_{kind}.npz"


def read_stats_file(path) -> dict:
    """Load one statistics file into a dict of numpy arrays."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_layer_cooccurrence(stats_dir, layer: int, prefer: str = "moe", latest_only: bool = False) -> np.ndarray:
    """Co-occurrence counts of ``layer`` summed over all its windows in ``stats_dir``
    (``latest_only``: the highest-numbered window alone, as the reference code reads).

    Uses the files of kind ``prefer`` ("moe" or "mope") when there are any, otherwise
    the other kind. Raises ``ValueError`` when the layer has no file.
    """
    if layer is None:
        raise ValueError("dynamic mask: the router has no layer number (set_layer_number was not called)")
    root = Path(stats_dir)
    if not root.is_dir():
        raise ValueError(f"moe_cooccurrence_stats_dir: {str(root)!r} is not a directory")
    by_kind: dict[str, list[Path]] = {"moe": [], "mope": [], "remoe": []}
    for path in root.iterdir():
        m = _FILE_RE.match(path.name)
        if m and int(m.group(1)) == layer:
            by_kind[m.group(3)].append(path)
    files = by_kind.get(prefer) or [p for kind, paths in by_kind.items() if kind != prefer for p in paths]
    if not files:
        raise ValueError(f"moe_cooccurrence_stats_dir: no layer{layer}_seg*_{{moe,mope}}.npz in {str(root)!r}")
    if latest_only:
        files = [max(files, key=lambda p: int(_FILE_RE.match(p.name).group(2)))]
    total = None
    for path in sorted(files):
        c = read_stats_file(path)["cooccurrence_matrix"].astype(np.float64)
        total = c if total is None else total + c
    return total


def _is_writer(router: TopKStatsRouter) -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    group = router.token_group
    if group is not None and dist.get_rank(group) != 0:
        return False
    tp = getattr(router, "tp_group", None)
    return tp is None or dist.get_rank(tp) == 0


class RoutingStatsTracker:
    """Windows of routing statistics for the tracked MoE layers of a model.

    Args:
        models: the model or its list of chunks (virtual pipeline).
        out_dir: directory of the npz files (default: the config's ``moe_stats_dir``).
        interval: window length in optimizer steps (default: ``moe_plot_every``).

    Every rank must call :meth:`on_optimizer_step` (it is collective over each
    tracked layer's token group); one rank per group writes.
    """

    def __init__(self, models, out_dir=None, interval: Optional[int] = None):
        self.routers = list(iter_routers(models))
        cfg = self.routers[0].config if self.routers else None
        if out_dir is None and cfg is not None:
            out_dir = getattr(cfg, "moe_stats_dir", None)
        if out_dir is None:
            raise ValueError("RoutingStatsTracker: moe_stats_dir is not set (pass out_dir or set the config field)")
        if interval is None:
            interval = getattr(cfg, "moe_plot_every", 200) if cfg is not None else 200
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"RoutingStatsTracker: interval must be a positive int, got {interval!r}")
        self.out_dir = Path(out_dir)
        self.interval = interval

    @property
    def tracked_routers(self) -> list[TopKStatsRouter]:
        return [r for r in self.routers if r.tracks_statistics]

    def on_optimizer_step(self, step: int) -> list[Path]:
        """Call after every optimizer step with the number of steps completed (1, 2, ...).

        At the end of a window (``step % interval == 0``) flushes segment
        ``step // interval - 1`` and returns the paths written by this rank.
        """
        if step % self.interval != 0:
            return []
        return self.flush(step // self.interval - 1)

    @torch.no_grad()
    def flush(self, segment: int) -> list[Path]:
        """Sum the current window over ranks, write it as ``segment``, clear it."""
        written = []
        for router in self.tracked_routers:
            num_tokens, usage, cooccurrence = router.reduce_window()
            sigma = router.current_sigma()
            if not _is_writer(router):
                continue
            arrays = {
                "expert_counts": np.rint(usage.cpu().numpy()).astype(np.int64),
                "cooccurrence_matrix": np.rint(cooccurrence.cpu().numpy()).astype(np.int64),
                "num_tokens": np.int64(round(float(num_tokens))),
            }
            if router.last_window_experts_per_token is not None:
                arrays["experts_per_token"] = np.rint(router.last_window_experts_per_token.cpu().numpy()).astype(np.int64)
            if sigma is not None:
                arrays["cov_matrix"] = sigma.detach().to(torch.float32).cpu().numpy()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / stats_file_name(router.layer_number, segment, router.stats_kind)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
            written.append(path)
        return written


@torch.no_grad()
def write_eval_dump(router: TopKStatsRouter, probs: torch.Tensor, routing_map: torch.Tensor, index: int) -> Path:
    """Write one eval forward's routed experts and weights for ``router`` (host copy)."""
    out_dir = Path(router.config.moe_eval_dump_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    k = min(getattr(router, "max_experts_per_token", router.topk), routing_map.shape[1])
    weights = probs.detach().to(torch.float32).masked_fill(~routing_map, -float("inf"))
    vals, idx = weights.topk(k, dim=1)
    valid = torch.isfinite(vals)
    experts = torch.where(valid, idx, torch.full_like(idx, -1))
    vals = torch.where(valid, vals, torch.zeros_like(vals))
    path = out_dir / f"layer{router.layer_number}_rank{rank}_fwd{index:06d}.npz"
    np.savez(path, experts=experts.cpu().numpy().astype(np.int64), weights=vals.cpu().numpy())
    return path
