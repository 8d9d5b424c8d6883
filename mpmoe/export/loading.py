"""Load a checkpoint for export: the one place the export driver reads models.

Goes through the shared reader (the model rebuilt from its recorded flags, tensor and
expert parallelism 1, fp32); adds what export needs beside the model: the tokenizer
folder and the vocabulary to write (the tokenizer's, or an imported model's own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

__all__ = ["ExportModel", "load_for_export"]


@dataclasses.dataclass
class ExportModel:
    model: object
    tokenizer: object
    tokenizer_dir: Path
    eod_id: int
    vocab_size: int
    hf_vocab_size: int
    max_length: int
    checkpoint: Path
    iteration: int
    routing: str
    trained_routing: str
    args: object


def load_for_export(load, *, routing: str = "auto", tokenizer=None, model_flags=None) -> ExportModel:
    from mpmoe.eval.loader import _find_tokenizer, load_eval_model
    from mpmoe.megatron import init_distributed
    from mpmoe.train.checkpoint import saved_run_info

    init_distributed()
    m = load_eval_model(load, routing=routing, dtype="fp32", tokenizer=tokenizer, model_flags=model_flags)
    data = saved_run_info(m.checkpoint).get("data") or {}
    tok_dir = _find_tokenizer(tokenizer, m.checkpoint.parent, m.checkpoint, m.args)
    if tok_dir.is_file():
        tok_dir = tok_dir.parent
    return ExportModel(
        model=m.model, tokenizer=m.tokenizer, tokenizer_dir=Path(tok_dir), eod_id=m.eod_id,
        vocab_size=m.vocab_size, hf_vocab_size=int(data.get("hf_vocab_size") or m.vocab_size),
        max_length=m.max_length, checkpoint=m.checkpoint, iteration=m.iteration, routing=m.routing,
        trained_routing=m.trained_routing, args=m.args)
