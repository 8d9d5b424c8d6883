"""Expert ablations from a trainer checkpoint (the demo's analyses, as one tool).

The model is rebuilt and loaded through :func:`mpmoe.store.load_model` (the one loader), on one process with tensor and
expert parallelism 1 (a checkpoint written with expert parallelism loads into it).

For a text sample (the run's validation split, else its training split), every MoE
layer's input is captured and every token is passed through ALL routed experts,
bypassing the router: ``outputs[layer]`` is ``[E, T, H]``, the "expert embeddings".
The routing of the same forward gives the sample's co-occurrence matrix, and MoPE
routers give Sigma. Per layer: expert-output cosine similarity, weight-space cosine
similarity, NPMI co-occurrence, Sigma as correlation, linear CKA between them, OT
distances between experts' output distributions, t-SNE and PCA plots.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mpmoe.analysis import metrics as M
from mpmoe.analysis.stats import AnalysisError

__all__ = ["ExpertProbe", "analyze_checkpoint", "collect_expert_outputs", "load_model"]


@dataclass
class ExpertProbe:
    """What one sample forward tells about one MoE layer."""

    layer: int
    kind: str  # "moe" | "mope"
    outputs: np.ndarray  # [E, T, H] every token through every expert (float32)
    cooccurrence: np.ndarray  # [E, E] routing co-occurrence of the sample's tokens
    num_tokens: int
    sigma: Optional[np.ndarray] = None  # [E, E] (MoPE)
    weights: Optional[np.ndarray] = None  # [E, P] flattened expert parameters
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- model
def load_model(load_dir, train_argv: list[str]):
    """(model, args, data spec, iteration) of the latest checkpoint in ``load_dir`` (fp32,
    one process: :func:`mpmoe.store.load_model`); needs init_distributed.

    ``train_argv``: the ``mpmoe train`` flags that describe the model (preset, sizes,
    routing); empty: the flags the checkpoint records (checkpoints written by ``mpmoe train``
    or :func:`mpmoe.store.save_model`).
    """
    from mpmoe.store import StoreError
    from mpmoe.store import load_model as store_load
    from mpmoe.run.data import resolve_data

    try:
        loaded = store_load(load_dir, model_flags=list(train_argv) or None, dtype="fp32")
    except StoreError as exc:
        raise AnalysisError(str(exc)) from None
    args = loaded.args
    if args.num_experts is None:
        raise AnalysisError("model flags describe a dense model (no --num-experts)")
    args.no_tensorboard = True
    spec = resolve_data(args)
    return loaded.model, args, spec, loaded.iteration


def sample_tokens(args, spec, num_tokens: int):
    """[B, S] token ids (and position ids) of the validation split, else the training split."""
    import copy

    import torch

    from mpmoe.run.data import build_datasets

    seqs = max(1, math.ceil(num_tokens / args.seq_length))
    a = copy.copy(args)
    a.train_iters, a.global_batch_size, a.eval_iters, a.eval_interval = seqs, 1, seqs, 10**9
    train, valid, _ = build_datasets(spec, a, seed=args.seed)
    ds = valid if valid is not None and len(valid) >= seqs else train
    tokens = torch.stack([torch.as_tensor(np.asarray(ds[i]["tokens"])) for i in range(seqs)]).long()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return tokens, pos


def _expert_weights(experts) -> Optional[np.ndarray]:
    local = getattr(experts, "local_experts", None)
    if local is None:
        return None  # grouped GEMM layouts: not flattened per expert here
    if len({sum(p.numel() for p in e.parameters()) for e in local}) > 1:
        return None  # experts of different sizes (a split model): no common weight space
    return np.stack([np.concatenate([p.detach().float().cpu().numpy().ravel() for p in e.parameters()])
                     for e in local])


def _expert_sizes(experts) -> Optional[list[int]]:
    """Each local expert's FFN size (they differ in a split model), or None (grouped GEMM)."""
    local = getattr(experts, "local_experts", None)
    if local is None:
        return None
    return [int(e.linear_fc2.weight.shape[-1]) for e in local]


