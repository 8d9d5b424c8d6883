"""Analysis of routing-statistics dumps (``layer{L}_seg{S}_{moe|mope|remoe}.npz`` windows).

:func:`load_stats` reads a statistics folder (or a run folder whose ``config.json`` names
one, or a tree holding several, e.g. one per rank or node: files of the same layer and
window found in several folders are summed); :func:`summarize` gives the headline
numbers; :func:`analyze_stats` writes the report folder (PNGs, ``summary.json``,
``index.md``, ``index.html``), optionally with a second run side by side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mpmoe.analysis import metrics as M
from mpmoe.errors import UserError

__all__ = ["AnalysisError", "LayerStats", "StatsSet", "analyze_stats", "find_stats_files", "load_stats",
           "summarize"]

from mpmoe.megatron.statsfile import FILE_RE as _FILE_RE  # noqa: E402 - NumPy only
WIDTH_IN = 12.0  # every figure is WIDTH_IN x DPI pixels wide
DPI = 100


class AnalysisError(UserError, ValueError):
    """Bad input for the analysis (missing folder, no statistics, inconsistent files)."""


@dataclass
class LayerStats:
    """All windows of one layer. Arrays are indexed by position in ``segments``."""

    layer: int
    kind: str  # "moe" | "mope" | "remoe"
    segments: list[int]
    counts: np.ndarray  # [S, E] float64
    cooccurrence: np.ndarray  # [S, E, E] float64
    num_tokens: np.ndarray  # [S] float64
    sigma: Optional[np.ndarray] = None  # [S, E, E] (MoPE) or None
    sources: int = 1  # folders summed
    experts_per_token: Optional[np.ndarray] = None  # [S, E+1] tokens with 0..E experts (newer files)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def total_counts(self) -> np.ndarray:
        return self.counts.sum(0)

    @property
    def total_cooccurrence(self) -> np.ndarray:
        return self.cooccurrence.sum(0)

    @property
    def total_tokens(self) -> float:
        return float(self.num_tokens.sum())


@dataclass
class StatsSet:
    name: str
    roots: list[Path]
    layers: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def kinds(self) -> set[str]:
        return {ls.kind for ls in self.layers.values()}


def _tokens_from_cooccurrence(c: np.ndarray) -> float:
    """Tokens of a window without ``num_tokens`` (old/demo files), exact for a fixed k.

    Each token with k experts adds k to the trace and k^2 to the sum, so N = trace^2 / sum.
    """
    s = c.sum()
    return float(np.trace(c) ** 2 / s) if s > 0 else 0.0


def find_stats_files(path) -> list[Path]:
    """Statistics files under ``path``: the folder itself, the run's ``moe_stats_dir``, or below."""
    root = Path(path)
    if not root.exists():
        raise AnalysisError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a directory")
    direct = [p for p in root.iterdir() if _FILE_RE.match(p.name)]
    if direct:
        return sorted(direct)
    cfg = root / "config.json"
    if cfg.is_file():
        try:
            stats_dir = json.loads(cfg.read_text()).get("args", {}).get("moe_stats_dir")
        except (json.JSONDecodeError, AttributeError):
            stats_dir = None
        if stats_dir and Path(stats_dir).is_dir():
            found = [p for p in Path(stats_dir).iterdir() if _FILE_RE.match(p.name)]
            if found:
                return sorted(found)
    found = sorted(p for p in root.rglob("layer*_seg*_*.npz") if _FILE_RE.match(p.name))
    if not found:
        raise AnalysisError(f"{root}: no statistics files layer{{L}}_seg{{S}}_{{moe|mope|remoe}}.npz "
                            "(train with --moe-stats-dir to write them)")
    return found


