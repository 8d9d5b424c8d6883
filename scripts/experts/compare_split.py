#!/usr/bin/env python
"""Compare HEMoE's ILP split with the baseline partitioners on a dense tiny model (CPU).

::

    python scripts/experts/compare_split.py OUT            # the full comparison (tiny-cpu-dense)
    python scripts/experts/compare_split.py OUT --quick    # minutes; what the test runs

1. trains the dense model (``--preset tiny-cpu-dense``, ``--dense-iters``, default 300);
2. per seed (default 1,2,3) and partitioner (``ilp``, ``moefication``, ``random-homogeneous``,
   ``random-heterogeneous`` with the ILP split's sizes via ``--sizes-from``, ``contiguous``):
   ``mpmoe experts split`` (E = 8, top-4, unit gates, 32 modules, 4 domains clustered from
   hidden states x 16 sequences, ILP limit 60 s per layer);
3. fine-tunes each split for the same budget (``--ft-iters``, default 60) with only the routers
   trainable and with everything trainable (``mpmoe train --load SPLIT --no-load-optim``),
   and the dense model for the same budget as the control;
4. measures the held-out loss (``mpmoe.store.heldout_loss``: the same windows of the
   validation split for every model) right after the split and after fine-tuning, and the
   offline ``mpmoe_local`` eval tasks after fine-tuning.

Writes ``OUT/report.md`` (mean +- std over seeds, per seed in ``OUT/summary.json``). Finished
steps in OUT are reused. At tiny scale the partitioners are not expected to separate: the report
states what was measured, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpmoe.analysis.metrics import mean_std  # noqa: E402  (shared with scripts/reproduce/)
from mpmoe.eval.scores import evaluate_checkpoint  # noqa: E402

PARTITIONERS = ("ilp", "moefication", "random-homogeneous", "random-heterogeneous", "contiguous")
QUICK_MODEL = ["--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "128",
               "--num-attention-heads", "2", "--seq-length", "64", "--max-position-embeddings", "64"]


def log(msg: str) -> None:
    print(f"[compare_split {time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: stage -> [wall s, CPU s (all threads of this process)], summed over the runs of this invocation
TIMES: dict = {}


@contextlib.contextmanager
def timed(stage: str):
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        t = TIMES.setdefault(stage, [0.0, 0.0])
        t[0] += time.perf_counter() - wall
        t[1] += time.process_time() - cpu


def _train(run: Path, argv: list) -> dict:
    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    done = run / "done.json"
    if not done.is_file():
        start = time.time()
        result = train(parse_args([*argv, "--run-dir", str(run), "--save", str(run / "ckpt"),
                                   "--no-tensorboard", "--no-progress"]))
        result["wall_s"] = round(time.time() - start, 1)
        done.write_text(json.dumps(result))
    return json.loads(done.read_text())


def _heldout(ckpt: Path, num_tokens: int) -> float:
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.store import heldout_loss, load_model

    init_distributed()
    try:
        loaded = load_model(str(ckpt), dtype="fp32")
        return float(heldout_loss(loaded, split="valid", num_tokens=num_tokens)["loss"])
    finally:
        destroy_distributed()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("out")
    p.add_argument("--quick", action="store_true", help="a smaller model, fewer steps and runs (the test)")
    p.add_argument("--seeds", default=None, help="comma-separated (default 1,2,3; quick: 1)")
    p.add_argument("--partitioners", default=None, help=f"default: all of {','.join(PARTITIONERS)}")
    p.add_argument("--dense-iters", type=int, default=None)
    p.add_argument("--ft-iters", type=int, default=None)
    p.add_argument("--ilp-time-limit", type=float, default=None)
    p.add_argument("--limit", default=None, help="documents per mpmoe_local task")
    p.add_argument("--modes", default=None, help="trainable parameters in fine-tuning: routers,all (quick: routers)")
    p.add_argument("--samples-per-domain", type=int, default=None)
    p.add_argument("--dense-load", default=None, help="use this dense checkpoint (a tiny-cpu-dense run) "
                   "instead of training one")
    p.add_argument("--embedded-cache-dir", default=None)
    a = p.parse_args(argv)
    quick = a.quick
    seeds = [int(s) for s in (a.seeds or ("1" if quick else "1,2,3")).split(",")]
    parts = (a.partitioners or ("ilp,random-heterogeneous" if quick else ",".join(PARTITIONERS))).split(",")
    parts.sort(key=lambda x: PARTITIONERS.index(x) if x in PARTITIONERS else len(PARTITIONERS))  # the ILP first
    dense_iters = a.dense_iters or (12 if quick else 300)
    ft_iters = a.ft_iters or (2 if quick else 60)
    ilp_limit = a.ilp_time_limit or (2.0 if quick else 60.0)  # mpmoe experts split's default
    limit = a.limit or ("4" if quick else "40")
    modes = (a.modes or ("routers" if quick else "routers,all")).split(",")
    eval_iters = 1 if quick else 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--preset", "tiny-cpu-dense", *(QUICK_MODEL if quick else []), "--eval-iters", str(eval_iters),
            "--log-interval", "10"]
    if a.embedded_cache_dir:
        base += ["--embedded-cache-dir", a.embedded_cache_dir]
    split_flags = ["--num-experts", "8" if not quick else "4", "--moe-router-topk", "4" if not quick else "2",
                   "--num-modules", "32" if not quick else "8", "--num-domains", "4" if not quick else "2",
                   "--samples-per-domain", str(a.samples_per_domain or (16 if not quick else 2)), "--ilp-time-limit", str(ilp_limit)]
    start = time.time()
    summary = {"quick": quick, "seeds": seeds, "partitioners": parts, "dense_iters": dense_iters,
               "ft_iters": ft_iters, "modes": modes, "split_flags": split_flags, "local_limit": limit, "runs": {}}

    if a.dense_load:
        from mpmoe.run.checkpoint import latest_iteration

        dense_ckpt = Path(a.dense_load)
        dense_iters = summary["dense_iters"] = int(latest_iteration(dense_ckpt) or 0)
    else:
        log(f"dense model, {dense_iters} iterations")
        dense_dir = out / "dense"
        with timed("dense training"):
            _train(dense_dir, [*base, "--train-iters", str(dense_iters), "--eval-interval", str(dense_iters)])
        dense_ckpt = dense_dir / "ckpt"
    heldout_tokens = 1024 if quick else 4096
    with timed("held-out loss"):
        summary["dense_val"] = _heldout(dense_ckpt, heldout_tokens)
    ft_common = ["--train-iters", str(ft_iters), "--eval-interval", str(ft_iters), "--lr-warmup-fraction", "0",
                 "--lr-decay-style", "constant", "--lr", "1e-3", "--no-load-optim", "--no-load-rng"]
    for seed in seeds:
        log(f"dense control, seed {seed}")
        ctrl = out / f"dense-ft-s{seed}"
        # a trainer checkpoint resumes its iteration count: the control runs to dense + ft iterations
        with timed("fine-tuning"):
            _train(ctrl, [*base, "--seed", str(seed), "--load", str(dense_ckpt), *ft_common,
                          "--train-iters", str(dense_iters + ft_iters), "--eval-interval", str(dense_iters + ft_iters)])
        with timed("held-out loss"):
            val = _heldout(ctrl / "ckpt", heldout_tokens)
        with timed("mpmoe_local eval"):
            local = evaluate_checkpoint(ctrl / "ckpt", out / "eval" / ctrl.name, limit=limit)
        summary["runs"][f"dense/all/s{seed}"] = {"val": val, "local": local}
        for part in parts:
            split = out / f"split-{part}-s{seed}"
            if not (split / "surgery.json").is_file() and not any(split.glob("**/surgery.json")):
                log(f"split {part} seed {seed}")
                from mpmoe.experts.split import main as split_main

                # random-heterogeneous takes the sizes of this seed's ILP split (a time-limited
                # solve run again could stop elsewhere); without an ILP split it solves its own
                ilp_split = out / f"split-ilp-s{seed}"
                same_sizes = ["--sizes-from", str(ilp_split)] if part == "random-heterogeneous" and "ilp" in parts else []
                with timed(f"split ({part})"):
                    split_main(["--load", str(dense_ckpt), "--save", str(split), "--partitioner", part,
                                "--seed", str(seed), *split_flags, *same_sizes])
            surgery = json.loads(next(split.glob("**/surgery.json")).read_text())
            with timed("held-out loss"):
                before = _heldout(split, heldout_tokens)
            for mode in modes:
                name = f"{part}-{mode}-s{seed}"
                log(f"fine-tune {name}")
                run = out / f"ft-{name}"
                with timed("fine-tuning"):
                    _train(run, ["--preset", str(split / "preset.toml"), "--load", str(split), "--seed", str(seed),
                                 "--trainable-params", mode, *ft_common, "--eval-iters", str(eval_iters),
                                 "--log-interval", "10",
                                 *(["--embedded-cache-dir", a.embedded_cache_dir] if a.embedded_cache_dir else [])])
                with timed("held-out loss"):
                    val = _heldout(run / "ckpt", heldout_tokens)
                with timed("mpmoe_local eval"):
                    local = evaluate_checkpoint(run / "ckpt", out / "eval" / run.name, limit=limit)
                summary["runs"][f"{part}/{mode}/s{seed}"] = {
                    "val_split": before, "val": val, "local": local,
                    "ilp": {k: {kk: v.get(kk) for kk in ("status", "mip_gap", "sizes_neurons")}
                            for k, v in surgery["layers"].items()}}
                _write(out, summary, start)  # after every run: an interrupted comparison still reports
    _write(out, summary, start)
    log(f"done in {summary['wall_s']} s: {out / 'report.md'}")
    return 0


def _write(out: Path, summary: dict, start: float) -> None:
    summary["wall_s"] = round(time.time() - start, 1)
    summary["cpu_s"] = round(time.process_time(), 1)  # this process, all threads, since it started
    summary["stages_s"] = {k: {"wall": round(w, 1), "cpu": round(c, 1)} for k, (w, c) in TIMES.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary))


#: the mpmoe_local numbers shown in the table (all of them are in summary.json)
SHOWN = ("mpmoe_docs_mc/acc_norm", "mpmoe_docs_lastword/acc", "mpmoe_docs_ppl/bits_per_byte")


def report(s: dict) -> str:
    fmt = lambda ms: "-" if math.isnan(ms[0]) else f"{ms[0]:.4f} ± {ms[1]:.4f}"  # noqa: E731
    lines = ["# HEMoE split vs baseline partitioners (tiny, CPU)", "",
             f"Dense model: {s['dense_iters']} iterations, held-out loss {s['dense_val']:.4f}. Each split "
             f"fine-tuned {s['ft_iters']} iterations (the dense control as many more); seeds {s['seeds']}; "
             f"mean ± std over seeds; wall {s['wall_s']} s.", "",
             "| model | trainable | held-out loss after split | after fine-tune | " + " | ".join(SHOWN) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in SHOWN) + " |"]
    groups = {}
    for key, run in s["runs"].items():
        part, mode, _ = key.split("/")
        groups.setdefault((part, mode), []).append(run)
    for (part, mode), runs in groups.items():
        cells = [fmt(mean_std([r.get("val_split") for r in runs])), fmt(mean_std([r["val"] for r in runs]))]
        cells += [fmt(mean_std([r["local"].get(k, float("nan")) for r in runs])) for k in SHOWN]
        lines.append(f"| {part} | {mode} | " + " | ".join(cells) + " |")
    if s.get("stages_s"):
        lines += ["", "Time per stage (this invocation; wall / CPU seconds, CPU summed over threads): "
                  + "; ".join(f"{k} {v['wall']} / {v['cpu']}" for k, v in s["stages_s"].items()) + "."]
    ilp = [(key, layer, v) for key, run in s["runs"].items() if key.startswith("ilp/") and key.split("/")[1] == s["modes"][0]
           for layer, v in run.get("ilp", {}).items()]
    if ilp:
        lines += ["", "ILP per seed and layer (status, MIP gap, expert sizes in neurons): " + "; ".join(
            f"{key.split('/')[2]} layer {layer}: {v['status']}, "
            f"{'-' if v['mip_gap'] is None else format(v['mip_gap'], '.1%')}, {v['sizes_neurons']}"
            for key, layer, v in ilp) + "."]
    lines += ["", "Split flags: `" + " ".join(s.get("split_flags", [])) + f"`; mpmoe_local: {s.get('local_limit')} "
              "documents per task.", "", "Per run (ILP status, MIP gap and expert sizes per layer, every mpmoe_local metric) in "
              "summary.json."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