def collect_expert_outputs(model, tokens, position_ids, *, layers: Optional[list[int]] = None,
                           max_tokens: Optional[int] = None, progress: bool = False) -> dict[int, ExpertProbe]:
    """Run the sample, capture each MoE layer's input and pass it through all its experts."""
    import torch
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    from mpmoe.megatron.router import TopKStatsRouter

    moe_layers = [m for m in model.modules() if isinstance(m, BaseMoELayer)]
    if layers is not None:
        unknown = sorted(set(layers) - {m.layer_number for m in moe_layers})
        if unknown:
            raise AnalysisError(f"--layers: no MoE layer {unknown} (MoE layers: "
                                f"{[m.layer_number for m in moe_layers]})")
        moe_layers = [m for m in moe_layers if m.layer_number in layers]
    captured, routed, handles = {}, {}, []
    for m in moe_layers:
        handles.append(m.register_forward_pre_hook(
            lambda mod, inp, n=m.layer_number: captured.__setitem__(n, inp[0].detach())))
        handles.append(m.router.register_forward_hook(
            lambda mod, inp, out, n=m.layer_number: routed.__setitem__(n, out[1].detach())))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(tokens.to(device), position_ids.to(device), None)
    finally:
        for h in handles:
            h.remove()
    probes = {}
    it = moe_layers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(moe_layers, desc="experts x tokens", unit="layer", leave=False)
    for m in it:
        n = m.layer_number
        x = captured[n].reshape(-1, captured[n].shape[-1])
        if max_tokens is not None:
            x = x[:max_tokens]
        e_local = m.experts.num_local_experts
        t = x.shape[0]
        with torch.no_grad():
            out, _ = m.experts(x.repeat(e_local, 1), torch.full((e_local,), t, dtype=torch.long),
                               torch.ones(e_local * t, dtype=x.dtype, device=x.device))
        outputs = out.reshape(e_local, t, -1).float().cpu().numpy()
        rmap = routed[n].reshape(-1, routed[n].shape[-1]).float().cpu().numpy()
        router = m.router
        # merged experts (mpmoe experts merge, collapsed): Sigma of the stored experts
        sigma = getattr(router, "group_sigma", router.current_sigma)() if isinstance(router, TopKStatsRouter) else None
        probes[n] = ExpertProbe(
            layer=n, kind=getattr(router, "stats_kind", "moe"), outputs=outputs,
            cooccurrence=rmap.T @ rmap, num_tokens=int(rmap.shape[0]),
            sigma=None if sigma is None else sigma.detach().double().cpu().numpy(),
            weights=_expert_weights(m.experts), extra={"expert_sizes": _expert_sizes(m.experts)})
    return probes


# --------------------------------------------------------------------------- numbers
def probe_numbers(p: ExpertProbe, *, ot_samples: int = 128, progress: bool = False) -> dict:
    """Per-layer matrices and headline numbers of one probe (matrices under ``"_m"``)."""
    from mpmoe.analysis.plotting import finite

    e = p.outputs.shape[0]
    sim = M.cosine_similarity_matrix(p.outputs.reshape(e, -1))
    npmi = M.pmi_cooccurrence(p.cooccurrence, max(p.num_tokens, 1))
    mats = {"similarity": sim, "npmi": npmi, "cooccurrence_norm": M.row_normalized_cooccurrence(p.cooccurrence)}
    usage = np.diag(p.cooccurrence)
    out = {
        "kind": p.kind,
        "num_experts": e,
        "expert_sizes": p.extra.get("expert_sizes"),
        "tokens": p.num_tokens,
        "mean_offdiag_output_similarity": finite(M.mean_offdiagonal(sim)),
        "max_offdiag_output_similarity": finite(np.max(sim[~np.eye(e, dtype=bool)])) if e > 1 else None,
        "most_similar_pairs": [[i, j, round(v, 6)] for i, j, v in M.top_pairs(sim, 5)],
        "cka_similarity_vs_npmi": finite(M.matrix_cka(sim, npmi)),
        "cka_similarity_vs_npmi_chance": finite(M.matrix_cka_baseline(sim, npmi)),
        "effective_experts": finite(M.effective_num_experts(usage)),
        "coactivation_concentration": finite(M.coactivation_concentration(p.cooccurrence)),
    }
    if p.weights is not None:
        wsim = M.cosine_similarity_matrix(p.weights)
        mats["weight_similarity"] = wsim
        out["mean_offdiag_weight_similarity"] = finite(M.mean_offdiagonal(wsim))
        out["cka_output_vs_weight_similarity"] = finite(M.matrix_cka(sim, wsim))
    if p.sigma is not None:
        corr = M.covariance_to_correlation(p.sigma)
        mats["sigma"] = corr
        out["cka_similarity_vs_sigma"] = finite(M.matrix_cka(sim, corr))
        out["cka_similarity_vs_sigma_chance"] = finite(M.matrix_cka_baseline(sim, corr))
        out["cka_npmi_vs_sigma"] = finite(M.matrix_cka(npmi, corr))
        out["sigma_mean_abs_offdiag_correlation"] = finite(M.mean_offdiagonal(corr, absolute=True))
    if ot_samples and ot_samples > 0:
        n = min(ot_samples, p.outputs.shape[1])
        idx = np.linspace(0, p.outputs.shape[1] - 1, n).round().astype(int)
        ot_m = M.ot_distance_matrix(p.outputs[:, idx, :], progress=progress)
        mats["ot"] = ot_m
        out["ot_samples"] = int(n)
        out["mean_offdiag_ot_distance"] = finite(M.mean_offdiagonal(ot_m))
        out["cka_similarity_vs_ot"] = finite(M.matrix_cka(sim, -ot_m))
    out["_m"] = mats
    return out