def load_stats(path, name: Optional[str] = None) -> StatsSet:
    """Read every window of every layer under ``path`` (see :func:`find_stats_files`)."""
    files = find_stats_files(path)
    groups: dict[tuple[int, int, str], list[Path]] = {}
    for f in files:
        m = _FILE_RE.match(f.name)
        groups.setdefault((int(m.group(1)), int(m.group(2)), m.group(3)), []).append(f)
    per_layer: dict[int, dict] = {}
    for (layer, seg, kind), paths in sorted(groups.items()):
        counts = cooc = sigma = hist = None
        has_hist = True
        tokens = 0.0
        for p in paths:
            try:
                with np.load(p) as d:
                    data = {k: d[k] for k in d.files}
            except Exception as exc:  # noqa: BLE001 - report any unreadable file in one line
                raise AnalysisError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from None
            for key in ("expert_counts", "cooccurrence_matrix"):
                if key not in data:
                    raise AnalysisError(f"{p}: missing key {key!r}")
            c = data["cooccurrence_matrix"].astype(np.float64)
            u = data["expert_counts"].astype(np.float64)
            if c.ndim != 2 or c.shape != (u.size, u.size):
                raise AnalysisError(f"{p}: cooccurrence_matrix {c.shape} does not match expert_counts {u.shape}")
            if counts is not None and counts.shape != u.shape:
                raise AnalysisError(f"{p}: {u.size} experts, but another file of layer {layer} has {counts.size}")
            counts = u if counts is None else counts + u
            cooc = c if cooc is None else cooc + c
            tokens += float(data["num_tokens"]) if "num_tokens" in data else _tokens_from_cooccurrence(c)
            if "experts_per_token" in data:
                h = data["experts_per_token"].astype(np.float64)
                hist = h if hist is None else hist + h
            else:
                has_hist = False
            if "cov_matrix" in data:
                s = data["cov_matrix"].astype(np.float64)
                sigma = s if sigma is None else sigma + s
        if sigma is not None:
            sigma = sigma / len(paths)  # every rank routes with the same Sigma
        entry = per_layer.setdefault(layer, {"kind": kind, "segs": [], "u": [], "c": [], "n": [], "s": [],
                                             "h": [], "sources": len(paths)})
        if entry["kind"] != kind:
            raise AnalysisError(f"{Path(path)}: layer {layer} has both moe and mope files (two runs in one folder?)")
        if entry["u"] and entry["u"][0].shape != counts.shape:
            raise AnalysisError(f"{Path(path)}: layer {layer} changes its number of experts between windows")
        entry["segs"].append(seg)
        entry["u"].append(counts)
        entry["c"].append(cooc)
        entry["n"].append(tokens)
        entry["s"].append(sigma)
        entry["h"].append(hist if has_hist else None)
        entry["sources"] = max(entry["sources"], len(paths))
    from mpmoe.analysis.plotting import run_label

    root = Path(path)
    label = run_label({e["kind"] for e in per_layer.values()}, root)
    out = StatsSet(name=name or label, roots=sorted({f.parent for f in files}))
    for layer, e in sorted(per_layer.items()):
        sig = np.stack(e["s"]) if all(s is not None for s in e["s"]) else None
        hist = np.stack(e["h"]) if all(h is not None for h in e["h"]) else None
        out.layers[layer] = LayerStats(layer, e["kind"], e["segs"], np.stack(e["u"]), np.stack(e["c"]),
                                       np.asarray(e["n"], dtype=np.float64), sig, e["sources"], hist)
    return out


# --------------------------------------------------------------------------- numbers
def layer_summary(ls: LayerStats) -> dict:
    """Headline numbers of one layer over all its windows (and of its last window)."""
    from mpmoe.analysis.plotting import finite

    total_c = ls.total_cooccurrence
    norm = M.row_normalized_cooccurrence(total_c)
    imb = M.load_imbalance(ls.total_counts)
    last = M.load_imbalance(ls.counts[-1])
    tokens = ls.total_tokens
    k_est = float(ls.total_counts.sum() / tokens) if tokens > 0 else float("nan")
    out = {
        "kind": ls.kind,
        "num_experts": ls.num_experts,
        "windows": len(ls.segments),
        "first_window": ls.segments[0],
        "last_window": ls.segments[-1],
        "tokens": tokens,
        "experts_per_token": finite(k_est),
        "effective_experts": finite(imb["effective_experts"]),
        "effective_experts_fraction": finite(imb["effective_experts"] / ls.num_experts),
        "load_max_over_mean": finite(imb["max_over_mean"]),
        "load_cv": finite(imb["cv"]),
        "unused_experts": imb["unused"],
        "last_window_effective_experts": finite(last["effective_experts"]),
        "last_window_load_max_over_mean": finite(last["max_over_mean"]),
        "coactivation_concentration": finite(M.coactivation_concentration(total_c)),
        "mean_offdiag_normalized_cooccurrence": finite(M.mean_offdiagonal(norm)),
        "top_cooccurring_pairs": [[i, j, round(v, 6)] for i, j, v in M.top_pairs((norm + norm.T) / 2, 5)],
        "sources_summed": ls.sources,
    }
    if tokens > 0 and total_c.sum() > 0:
        out["mean_offdiag_npmi"] = finite(M.mean_offdiagonal(M.pmi_cooccurrence(total_c, tokens)))
    if ls.experts_per_token is not None:
        h = ls.experts_per_token.sum(0)
        if h.sum() > 0:
            ks = np.arange(h.size)
            mean = float((h * ks).sum() / h.sum())
            out["experts_per_token_std"] = finite(float(np.sqrt((h * (ks - mean) ** 2).sum() / h.sum())))
            out["experts_per_token_max"] = int(ks[h > 0].max())
            out["tokens_with_no_expert_fraction"] = finite(float(h[0] / h.sum()))
    if ls.sigma is not None:
        corr = M.covariance_to_correlation(ls.sigma[-1])
        out["sigma_mean_abs_offdiag_correlation"] = finite(M.mean_offdiagonal(corr, absolute=True))
        out["sigma_max_offdiag_correlation"] = finite(np.max(corr[~np.eye(len(corr), dtype=bool)])) \
            if len(corr) > 1 else None
        out["sigma_cka_with_cooccurrence_npmi"] = finite(
            M.matrix_cka(corr, M.pmi_cooccurrence(total_c, tokens))) if tokens > 0 else None
    return out


