"""Routing methods on equal footing: top-k, MoPE, ReMoE, top-k + expert bias (tiny-cpu).

Trains the preset once per router and seed with ``mpmoe train``'s own loop (same data,
same model, same schedule; the MoE layers differ only in their router) and prints, per
router, the final validation loss (mean +- std over the seeds), training tokens/s (median
logged window), the load imbalance (max / mean tokens per expert over the second half of
training, mean over MoE layers) and the experts per token (equal active compute: top-k and
MoPE route exactly k; ReMoE's L1 steers it to k on average, so its column shows how close
it got).

    python benchmarks/compare_routers.py --quick          # 3 seeds x 4 routers, 30 iterations
    python benchmarks/compare_routers.py                  # the preset's 400 iterations
    python benchmarks/compare_routers.py --iters 150 --seeds 1 2 3
    python benchmarks/compare_routers.py --preset tiny-paper --iters 200 \
        --routers top-k "top-k + bias" "top-k + bias (logit)" "top-k + bias (prob x 4/E)" \
        --bias-plot bias.png --json out.json      # the expert-bias modes (docs/routing.md)

The load imbalance is reported twice: over the run (mean over every statistics window of
``--windows`` equal parts) and over the last window. ``--bias-plot`` draws the expert bias
of the first MoE layer's first experts after every optimizer step (seed of the first run),
as the selection adds it, to show whether it oscillates.

The runs are sequential in one process, so the machine's load affects them alike only on
average: read tokens/s as a rough figure (``bench_train.py --router`` measures step-time
ratios interleaved). ReMoE starts with the reference L1 coefficient 1e-8
(``--remoe-l1-init``): it routes densely (about half of the experts) for its first ~60
iterations while the coefficient grows, then its sparsity swings around the target, so
short runs (``--quick``) are not at equal active compute for ReMoE - its experts/token
column says how far off the last window was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")

ROUTERS = {
    "top-k": ["--moe-router-load-balancing-type", "aux_loss"],
    "MoPE": ["--moe-router-load-balancing-type", "otep"],
    "ReMoE": ["--moe-router-load-balancing-type", "none", "--moe-relu-routing"],
    "top-k + bias": ["--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias",
                     "--moe-router-expert-bias-mode", "prob"],
    "top-k + bias (logit)": ["--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias",
                             "--moe-router-expert-bias-mode", "logit"],
    "top-k + bias (prob x 4/E)": ["--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias",
                                  "--moe-router-expert-bias-mode", "prob-scaled"],
    # MoPE + bias keeps the aux loss off like top-k + bias (the preset's coefficient is zeroed)
    "MoPE + bias": ["--moe-router-load-balancing-type", "otep", "--moe-aux-loss-coeff", "0",
                    "--moe-router-enable-expert-bias", "--moe-router-expert-bias-mode", "prob"],
    "MoPE + bias (logit)": ["--moe-router-load-balancing-type", "otep", "--moe-aux-loss-coeff", "0",
                            "--moe-router-enable-expert-bias", "--moe-router-expert-bias-mode", "logit"],
    "MoPE + bias (prob x 4/E)": ["--moe-router-load-balancing-type", "otep", "--moe-aux-loss-coeff", "0",
                                 "--moe-router-enable-expert-bias", "--moe-router-expert-bias-mode",
                                 "prob-scaled"],
}
#: routers of the default comparison (the bias-mode variants are asked for by name)
DEFAULT_ROUTERS = ["top-k", "MoPE", "ReMoE", "top-k + bias"]
TRACED_EXPERTS = 6


def _record_bias(trace: list):
    """Patch the trainer's per-step hook to append the first MoE layer's selection bias."""
    import mpmoe.megatron.remoe as balancing
    from mpmoe.megatron.router import iter_routers

    original = balancing.update_balancing_state

    def hook(models):
        original(models)
        for r in iter_routers(models):
            if getattr(r, "expert_bias", None) is not None:
                trace.append(r.selection_bias()[0].detach().double().cpu().numpy().copy())
                break

    balancing.update_balancing_state = hook
    return lambda: setattr(balancing, "update_balancing_state", original)



def _run(preset: str, flags: list[str], seed: int, iters: int, workdir: Path, windows: int = 2) -> dict:
    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    run_dir = workdir / f"run-{abs(hash((tuple(flags), seed)))}"
    stats = run_dir / "stats"
    half = max(1, iters // windows)
    args = parse_args(["--preset", preset, *flags, "--seed", str(seed), "--train-iters", str(iters),
                       "--eval-interval", str(iters), "--log-interval", str(max(1, iters // 10)),
                       "--run-dir", str(run_dir), "--no-tensorboard", "--no-progress",
                       "--moe-stats-dir", str(stats), "--moe-plot-every", str(half)])
    trace: list = []
    restore = _record_bias(trace)
    try:
        result = train(args)
    finally:
        restore()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tok_s = [m["tokens_per_s"] for m in lines[1:] if "tokens_per_s" in m] or \
        [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    last = iters // half - 1
    imbalance, k = [], []
    for f in sorted(stats.glob(f"layer*_seg{last}_*.npz")):
        with np.load(f) as d:
            counts, tokens = d["expert_counts"].astype(float), float(d["num_tokens"])
        imbalance.append(counts.max() / max(counts.mean(), 1e-9))
        k.append(counts.sum() / max(tokens, 1.0))
    over_run = []
    for f in stats.glob("layer*_seg*_*.npz"):
        with np.load(f) as d:
            counts = d["expert_counts"].astype(float)
        over_run.append(counts.max() / max(counts.mean(), 1e-9))
    bias = np.array(trace) if trace else None
    return {"val_loss": result["val_loss"], "tokens_per_s": statistics.median(tok_s),
            "imbalance": float(np.mean(imbalance)), "imbalance_run": float(np.mean(over_run)),
            "experts_per_token": float(np.mean(k)),
            "bias_absmax": float(np.abs(bias[-1]).max()) if bias is not None else None,
            # sign changes per step of the traced experts' bias over the second half: 1 = flips every step
            "bias_flip_rate": _flip_rate(bias) if bias is not None else None,
            "bias_trace": bias[:, :TRACED_EXPERTS].tolist() if bias is not None else None}


def _flip_rate(bias: "np.ndarray") -> float:
    """Fraction of steps in the second half where an expert's bias step changes sign (mean over experts)."""
    steps = np.diff(bias[len(bias) // 2:], axis=0)
    signs = np.sign(steps)
    flips = (signs[1:] * signs[:-1]) < 0
    return float(flips.mean()) if flips.size else float("nan")


def _fmt(values: list[float], digits: int = 4) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-cpu")
    p.add_argument("--quick", action="store_true", help="30 iterations per run (a smoke comparison)")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--routers", nargs="+", default=DEFAULT_ROUTERS, choices=list(ROUTERS), metavar="ROUTER",
                   help=f"subset of: {', '.join(ROUTERS)} (default: {', '.join(DEFAULT_ROUTERS)})")
    p.add_argument("--windows", type=int, default=2, help="statistics windows per run (load over the run)")
    p.add_argument("--bias-plot", default=None, help="PNG of the traced experts' bias over steps")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("--remoe-l1-init", type=float, default=1e-8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ns = p.parse_args(argv)
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    from mpmoe.run.args import parse_args

    iters = ns.iters or (30 if ns.quick else parse_args(["--preset", ns.preset], check=False).train_iters)
    results = {}
    from tqdm.auto import tqdm

    jobs = [(r, s) for r in ns.routers for s in ns.seeds]
    with tempfile.TemporaryDirectory(prefix="compare-routers-") as tmp:
        for router, seed in tqdm(jobs, desc="runs", unit="run", disable=not sys.stderr.isatty()):
            flags = list(ROUTERS[router])
            if router == "ReMoE":
                flags += ["--moe-relu-l1-reg-coeff-init", str(ns.remoe_l1_init)]
            results.setdefault(router, []).append(_run(ns.preset, flags, seed, iters, Path(tmp), ns.windows))
            if ns.json:  # after every run, so that a long comparison can be read while it runs
                Path(ns.json).write_text(json.dumps({"preset": ns.preset, "iters": iters, "seeds": ns.seeds,
                                                     "results": results}, indent=1))
    print(f"compare_routers: preset {ns.preset}, {iters} iterations, seeds {ns.seeds}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"  {'router':26s} {'val loss (mean +- std)':>24s} {'tokens/s':>10s} {'load max/mean':>14s} "
          f"{'(over run)':>11s} {'experts/token':>14s} {'|bias| max':>10s} {'bias flips':>10s}")
    for router, rows in results.items():
        bias = [r["bias_absmax"] for r in rows if r["bias_absmax"] is not None]
        flips = [r["bias_flip_rate"] for r in rows if r["bias_flip_rate"] is not None]
        print(f"  {router:26s} {_fmt([r['val_loss'] for r in rows]):>24s} "
              f"{statistics.mean(r['tokens_per_s'] for r in rows):10.0f} "
              f"{statistics.mean(r['imbalance'] for r in rows):14.3f} "
              f"{statistics.mean(r['imbalance_run'] for r in rows):11.3f} "
              f"{statistics.mean(r['experts_per_token'] for r in rows):14.2f} "
              f"{(f'{statistics.mean(bias):.2e}' if bias else '-'):>10s} "
              f"{(f'{statistics.mean(flips):.2f}' if flips else '-'):>10s}")
    if ns.bias_plot:
        _plot_bias(results, ns.bias_plot)
    return 0


def _plot_bias(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traced = {name: rows[0]["bias_trace"] for name, rows in results.items() if rows[0]["bias_trace"]}
    if not traced:
        return
    fig, axes = plt.subplots(1, len(traced), figsize=(4 * len(traced), 3), squeeze=False)
    for ax, (name, trace) in zip(axes[0], traced.items()):
        ax.plot(np.array(trace))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("bias as added to the selection")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
