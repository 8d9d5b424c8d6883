"""Routing statistics for every MoE layer (top-k or MoPE): windows, npz files, eval dumps.

Each router (:class:`mpmoe.megatron.router.TopKStatsRouter` and its MoPE subclass)
adds the routing map of every counted forward (training mode, not an activation
recomputation) to device-resident window counters when its layer is tracked
(``moe_stats_dir`` set, layer in ``moe_stats_layers`` or that list None). The trainer
drives a :class:`RoutingStatsTracker`: after each optimizer step it calls
``tracker.on_optimizer_step(step)``; every ``moe_plot_every`` steps the window counters
are summed over the ranks that see different tokens and written, by one rank, as

    {moe_stats_dir}/layer{L}_seg{S}_{moe|mope|remoe}.npz

(the format: :mod:`mpmoe.megatron.statsfile`) with keys ``expert_counts`` (int64 [E], tokens routed to each expert),
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

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mpmoe.megatron.router import TopKStatsRouter, iter_routers
from mpmoe.megatron.statsfile import load_layer_cooccurrence, read_stats_file, stats_file_name, write_stats_file

__all__ = ["RoutingStatsTracker", "stats_file_name", "load_layer_cooccurrence", "read_stats_file"]


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
            path = self.out_dir / stats_file_name(router.layer_number, segment, router.stats_kind)
            written.append(write_stats_file(path, arrays))
        return written
