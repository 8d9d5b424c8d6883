"""Time `mpmoe export hf` and `mpmoe import hf` on a flame-moe-38m-sized model (CPU).

    python benchmarks/bench_export.py [--workdir DIR] [--routing aux_loss|otep] [--json PATH]

1. builds the flame-moe-38m model (random weights; the embedded tokenizer, so 8192 tokens
   instead of the preset's 50304) and writes it with ``mpmoe.store.save_model``;
2. exports it to a Hugging Face folder (qwen2_moe, or MoPE remote code with ``--routing otep``);
3. imports that folder back (top-k only: import reads qwen2_moe, not MoPE remote code).

Each step runs in its own process; printed: its time (the export / import call, model
loading included) and its peak resident memory above what the process held before the call
(torch, megatron and transformers imported), against the checkpoint's size on disk.
Targets: under 60 s each on 2 CPU cores, peak memory under 3x the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def phase(name: str, work: Path, routing: str) -> dict:
    import transformers  # noqa: F401 - imported before the baseline, as the verbs import it

    from mpmoe import store
    from mpmoe.data import prepare_embedded
    from mpmoe.export.hf import export_hf
    from mpmoe.export.hf_import import import_hf
    from mpmoe.megatron import init_distributed
    from mpmoe.run.args import args_from_saved
    from mpmoe.run.model import build_model, padded_vocab_size

    init_distributed()
    base = _rss_now()
    start = time.perf_counter()
    if name == "setup":
        tok = prepare_embedded(str(work / "cache"), progress=False)
        args = args_from_saved(None, ["--preset", "flame-moe-38m", "--moe-router-load-balancing-type", routing])
        args.max_position_embeddings = args.seq_length
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
        args.bf16 = args.bf16 and not os.environ.get("BENCH_FP32")  # the preset trains in bf16
        _, model, _ = build_model(args, padded_vocab_size(tok.vocab_size, 128))
        store.save_model(work / "ckpt", model, args=args, tokenizer_dir=tok.tokenizer_dir)
    elif name == "export":
        export_hf(work / "ckpt", work / "hf")
    elif name == "import":
        import_hf(work / "hf", work / "ckpt-imported")
    return {"phase": name, "seconds": time.perf_counter() - start, "peak_above_base": _rss_peak() - base,
            "peak_rss": _rss_peak()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--routing", choices=["aux_loss", "otep"], default="aux_loss")
    p.add_argument("--json", default=None)
    p.add_argument("--fp32-checkpoint", action="store_true", help="write the checkpoint in fp32 (as `mpmoe "
                   "train` on CPU does) instead of the preset's bf16")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mpmoe-bench-export-"))
    if a.phase:
        print(json.dumps(phase(a.phase, work, a.routing)))
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf-home"))
    if a.fp32_checkpoint:
        env["BENCH_FP32"] = "1"
    rows = []
    phases = ["setup", "export"] + (["import"] if a.routing == "aux_loss" else [])
    for name in phases:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--routing", a.routing,
                            "--phase", name], capture_output=True, text=True, env=env)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["process_seconds"] = time.perf_counter() - t0
        rows.append(row)
    ckpt, folder = _size(work / "ckpt"), _size(work / "hf")
    print(f"checkpoint (model only): {ckpt / 2**20:.0f} MiB; HF folder (fp32) {folder / 2**20:.0f} MiB")
    for row in rows[1:]:
        # export reads the checkpoint; import reads the folder and writes an fp32 checkpoint of its size
        ref = ckpt if row["phase"] == "export" else max(folder, _size(work / "ckpt-imported"))
        ratio = row["peak_above_base"] / ref
        print(f"{row['phase']:>6}: {row['seconds']:.1f} s (process {row['process_seconds']:.1f} s, target < 60 s); "
              f"peak memory above base {row['peak_above_base'] / 2**20:.0f} MiB = {ratio:.2f}x the "
              f"{'checkpoint' if row['phase'] == 'export' else 'folder / imported checkpoint'} (target < 3x); "
              f"peak RSS {row['peak_rss'] / 2**20:.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps({"checkpoint_bytes": ckpt, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
