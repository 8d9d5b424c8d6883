"""Training step time: MoPE (OTEP) and other routers vs megatron's top-k, side by side in one run.

Builds the preset's model once per router (``--router``, default ``mope``) plus top-k
(``aux_loss``) with the trainer's own pieces (:mod:`mpmoe.train.optim`,
:func:`mpmoe.train.loop.forward_backward`), warms both up, then times full training
steps (forward + backward over the micro-batches, gradient sync, optimizer step)
*interleaved* (MoPE, top-k, MoPE, ...) so that machine load affects both alike, and prints
the median step times, tokens/s and the ratio. On a GPU it also prints the model FLOPs
utilisation (6 x active parameters per token + attention, against the GPU's bf16 peak).

    python benchmarks/bench_train.py                       # tiny-cpu on CPU (goal: <= 1.1x)
    python benchmarks/bench_train.py --preset flame-moe-38m --steps 30   # on a GPU (goal: <= 1.03x)

MoPE routes with OTEP from the first timed step (warm-up over) and a learned Sigma
(the warm-up steps fill its counters).

    python benchmarks/bench_train.py --router mope,remoe,topk-bias,mope-bias

``--router`` takes a comma list of ``mope``, ``remoe`` (ReLU routing), ``topk-bias`` and
``mope-bias`` (expert-bias balancing), each timed against top-k in the same interleaved
loop. ReMoE's cost follows its number of experts per token: for equal active compute its
warm-up steps start with a large L1 coefficient (``--remoe-l1-init``) so that its sparsity
is near the target 1 - k/E when timing starts; the experts per token it routes while timed
is printed next to its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

# dense bf16 peak (TFLOP/s) by GPU name fragment, for the MFU estimate
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


ROUTERS = {
    "topk": ["--moe-router-load-balancing-type", "aux_loss"],
    "mope": ["--moe-router-load-balancing-type", "otep"],
    "remoe": ["--moe-router-load-balancing-type", "none", "--moe-relu-routing"],
    "topk-bias": ["--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias"],
    "mope-bias": ["--moe-router-load-balancing-type", "otep", "--moe-router-enable-expert-bias"],
}


def _build(preset: str, router_flags: list[str], extra: list[str]):
    from mpmoe.run.args import parse_args
    from mpmoe.run.model import build_model
    from mpmoe.train.optim import build_optimizer, wrap_model
    from mpmoe.run.model import count_parameters

    bf16 = [] if torch.cuda.is_available() else ["--no-bf16"]
    args = parse_args(["--preset", preset, *router_flags, "--train-iters", "1000", *bf16, *extra])
    config, model, module = build_model(args, args.vocab_size)
    wrapped, finalize = wrap_model(module, config, args)
    config.finalize_model_grads_func = finalize
    optimizer = build_optimizer(wrapped, config, args)
    config.grad_scale_func = optimizer.scale_loss
    return args, model, wrapped, optimizer, count_parameters(model)


def _batches(args, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s, b = args.seq_length, args.micro_batch_size
    for _ in range(n):
        ids = torch.randint(0, args.vocab_size, (b, s + 1), generator=g)
        yield {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
               "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def _step(run, seed: int) -> float:
    from mpmoe.megatron.remoe import update_balancing_state
    from mpmoe.megatron.router import set_training_progress
    from mpmoe.train.loop import forward_backward

    args, model, wrapped, optimizer, _ = run
    nmb = args.global_batch_size // args.micro_batch_size
    set_training_progress(model, 10**6, None)  # warm-up over: MoPE routes with OTEP
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    optimizer.zero_grad()
    wrapped.zero_grad_buffer()
    forward_backward(wrapped, _batches(args, nmb, seed), nmb, args)
    optimizer.step()
    update_balancing_state(model)  # as the trainer: ReMoE's coefficient step
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _experts_per_token(run) -> float:
    from mpmoe.megatron.remoe import ReMoERouter
    from mpmoe.megatron.router import iter_routers

    vals = [float(r.last_experts_per_token) for r in iter_routers(run[1]) if isinstance(r, ReMoERouter)]
    return sum(vals) / len(vals) if vals else float("nan")


def _flops_per_token(args, active: int) -> float:
    attn = 12 * args.num_layers * args.hidden_size * args.seq_length  # fwd+bwd QK^T and AV
    return 6 * active + attn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per router")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    p.add_argument("--router", default="mope",
                   help=f"comma list of routers timed against top-k: {', '.join(r for r in ROUTERS if r != 'topk')}")
    p.add_argument("--remoe-l1-init", type=float, default=1e-2,
                   help="ReMoE's initial L1 coefficient here (reaches the target sparsity in the warm-up)")
    p.add_argument("--remoe-warmup", type=int, default=40, help="warm-up steps of ReMoE (sparsity)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more mpmoe train flags after --")
    ns = p.parse_args(argv)
    for name in ("steps", "warmup", "threads", "remoe_warmup"):
        value = getattr(ns, name)
        if value is not None and value < (1 if name == "steps" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'steps' else 0}, got {value}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    extra = [a for a in ns.extra if a != "--"]

    from mpmoe.megatron import destroy_distributed, init_distributed

    from mpmoe.megatron.spec import resolve_backend

    init_distributed(seed=1234)
    spec = resolve_backend()
    names = [r.strip() for r in ns.router.split(",") if r.strip()]
    bad = [r for r in names if r not in ROUTERS or r == "topk"]
    if bad or not names:
        p.error(f"--router: unknown {', '.join(bad) or '(empty)'}; choose from "
                f"{', '.join(r for r in ROUTERS if r != 'topk')}")
    runs = {}
    for name in names:
        flags = ROUTERS[name] + (["--moe-relu-l1-reg-coeff-init", str(ns.remoe_l1_init),
                                  "--moe-relu-l1-reg-coeff-multiplier", "1.2"] if name == "remoe" else [])
        runs[name] = _build(ns.preset, flags, extra)
    runs["topk"] = _build(ns.preset, ROUTERS["topk"], extra)
    args = runs["topk"][0]
    tokens = args.global_batch_size * args.seq_length
    for i in range(ns.warmup):
        for run in runs.values():
            _step(run, seed=i)
    if "remoe" in runs:  # reach the target sparsity before timing (equal active compute)
        for i in range(ns.remoe_warmup):
            _step(runs["remoe"], seed=500 + i)
    times = {name: [] for name in runs}
    for i in range(ns.steps):
        for name, run in runs.items():
            times[name].append(_step(run, seed=1000 + i))
    remoe_k = _experts_per_token(runs["remoe"]) if "remoe" in runs else None
    destroy_distributed()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bench_train: preset {ns.preset}, {device}, {tokens} tokens/step "
          f"(global batch {args.global_batch_size} x seq {args.seq_length}), "
          f"{args.num_experts} experts top-{args.moe_router_topk}, {ns.steps} interleaved steps each, "
          f"{'bf16' if getattr(args, 'bf16', False) else 'fp32'}, {spec} layer spec, "
          f"{args.moe_token_dispatcher_type} dispatcher")
    med = {}
    for name, ts in times.items():
        ts = sorted(ts)
        med[name] = statistics.median(ts)
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        active = runs[name][-1]["active"]
        line = (f"  {name:9s} step {med[name] * 1e3:9.1f} ms (p10 {q(0.1) * 1e3:.1f}, p90 {q(0.9) * 1e3:.1f})"
                f"  {tokens / med[name]:10.0f} tokens/s")
        if torch.cuda.is_available():
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
            achieved = _flops_per_token(args, active) * tokens / med[name] / 1e12
            line += f"  {achieved:.1f} TFLOP/s" + (f"  MFU {achieved / peak:.1%}" if peak else "")
        if name == "remoe":
            line += f"  ({remoe_k:.2f} experts/token at the last step; top-k: {args.moe_router_topk})"
        print(line)
    goal = 1.03 if torch.cuda.is_available() else 1.1
    for name in names:
        ratio = med[name] / med["topk"]
        best = min(times[name]) / min(times["topk"])
        print(f"  {name} / top-k step time: {ratio:.3f}x by median, {best:.3f}x by fastest step "
              f"(goal <= {goal}x by median: {'met' if ratio <= goal else 'NOT met'}; on a shared machine "
              f"the fastest-step ratio is the less noisy one)")
    if ns.json:
        figures = {"preset": ns.preset, "device": device, "spec": spec, "bf16": bool(getattr(args, "bf16", False)),
                   "dispatcher": args.moe_token_dispatcher_type, "tokens_per_step": tokens,
                   "steps": ns.steps, "topk_ms": med["topk"] * 1e3}
        for name in names:
            figures.update({f"{name}_ms": med[name] * 1e3, f"{name}_ratio_median": med[name] / med["topk"],
                            f"{name}_ratio_fastest": min(times[name]) / min(times["topk"])})
        if "mope" in names:  # the names gpu_check.sh reads
            figures.update(ratio_median=figures["mope_ratio_median"], ratio_fastest=figures["mope_ratio_fastest"])
        with open(ns.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
