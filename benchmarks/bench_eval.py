"""Evaluation throughput of the lm-eval adapter: MoPE vs top-k routing, batch 1 vs batched.

Trains a tiny-cpu checkpoint for a few iterations (or takes ``--load``), loads it twice
(``routing=mope``: OTEP with the checkpoint's Sigma; ``routing=topk``: the same weights,
plain top-k) and times, on the offline tasks' real requests:

* loglikelihood requests/s (the multiple-choice task: 4 requests per document);
* generated tokens/s (greedy, the generation task's prompts, ``--max-gen-toks`` tokens each,
  no stop string so every row generates the same amount), with the KV cache;

each at batch size 1 and at ``--batch-size``. MoPE and top-k take turns batch by batch (the
order swapped every batch), so that the load of a shared machine, which drifts over seconds,
falls on both alike; each round sums its batches. Reported: the median of ``--rounds``
rounds, the batching speed-up, and the MoPE / top-k ratio as the median of the rounds'
paired ratios. ``--no-kv`` adds generation without the KV cache (recomputing the prefix each
token) for comparison.

    python benchmarks/bench_eval.py                    # tiny-cpu on CPU
    python benchmarks/bench_eval.py --load runs/x/ckpt --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def _train(save: Path, iters: int, cache: str | None) -> None:
    from mpmoe.train.cli import main

    argv = ["--train-iters", str(iters), "--save", str(save), "--run-dir", str(save.parent / "run"),
            "--eval-interval", str(iters), "--eval-iters", "1", "--log-interval", str(iters),
            "--no-tensorboard", "--no-progress"]
    if cache:
        argv += ["--embedded-cache-dir", cache]
    if main(argv) != 0:
        sys.exit("training the benchmark checkpoint failed")


def _requests(task_name: str, limit: int):
    from lm_eval.tasks import TaskManager

    from mpmoe.eval import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, verbosity="ERROR")
    task = manager.load([task_name])["tasks"][task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default=None, help="checkpoint (default: train tiny-cpu for --train-iters)")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ll-docs", type=int, default=64, help="multiple-choice documents (4 requests each)")
    p.add_argument("--gen-docs", type=int, default=32, help="generation prompts")
    p.add_argument("--max-gen-toks", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-kv", action="store_true", help="also time generation without the KV cache")
    p.add_argument("--embedded-cache-dir", default=None)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("train_iters", "batch_size", "ll_docs", "gen_docs", "max_gen_toks", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.load is not None and not Path(args.load).is_dir():
        p.error(f"--load {args.load}: no such checkpoint folder")

    import torch
    from lm_eval.api.instance import Instance

    from mpmoe.eval.lm import MpmoeLM
    from mpmoe.megatron import destroy_distributed, init_distributed

    tmp = None
    load = args.load
    if load is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_eval-")
        load = str(Path(tmp.name) / "ckpt")
        print(f"training tiny-cpu for {args.train_iters} iterations -> {load}", flush=True)
        _train(Path(load), args.train_iters, args.embedded_cache_dir)

    ll_reqs = _requests("mpmoe_docs_mc", args.ll_docs)
    gen_src = _requests("mpmoe_docs_gen", args.gen_docs)
    gen_kwargs = {"until": [], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    gen_reqs = [Instance(request_type="generate_until", doc=r.doc, arguments=(r.args[0], dict(gen_kwargs)),
                         idx=0) for r in gen_src]

    init_distributed()
    models = {mode: MpmoeLM(load=load, routing=mode, progress=False) for mode in ("mope", "topk")}
    em = models["mope"].em
    print(f"checkpoint {em.checkpoint} (iteration {em.iteration}), device {em.device}, "
          f"dtype {em.dtype}, threads {torch.get_num_threads()}, context {em.max_length}")
    print(f"{len(ll_reqs)} loglikelihood requests, {len(gen_reqs)} prompts x {args.max_gen_toks} "
          f"generated tokens\n", flush=True)

    modes = ("mope", "topk")
    configs = []
    for bs in (1, args.batch_size):
        configs.append(("loglikelihood", bs, True))
        configs.append(("generate", bs, True))
        if args.no_kv:
            configs.append(("generate", bs, False))
    # seconds[(kind, bs, kv)][mode][round], units[(kind, bs, kv)][mode]: requests or tokens per pass
    seconds: dict = {c: {m: [] for m in modes} for c in configs}
    units: dict = {c: {m: 0 for m in modes} for c in configs}

    def run(mode, cfg, chunk):
        kind, bs, kv = cfg
        lm = models[mode]
        lm.batch_size, lm.kv_cache = bs, kv
        if kind == "loglikelihood":
            return len(chunk), _time(lambda: lm.loglikelihood(chunk, disable_tqdm=True))
        before = lm.counters["generated_tokens"]
        took = _time(lambda: lm.generate_until(chunk, disable_tqdm=True))
        return lm.counters["generated_tokens"] - before, took

    for lm in models.values():  # warm-up: one small pass of each kind
        lm.batch_size = args.batch_size
        lm.loglikelihood(ll_reqs[:8], disable_tqdm=True)
        lm.generate_until(gen_reqs[:2], disable_tqdm=True)
    for r in range(args.rounds):
        for cfg in configs:
            # The two routings take turns batch by batch (first one, then the other, swapped
            # every batch), so that the machine's load, which drifts over seconds on a shared
            # host, falls on both alike; each round sums its batches.
            reqs = ll_reqs if cfg[0] == "loglikelihood" else gen_reqs
            total = {m: 0.0 for m in modes}
            count = {m: 0 for m in modes}
            for b, start in enumerate(range(0, len(reqs), cfg[1])):
                for mode in (modes if (b + r) % 2 == 0 else modes[::-1]):
                    n, took = run(mode, cfg, reqs[start:start + cfg[1]])
                    total[mode] += took
                    count[mode] += n
            for mode in modes:
                seconds[cfg][mode].append(total[mode])
                units[cfg][mode] = count[mode]
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def rate(cfg, mode):
        return units[cfg][mode] / statistics.median(seconds[cfg][mode])

    def time_ratio(cfg):
        """MoPE time / top-k time: the median over rounds of each round's paired ratio."""
        return statistics.median(a / b for a, b in zip(seconds[cfg]["mope"], seconds[cfg]["topk"]))

    print()
    print(f"{'measure':<28}{'routing':<8}{'batch':>6}{'median s':>10}{'rate':>12}")
    for cfg in configs:
        kind, bs, kv = cfg
        label = "loglikelihood requests/s" if kind == "loglikelihood" else \
            ("generated tokens/s" + ("" if kv else " (no KV)"))
        for mode in modes:
            print(f"{label:<28}{mode:<8}{bs:>6}{statistics.median(seconds[cfg][mode]):>10.3f}{rate(cfg, mode):>12.1f}")
    print()
    b = args.batch_size
    for mode in modes:
        ll = rate(("loglikelihood", b, True), mode) / rate(("loglikelihood", 1, True), mode)
        gen = rate(("generate", b, True), mode) / rate(("generate", 1, True), mode)
        print(f"batching speed-up ({mode}, batch {b} vs 1): loglikelihood {ll:.2f}x, generation {gen:.2f}x")
    for bs in (1, b):
        ll, gen = time_ratio(("loglikelihood", bs, True)), time_ratio(("generate", bs, True))
        print(f"MoPE time / top-k time (batch {bs}, median of paired rounds): loglikelihood {ll:.3f}x, "
              f"generation {gen:.3f}x; MoPE / top-k generated tokens/s {1 / gen:.3f}x")
    if args.no_kv:
        for bs in (1, b):
            kv = rate(("generate", bs, True), "mope") / rate(("generate", bs, False), "mope")
            print(f"KV cache speed-up (mope, batch {bs}): {kv:.2f}x")
    # agreement: the two routing modes score the same requests differently only through routing
    same = models["mope"].loglikelihood(ll_reqs[:16], disable_tqdm=True) == \
        models["topk"].loglikelihood(ll_reqs[:16], disable_tqdm=True)
    print(f"MoPE and top-k scores identical on 16 requests: {same} (expected False with a learned Sigma)")
    if args.json:
        rates = [{"measure": kind, "routing": mode, "batch": bs, "kv_cache": kv, "rate": rate((kind, bs, kv), mode)}
                 for (kind, bs, kv) in configs for mode in modes]
        ratios = {f"generation_mope_over_topk_tokens_per_s_batch{bs}": 1 / time_ratio(("generate", bs, True))
                  for bs in (1, b)}
        with open(args.json, "w") as f:
            json.dump({"device": str(em.device), "dtype": str(em.dtype), "rounds": args.rounds, "rates": rates,
                       **ratios}, f, indent=1)
    for lm in models.values():
        lm.close()
    destroy_distributed()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
