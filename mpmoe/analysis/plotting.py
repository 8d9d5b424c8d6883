"""Headless matplotlib helpers (Agg backend, imported lazily) and the report index."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return int(math.ceil(n / cols)), cols


def save(fig, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def matrix_panel(ax, m, title: str, *, cmap="viridis", vmin=None, vmax=None, colorbar=True):
    im = ax.imshow(np.asarray(m), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=6)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return im


def write_report(out_dir: Path, title: str, images: list[tuple[str, str]], summary: dict) -> None:
    """``summary.json``, ``index.md`` and ``index.html`` showing ``images`` (name, caption)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    md = [f"# {title}", "", "Headline numbers: [`summary.json`](summary.json).", ""]
    for name, caption in images:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    (out_dir / "index.md").write_text("\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>",
            '<p>Headline numbers: <a href="summary.json">summary.json</a></p>']
    for name, caption in images:
        body.append(f"<h2>{html.escape(caption)}</h2><img src=\"{html.escape(name)}\" style=\"max-width:100%\">")
    (out_dir / "index.html").write_text(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title)
        + "</title></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def finite(x):
    """float, or None for NaN/inf (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


_GENERIC_FOLDERS = {"stats", "moe_stats", "routing_stats", "ckpt", "checkpoints", "save", "run", "."}


def routing_label(kinds) -> str:
    """"MoPE", "top-k", "ReMoE" or "MoPE+top-k" for a set of router kinds, statistics tags or
    labels (:mod:`mpmoe.megatron.routers`)."""
    from mpmoe.megatron.routers import label_of

    labels = sorted({label_of(k) for k in kinds})
    return "+".join(labels) if labels else "dense"


def run_label(kinds, path) -> str:
    """A run's label: what it routes with and the run's name (the folder, or its parent's
    name when the folder has a generic name such as ``stats``), e.g. ``"MoPE (seed1-mope)"``."""
    p = Path(path).resolve()
    name = p.parent.name if p.name in _GENERIC_FOLDERS and p.parent.name else p.name
    return f"{routing_label(kinds)} ({name})"


def integer_ticks(*axes) -> None:
    """Integer-only major ticks on the x axis (statistics windows are numbered)."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
