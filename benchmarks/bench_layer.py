"""Forward+backward of one megatron MoE layer: MoPE (OTEP) router vs top-k router.

Same shapes, same weights, same inputs; the two layers are timed interleaved so
that machine drift hits both alike. Prints per-variant medians and the ratio, plus
the number of device->host synchronisation calls (``.item()``, ``.cpu()``,
``.tolist()``, ``bool()/int()/float()`` of a tensor, ``.numpy()``) made by the MoPE
router's forward and backward per step (goal: 0).

    python benchmarks/bench_layer.py                  # tokens 8192, hidden 256, 64 experts, top-8, ffn 176
    python benchmarks/bench_layer.py --iters 5 --tokens 1024   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402

from mpmoe.megatron.config import MoPEConfig  # noqa: E402
from mpmoe.megatron.router import MoPERouter, TopKStatsRouter, set_training_progress  # noqa: E402

_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def count_host_syncs(counter: list):
    """Count calls of the host-synchronising Tensor methods while active."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def wrap(name, fn):
        def inner(self, *a, **k):
            counter.append(name)
            return fn(self, *a, **k)

        return inner

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def build(config, router_cls, seed):
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    spec.submodules.router = router_cls
    spec.submodules.shared_experts = None
    torch.manual_seed(seed)
    layer = build_module(spec, config=config, layer_number=1)
    layer.set_layer_number(1)
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from mpmoe.run.args import NON_NEGATIVE, POSITIVE

    ap.add_argument("--tokens", type=POSITIVE, default=8192)
    ap.add_argument("--hidden", type=POSITIVE, default=256)
    ap.add_argument("--experts", type=POSITIVE, default=64)
    ap.add_argument("--topk", type=POSITIVE, default=8)
    ap.add_argument("--ffn", type=POSITIVE, default=176)
    ap.add_argument("--iters", type=POSITIVE, default=15)
    ap.add_argument("--warmup", type=NON_NEGATIVE, default=3)
    ap.add_argument("--threads", type=NON_NEGATIVE, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.topk > args.experts:
        ap.error(f"--topk {args.topk} > --experts {args.experts}")
    if args.threads:
        torch.set_num_threads(args.threads)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()

    common = dict(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=4,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type="allgather",
        moe_router_dtype="fp32",
        moe_aux_loss_coeff=1e-2,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )
    cfg_mope = MoPEConfig(moe_router_load_balancing_type="otep", **common)
    cfg_topk = MoPEConfig(moe_router_load_balancing_type="aux_loss", **common)
    layers = {"mope": build(cfg_mope, MoPERouter, 0), "topk": build(cfg_topk, TopKStatsRouter, 0)}
    layers["mope"].load_state_dict(layers["topk"].state_dict(), strict=False)
    # Past the warm-up: OTEP is active.
    set_training_progress(layers["mope"], step=100, total_steps=100)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, 1, args.hidden, generator=g)
    grad_out = torch.randn(args.tokens, 1, args.hidden, generator=g)

    def step(layer):
        inp = x.detach().requires_grad_(True)
        out, _ = layer(inp)
        out.backward(grad_out)
        layer.zero_grad(set_to_none=True)

    times = {"mope": [], "topk": []}
    cpu_times = {"mope": [], "topk": []}
    for i in range(args.warmup + args.iters):
        for name in ("mope", "topk") if i % 2 == 0 else ("topk", "mope"):
            c0, t0 = time.process_time(), time.perf_counter()
            step(layers[name])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[name].append(dt)
                cpu_times[name].append(dc)

    # Host syncs in the MoPE router path (router forward + its backward), one step.
    router = layers["mope"].router
    inp = x.detach().requires_grad_(True)
    calls: list = []
    with count_host_syncs(calls):
        probs, routing_map = router(inp)
        (probs * torch.ones_like(probs)).sum().backward()
    router.zero_grad(set_to_none=True)
    # Router-only timing (fwd+bwd), both variants.
    rtimes = {"mope": [], "topk": []}
    for i in range(args.warmup + 3 * args.iters):
        for name in ("mope", "topk"):
            r = layers[name].router
            inp = x.detach().requires_grad_(True)
            t0 = time.perf_counter()
            probs, _ = r(inp)
            probs.sum().backward()
            dt = time.perf_counter() - t0
            r.zero_grad(set_to_none=True)
            if i >= args.warmup:
                rtimes[name].append(dt)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    cmed = {k: statistics.median(v) * 1e3 for k, v in cpu_times.items()}
    rmed = {k: statistics.median(v) * 1e3 for k, v in rtimes.items()}
    print(
        f"MoE layer fwd+bwd  tokens={args.tokens} hidden={args.hidden} experts={args.experts} "
        f"top-{args.topk} ffn={args.ffn}  threads={torch.get_num_threads()}  iters={args.iters}"
    )
    print(f"{'median':16s}{'MoPE':>10s}{'top-k':>10s}{'ratio':>8s}")
    print(f"{'layer wall ms':16s}{med['mope']:10.1f}{med['topk']:10.1f}{med['mope'] / med['topk']:8.3f}")
    print(f"{'layer cpu ms':16s}{cmed['mope']:10.1f}{cmed['topk']:10.1f}{cmed['mope'] / cmed['topk']:8.3f}")
    print(f"{'router wall ms':16s}{rmed['mope']:10.1f}{rmed['topk']:10.1f}{rmed['mope'] / rmed['topk']:8.3f}")
    print(
        f"router overhead / top-k layer (wall): {(rmed['mope'] - rmed['topk']) / med['topk']:.3f}"
        f"  (expected layer ratio {1 + (rmed['mope'] - rmed['topk']) / med['topk']:.3f})"
    )
    print(f"MoPE router host syncs per step (fwd+bwd): {len(calls)} {sorted(set(calls)) if calls else ''}")
    target = "PASS" if med["mope"] / med["topk"] <= 1.15 else "FAIL"
    print(f"target MoPE <= 1.15x top-k: {target}")

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
