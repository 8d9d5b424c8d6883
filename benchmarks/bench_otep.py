"""OTEP selection speed: mpmoe's otep_select vs torch.topk vs the demo's formulation.

For each (tokens, experts, k) it prints, measured side by side in one run
(interleaved, median of repeats), the times of

* ``torch.topk``        - plain top-k routing (the floor any router pays),
* ``otep_select``       - mpmoe: incremental pivoted Cholesky, O(T E k^2), the path
  ``otep_select`` takes by default (on CUDA with Triton: the fused kernel; on CPU: the
  blocked loop, or for T <= 64 the small-batch loop, timed as the MoPE router runs it at
  decode steps: one ``OtepCache`` kept across calls, each call on the next of
  ``DECODE_BATCHES`` different batches of probabilities, and ``torch.topk`` on the same),
* ``torch path``        - on CUDA with Triton: ``backend="torch"`` (the PyTorch loop); on CPU
  for T <= 64: the blocked loop that larger batches take (what T <= 64 took before),
* ``demo formulation``  - the MP-MoE demo's per-round recompute of
  a_j = L^-1 Sigma_Sj for every candidate (O(T E k^3)), re-implemented here
  from the spec (docs/design.md),

their ratios, and whether the selections agree (OTEP vs demo on a learned Sigma;
all three on Sigma = I, where OTEP must equal top-k).

    python benchmarks/bench_otep.py [--repeats 7] [--burst 5] [--threads N] [--shapes 16384x64x8,...]
    python benchmarks/bench_otep.py --device cuda --shapes 16384x64x8,4096x128x8,1x64x8,8x64x8,64x64x8 --json out.json

On CUDA the demo formulation is skipped and each sample is a burst of calls between two
synchronisations (time per call = burst time / burst).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from mpmoe.routing import OtepCache, otep, otep_select, otep_triton

DEFAULT_SHAPES = "16384x64x8,4096x128x8,4096x8x2"
DECODE_BATCHES = 16  # distinct probability batches a small-batch shape cycles through
EPS = 1e-12


def demo_formulation(probs: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """The demo's greedy OTEP: every round recomputes A = L^-1 Sigma_S,: for all candidates.

    Per token it keeps Linv = L^-1 (t x t, L the Cholesky factor of Sigma_SS) and
    the selected set S. Each round: A = Linv @ Sigma[S, :] (t x E), z = Linv @ p_S,
    s_j = Sigma_jj - ||A_j||^2, gain_j = (p_j - A_j . z)^2 / s_j, pick the best,
    then extend Linv by one row. Returns a bool map [T, E].
    """
    num_tokens, num_experts = probs.shape
    p = probs.float()
    sig = sigma.float()
    diag = sig.diagonal().clamp_min(EPS)
    selected = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    chosen = torch.empty(num_tokens, 0, dtype=torch.long)
    linv = torch.empty(num_tokens, 0, 0)
    for t in range(k):
        if t == 0:
            gain = p * p / diag
        else:
            sig_s = sig[chosen]  # [T, t, E]
            a = torch.bmm(linv, sig_s)  # [T, t, E]  <- recomputed every round
            z = torch.bmm(linv, p.gather(1, chosen).unsqueeze(2))  # [T, t, 1]
            s = (diag - a.pow(2).sum(1)).clamp_min(EPS)
            r = p - (a * z).sum(1)
            gain = r * r / s
        gain = gain.masked_fill(selected, -float("inf"))
        j = gain.argmax(dim=1)
        # extend L^-1 by the new row: [-(a_j^T Linv) / l, 1 / l], l = sqrt(s_j)
        if t == 0:
            l_new = diag[j].sqrt()
            new_linv = (1.0 / l_new).view(-1, 1, 1)
        else:
            a_j = a.gather(2, j.view(-1, 1, 1).expand(-1, t, 1)).squeeze(2)  # [T, t]
            l_new = s.gather(1, j.unsqueeze(1)).sqrt()  # [T, 1]
            last = -torch.bmm(a_j.unsqueeze(1), linv).squeeze(1) / l_new  # [T, t]
            new_linv = torch.zeros(num_tokens, t + 1, t + 1)
            new_linv[:, :t, :t] = linv
            new_linv[:, t, :t] = last
            new_linv[:, t, t] = 1.0 / l_new.squeeze(1)
        linv = new_linv
        chosen = torch.cat([chosen, j.unsqueeze(1)], dim=1)
        selected.scatter_(1, j.unsqueeze(1), True)
    return selected


def learned_sigma(num_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """A covariance with realistic structure: Sigma of correlated top-k routing maps."""
    g = torch.Generator().manual_seed(seed)
    tokens = 20000
    centers = torch.randn(8, num_experts, generator=g) * 2
    logits = centers[torch.randint(0, 8, (tokens,), generator=g)] + torch.randn(tokens, num_experts, generator=g)
    idx = logits.topk(k, dim=1).indices
    maps = torch.zeros(tokens, num_experts).scatter_(1, idx, 1.0)
    n = float(tokens)
    mean = maps.sum(0) / n
    sigma = maps.t() @ maps / n - torch.outer(mean, mean)
    sigma.diagonal().clamp_(min=EPS)
    return sigma


def router_probs(tokens: int, num_experts: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(tokens, num_experts, generator=g)).softmax(-1)


def blocked_loop(probs, sigma, k):
    """otep_select through the blocked loop whatever the batch size."""
    saved, otep.SMALL_BATCH = otep.SMALL_BATCH, -1
    try:
        return otep_select(probs, sigma, k, check_finite=False, backend="torch")
    finally:
        otep.SMALL_BATCH = saved


def timeit(fns: dict, repeats: int, burst: int = 5, cuda: bool = False) -> dict:
    """Median seconds per call. Rounds alternate between the functions (so machine
    noise hits all alike); within a round each runs ``burst`` calls back to back, the
    steady state a router sees layer after layer. On CUDA a sample is one burst between
    two synchronisations, divided by ``burst``."""
    for fn in fns.values():
        fn()  # warm-up (and the kernel's compilation)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(burst):
                    fn()
                torch.cuda.synchronize()
                samples[name].append((time.perf_counter() - t0) / burst)
                continue
            for _ in range(burst):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated TxExK (default: %(default)s)")
    from mpmoe.run.args import POSITIVE

    ap.add_argument("--repeats", type=POSITIVE, default=7, help="rounds (each function runs --burst calls per round)")
    ap.add_argument("--burst", type=POSITIVE, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--skip-demo", action="store_true", help="do not time the demo formulation")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.exit(2, "bench_otep: --device cuda but CUDA is not available\n")
    fused = cuda and otep_triton.available()
    skip_demo = args.skip_demo or cuda
    where = f"CUDA ({torch.cuda.get_device_name()}), fused kernel: {'yes' if fused else 'no (Triton missing)'}" if cuda \
        else f"{torch.get_num_threads()} threads, CPU"
    print(f"torch {torch.__version__}, {where}, fp32, median of {args.repeats} alternating rounds x {args.burst} calls")
    header = (f"{'T x E x k':>16} {'topk ms':>9} {'otep ms':>9} {'other ms':>9} "
              f"{'otep/topk':>10} {'other/otep':>10}  agree (other: demo; at T <= 64 on CPU or on "
              f"CUDA the PyTorch loop otep_select took before)")
    print(header)
    print("-" * len(header))
    rows = []
    for shape in args.shapes.split(","):
        try:
            tokens, num_experts, k = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            ap.error(f"--shapes: expected TxExK like 4096x64x8, got {shape!r}")
        if min(tokens, num_experts, k) < 1 or k > num_experts:
            ap.error(f"--shapes {shape}: T, E, K must be >= 1 and K <= E")
        probs = router_probs(tokens, num_experts).to(args.device)
        sigma = learned_sigma(num_experts, k).to(args.device)
        fns = {
            "topk": lambda: torch.topk(probs, k, dim=1),
            "otep": lambda: otep_select(probs, sigma, k, check_finite=False),
        }
        small = not cuda and tokens <= otep.SMALL_BATCH
        if small:  # decode: the router's kept cache over changing tokens
            batches = [router_probs(tokens, num_experts, seed=1 + i) for i in range(DECODE_BATCHES)]
            turn, cache = itertools.count(), OtepCache()
            fns["topk"] = lambda: torch.topk(batches[next(turn) % DECODE_BATCHES], k, dim=1)
            fns["otep"] = lambda: otep_select(batches[next(turn) % DECODE_BATCHES], sigma, k,
                                              check_finite=False, cache=cache)
        if fused:
            fns["torch"] = lambda: otep_select(probs, sigma, k, check_finite=False, backend="torch")
        elif small:
            fns["torch"] = lambda: blocked_loop(probs, sigma, k)
        if not skip_demo:
            fns["demo"] = lambda: demo_formulation(probs, sigma, k)
        times = timeit(fns, args.repeats, args.burst, cuda)
        ours = otep_select(probs, sigma, k)
        other = "torch" if (fused or small) else "demo"
        if small:
            same = (ours == blocked_loop(probs, sigma, k)).all(dim=1).float().mean().item()
            agree = f"small-batch loop = blocked loop on {same:.4%} of tokens"
        elif fused:
            ref = otep_select(probs, sigma, k, backend="torch")
            same = (ours == ref).all(dim=1).float().mean().item()
            agree = f"fused = torch path on {same:.4%} of tokens"
        elif skip_demo:
            same, agree = None, "n/a"
        else:
            demo = demo_formulation(probs, sigma, k)
            same = (ours == demo).all(dim=1).float().mean().item()
            eye = torch.eye(num_experts)
            top = torch.zeros_like(ours).scatter_(1, probs.topk(k, dim=1).indices, True)
            same_i = (
                torch.equal(otep_select(probs, eye, k), top) and torch.equal(demo_formulation(probs, eye, k), top)
            )
            agree = f"otep = demo on {same:.4%} of tokens, identity: otep = topk = demo {'yes' if same_i else 'NO'}"
        other_ms = times.get(other, float("nan")) * 1e3
        print(
            f"{shape:>16} {times['topk'] * 1e3:9.3f} {times['otep'] * 1e3:9.3f} {other_ms:9.3f} "
            f"{times['otep'] / times['topk']:9.2f}x {times.get(other, float('nan')) / times['otep']:9.2f}x  {agree}"
        )
        rows.append({"shape": [tokens, num_experts, k], "topk_ms": times["topk"] * 1e3,
                     "otep_ms": times["otep"] * 1e3, f"{other}_ms": other_ms if other in times else None,
                     "otep_over_topk": times["otep"] / times["topk"], "agreement": same})
    if args.json:
        info = {"device": args.device, "fused_kernel": fused, "torch": torch.__version__,
                "triton": getattr(otep_triton.triton, "__version__", None), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
