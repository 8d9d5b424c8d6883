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
    "top-k + bias": ["--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias"],
}


def _run(preset: str, flags: list[str], seed: int, iters: int, workdir: Path) -> dict:
    from mpmoe.train.args import parse_args
    from mpmoe.train.loop import train

    run_dir = workdir / f"run-{abs(hash((tuple(flags), seed)))}"
    stats = run_dir / "stats"
    half = max(1, iters // 2)
    args = parse_args(["--preset", preset, *flags, "--seed", str(seed), "--train-iters", str(iters),
                       "--eval-interval", str(iters), "--log-interval", str(max(1, iters // 10)),
                       "--run-dir", str(run_dir), "--no-tensorboard", "--no-progress",
                       "--moe-stats-dir", str(stats), "--moe-plot-every", str(half)])
    result = train(args)
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
    return {"val_loss": result["val_loss"], "tokens_per_s": statistics.median(tok_s),
            "imbalance": float(np.mean(imbalance)), "experts_per_token": float(np.mean(k))}


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
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS), metavar="ROUTER",
                   help=f"subset of: {', '.join(ROUTERS)}")
    p.add_argument("--remoe-l1-init", type=float, default=1e-8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ns = p.parse_args(argv)
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    from mpmoe.train.args import parse_args

    iters = ns.iters or (30 if ns.quick else parse_args(["--preset", ns.preset], check=False).train_iters)
    results = {}
    from tqdm.auto import tqdm

    jobs = [(r, s) for r in ns.routers for s in ns.seeds]
    with tempfile.TemporaryDirectory(prefix="compare-routers-") as tmp:
        for router, seed in tqdm(jobs, desc="runs", unit="run", disable=not sys.stderr.isatty()):
            flags = list(ROUTERS[router])
            if router == "ReMoE":
                flags += ["--moe-relu-l1-reg-coeff-init", str(ns.remoe_l1_init)]
            results.setdefault(router, []).append(_run(ns.preset, flags, seed, iters, Path(tmp)))
    print(f"compare_routers: preset {ns.preset}, {iters} iterations, seeds {ns.seeds}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"  {'router':13s} {'val loss (mean +- std)':>24s} {'tokens/s':>10s} {'load max/mean':>14s} "
          f"{'experts/token':>14s}")
    for router, rows in results.items():
        print(f"  {router:13s} {_fmt([r['val_loss'] for r in rows]):>24s} "
              f"{statistics.mean(r['tokens_per_s'] for r in rows):10.0f} "
              f"{statistics.mean(r['imbalance'] for r in rows):14.3f} "
              f"{statistics.mean(r['experts_per_token'] for r in rows):14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
