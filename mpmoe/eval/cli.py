"""``mpmoe eval``: lm-evaluation-harness on mpmoe checkpoints.

    mpmoe eval --load CKPT --tasks mpmoe_local                 # offline tasks shipped with mpmoe
    mpmoe eval --load CKPT --tasks boolq,arc_easy --routing topk --output-path out/
    torchrun --standalone --nproc-per-node 8 -m mpmoe eval --load CKPT --tasks mmlu --num-fewshot 5
    mpmoe eval table OUT_DIR... [--out summary.md] [--csv summary.csv]
    mpmoe eval harness --model mpmoe --model_args load=CKPT --tasks ...   # lm-eval's own CLI

Writes ``results.json`` (lm-eval's results plus an ``mpmoe`` block: checkpoint, iteration,
routing, dtype, ...) and ``results.md`` (the table, also printed) to ``--output-path``;
``--log-samples`` adds ``samples_<task>.jsonl``. Tasks needing Hugging Face hub datasets
are checked before the model loads: when the hub is unreachable and a dataset is not
cached, the command stops at once naming it. Errors end with one line
``mpmoe eval: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from mpmoe.errors import ArgumentParser, UserError, run_verb
from mpmoe.eval.errors import EvalError

PROG = "mpmoe eval"


def _limit(text: str):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 and value == int(value) else value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Evaluate an mpmoe checkpoint with lm-evaluation-harness. "
                "Other forms: `mpmoe eval table DIR...` (one table from results folders) and "
                "`mpmoe eval harness ARGS` (lm-eval's own CLI with the `mpmoe` model registered).")
    m = p.add_argument_group("model")
    m.add_argument("--load", required=True, help="checkpoint: a `mpmoe train --save` folder (latest "
                   "iteration) or one iter_XXXXXXX folder")
    m.add_argument("--ckpt-step", type=int, default=None, help="iteration to load from a save folder")
    m.add_argument("--routing", choices=("auto", "mope", "topk"), default="auto",
                   help="auto: as trained; mope: OTEP with the checkpoint's Sigma; topk: plain top-k "
                        "(compare both on one MoPE checkpoint). Default auto")
    m.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="default: bf16 on CUDA, fp32 on CPU")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    m.add_argument("--model-flags", default=None,
                   help="`mpmoe train` flags as one string, for checkpoints that do not record them")
    m.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the run's --seq-length)")
    m.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix at every generated token")
    m.add_argument("--routing-dump-dir", default=None,
                   help="write every forward's routing (experts and gate weights per token) here")

    from mpmoe.megatron import settings

    settings.add_arguments(p, evaluation=True)

    t = p.add_argument_group("tasks")
    t.add_argument("--tasks", required=True, help="comma-separated lm-eval task / group names "
                   "(mpmoe's offline tasks: mpmoe_local, mpmoe_docs_mc, mpmoe_docs_gen, "
                   "mpmoe_docs_ppl, mpmoe_docs_lastword)")
    t.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    t.add_argument("--batch-size", type=int, default=16, help="requests per forward (default 16)")
    t.add_argument("--max-gen-toks", type=int, default=256, help="generation cap when a task sets none")
    t.add_argument("--gen-kwargs", default=None, help="generation overrides, e.g. max_gen_toks=64,until=Q:")
    t.add_argument("--limit", type=_limit, default=None, help="documents per task (N, or a fraction < 1)")
    t.add_argument("--include-path", action="append", default=[], help="extra folder of task YAMLs (repeatable)")
    t.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for standard errors (0: skip them)")
    t.add_argument("--seed", type=int, default=1234, help="python/numpy/torch/few-shot seeds (default 1234)")

    o = p.add_argument_group("output")
    o.add_argument("--output-path", default=None, help="results folder (default: "
                   "eval_results/<save folder name>/iter_XXXXXXX-<routing>)")
    o.add_argument("--log-samples", action="store_true", help="also write each document's requests and answers")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--verbose", action="store_true", help="lm-eval's INFO log")
    return p


def _split_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise EvalError("--tasks: no task names given")
    return names


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _default_output(load: str, step: Optional[int], routing: str) -> Path:
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from mpmoe.run.checkpoint import resolve_checkpoint

    try:
        root, _, it = resolve_checkpoint(load, step)
    except CheckpointingException as exc:
        raise EvalError(str(exc)) from None
    return Path("eval_results") / root.resolve().name / f"iter_{it:07d}-{routing}"


def _check_output(folder: Path, what: str) -> None:
    """Before any work: ``folder`` is (or can become) a writable folder."""
    from mpmoe.errors import folder_problem

    problem = folder_problem(folder)
    if problem:
        raise EvalError(f"{what} {folder}: {problem}")


def _write(out: Path, results: dict, meta: dict, log_samples: bool) -> Path:
    from lm_eval.utils import make_table

    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    payload = {"mpmoe": meta, **results}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results.json")
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    header = (f"# {meta['checkpoint']} (iteration {meta['iteration']}, routing {meta['routing']}, "
              f"{meta['dtype']})\n\n")
    (out / "results.md").write_text(header + table, encoding="utf-8")
    if log_samples and samples:
        for task, rows in samples.items():
            with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    return out


def evaluate(args) -> Optional[dict]:
    """Run one evaluation as configured by the parsed ``args``; rank 0 returns the payload."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    import mpmoe.eval.lm  # noqa: F401 - registers the "mpmoe" model
    from mpmoe.eval import TASKS_DIR
    from mpmoe.eval.hub import check_datasets

    for flag, value, minimum in (("--batch-size", args.batch_size, 1), ("--max-gen-toks", args.max_gen_toks, 1),
                                 ("--bootstrap-iters", args.bootstrap_iters, 0)):
        if value < minimum:
            raise EvalError(f"{flag} must be >= {minimum}, got {value}")
    if not Path(args.load).is_dir():  # before the task index (seconds): the likelier typo first
        raise EvalError(f"--load {args.load}: no such checkpoint folder")
    names = _split_tasks(args.tasks)
    for extra in args.include_path:
        if not Path(extra).is_dir():
            raise EvalError(f"--include-path {extra}: no such folder")
    include = [str(TASKS_DIR), *args.include_path]
    # Indexing lm-eval's thousands of built-in task YAMLs takes ~10-20 s: skip it when
    # every requested task is one of mpmoe's or in --include-path.
    manager = TaskManager(include_path=include, include_defaults=False)
    if not all(name in manager.all_tasks for name in names):
        manager = TaskManager(include_path=include)
    check_datasets(names, manager)  # before the model loads: a hub problem fails in seconds

    out = Path(args.output_path) if args.output_path else _default_output(args.load, args.ckpt_step, args.routing)
    _check_output(out, "--output-path" if args.output_path else "the results folder")
    if args.routing_dump_dir:
        _check_output(Path(args.routing_dump_dir), "--routing-dump-dir")
    from mpmoe.eval.lm import MpmoeLM
    from mpmoe.megatron.settings import SETTINGS

    if args.routing_dump_dir is None and os.environ.get("EACT_SAVE", "").strip():
        args.routing_dump_dir = os.environ["EACT_SAVE"].strip()  # the demo's variable
        print(f"{PROG}: note: EACT_SAVE={args.routing_dump_dir!r} sets --routing-dump-dir", file=sys.stderr)

    start = time.perf_counter()
    lm = MpmoeLM(load=args.load, routing=args.routing, dtype=args.dtype, device=args.device,
                 batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                 ckpt_step=args.ckpt_step, tokenizer=args.tokenizer, model_flags=args.model_flags,
                 kv_cache=not args.no_kv_cache, routing_dump_dir=args.routing_dump_dir,
                 routing_ablation={s.name: getattr(args, s.name) for s in SETTINGS if s.eval},
                 progress=not args.no_progress, seed=args.seed)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
            gen_kwargs=args.gen_kwargs, task_manager=manager,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
        if results is None or lm.rank != 0:
            return None
        em = lm.em
        meta = {"checkpoint": str(em.checkpoint.resolve()), "iteration": em.iteration,
                "routing": em.routing, "trained_routing": em.trained_routing,
                "dtype": "bf16" if em.dtype == torch.bfloat16 else "fp32",
                "device": str(em.device), "tasks": names, "num_fewshot": args.num_fewshot,
                "limit": args.limit, "batch_size": args.batch_size, "max_length": lm.max_length,
                "kv_cache": not args.no_kv_cache, "world_size": lm.world_size,
                "routing_ablation": {s.name: getattr(em.args, s.name, None) for s in SETTINGS if s.eval},
                "elapsed_s": round(time.perf_counter() - start, 3)}
        _write(out, results, meta, args.log_samples)
        print((out / "results.md").read_text(encoding="utf-8"))
        print(f"{PROG}: wrote {out / 'results.json'} and results.md in {meta['elapsed_s']:.1f} s")
        return {"mpmoe": meta, **results}
    finally:
        lm.close()


