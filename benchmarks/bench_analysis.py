"""Time `mpmoe analyze` on a 64-expert, 9-layer statistics set and a flame-moe-38m checkpoint.

    python benchmarks/bench_analysis.py [--workdir DIR] [--windows 20] [--num-tokens 2048] [--ot-samples 128]

1. writes a synthetic statistics set the shape of a flame-moe-38m run (layers 2..9 MoPE, 64
   experts, top-6 routed, --windows windows; and a top-k set for --compare), then times
   `mpmoe analyze stats RUN --compare OTHER`;
2. writes the initial flame-moe-38m checkpoint with `mpmoe train --train-iters 0 --save`
   (embedded corpus, fp32 on CPU) and times `mpmoe analyze checkpoint` on it.
Prints each time and the total against the 2-minute target.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_stats(out: Path, kind: str, *, layers=range(2, 10), experts=64, k=6, windows=20, tokens=8192, seed=0):
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for layer in layers:
        pref = rng.normal(scale=1.5 if kind == "moe" else 0.5, size=experts)
        for seg in range(windows):
            logits = pref[None, :] + rng.gumbel(size=(tokens, experts))
            idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            m = np.zeros((tokens, experts), dtype=np.int64)
            np.put_along_axis(m, idx, 1, axis=1)
            arrays = {"expert_counts": m.sum(0), "cooccurrence_matrix": m.T @ m, "num_tokens": np.int64(tokens)}
            if kind == "mope":
                f = m.astype(np.float64)
                mu = f.mean(0)
                arrays["cov_matrix"] = (f.T @ f / tokens - np.outer(mu, mu)).astype(np.float32)
            np.savez(out / f"layer{layer}_seg{seg}_{kind}.npz", **arrays)


def run(cmd: list[str], env) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--num-tokens", type=int, default=2048)
    p.add_argument("--ot-samples", type=int, default=128)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-analysis-"))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    py = [sys.executable, "-m", "mpmoe.cli"]

    write_stats(work / "stats-mope", "mope", windows=a.windows, seed=0)
    write_stats(work / "stats-moe", "moe", windows=a.windows, seed=1)
    t_stats = run(py + ["analyze", "stats", str(work / "stats-mope"), "--compare", str(work / "stats-moe"),
                        "--out", str(work / "report-stats"), "--no-progress"], env)
    print(f"analyze stats   (9-layer run: 8 MoE layers x 64 experts x {a.windows} windows, vs a second run): "
          f"{t_stats:6.1f} s", flush=True)

    model = ["--preset", "flame-moe-38m", "--moe-router-load-balancing-type", "otep", "--no-bf16",
             "--global-batch-size", "4", "--micro-batch-size", "4"]
    ckpt = work / "ckpt-38m"
    if not (ckpt / "latest_checkpointed_iteration.txt").is_file():
        t_save = run(py + ["train"] + model + ["--train-iters", "0", "--save", str(ckpt), "--run-dir",
                                              str(work / "run-38m"), "--no-tensorboard", "--no-progress"], env)
        print(f"(writing the flame-moe-38m checkpoint: {t_save:.1f} s, not counted)", flush=True)
    t_ck = run(py + ["analyze", "checkpoint", "--load", str(ckpt), "--out", str(work / "report-ckpt"),
                     "--num-tokens", str(a.num_tokens), "--ot-samples", str(a.ot_samples), "--no-progress"] + model, env)
    print(f"analyze checkpoint (flame-moe-38m: 8 MoE layers x 64 experts, {a.num_tokens} tokens through all "
          f"experts, OT on {a.ot_samples} tokens): {t_ck:6.1f} s", flush=True)
    total = t_stats + t_ck
    print(f"total {total:.1f} s  (target < 120 s: {'met' if total < 120 else 'NOT met'}); "
          f"{os.cpu_count()} CPUs visible; reports in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
