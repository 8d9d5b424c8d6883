"""Helpers for the trainer tests (no tests here): a random indexed dataset and tiny flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 128


def make_indexed_dataset(directory, num_docs: int = 300, seed: int = 0, vocab: int = VOCAB) -> str:
    """A megatron .bin/.idx dataset of random documents; returns its prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    Path(directory).mkdir(parents=True, exist_ok=True)
    prefix = str(Path(directory) / "random_text_document")
    if Path(prefix + ".idx").is_file():
        return prefix
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(20, 120))
        # a learnable pattern: repeated short motifs, so the loss can go down
        motif = rng.integers(1, vocab, size=int(rng.integers(3, 8)))
        doc = np.resize(motif, n).astype(np.int64)
        doc[-1] = 0  # EOD
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_flags(prefix: str, run_dir, **overrides) -> list[str]:
    """Flags for a 2-layer MoE (4 experts, top-2, shared expert) on ``prefix``."""
    flags = {
        "preset": "tiny-cpu", "num-layers": 2, "hidden-size": 32, "ffn-hidden-size": 64,
        "num-attention-heads": 2, "num-experts": 4, "moe-router-topk": 2,
        "moe-ffn-hidden-size": 32, "moe-shared-expert-intermediate-size": 32,
        "moe-layer-freq": "[0,1]", "seq-length": 32, "max-position-embeddings": 32,
        "global-batch-size": 4, "micro-batch-size": 2, "data-path": prefix,
        "vocab-size": VOCAB, "split": "90,10,0", "train-iters": 8, "eval-interval": 4,
        "eval-iters": 1, "log-interval": 1, "lr": 3e-3, "min-lr": 3e-4,
        "lr-warmup-fraction": 0.25, "run-dir": str(run_dir), "no-tensorboard": True,
        "data-cache-path": str(Path(prefix).parent / "index-cache"),
    }
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        if v is None or v is False:
            continue
        argv.append(f"--{k}")
        if v is not True:
            argv.append(str(v))
    return argv


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