def _quiet_logs(verbose: bool) -> None:
    import warnings

    if verbose:
        return
    for name in ("lm_eval", "lm-eval", "megatron", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _harness(argv: list[str]) -> int:
    """lm-eval's own CLI, with the ``mpmoe`` model registered."""
    import mpmoe.eval.lm  # noqa: F401 - registers the "mpmoe" model
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The verb (user errors: one line ``mpmoe eval: error: ...``, exit 2)."""
    return run_verb(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list) -> int:
    # lm-eval bootstraps some standard errors (perplexity, median, ...) in a fork()ed
    # multiprocessing pool; forked from this threaded process (torch, tqdm's monitor) a worker
    # can deadlock and the evaluation hang (seen: 1 `mpmoe eval harness` run in 8). lm-eval's
    # single-process path instead (docs/eval.md); an empty DISABLE_MULTIPROC= brings the pool back.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if argv and argv[0] == "table":
        from mpmoe.eval.table import main as table_main

        return table_main(argv[1:])
    if argv and argv[0] == "harness":
        return _harness(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    _quiet_logs(args.verbose)
    try:
        evaluate(args)
    except UserError:
        raise  # printed by run_verb
    except Exception as exc:  # noqa: BLE001 - lm-eval task errors (bad YAML, missing field)
        if isinstance(exc, FileNotFoundError) or type(exc).__module__.startswith("lm_eval"):
            raise EvalError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