def summarize(stats: StatsSet) -> dict:
    layers = {str(layer): layer_summary(ls) for layer, ls in stats.layers.items()}
    eff = [v["effective_experts_fraction"] for v in layers.values() if v["effective_experts_fraction"] is not None]
    conc = [v["coactivation_concentration"] for v in layers.values() if v["coactivation_concentration"] is not None]
    return {
        "name": stats.name,
        "stats_dirs": [str(r) for r in stats.roots],
        "layers": layers,
        "mean_effective_experts_fraction": float(np.mean(eff)) if eff else None,
        "mean_coactivation_concentration": float(np.mean(conc)) if conc else None,
    }


def _series(ls: LayerStats) -> dict:
    return {
        "max_over_mean": np.array([M.load_imbalance(u)["max_over_mean"] for u in ls.counts]),
        "effective": np.array([M.effective_num_experts(u) for u in ls.counts]),
        "concentration": np.array([M.coactivation_concentration(c) for c in ls.cooccurrence]),
        "sigma_corr": (np.array([M.mean_offdiagonal(M.covariance_to_correlation(s), absolute=True)
                                 for s in ls.sigma]) if ls.sigma is not None else None),
    }


# --------------------------------------------------------------------------- plots
def _load_fraction(u: np.ndarray) -> np.ndarray:
    s = u.sum(-1, keepdims=True)
    return np.divide(u, s, out=np.zeros_like(u), where=s > 0)


def _plot_load_heatmap(plt, sets: list[StatsSet], out: Path) -> Path:
    fig, axes = plt.subplots(1, len(sets), figsize=(WIDTH_IN, 1.2 + 0.45 * max(len(s.layers) for s in sets)),
                             squeeze=False)
    for ax, s in zip(axes[0], sets):
        layers = sorted(s.layers)
        e = max(s.layers[l].num_experts for l in layers)
        mat = np.zeros((len(layers), e))
        for r, l in enumerate(layers):
            frac = _load_fraction(s.layers[l].total_counts)
            mat[r, : frac.size] = frac * frac.size  # 1 = the mean load
        im = ax.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"L{l} {s.layers[l].kind}" for l in layers], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"{s.name}: load / mean load (all windows)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, out / "load_heatmap.png")


