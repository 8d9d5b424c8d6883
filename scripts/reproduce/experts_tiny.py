"""MC-SMoE on top-k vs MoPE at tiny scale: do MoPE models merge worse? One command.

    python scripts/reproduce/experts_tiny.py OUT [--quick] [--seeds 1,2] [--iters N]
    python scripts/reproduce/experts_tiny.py OUT --runs RUNS [--seeds 1,2,3]   # reuse trained models

Trains the tiny shape with 64 experts top-8 (top-k and MoPE, same shape, batch and
iterations) for each seed, then merges every checkpoint 64 -> 32 -> 16 -> 8 experts per layer
(collapsed layout) with M-SMoE (the reference's defaults), naive averaging (uniform weights,
no alignment), M-SMoE without alignment, and drop (keep the dominants), compresses each
M-SMoE merge (low rank + 10% of residual rows), and reports validation loss (mean +- std over
seeds), the ``mpmoe_local`` scores (``--eval-limit`` documents per task), expert and total
parameters and checkpoint bytes: ``OUT/report.md`` and ``OUT/summary.json``. Finished stages
are reused when OUT already holds them. ``--quick`` (what the test runs): 16 experts top-4,
16 -> 8 -> 4, one seed, a few iterations.

``--runs RUNS`` trains nothing: it reads the checkpoints of a ``scripts/reproduce/paper_tiny.sh``
output folder (``RUNS/runs/seed{S}-{topk,mope}/ckpt``, e.g. ``--shape paper``: tiny-paper, 64
experts top-8) and writes only into OUT; the merge sizes are E/2, E/4, E/8 of their E. Every
M-SMoE merge is also scored with fold-then-select routing (``--moe-expert-group-routing
fold-select``, validation loss only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpmoe.analysis.metrics import mean_std  # noqa: E402

SHAPE = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
         "--seq-length", "64", "--max-position-embeddings", "64", "--moe-ffn-hidden-size", "32",
         "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "[0,1,1,1]",
         "--global-batch-size", "8", "--micro-batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4",
         "--eval-iters", "2"]
MOPE_FLAGS = ["--moe-otep-warmup-fraction", "0.05"]  # MoPE runs only (an error on top-k)
CONFIGS = {
    "full": dict(experts=64, topk=8, sizes=[32, 16, 8], iters=300, seeds=[1, 2], calib=4096, heldout=4096,
                 eval_limit=20, rank=8, keep=0.1),
    "quick": dict(experts=16, topk=4, sizes=[8, 4], iters=12, seeds=[1], calib=512, heldout=512,
                  eval_limit=2, rank=4, keep=0.25),
    "runs": dict(seeds=[1, 2, 3], calib=4096, heldout=4096, eval_limit=20, rank=8, keep=0.1),
}
RUN_NAMES = {"top-k": "topk", "MoPE": "mope"}  # paper_tiny.py's run folders: seed{S}-{name}
METHODS = {  # name -> mpmoe experts merge flags
    "M-SMoE": [],
    "naive": ["--weighting", "uniform", "--align", "none"],
    "no-align": ["--align", "none"],
    "drop": ["--method", "drop"],
}
ROUTINGS = {"top-k": ["--moe-router-load-balancing-type", "aux_loss"], "MoPE": MOPE_FLAGS}


def log(msg: str) -> None:
    print(f"[experts_tiny {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cli(*argv) -> None:
    from mpmoe.cli import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"experts_tiny: `mpmoe {' '.join(map(str, argv))}` failed ({rc})")


def existing(runs: Path, routing: str, seed: int) -> Path:
    save = runs / "runs" / f"seed{seed}-{RUN_NAMES[routing]}" / "ckpt"
    if not (save / "latest_checkpointed_iteration.txt").is_file():
        raise SystemExit(f"experts_tiny: --runs: no finished checkpoint in {save}")
    return save


def runs_config(runs: Path, cfg: dict) -> dict:
    """Experts, top-k and iterations of the reused runs (their recorded flags)."""
    seen = set()
    for routing in ROUTINGS:
        for seed in cfg["seeds"]:
            args = json.loads((runs / "runs" / f"seed{seed}-{RUN_NAMES[routing]}" / "config.json").read_text())["args"]
            seen.add((args["num_experts"], args["moe_router_topk"], args["train_iters"]))
    if len(seen) != 1:
        raise SystemExit(f"experts_tiny: --runs: the runs differ in (experts, top-k, iterations): {sorted(seen)}")
    experts, topk, iters = seen.pop()
    return dict(cfg, experts=experts, topk=topk, iters=iters,
                sizes=[experts // d for d in (2, 4, 8) if experts // d >= topk])


def train(out: Path, routing: str, seed: int, cfg: dict, extra: list) -> Path:
    save = out / "ckpt" / f"{routing}-s{seed}"
    if not (save / "latest_checkpointed_iteration.txt").is_file():
        log(f"train {routing} seed {seed}")
        _cli("train", "--preset", "tiny-cpu", *SHAPE, "--num-experts", cfg["experts"], "--moe-router-topk",
             cfg["topk"], *ROUTINGS[routing], "--train-iters", cfg["iters"], "--eval-interval", cfg["iters"],
             "--seed", seed, "--save", save, "--run-dir", out / "runs" / f"{routing}-s{seed}", "--no-tensorboard",
             "--no-progress", *extra)
    return save


def measure(path: Path, cfg: dict, out: Path, fold_select: bool = False) -> dict:
    """Validation loss, parameters, checkpoint bytes and mpmoe_local scores of one checkpoint
    (``fold_select``: also the validation loss with fold-then-select routing)."""
    cache = path / "measure.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from mpmoe import store
    from mpmoe.experts.common import count_parameters, folder_bytes
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    loss_fold = None
    try:
        m = store.load_model(path, dtype="fp32")
        loss = store.heldout_loss(m, split="valid", num_tokens=cfg["heldout"])["loss"]
        params = count_parameters(m.model)
        if fold_select:
            m = store.load_model(path, dtype="fp32", routing_ablation={"moe_expert_group_routing": "fold-select"})
            loss_fold = store.heldout_loss(m, split="valid", num_tokens=cfg["heldout"])["loss"]
    finally:
        destroy_distributed()
    scores = {}
    if cfg["eval_limit"]:
        from mpmoe.eval.cli import build_parser, evaluate

        dest = out / "eval" / path.name
        args = build_parser().parse_args(["--load", str(path), "--tasks", "mpmoe_local", "--limit",
                                          str(cfg["eval_limit"]), "--output-path", str(dest), "--no-progress",
                                          "--bootstrap-iters", "0", "--batch-size", "8", "--dtype", "fp32"])
        evaluate(args)
        res = json.loads((dest / "results.json").read_text())
        for task, metrics in res.get("results", {}).items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in key and key.startswith("acc"):
                    scores[f"{task}/{key.split(',')[0]}"] = value
    ckpt_bytes = folder_bytes(next(path.glob("iter_*")))
    rec = {"loss": loss, "params": params, "bytes": ckpt_bytes, "scores": scores}
    if loss_fold is not None:
        rec["loss_fold_select"] = loss_fold
    cache.write_text(json.dumps(rec))
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default=None, help="comma-separated seeds")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None, help="mpmoe_local documents per task (0: skip)")
    p.add_argument("--train-flags", default="", help="extra `mpmoe train` flags (one string)")
    p.add_argument("--runs", default=None, help="reuse the checkpoints of a paper_tiny.sh output folder "
                   "(RUNS/runs/seed{S}-{topk,mope}/ckpt); nothing is trained, nothing written there")
    a = p.parse_args(argv)
    if a.runs and (a.quick or a.iters or a.train_flags):
        p.error("--runs reuses trained checkpoints: not with --quick, --iters or --train-flags")
    cfg = dict(CONFIGS["quick" if a.quick else "runs" if a.runs else "full"])
    if a.seeds:
        cfg["seeds"] = [int(s) for s in a.seeds.split(",")]
    if a.runs:
        cfg = runs_config(Path(a.runs), cfg)
    if a.iters:
        cfg["iters"] = a.iters
    if a.eval_limit is not None:
        cfg["eval_limit"] = a.eval_limit
    out = Path(a.out)
    (out / "merged").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []  # (routing, seed, size, method, measure)
    for i, seed in enumerate(cfg["seeds"]):  # seed by seed, both routings: a report after each pair
        for routing in ROUTINGS:
            src = existing(Path(a.runs), routing, seed) if a.runs else train(out, routing, seed, cfg,
                                                                              a.train_flags.split())
            # the original, as a model-only checkpoint (E' = E: the identity, bit for bit) so that
            # its bytes compare with the merged ones (a training checkpoint holds optimizer state)
            orig = out / "merged" / f"{routing}-s{seed}-{cfg['experts']}-original"
            if not (orig / "surgery.json").is_file():
                _cli("experts", "merge", "--load", src, "--save", orig, "--num-experts", cfg["experts"],
                     "--layout", "collapsed", "--calibration-tokens", cfg["calib"], "--seed", seed)
            rows.append((routing, seed, cfg["experts"], "original", measure(orig, cfg, out)))
            for size in cfg["sizes"]:
                for method, flags in METHODS.items():
                    dest = out / "merged" / f"{routing}-s{seed}-{size}-{method}"
                    if not (dest / "surgery.json").is_file():
                        log(f"merge {routing} seed {seed}: {cfg['experts']} -> {size} {method}")
                        _cli("experts", "merge", "--load", src, "--save", dest, "--num-experts", size,
                             "--layout", "collapsed", "--calibration-tokens", cfg["calib"], "--seed", seed, *flags)
                    rows.append((routing, seed, size, method, measure(dest, cfg, out, method == "M-SMoE")))
                    if method == "M-SMoE":
                        comp = out / "merged" / f"{routing}-s{seed}-{size}-MC-SMoE"
                        if not (comp / "surgery.json").is_file():
                            log(f"compress {routing} seed {seed}: {size} experts")
                            _cli("experts", "compress", "--load", dest, "--save", comp, "--rank", cfg["rank"],
                                 "--sparse-keep", cfg["keep"], "--steps", 8, "--final-warmup", 2,
                                 "--calibration-tokens", cfg["calib"], "--seed", seed)
                        rows.append((routing, seed, size, "MC-SMoE", measure(comp, cfg, out)))
        write_report(out, dict(cfg, seeds=cfg["seeds"][:i + 1]), rows, time.perf_counter() - start)
        log(f"seeds {cfg['seeds'][:i + 1]} done: {out / 'report.md'}")
    elapsed = time.perf_counter() - start
    write_report(out, cfg, rows, elapsed)
    log(f"done in {elapsed:.0f} s: {out / 'report.md'}")
    return 0


def write_report(out: Path, cfg: dict, rows: list, elapsed: float) -> None:
    """``OUT/summary.json`` and ``OUT/report.md`` from ``rows`` [(routing, seed, experts, method, measure)]."""
    table = {}
    for routing, seed, size, method, rec in rows:
        table.setdefault((routing, size, method), []).append(rec)
    summary = {"config": cfg, "seconds": elapsed, "rows": [
        {"routing": r, "seed": s, "experts": n, "method": m, **rec} for r, s, n, m, rec in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    orig = {(r, sd): rec["loss"] for r, sd, n, m, rec in rows if m == "original"}
    delta = {}  # (routing, size, method) -> per-seed loss change against the seed's own original
    for routing, seed, size, method, rec in rows:
        delta.setdefault((routing, size, method), []).append(rec["loss"] - orig[(routing, seed)])
    lines = [f"# MC-SMoE at tiny scale: top-k vs MoPE ({cfg['experts']} experts top-{cfg['topk']})", "",
             f"{len(cfg['seeds'])} seed(s) {cfg['seeds']}, {cfg['iters']} training iterations, calibration "
             f"{cfg['calib']} tokens (training split), validation loss on {cfg['heldout']} tokens, mpmoe_local "
             f"limit {cfg['eval_limit']}; {elapsed:.0f} s in all. Δ: the loss minus the same seed's original, "
             "mean ± std over seeds.", "",
             "| routing | experts | method | val loss | Δ vs original | Δ fold-select | mpmoe_local acc | "
             "expert params | total params | checkpoint bytes |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (routing, size, method), recs in table.items():
        m, s = mean_std([r["loss"] for r in recs])
        dm, ds = mean_std(delta[(routing, size, method)])
        folds = [r["loss_fold_select"] - orig[(routing, sd)] for (rt, sd, n, mt, r) in rows
                 if (rt, n, mt) == (routing, size, method) and "loss_fold_select" in r]
        fm, fs = mean_std(folds)
        fold = f"{fm:+.4f} ± {fs:.4f}" if folds else "-"
        accs = [sum(r["scores"].values()) / len(r["scores"]) for r in recs if r["scores"]]
        acc = "{:.3f} ± {:.3f}".format(*mean_std(accs)) if accs else "-"
        lines.append(f"| {routing} | {size} | {method} | {m:.4f} ± {s:.4f} | "
                     f"{'' if method == 'original' else f'{dm:+.4f} ± {ds:.4f}'} | {fold} | {acc} | "
                     f"{recs[0]['params']['experts']:,} | {recs[0]['params']['total']:,} | {recs[0]['bytes']:,} |")
    lines += ["", "Does MoPE merge worse than top-k? Loss increase (Δ, mean ± std over seeds), MoPE minus top-k:"]
    for size in cfg["sizes"]:
        for method in [*METHODS, "MC-SMoE"]:
            d = {routing: mean_std(delta[(routing, size, method)]) for routing in ROUTINGS}
            lines.append(f"- {cfg['experts']} -> {size} {method}: top-k {d['top-k'][0]:+.4f} ± {d['top-k'][1]:.4f}, "
                         f"MoPE {d['MoPE'][0]:+.4f} ± {d['MoPE'][1]:.4f} (difference "
                         f"{d['MoPE'][0] - d['top-k'][0]:+.4f})")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
