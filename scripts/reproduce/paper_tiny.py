"""The MP-MoE paper's experiments at tiny scale, one command (driver of paper_tiny.sh).

    python scripts/reproduce/paper_tiny.py OUT [--quick] [--seeds 1,2,3] [--iters N]
    python scripts/reproduce/paper_tiny.py OUT --shape paper    # 64 experts top-8, 4 methods
    python scripts/reproduce/paper_tiny.py OUT --preset flame-moe-38m --data-path PREFIX \
        --tokenizer-model DIR --iters 2000          # the same pipeline on a GPU

Trains MoPE and top-k (same shape, batch, iterations and k: equal compute) over several
seeds, plus MoPE with the Sigma prior (``--moe-sigma-shrinkage``), then measures:
validation loss (mean +- std, per seed, learning curves with seed bands); the offline
eval tasks (``mpmoe_local``) with both routings; the knock-out ablation (validation loss
change when one expert of one layer is masked: the most co-occurring expert vs random
ones); the dynamic k -> k-1 mask (co-occurrence vs random); the Sigma prior on/off; and the
analysis plots (``mpmoe analyze stats`` / ``checkpoint``). Writes ``OUT/report.md``,
``OUT/summary.json`` and PNGs. Everything runs in this process, one stage after another;
finished training runs are reused when OUT already holds them (re-run to resume).

``--shape paper`` trains the paper's expert shape at CPU scale instead (the ``tiny-paper``
preset: 64 experts, top-8 + a shared MLP, pre-softmax, hidden 64) for 1,500 iterations,
MoPE, top-k (aux loss), top-k + aux-loss-free expert bias and ReMoE (same k, so equal active
compute; ReMoE's L1 steers it to k on average), 3 seeds, no Sigma-prior runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpmoe.analysis.metrics import mean_std  # noqa: E402  (the seed spread, shared with the other scripts)

# Tiny models for the CPU. "full" is close to the paper's ratio (top-4 of 16 + a shared MLP
# of 2x the expert FFN, pre-softmax gates as the authors' configs); "quick" is for tests.
CONFIGS = {
    "full": dict(preset="tiny-cpu", flags=[
        "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--num-experts", "16", "--moe-router-topk", "4",
        "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "[0,1,1,1]",
        "--moe-router-pre-softmax", "--global-batch-size", "8", "--micro-batch-size", "8", "--lr", "2e-3",
        "--min-lr", "2e-4"], mope_flags=["--moe-otep-warmup-fraction", "0.05"],
        iters=300, eval_interval=50, eval_iters=8, plot_every=50, seeds=[1, 2, 3], eval_limit=40, random_draws=3,
        side_runs=3),
    "quick": dict(preset="tiny-cpu", flags=[
        "--num-layers", "3", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "2",
        "--seq-length", "32", "--max-position-embeddings", "32", "--num-experts", "8", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0,1,1]",
        "--moe-router-pre-softmax", "--global-batch-size", "4", "--micro-batch-size", "4", "--lr", "3e-3",
        "--min-lr", "3e-4"], mope_flags=["--moe-otep-warmup-fraction", "0.2"],
        iters=16, eval_interval=8, eval_iters=2, plot_every=8, seeds=[1, 2], eval_limit=3, random_draws=1,
        side_runs=1),
    # The paper's expert shape (issue 24): the tiny-paper preset holds it (one source for this
    # script and benchmarks/compare_routers.py); more methods, no prior runs, no eval tasks.
    "paper": dict(preset="tiny-paper", flags=[],
                  iters=1500, eval_interval=100, eval_iters=8, plot_every=100, seeds=[1, 2, 3], eval_limit=40,
                  random_draws=3, side_runs=0, skip_eval=True,
                  methods={"top-k + bias": ("none", ["--moe-router-enable-expert-bias"]),
                           "ReMoE": ("none", ["--moe-relu-routing"])}),
}

MOPE_FLAGS: list = []  # the chosen config's MoPE-only flags (set by main)

CLAIMS = {
    "loss": "MoPE reaches a lower pre-training loss / perplexity than top-k routing at equal compute "
            "(paper: pre-training curves, figure/pretrain_loss_ppl.png of the authors' repository).",
    "tasks": "MoPE improves downstream accuracy over top-k (paper: lm-eval benchmark table).",
    "dynamic": "Top-k's co-activated experts echo each other: dropping the most co-occurring routed "
               "expert (k -> k-1) costs less than dropping a random one (the 'dynamic ensemble "
               "pruning' view the paper builds on).",
    "knockout": "Knocking out a highly co-occurring expert is cheaper than a random one for top-k "
                "(redundancy); MoPE's experts are less redundant.",
    "prior": "No claim (the Sigma prior is mpmoe's fix of the unseen-expert edge; the paper has eps).",
}


def log(msg: str) -> None:
    print(f"[paper_tiny {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- training
def train_run(out: Path, name: str, base: list, seed: int, routing: str, iters: int, extra=()) -> dict:
    """Train one run (reused when its folder holds a finished run); returns its metrics."""
    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    run = out / "runs" / name
    done = run / "done.json"
    if not done.is_file():
        # MoPE's own settings only on MoPE runs (on another router they are an error)
        argv = [*base, *(MOPE_FLAGS if routing == "otep" else ()), "--seed", str(seed),
                "--moe-router-load-balancing-type", routing,
                "--train-iters", str(iters), "--run-dir", str(run), "--save", str(run / "ckpt"),
                "--moe-stats-dir", str(run / "stats"), "--no-tensorboard", "--no-progress", *extra]
        log(f"train {name}")
        start = time.time()
        result = train(parse_args(argv))
        result["wall_s"] = round(time.time() - start, 1)
        done.write_text(json.dumps(result))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [(m["iteration"], m["val_loss"]) for m in metrics if "val_loss" in m]
    return {"name": name, "seed": seed, "routing": routing, "dir": str(run), "curve": curve,
            "val_loss": curve[-1][1], **json.loads(done.read_text())}


def train_seeds_in_parallel(argv: list, seeds: list, jobs: int, out: Path) -> None:
    """Train each seed's runs in a process of its own, ``jobs`` at a time, the cores split
    between them (one 2-thread process runs a tiny model at well under twice the speed of a
    1-thread one); the caller then reuses the finished runs. A job's log is
    OUT/runs/train-seed<S>.log."""
    import subprocess

    from mpmoe.errors import UserError

    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MPMOE_PAPER_TINY_JOB="1")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    pending, running = list(seeds), []
    log(f"training {len(seeds)} seeds in {jobs} processes of {threads} thread(s)")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                seed = pending.pop(0)
                logf = out / "runs" / f"train-seed{seed}.log"
                with open(logf, "w") as fh:
                    cmd = [sys.executable, __file__, *argv, "--seeds", str(seed), "--jobs", "1", "--train-only"]
                    running.append((seed, logf, subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)))
            time.sleep(2)
            for job in [j for j in running if j[2].poll() is not None]:
                running.remove(job)
                if job[2].returncode != 0:
                    tail = job[1].read_text().strip().splitlines()[-1:] or [""]
                    raise UserError(f"seed {job[0]}'s training failed (exit {job[2].returncode}, log "
                                    f"{job[1]}): {tail[0]}")
    finally:
        for _, _, proc in running:  # an error or a signal here ends the other jobs too
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- ablations
def _cooccurrence(stats_dir: Path, layer: int) -> np.ndarray:
    from mpmoe.megatron.stats import load_layer_cooccurrence

    return load_layer_cooccurrence(stats_dir, layer, prefer="mope")


def most_cooccurring_expert(c: np.ndarray) -> int:
    """The expert most echoed by another: argmax_j max_{i != j} C[i, j] / C[i, i]."""
    from mpmoe.routing.masks import normalized_cooccurrence
    import torch

    return int(normalized_cooccurrence(torch.as_tensor(c)).amax(dim=0).argmax())


def ablations(run: dict, draws: int) -> dict:
    """Validation loss of one checkpoint: as trained, routed top-k, with each knock-out and
    each dynamic mask (the validation set the trainer used)."""
    import torch

    from mpmoe.eval.loader import load_eval_model
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.megatron.router import MoPERouter, iter_routers
    from mpmoe.run.data import build_datasets, micro_batches, resolve_data

    init_distributed(seed=1234)
    try:
        em = load_eval_model(run["dir"] + "/ckpt")
        args = em.args
        _, valid, _ = build_datasets(resolve_data(args), args, seed=args.seed)
        batches = list(micro_batches(valid, 0, args.eval_iters * args.global_batch_size,
                                     args.global_batch_size, 0, 1))
        config = em.model.config
        routers = list(iter_routers(em.model))

        def loss() -> float:
            total = count = 0.0
            for b in batches:
                logits = em.forward(b["tokens"]).float()
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
                mask = b["loss_mask"].flatten().float()
                total += float((ce * mask).sum())
                count += float(mask.sum())
            return total / count

        def reset():
            config.moe_mask_experts = None
            config.moe_dynamic_mask_mode = None
            for r in routers:
                r._dynamic_cooccurrence = None

        base = loss()
        out = {"base": base, "knockout": {}, "dynamic": {}}
        if any(isinstance(r, MoPERouter) for r in routers):
            config.moe_otep_inference_topk = True
            out["topk_routing"] = loss()
            config.moe_otep_inference_topk = False
        rng = np.random.default_rng(run["seed"])
        stats = Path(run["dir"]) / "stats"
        for r in routers:
            layer = r.layer_number
            top = most_cooccurring_expert(_cooccurrence(stats, layer))
            config.moe_mask_experts = {layer: (top,)}
            hit = loss() - base
            others = [e for e in range(r.num_experts) if e != top]
            rand = []
            for e in rng.choice(others, size=min(draws, len(others)), replace=False):
                config.moe_mask_experts = {layer: (int(e),)}
                rand.append(loss() - base)
            reset()
            out["knockout"][str(layer)] = {"expert": top, "most_cooccurring": hit, "random": float(np.mean(rand)),
                                          "random_each": rand}
        config.moe_cooccurrence_stats_dir = str(stats)
        config.moe_dynamic_mask_layers = None
        for mode in ("cooccurrence", "random"):
            config.moe_dynamic_mask_mode = mode
            out["dynamic"][mode] = loss() - base
            reset()
        return out
    finally:
        destroy_distributed()


def eval_tasks(run: dict, routing: str, limit, out: Path) -> dict:
    """``mpmoe eval --tasks mpmoe_local`` (offline) with one routing; the metric per task."""
    from mpmoe.eval.scores import evaluate_checkpoint

    dest = out / "eval" / f"{run['name']}-{routing}"
    if not (dest / "results.json").is_file():
        log(f"eval {run['name']} routing {routing}")
    return evaluate_checkpoint(run["dir"] + "/ckpt", dest, limit=limit, extra=["--routing", routing])


# --------------------------------------------------------------------------- report
def plot_curves(runs: dict, path: Path) -> None:
    from mpmoe.analysis.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in runs.items():
        its = [i for i, _ in group[0]["curve"]]
        ys = np.array([[v for _, v in r["curve"]] for r in group])
        m, s = ys.mean(0), ys.std(0, ddof=1) if len(group) > 1 else np.zeros(ys.shape[1])
        ax.plot(its, m, label=f"{label} (n={len(group)})")
        ax.fill_between(its, m - s, m + s, alpha=0.25)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss, mean +- std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablations(abl: dict, path: Path) -> None:
    from mpmoe.analysis.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(abl)
    layers = sorted({l for g in abl.values() for a in g for l in a["knockout"]}, key=int)
    width = 0.8 / (2 * len(labels))
    for gi, label in enumerate(labels):
        for ki, kind in enumerate(("most_cooccurring", "random")):
            vals = [[a["knockout"][l][kind] for a in abl[label]] for l in layers]
            x = np.arange(len(layers)) + (2 * gi + ki) * width
            axes[0].bar(x, [np.mean(v) for v in vals], width, yerr=[np.std(v) for v in vals],
                        label=f"{label}: {kind.replace('_', '-')}")
    axes[0].set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [f"L{l}" for l in layers])
    axes[0].set_ylabel("validation loss change")
    axes[0].set_title("knock out one expert per layer")
    axes[0].legend(fontsize=7)
    for gi, label in enumerate(labels):
        for ki, mode in enumerate(("cooccurrence", "random")):
            v = [a["dynamic"][mode] for a in abl[label]]
            axes[1].bar(gi * 2.5 + ki, np.mean(v), yerr=np.std(v), label=f"{label}: {mode}")
    axes[1].set_xticks([g * 2.5 + 0.5 for g in range(len(labels))], labels)
    axes[1].set_ylabel("validation loss change")
    axes[1].set_title("dynamic k -> k-1 (all MoE layers)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(a: float, b: float, spread: float, better: str, worse: str) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return "not measured"
    if abs(a - b) <= spread:
        return f"no difference beyond the seed spread ({a - b:+.4f} vs spread {spread:.4f})"
    return f"{better if a < b else worse} ({a - b:+.4f}, seed spread {spread:.4f})"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (mpmoe's rule), not usage + error
        from mpmoe.errors import UserError

        raise UserError(message)


def _seeds(text: str) -> list:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(x < 0 for x in seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative ints like 1,2,3, got {text!r}")
    return seeds


def main(argv=None) -> int:
    from mpmoe.errors import run_verb

    return run_verb("paper_tiny", _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    from mpmoe.errors import UserError
    from mpmoe.run.args import FRACTION, POSITIVE, ConfigError, parse_args

    p = _Parser(prog="paper_tiny", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--quick", action="store_true", help="a few iterations of a smaller model (tests)")
    p.add_argument("--shape", choices=["small", "paper"], default="small",
                   help="small: 16 experts top-4, MoPE vs top-k (+ prior), 300 iterations; paper: 64 experts "
                        "top-8 + shared, MoPE / top-k / top-k + bias / ReMoE, 1,500 iterations")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default 1,2,3; --quick: 1,2)")
    p.add_argument("--iters", type=POSITIVE, default=None)
    p.add_argument("--shrinkage", type=FRACTION, default=0.1, help="Sigma prior of the prior-on runs")
    p.add_argument("--preset", default=None, help="a preset instead of the tiny model (e.g. flame-moe-38m)")
    p.add_argument("--data-path", nargs="*", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--train-flags", default="", help="more `mpmoe train` flags, one string")
    p.add_argument("--eval-limit", type=float, default=None, help="documents per eval task")
    p.add_argument("--skip-eval", action="store_true", help="skip the lm-eval tasks")
    p.add_argument("--skip-analysis", action="store_true", help="skip mpmoe analyze")
    p.add_argument("--side-runs", type=int, default=None,
                   help="seeds that also get a Sigma-prior run and the eval tasks (default: all; "
                        "--quick: 1; 0: none); finished prior runs in OUT are always reported")
    p.add_argument("--jobs", type=POSITIVE, default=None,
                   help="train the seeds in this many processes at once, the cores split between them "
                        "(default: one per seed with --shape paper, else 1)")
    p.add_argument("--train-only", action="store_true",
                   help="only train (e.g. one process per seed into one OUT; a later run without it "
                        "reuses the runs)")
    a = p.parse_args(argv)
    import shlex

    if a.quick and a.shape != "small":
        p.error("--quick and --shape paper exclude each other")
    cfg = CONFIGS["quick" if a.quick else ("paper" if a.shape == "paper" else "full")]
    seeds = a.seeds or cfg["seeds"]
    if a.side_runs is not None and a.side_runs < 0:
        raise UserError(f"--side-runs must be >= 0, got {a.side_runs}")
    if a.side_runs is not None:
        cfg = dict(cfg, side_runs=a.side_runs)
    iters = a.iters or cfg["iters"]
    MOPE_FLAGS[:] = [] if a.preset else cfg.get("mope_flags", [])
    if a.preset:
        base = ["--preset", a.preset]
    else:
        base = ["--preset", cfg["preset"], *cfg["flags"]]
    base += ["--eval-interval", str(max(1, min(cfg["eval_interval"], iters))), "--eval-iters", str(cfg["eval_iters"]),
             "--moe-plot-every", str(cfg["plot_every"]), "--log-interval", str(max(1, cfg["eval_interval"] // 2))]
    if a.data_path:
        base += ["--data-path", *a.data_path]
    if a.tokenizer_model:
        base += ["--tokenizer-model", a.tokenizer_model]
    base += shlex.split(a.train_flags)
    out = Path(a.out)
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"OUT {out}: {probe} is a file, not a folder")
    try:  # the flags of every run, checked before the first one trains
        parse_args([*base, *MOPE_FLAGS, "--seed", str(seeds[0]), "--train-iters", str(iters)])
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mode = "quick" if a.quick else ("paper shape" if a.shape == "paper" else "full")
    log(f"{mode}: seeds {seeds}, {iters} iterations, out {out}")
    jobs = min(a.jobs or (len(seeds) if a.shape == "paper" else 1), len(seeds))
    if os.environ.get("MPMOE_PAPER_TINY_JOB"):
        from mpmoe.supervise import die_with_launcher

        die_with_launcher(force=True)  # a seed's job ends with the run that started it
    elif jobs > 1:
        train_seeds_in_parallel(list(argv), seeds, jobs, out)

    groups = {"MoPE": [], "top-k": [], f"MoPE + prior {a.shrinkage:g}": []}
    for seed in seeds:
        groups["MoPE"].append(train_run(out, f"seed{seed}-mope", base, seed, "otep", iters))
        groups["top-k"].append(train_run(out, f"seed{seed}-topk", base, seed, "aux_loss", iters))
        prior_done = (out / "runs" / f"seed{seed}-mope-prior" / "done.json").is_file()
        if len(groups[f"MoPE + prior {a.shrinkage:g}"]) < cfg["side_runs"] or prior_done:
            groups[f"MoPE + prior {a.shrinkage:g}"].append(train_run(
                out, f"seed{seed}-mope-prior", base, seed, "otep", iters, ["--moe-sigma-shrinkage", str(a.shrinkage)]))
        for label, (routing, extra) in cfg.get("methods", {}).items():
            slug = label.replace(" + ", "-").replace(" ", "-").lower()
            groups.setdefault(label, []).append(train_run(out, f"seed{seed}-{slug}", base, seed, routing, iters, extra))
    t_train = time.time() - t0
    groups = {label: g for label, g in groups.items() if g}  # no prior runs with --side-runs 0
    if a.train_only:
        log(f"trained in {t_train / 60:.1f} min")
        return 0

    log("ablations (knock-out, dynamic mask, routing swap)")
    abl = {label: [ablations(r, cfg["random_draws"]) for r in groups[label]] for label in ("MoPE", "top-k")}

    tasks = {}
    if not (a.skip_eval or cfg.get("skip_eval")):
        limit = a.eval_limit or cfg["eval_limit"]
        limit = int(limit) if float(limit).is_integer() else limit
        for r_mope, r_topk in list(zip(groups["MoPE"], groups["top-k"]))[:cfg["side_runs"]]:
            tasks[r_mope["name"] + " (MoPE routing)"] = eval_tasks(r_mope, "mope", limit, out)
            tasks[r_mope["name"] + " (top-k routing)"] = eval_tasks(r_mope, "topk", limit, out)
            tasks[r_topk["name"] + " (top-k)"] = eval_tasks(r_topk, "auto", limit, out)

    images = ["learning_curves.png", "ablations.png"]
    plot_curves(groups, out / "learning_curves.png")
    plot_ablations(abl, out / "ablations.png")
    if not a.skip_analysis:
        from mpmoe.analysis.cli import main as analyze

        m, t = groups["MoPE"][0], groups["top-k"][0]
        log("analysis plots")
        analyze(["stats", m["dir"] + "/stats", "--compare", t["dir"] + "/stats", "--out", str(out / "analysis_stats"),
                 "--no-progress"])
        analyze(["checkpoint", "--load", m["dir"] + "/ckpt", "--compare-load", t["dir"] + "/ckpt",
                 "--stats", m["dir"] + "/stats", "--compare-stats", t["dir"] + "/stats",
                 "--out", str(out / "analysis_checkpoint"), "--no-progress", "--num-tokens", "512"])

    # ------------------------------------------------------------------ numbers
    final = {label: [r["val_loss"] for r in g] for label, g in groups.items()}
    stats = {label: mean_std(v) for label, v in final.items()}
    spread = max(stats["MoPE"][1], stats["top-k"][1])
    summary = {
        "mode": mode, "seeds": seeds, "iterations": iters, "base_flags": base,
        "wall_s": {"training": round(t_train, 1), "total": round(time.time() - t0, 1)},
        "val_loss": {label: {"per_seed": v, "mean": stats[label][0], "std": stats[label][1]}
                     for label, v in final.items()},
        "curves": {label: [r["curve"] for r in g] for label, g in groups.items()},
        "ablations": abl, "eval_tasks": tasks, "claims": CLAIMS,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    n_runs = sum(len(g) for g in groups.values())
    run_wall = sum(r.get("wall_s", 0.0) for g in groups.values() for r in g)
    summary["wall_s"]["training_runs_summed"] = round(run_wall, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    def row(label):
        m, s = stats[label]
        return f"| {label} | {m:.4f} ± {s:.4f} | " + " / ".join(f"{v:.4f}" for v in final[label]) + " |"

    lines = [f"# MP-MoE at tiny scale ({summary['mode']})", "",
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {iters} iterations each, equal compute "
             f"(same shape, batch, iterations and k for every routing). {n_runs} training runs took "
             f"{run_wall / 60:.1f} min of wall time summed over runs; this invocation "
             f"{(time.time() - t0) / 60:.1f} min.", "",
             "Flags: `" + " ".join(base) + "`", "",
             "## Validation loss", "", "| run | mean ± std | per seed |", "|---|---|---|",
             *[row(label) for label in final], "",
             "![learning curves](learning_curves.png)", "",
             "## Paper claims next to what was measured", "",
             "| claim (paper) | measured here |", "|---|---|"]
    lines.append(f"| {CLAIMS['loss']} | " + verdict(stats["MoPE"][0], stats["top-k"][0], spread,
                                                       "MoPE lower", "top-k lower") + " |")
    for label in cfg.get("methods", {}):
        lines.append(f"| (no paper claim) {label} vs top-k | " + verdict(
            stats[label][0], stats["top-k"][0], max(stats[label][1], stats["top-k"][1]),
            f"{label} lower", "top-k lower") + " |")
    for label in ("MoPE", "top-k"):
        dyn = {m: mean_std([x["dynamic"][m] for x in abl[label]]) for m in ("cooccurrence", "random")}
        lines.append(f"| {CLAIMS['dynamic']} ({label}) | k->k-1 loss change: co-occurrence "
                     f"{dyn['cooccurrence'][0]:+.4f} ± {dyn['cooccurrence'][1]:.4f}, random "
                     f"{dyn['random'][0]:+.4f} ± {dyn['random'][1]:.4f} |")
    for label in ("MoPE", "top-k"):
        ko = [(x["knockout"][l]["most_cooccurring"], x["knockout"][l]["random"]) for x in abl[label] for l in x["knockout"]]
        mc, rd = mean_std([k[0] for k in ko]), mean_std([k[1] for k in ko])
        lines.append(f"| {CLAIMS['knockout']} ({label}) | knock-out loss change, mean over layers and seeds: "
                     f"most co-occurring {mc[0]:+.4f} ± {mc[1]:.4f}, random {rd[0]:+.4f} ± {rd[1]:.4f} |")
    prior = f"MoPE + prior {a.shrinkage:g}"
    if prior in stats:
        n = len(final[prior])
        lines.append(f"| {CLAIMS['prior']} | prior {a.shrinkage:g} vs none over the first {n} seed(s): "
                     + verdict(stats[prior][0], mean_std(final["MoPE"][:n])[0], spread, "prior lower",
                               "no prior lower") + " |")
    swap = mean_std([x["topk_routing"] - x["base"] for x in abl["MoPE"]])
    lines += ["", f"MoPE checkpoints routed top-k at validation: loss change {swap[0]:+.4f} ± {swap[1]:.4f}.", "",
              "## Knock-out and dynamic mask (validation loss change)", "",
              "![ablations](ablations.png)", "",
              "| run | layer | most co-occurring expert | loss change | random expert(s) loss change |",
              "|---|---|---|---|---|"]
    for label in ("MoPE", "top-k"):
        for r, x in zip(groups[label], abl[label]):
            for l, k in x["knockout"].items():
                lines.append(f"| {r['name']} | {l} | {k['expert']} | {k['most_cooccurring']:+.4f} | {k['random']:+.4f} |")
    lines += ["", "| run | dynamic co-occurrence | dynamic random |", "|---|---|---|"]
    for label in ("MoPE", "top-k"):
        for r, x in zip(groups[label], abl[label]):
            lines.append(f"| {r['name']} | {x['dynamic']['cooccurrence']:+.4f} | {x['dynamic']['random']:+.4f} |")
    if tasks:
        keys = sorted({k for v in tasks.values() for k in v})
        lines += ["", "## Offline eval tasks (`mpmoe eval --tasks mpmoe_local`)", "",
                  "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, v in tasks.items():
            lines.append(f"| {name} | " + " | ".join(f"{v.get(k, float('nan')):.4f}" for k in keys) + " |")
    if not a.skip_analysis:
        lines += ["", "## Analysis plots", "", "Routing statistics: [analysis_stats/index.md](analysis_stats/index.md); "
                  "expert similarity, CKA, t-SNE/PCA: [analysis_checkpoint/index.md](analysis_checkpoint/index.md) "
                  f"(seed {seeds[0]}, MoPE vs top-k).", "",
                  "![co-activation and load over windows](analysis_stats/imbalance_curves.png)", ""]
        comp = json.loads((out / "analysis_stats" / "summary.json").read_text()).get("comparison", {})
        for layer, v in sorted(comp.items()):
            c = v.get("coactivation_concentration")
            if c and len(c) == 2:
                lines.append(f"- layer {layer}: co-activation concentration MoPE {c[0]:.4f}, top-k {c[1]:.4f} "
                             "(all windows, seed " + str(seeds[0]) + ")")
    lines += ["", "Winner by validation loss: " + verdict(stats["MoPE"][0], stats["top-k"][0], spread,
                                                         "MoPE", "top-k") + ".", ""]
    (out / "report.md").write_text("\n".join(lines))
    log(f"wrote {out / 'report.md'} ({', '.join(images)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