def _plot_experts_per_token(plt, sets: list[StatsSet], out: Path) -> Path:
    """Distribution of routed experts per token (all windows), one line per layer and run."""
    fig, ax = plt.subplots(1, 1, figsize=(WIDTH_IN, 3.6))
    styles = ["-o", "--s", ":^", "-.d"]
    for si, s in enumerate(sets):
        for l, ls in sorted(s.layers.items()):
            if ls.experts_per_token is None:
                continue
            h = ls.experts_per_token.sum(0)
            ax.plot(np.arange(h.size), h / max(h.sum(), 1.0), styles[si % len(styles)], ms=3, lw=1.0,
                    label=f"{s.name} L{l} ({ls.kind})")
    ax.set_xlabel("routed experts per token")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("experts per token (top-k / MoPE: a spike at k; ReMoE: variable)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=6, ncol=3)
    else:
        ax.text(0.5, 0.5, "no experts_per_token in these files (older statistics)", ha="center", va="center",
                transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, out / "experts_per_token.png")


def _plot_load_over_training(plt, s: StatsSet, out: Path, tag: str) -> Path:
    from mpmoe.analysis.plotting import grid, integer_ticks

    layers = sorted(s.layers)
    rows, cols = grid(len(layers), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, l in zip(axes.flat, layers):
        ls = s.layers[l]
        frac = _load_fraction(ls.counts) * ls.num_experts
        im = ax.imshow(frac.T, aspect="auto", cmap="magma", interpolation="nearest",
                       extent=(ls.segments[0] - 0.5, ls.segments[-1] + 0.5, ls.num_experts - 0.5, -0.5))
        ax.set_title(f"L{l} ({ls.kind}) load / mean", fontsize=9)
        ax.set_xlabel("window", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
        integer_ticks(ax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{s.name}: expert load over training", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"load_over_training{tag}.png")


def _plot_curves(plt, sets: list[StatsSet], out: Path) -> Path:
    from mpmoe.analysis.plotting import integer_ticks

    fig, axes = plt.subplots(2, 2, figsize=(WIDTH_IN, 7.0), squeeze=False)
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    all_layers = sorted({l for s in sets for l in s.layers})
    for si, s in enumerate(sets):
        for l, ls in s.layers.items():
            ser = _series(ls)
            kw = dict(ls=styles[si % len(styles)], color=cmap(all_layers.index(l) % 10), lw=1.2,
                      label=f"{s.name} L{l}")
            axes[0, 0].plot(ls.segments, ser["max_over_mean"], **kw)
            axes[0, 1].plot(ls.segments, ser["effective"] / ls.num_experts, **kw)
            axes[1, 0].plot(ls.segments, ser["concentration"], **kw)
            if ser["sigma_corr"] is not None:
                axes[1, 1].plot(ls.segments, ser["sigma_corr"], **kw)
    titles = ["load imbalance: max / mean tokens per expert", "effective experts / E  (exp entropy of load)",
              "co-activation concentration (1 - H(pairs)/log #pairs)", "MoPE Sigma: mean |off-diag correlation|"]
    for ax, t in zip(axes.flat, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("window", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        integer_ticks(ax)
    if not any(ls.sigma is not None for s in sets for ls in s.layers.values()):
        axes[1, 1].text(0.5, 0.5, "no MoPE layers", ha="center", va="center", transform=axes[1, 1].transAxes)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(labels) <= 24:
        axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, out / "imbalance_curves.png")


def _matrix_grid(plt, panels: list[tuple[str, np.ndarray]], title: str, path: Path, *, cols: int = 4,
                 cmap="viridis", symmetric=False) -> Path:
    from mpmoe.analysis.plotting import grid, matrix_panel

    rows, ncols = grid(len(panels), cols)
    fig, axes = plt.subplots(rows, ncols, figsize=(WIDTH_IN, 3.0 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (t, m) in zip(axes.flat, panels):
        if symmetric:
            v = float(np.max(np.abs(m))) or 1.0
            matrix_panel(ax, m, t, cmap=cmap, vmin=-v, vmax=v)
        else:
            matrix_panel(ax, m, t, cmap=cmap)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    from mpmoe.analysis.plotting import save

    return save(fig, path, dpi=DPI)


def _evenly(n: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def analyze_stats(path, out_dir, *, compare=None, name: Optional[str] = None, compare_name: Optional[str] = None,
                  evolution_windows: int = 4, progress: bool = False) -> dict:
    """Write the statistics report for ``path`` (and ``compare``) into ``out_dir``; returns the summary."""
    from mpmoe.analysis.plotting import pyplot, write_report

    main = load_stats(path, name)
    sets = [main]
    if compare is not None:
        other = load_stats(compare, compare_name)
        if other.name == main.name:
            main.name, other.name = f"A:{main.name}", f"B:{other.name}"
        sets.append(other)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    images: list[tuple[str, str]] = []
    jobs = []

    def add(fn, caption):
        jobs.append((fn, caption))

    add(lambda: _plot_load_heatmap(plt, sets, out), "Expert load per layer (layer x expert)")
    add(lambda: _plot_curves(plt, sets, out), "Load imbalance, effective experts, co-activation concentration, Sigma over windows")
    add(lambda: _plot_experts_per_token(plt, sets, out), "Distribution of routed experts per token")
    for i, s in enumerate(sets):
        tag = "" if i == 0 else "_compare"
        add(lambda s=s, tag=tag: _plot_load_over_training(plt, s, out, tag), f"{s.name}: load over training (window x expert)")
        add(lambda s=s, tag=tag: _matrix_grid(
            plt, [(f"L{l} ({ls.kind})", M.row_normalized_cooccurrence(ls.total_cooccurrence)) for l, ls in s.layers.items()],
            f"{s.name}: co-occurrence C[i,j]/C[i,i] (all windows)", out / f"cooccurrence{tag}.png"),
            f"{s.name}: normalised co-occurrence per layer")
        add(lambda s=s, tag=tag: _matrix_grid(
            plt, [(f"L{l} ({ls.kind})", M.pmi_cooccurrence(ls.total_cooccurrence, max(ls.total_tokens, 1.0)))
                  for l, ls in s.layers.items()],
            f"{s.name}: co-activation NPMI (all windows)", out / f"cooccurrence_npmi{tag}.png",
            cmap="RdBu_r", symmetric=True), f"{s.name}: co-activation NPMI per layer")
        mope = [(l, ls) for l, ls in s.layers.items() if ls.sigma is not None]
        if mope:
            add(lambda s=s, tag=tag, mope=mope: _matrix_grid(
                plt, [(f"L{l} Sigma corr. (window {ls.segments[-1]})", M.covariance_to_correlation(ls.sigma[-1]))
                      for l, ls in mope], f"{s.name}: MoPE Sigma as correlation (last window)",
                out / f"sigma{tag}.png", cmap="RdBu_r", symmetric=True), f"{s.name}: MoPE Sigma per layer")
        panels = []
        for l, ls in s.layers.items():
            for w in _evenly(len(ls.segments), evolution_windows):
                panels.append((f"L{l} w{ls.segments[w]}", M.row_normalized_cooccurrence(ls.cooccurrence[w])))
        ncols = min(evolution_windows, max(len(ls.segments) for ls in s.layers.values()))
        add(lambda s=s, tag=tag, panels=panels, ncols=ncols: _matrix_grid(
            plt, panels, f"{s.name}: co-occurrence evolution (rows: layers, columns: windows)",
            out / f"cooccurrence_evolution{tag}.png", cols=ncols), f"{s.name}: co-occurrence across windows")
    if len(sets) == 2:
        common = sorted(set(sets[0].layers) & set(sets[1].layers))
        panels = []
        for l in common:
            for s in sets:
                ls = s.layers[l]
                panels.append((f"{s.name} L{l} ({ls.kind})", M.row_normalized_cooccurrence(ls.total_cooccurrence)))
        if panels:
            add(lambda panels=panels: _matrix_grid(plt, panels, "co-occurrence side by side (normalised)",
                                                   out / "compare_cooccurrence.png", cols=4),
                "Side by side: normalised co-occurrence per common layer")
    if progress:
        from tqdm.auto import tqdm

        jobs_iter = tqdm(jobs, desc="plots", unit="fig")
    else:
        jobs_iter = jobs
    for fn, caption in jobs_iter:
        images.append((fn().name, caption))
    summary = {"runs": [summarize(s) for s in sets], "images": [n for n, _ in images]}
    if len(sets) == 2:
        summary["comparison"] = _compare(sets[0], sets[1])
    title = "Routing statistics: " + " vs ".join(s.name for s in sets)
    write_report(out, title, images, summary)
    return summary


def _compare(a: StatsSet, b: StatsSet) -> dict:
    """Per common layer: B minus A of the headline numbers, and CKA of their co-occurrence."""
    out = {}
    for l in sorted(set(a.layers) & set(b.layers)):
        sa, sb = layer_summary(a.layers[l]), layer_summary(b.layers[l])
        row = {"kinds": [sa["kind"], sb["kind"]]}
        for key in ("effective_experts", "load_max_over_mean", "coactivation_concentration",
                    "mean_offdiag_normalized_cooccurrence"):
            va, vb = sa.get(key), sb.get(key)
            row[key] = [va, vb]
        if a.layers[l].num_experts == b.layers[l].num_experts:
            row["cka_normalized_cooccurrence"] = M.matrix_cka(
                M.row_normalized_cooccurrence(a.layers[l].total_cooccurrence),
                M.row_normalized_cooccurrence(b.layers[l].total_cooccurrence))
        out[str(l)] = row
    return out
