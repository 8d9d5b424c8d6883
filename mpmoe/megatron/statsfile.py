"""The routing-statistics file format (NumPy only: the analysis tools read it without torch).

One file per MoE layer and window, ``layer{L}_seg{S}_{tag}.npz`` (``tag``: the router
kind's statistics tag, :mod:`mpmoe.megatron.routers`: ``moe`` for top-k, ``mope``,
``remoe``), with ``expert_counts`` (int64 [E]), ``cooccurrence_matrix`` (int64 [E, E],
diagonal = ``expert_counts``), ``num_tokens`` (int64), ``experts_per_token`` (int64 [E+1])
and, for MoPE, ``cov_matrix`` (float32 [E, E], the Sigma the layer routes with). Written by
:class:`mpmoe.megatron.stats.RoutingStatsTracker`; read back by the dynamic
"cooccurrence" mask (:func:`load_layer_cooccurrence`) and by :mod:`mpmoe.analysis.stats`.

Evaluation dumps: ``layer{L}_rank{R}_fwd{N:06d}.npz`` with ``experts`` (int64 [T, k], -1
where a token has fewer) and ``weights`` (float32 [T, k]).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from mpmoe.megatron import routers

__all__ = ["FILE_RE", "TAGS", "stats_file_name", "read_stats_file", "write_stats_file",
           "load_layer_cooccurrence", "write_eval_dump"]

#: statistics tags of the registered router kinds ("moe", "mope", "remoe", ...)
TAGS = tuple(dict.fromkeys(k.stats_tag for k in routers.KINDS.values()))

FILE_RE = re.compile(r"^layer(\d+)_seg(\d+)_(" + "|".join(map(re.escape, TAGS)) + r")\.npz$")


def stats_file_name(layer: int, segment: int, tag: str) -> str:
    return f"layer{layer}_seg{segment}_{tag}.npz"


def read_stats_file(path) -> dict:
    """One statistics file as a dict of numpy arrays."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def write_stats_file(path: Path, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_layer_cooccurrence(stats_dir, layer: int, prefer: str = "moe", latest_only: bool = False) -> np.ndarray:
    """Co-occurrence counts of ``layer`` summed over all its windows in ``stats_dir``
    (``latest_only``: the highest-numbered window alone, as the reference code reads).

    Uses the files of tag ``prefer`` when there are any, otherwise those of the other tags.
    Raises ``ValueError`` when the layer has no file.
    """
    if layer is None:
        raise ValueError("dynamic mask: the router has no layer number (set_layer_number was not called)")
    root = Path(stats_dir)
    if not root.is_dir():
        raise ValueError(f"moe_cooccurrence_stats_dir: {str(root)!r} is not a directory")
    by_tag: dict = {tag: [] for tag in TAGS}
    for path in root.iterdir():
        m = FILE_RE.match(path.name)
        if m and int(m.group(1)) == layer:
            by_tag[m.group(3)].append(path)
    files = by_tag.get(prefer) or [p for tag, paths in by_tag.items() if tag != prefer for p in paths]
    if not files:
        raise ValueError(f"moe_cooccurrence_stats_dir: no layer{layer}_seg*_{{{','.join(TAGS)}}}.npz in {str(root)!r}")
    if latest_only:
        files = [max(files, key=lambda p: int(FILE_RE.match(p.name).group(2)))]
    total = None
    for path in sorted(files):
        c = read_stats_file(path)["cooccurrence_matrix"].astype(np.float64)
        total = c if total is None else total + c
    return total


def write_eval_dump(out_dir, layer: int, rank: int, index: int, experts: np.ndarray, weights: np.ndarray) -> Path:
    """One evaluation forward's routed experts and weights of one layer on one rank."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"layer{layer}_rank{rank}_fwd{index:06d}.npz"
    np.savez(path, experts=experts.astype(np.int64), weights=weights.astype(np.float32))
    return path
