"""Time ``mpmoe experts merge`` on a flame-moe-38m-sized checkpoint (64 experts x 9 layers).

    python benchmarks/bench_experts_merge.py [--calibration-tokens 32768] [--num-experts 16] [--work DIR]

Builds the flame-moe-38m preset (fp32, the embedded corpus and its tokenizer, random
weights: the time does not depend on training) and saves it with ``mpmoe.store``, then runs
``mpmoe experts merge`` (the reference's defaults: calibration on the training split,
router-logit similarity, dominant grouping, weight matching to expert 0 of every expert,
frequency-weighted merge) in this process and prints the wall time of the whole verb
(load, calibration, grouping, alignment, merge, save) and of its parts. Target: under
2 minutes on a 2-core CPU with 32768 calibration tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_source(out: Path, cache) -> Path:
    from mpmoe import store
    from mpmoe.data import prepare_embedded
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.run.args import parse_args
    from mpmoe.run.model import build_model, padded_vocab_size

    flags = ["--preset", "flame-moe-38m", "--train-iters", "1", "--no-bf16"]
    if cache:
        flags += ["--embedded-cache-dir", str(cache)]
    args = parse_args(flags, check=False)
    emb = prepare_embedded(args.embedded_cache_dir, progress=False)
    init_distributed(seed=1)
    try:
        _, model, _ = build_model(args, padded_vocab_size(emb.vocab_size, args.make_vocab_size_divisible_by))
        store.save_model(out, model, args=args, tokenizer_dir=emb.tokenizer_dir)
    finally:
        destroy_distributed()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calibration-tokens", type=int, default=32768)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--work", default=None, help="folder for the two checkpoints (default: a temporary one)")
    p.add_argument("--embedded-cache-dir", default=None)
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-experts-"))
    work.mkdir(parents=True, exist_ok=True)
    src, dst = work / "source", work / "merged"
    shutil.rmtree(dst, ignore_errors=True)
    if not (src / "latest_checkpointed_iteration.txt").is_file():
        t = time.perf_counter()
        build_source(src, a.embedded_cache_dir)
        print(f"built flame-moe-38m source in {time.perf_counter() - t:.1f} s: {src}")
    from mpmoe.cli import main as mpmoe_main

    t = time.perf_counter()
    rc = mpmoe_main(["experts", "merge", "--load", str(src), "--save", str(dst), "--num-experts",
                     str(a.num_experts), "--calibration-tokens", str(a.calibration_tokens)])
    wall = time.perf_counter() - t
    if rc != 0:
        return rc
    print(f"mpmoe experts merge, flame-moe-38m (64 experts x 9 layers), {a.calibration_tokens} calibration "
          f"tokens, 64 -> {a.num_experts}: {wall:.1f} s wall (target < 120 s on 2 CPU cores)")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
