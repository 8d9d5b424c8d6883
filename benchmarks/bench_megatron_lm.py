"""Megatron-LM's own ``pretrain_gpt.py`` on a patched tree: MoPE vs top-k step time (GPU).

Assembles a Megatron-LM ``core_r0.19.0`` tree from the installed megatron-core wheel and
the pristine top-level scripts (as ``tests/test_megatron_lm_patches.py``), applies the
patch series, and runs ``pretrain_gpt.py`` (torchrun, one GPU, ``--mock-data``) for the
preset with ``--router mope`` and ``moe``, each for ``--iters`` iterations in bf16. Prints
and writes (``--json``) each run's median iteration time after the first ``--skip``
iterations, the ratio MoPE / top-k, and the lm losses of the last iteration.

    python benchmarks/bench_megatron_lm.py --preset flame-moe-38m --iters 20 --json out.json

``--upstream``: the folder of the pristine scripts (default
``../shared/upstream/megatron-lm-core_r0.19.0`` beside the repository, else
``shared/upstream/...`` inside it). Transformer Engine is used when it imports, else
megatron's local modules.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+) \|"
                  r".*?lm loss: (\S+) \|")
# Without Transformer Engine / Apex: megatron's local modules, no fused kernels.
LOCAL = ["--transformer-impl", "local", "--no-rope-fusion", "--no-persist-layer-norm",
         "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion",
         "--no-gradient-accumulation-fusion"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="flame-moe-38m")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--skip", type=int, default=5, help="iterations left out of the median")
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--upstream", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import megatron_lm_testing as mt  # the tree assembly of the tests
    from mpmoe.megatron_lm.flags import preset_flags

    if a.upstream:
        mt.UPSTREAM = Path(a.upstream)
    elif not mt.UPSTREAM.is_dir() and (ROOT / "shared" / "upstream" / mt.UPSTREAM.name).is_dir():
        mt.UPSTREAM = ROOT / "shared" / "upstream" / mt.UPSTREAM.name
    reason = mt.skip_reason()
    if reason:
        print(f"bench_megatron_lm: {reason}", file=sys.stderr)
        return 2
    try:
        import transformer_engine  # noqa: F401

        impl = []
    except Exception:  # noqa: BLE001 - absent or broken: megatron's local modules
        impl = LOCAL
    work = Path(tempfile.mkdtemp(prefix="bench_megatron_lm."))
    tree = mt.assemble_trees(work)["patched"]
    out = {"preset": a.preset, "iters": a.iters, "global_batch_size": a.global_batch_size,
           "transformer_impl": "local" if impl else "transformer_engine", "runs": {}}
    for router in ("mope", "moe"):
        flags = preset_flags(a.preset, router, train_iters=a.iters, mock_data=True) + impl + [
            "--bf16", "--global-batch-size", str(a.global_batch_size),
            "--micro-batch-size", str(a.micro_batch_size), "--log-interval", "1", "--eval-iters", "0",
            "--expert-model-parallel-size", "1", "--seed", "1234"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                               "--master-port", str(29500 + len(out["runs"])), "pretrain_gpt.py", *flags],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        (work / f"{router}.log").write_text(log)
        if proc.returncode != 0:
            print(log[-3000:], file=sys.stderr)
            return 1
        its = [(int(i), float(ms), float(loss)) for i, ms, loss in ITER.findall(log)]
        timed = [ms for i, ms, _ in its if i > a.skip]
        out["runs"][router] = {"median_ms": statistics.median(timed), "iterations": len(its),
                               "last_lm_loss": its[-1][2], "otep_layers_at_end": log.count(": otep ")}
        print(f"{router}: median {out['runs'][router]['median_ms']:.1f} ms/iteration over {len(timed)}, "
              f"lm loss at {its[-1][0]}: {its[-1][2]:.4f}", flush=True)
    out["ratio_mope_over_topk"] = out["runs"]["mope"]["median_ms"] / out["runs"]["moe"]["median_ms"]
    print(f"MoPE / top-k step time: {out['ratio_mope_over_topk']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
