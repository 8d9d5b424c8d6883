"""Interim model-only checkpoint writer (replaced by ``mpmoe.store.save_model`` when it lands)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class _NoOptimizer:
    def sharded_state_dict(self, model_sd, **kwargs):
        return {}


class _NoScheduler:
    def state_dict(self):
        return {}


def save_model(out, model, *, args, tokenizer_dir=None, data: Optional[dict] = None,
               extra_files: Optional[dict] = None) -> Path:
    from mpmoe.train.checkpoint import save_checkpoint, save_tokenizer
    from mpmoe.train.loop import _jsonable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"consumed_samples": 0, "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                "data": dict(data or {})}
    save_checkpoint(out, 0, model, _NoOptimizer(), _NoScheduler(), run_info)
    if tokenizer_dir is not None:
        save_tokenizer(out, tokenizer_dir)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out