# --------------------------------------------------------------------------- plots
def _plots(runs: list[tuple[str, dict[int, ExpertProbe], dict[int, dict]]], out: Path) -> list[tuple[str, str]]:
    from mpmoe.analysis.plotting import grid, matrix_panel, pyplot, save
    from mpmoe.analysis.stats import DPI, WIDTH_IN

    plt = pyplot()
    images = []
    for ri, (name, probes, nums) in enumerate(runs):
        tag = "" if ri == 0 else "_compare"
        layers = sorted(probes)
        # similarity vs co-occurrence vs Sigma vs weights vs OT, one row per layer
        cols = ["similarity", "npmi", "sigma", "weight_similarity", "ot"]
        cols = [c for c in cols if any(c in nums[l]["_m"] for l in layers)]
        titles = {"similarity": "output cos sim", "npmi": "co-occ. NPMI", "sigma": "Sigma corr.",
                  "weight_similarity": "weight cos sim", "ot": "OT (W2) distance"}
        fig, axes = plt.subplots(len(layers), len(cols), figsize=(WIDTH_IN, 2.6 * len(layers) + 0.4), squeeze=False)
        for r, l in enumerate(layers):
            for c, key in enumerate(cols):
                ax = axes[r, c]
                m = nums[l]["_m"].get(key)
                if m is None:
                    ax.axis("off")
                    continue
                sym = key in ("npmi", "sigma", "similarity", "weight_similarity")
                v = float(np.max(np.abs(m))) or 1.0
                matrix_panel(ax, m, f"L{l} ({probes[l].kind}) {titles[key]}", cmap="RdBu_r" if sym else "viridis",
                             vmin=-v if sym else None, vmax=v if sym else None)
        fig.suptitle(f"{name}: expert similarity vs co-occurrence vs Sigma", fontsize=10)
        fig.tight_layout()
        images.append((save(fig, out / f"expert_matrices{tag}.png", DPI).name,
                       f"{name}: output similarity, co-occurrence (NPMI), Sigma, weight similarity, OT per layer"))
        # CKA heatmap: layers x pairs of matrices
        pairs = [("similarity", "sigma"), ("similarity", "npmi"), ("npmi", "sigma"),
                 ("similarity", "weight_similarity"), ("similarity", "ot")]
        pairs = [pq for pq in pairs if any(pq[0] in nums[l]["_m"] and pq[1] in nums[l]["_m"] for l in layers)]
        if pairs:
            mat = np.full((len(layers), len(pairs)), np.nan)
            for r, l in enumerate(layers):
                for c, (a, b) in enumerate(pairs):
                    ms = nums[l]["_m"]
                    if a in ms and b in ms:
                        mat[r, c] = M.matrix_cka(ms[a], -ms[b] if b == "ot" else ms[b])
            fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.5 + 0.5 * len(layers)))
            im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            for r in range(mat.shape[0]):
                for c in range(mat.shape[1]):
                    if np.isfinite(mat[r, c]):
                        ax.text(c, r, f"{mat[r, c]:.2f}", ha="center", va="center", fontsize=8, color="w")
            ax.set_xticks(range(len(pairs)), [f"{a} vs {b}" for a, b in pairs], fontsize=7)
            ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=7)
            ax.set_title(f"{name}: linear CKA per layer (off-diagonal structure)", fontsize=10)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            images.append((save(fig, out / f"cka_heatmap{tag}.png", DPI).name, f"{name}: linear CKA per layer"))
        # joint t-SNE of the rows of similarity and Sigma (MoPE layers)
        tl = [l for l in layers if "sigma" in nums[l]["_m"]]
        if tl:
            from sklearn.manifold import TSNE

            rows_, cols_ = grid(len(tl), 4)
            fig, axes = plt.subplots(rows_, cols_, figsize=(WIDTH_IN, 3.0 * rows_ + 0.4), squeeze=False)
            for ax in axes.flat[len(tl):]:
                ax.axis("off")
            for ax, l in zip(axes.flat, tl):
                sim, sig = nums[l]["_m"]["similarity"], nums[l]["_m"]["sigma"]
                e = sim.shape[0]
                x = np.concatenate([sim, sig])
                perp = float(max(2.0, min(30.0, (2 * e - 1) / 3)))
                y = TSNE(n_components=2, perplexity=perp, init="pca", random_state=0).fit_transform(x)
                ax.scatter(y[:e, 0], y[:e, 1], s=14, c="tab:blue", label="similarity rows")
                ax.scatter(y[e:, 0], y[e:, 1], s=14, c="tab:red", marker="^", label="Sigma rows")
                for i in range(e):
                    ax.plot([y[i, 0], y[e + i, 0]], [y[i, 1], y[e + i, 1]], color="0.8", lw=0.5, zorder=0)
                ax.set_title(f"L{l}: joint t-SNE", fontsize=9)
                ax.tick_params(labelsize=6)
            axes.flat[0].legend(fontsize=6)
            fig.suptitle(f"{name}: t-SNE of expert similarity and Sigma (lines join one expert)", fontsize=10)
            fig.tight_layout()
            images.append((save(fig, out / f"tsne{tag}.png", DPI).name, f"{name}: joint t-SNE of similarity and Sigma"))
    # PCA of expert embeddings, runs side by side (one row per layer)
    from sklearn.decomposition import PCA

    all_layers = sorted(set().union(*[set(p) for _, p, _ in runs]))
    fig, axes = plt.subplots(len(all_layers), len(runs), figsize=(WIDTH_IN, 3.2 * len(all_layers) + 0.4), squeeze=False)
    for r, l in enumerate(all_layers):
        for c, (name, probes, _) in enumerate(runs):
            ax = axes[r, c]
            if l not in probes:
                ax.axis("off")
                continue
            emb = probes[l].outputs.mean(axis=1)  # mean output per expert [E, H]
            pts = PCA(n_components=2).fit_transform(emb)
            usage = np.diag(probes[l].cooccurrence)
            sizes = probes[l].extra.get("expert_sizes")
            hetero = sizes is not None and len(set(sizes)) > 1  # a split model: marker area ~ size
            marker = 60.0 * np.asarray(sizes) / max(sizes) + 6 if hetero else 20
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=usage, cmap="viridis", s=marker)
            for i, (px, py) in enumerate(pts):
                ax.annotate(f"{i}:{sizes[i]}" if hetero else str(i), (px, py), fontsize=5)
            what = "PCA of mean expert outputs" + (" (label expert:FFN size)" if hetero else "")
            ax.set_title(f"{name} L{l} ({probes[l].kind}): {what}", fontsize=8)
            ax.tick_params(labelsize=6)
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="tokens routed")
    fig.tight_layout()
    images.append((save(fig, out / "pca.png", DPI).name, "PCA of expert embeddings" + (" side by side" if len(runs) > 1 else "")))
    return images


