"""Data pipeline throughput: tokenize + write (MB/s of text) vs the raw tokenizer, and peak memory.

    python benchmarks/bench_data.py [--mb 24] [--vocab-size 32768] [--tokenizer-model NAME_OR_PATH]

Text: the embedded corpus (Python docs), repeated to ``--mb`` MB and written
as a jsonl file, so the pipeline figure includes reading and JSON parsing.
Tokenizer: a byte-level BPE trained on the embedded corpus (or
``--tokenizer-model``, e.g. EleutherAI/pythia-12b when it is in the HF cache).

Prints, in MB of UTF-8 text per second:
  raw        ``Tokenizer.encode_batch`` over the same texts in the same ~1 MB batches
             (the Rust tokenizer, all cores; nothing read or written)
  pipeline   ``mpmoe.data.prepare`` from the jsonl file to train/valid/test
             .bin/.idx with 1 and 2 workers, and its ratio to raw (goal >= 0.8)
and the peak resident memory of a pipeline run on a corpus of 1x and 4x the
size (separate processes; memory must not grow with the corpus).
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


def make_corpus(path: Path, mb: float) -> int:
    from mpmoe.data import embedded_texts

    texts = list(embedded_texts())
    target = int(mb * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                size += len(t.encode("utf-8"))
                if size >= target:
                    break
    return size


def batches(path: Path):
    from mpmoe.data import LocalSource
    from mpmoe.data.pipeline import BATCH_BYTES

    batch, size = [], 0
    for t in LocalSource([path]):
        batch.append(t)
        size += len(t.encode("utf-8"))
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its reaped children (pool workers)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def raw_once(data: list[list[str]], fn) -> tuple[float, float, None]:
    c0, t0 = _cpu(), time.perf_counter()
    for b in data:
        fn(b, add_special_tokens=False)
    return time.perf_counter() - t0, _cpu() - c0, None


def pipeline_once(path: Path, info, out: Path, workers: int) -> tuple[float, float, dict]:
    from mpmoe.data import LocalSource, prepare

    c0, t0 = _cpu(), time.perf_counter()
    m = prepare(LocalSource([path]), info, out / f"w{workers}", workers=workers, progress=False)
    # wall time of the whole call, pool start-up included
    return time.perf_counter() - t0, _cpu() - c0, m


def peak_rss_mb(path: Path, tok_dir: Path, out: Path, workers: int) -> tuple[float, float]:
    """(main process, largest worker) peak RSS in MB of one pipeline run in a fresh process."""
    code = (
        "import resource, sys, json\n"
        "from mpmoe.data import LocalSource, prepare\n"
        f"prepare(LocalSource([{str(path)!r}]), {str(tok_dir)!r}, {str(out)!r}, workers={workers}, progress=False)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    main_kb, child_kb = json.loads(r.stdout.strip().splitlines()[-1])
    return main_kb / 1024, child_kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=24.0, help="MB of text (default 24)")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--tokenizer-model", help="instead of the trained BPE")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    from mpmoe.data import embedded_texts, load_tokenizer, train_bpe

    with tempfile.TemporaryDirectory(prefix="mpmoe-bench-data-") as tmp:
        tmp = Path(tmp)
        if args.tokenizer_model:
            tok_dir = args.tokenizer_model
        else:
            t0 = time.perf_counter()
            tok_dir = train_bpe(embedded_texts(), tmp / "tok", vocab_size=args.vocab_size)
            print(f"trained byte-level BPE, vocab {args.vocab_size}, on the embedded corpus in "
                  f"{time.perf_counter() - t0:.1f}s")
        info = load_tokenizer(tok_dir)
        corpus = tmp / "corpus.jsonl"
        nbytes = make_corpus(corpus, args.mb)
        print(f"text: {nbytes / 1e6:.1f} MB (embedded corpus repeated), jsonl on disk; tokenizer {info.name} "
              f"(vocab {info.vocab_size}); {os.cpu_count()} CPUs")

        # The machine may be shared: interleave the measurements and keep the best of each.
        tok = info.build()
        data = list(batches(corpus))
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        runs = {
            "encode_batch": lambda: raw_once(data, tok.encode_batch),
            "encode_batch_fast": lambda: raw_once(data, tok.encode_batch_fast),
            "workers=1": lambda: pipeline_once(corpus, info, tmp / "out", 1),
            "workers=2": lambda: pipeline_once(corpus, info, tmp / "out", 2),
        }
        manifest = None
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t, cpu, m = fn()
                manifest = m or manifest
                best[name] = min(best.get(name, float("inf")), t)
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
        mbs = {k: nbytes / v / 1e6 for k, v in best.items()}
        per_cpu = {k: nbytes / v / 1e6 for k, v in best_cpu.items()}
        raw = mbs["encode_batch"]
        c = manifest["counts"]
        assert c["text_bytes"] == nbytes, (c["text_bytes"], nbytes)
        print(f"(best of {args.repeats} interleaved runs; 'MB/CPU-s' = MB of text per CPU-second of all threads"
              f" and worker processes, which other load on the machine disturbs less than wall time)")
        print(f"raw tokenizer   encode_batch       {raw:7.2f} MB/s   {per_cpu['encode_batch']:6.2f} MB/CPU-s"
              f"   ({c['tokens'] / best['encode_batch'] / 1e6:.2f}M tok/s)")
        print(f"raw tokenizer   encode_batch_fast  {mbs['encode_batch_fast']:7.2f} MB/s   "
              f"{per_cpu['encode_batch_fast']:6.2f} MB/CPU-s   (no offsets; what the pipeline calls)")
        for w in (1, 2):
            k = f"workers={w}"
            print(f"pipeline        {k}          {mbs[k]:7.2f} MB/s   {per_cpu[k]:6.2f} MB/CPU-s"
                  f"   = {mbs[k] / raw:.2f}x raw encode_batch (wall), {per_cpu[k] / per_cpu['encode_batch']:.2f}x (CPU)"
                  f"   ({c['tokens'] / best[k] / 1e6:.2f}M tok/s)")
        print(f"corpus: {c['tokens'] / 1e6:.2f}M tokens, {c['documents']:,} documents")

        if not args.skip_memory:
            small = tmp / "small.jsonl"
            big = tmp / "big.jsonl"
            s_mb = max(args.mb / 2, 4)
            make_corpus(small, s_mb)
            make_corpus(big, 4 * s_mb)
            for w in (1, 2):
                a = peak_rss_mb(small, Path(tok_dir), tmp / "mem_s", w)
                b = peak_rss_mb(big, Path(tok_dir), tmp / "mem_b", w)
                label = "main" if w == 1 else "main / worker"
                fa = f"{a[0]:.0f}" + (f" / {a[1]:.0f}" if w > 1 else "")
                fb = f"{b[0]:.0f}" + (f" / {b[1]:.0f}" if w > 1 else "")
                print(f"peak RSS MB ({label}), workers={w}: {s_mb:.0f} MB corpus {fa}   "
                      f"{4 * s_mb:.0f} MB corpus {fb}   (ratio {b[0] / a[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