# --------------------------------------------------------------------------- driver
def analyze_checkpoint(cli_args, train_argv: list[str]) -> dict:
    """``mpmoe analyze checkpoint``: load, probe, plot, summarise; returns the summary."""
    from mpmoe.analysis.plotting import write_report
    from mpmoe.megatron import destroy_distributed, init_distributed, routers

    layers = None
    if cli_args.layers:
        try:
            layers = [int(x) for x in cli_args.layers.split(",") if x.strip()]
        except ValueError:
            raise AnalysisError(f"--layers: expected comma-separated integers, got {cli_args.layers!r}") from None
    progress = not cli_args.no_progress
    out = Path(cli_args.out)
    specs = [(cli_args.name, cli_args.load, train_argv)]  # name None: routing + run name
    if cli_args.compare_load:
        argv2 = shlex.split(cli_args.compare_args) if cli_args.compare_args is not None else train_argv
        specs.append((cli_args.compare_name, cli_args.compare_load, argv2))
    for _, path, _ in specs:
        if not Path(path).is_dir():
            raise AnalysisError(f"{path}: no such checkpoint directory")
    runs, summary = [], {"runs": []}
    init_distributed(seed=1234)
    try:
        for name, path, argv in specs:
            model, args, spec, iteration = load_model(path, argv)
            if name is None:
                from mpmoe.analysis.plotting import run_label

                name = run_label({routers.label(args)}, path)
                if runs and runs[0][0] == name:
                    name = "B:" + name
            tokens, pos = sample_tokens(args, spec, cli_args.num_tokens)
            probes = collect_expert_outputs(model, tokens, pos, layers=layers, max_tokens=cli_args.num_tokens,
                                            progress=progress)
            nums = {l: probe_numbers(p, ot_samples=cli_args.ot_samples, progress=progress) for l, p in probes.items()}
            runs.append((name, probes, nums))
            summary["runs"].append({
                "name": name, "checkpoint": str(path), "iteration": iteration,
                "routing": routers.kind_of(args, dense="dense"), "sample_tokens": int(tokens.numel()),
                "layers": {str(l): {k: v for k, v in n.items() if k != "_m"} for l, n in nums.items()},
            })
            del model
    finally:
        destroy_distributed()
    images = _plots(runs, out)
    summary["images"] = [n for n, _ in images]
    write_report(out, "Expert analysis: " + " vs ".join(r[0] for r in runs), images, summary)
    return summary
