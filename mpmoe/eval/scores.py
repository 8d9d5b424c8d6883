"""Scores of one ``mpmoe eval`` run as a flat dict (what the experiment scripts tabulate).

:func:`flat_scores` turns lm-eval's ``results`` block into ``{"task/metric": value}`` (every
numeric metric, filter suffix dropped, no stderr or sample lengths); :func:`evaluate_checkpoint`
runs ``mpmoe eval`` on a checkpoint once (an existing ``DEST/results.json`` is reused) and
returns those scores. ``mpmoe eval table`` is the tool for tables over many result folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

__all__ = ["evaluate_checkpoint", "flat_scores"]


def flat_scores(results: dict) -> dict:
    """``{"task/metric": value}`` of a results.json's dict (``acc,none`` -> ``acc``)."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in key and not key.startswith("sample_len"):
                scores[f"{task}/{key.split(',')[0]}"] = value
    return scores


def evaluate_checkpoint(load, dest, *, limit, tasks: str = "mpmoe_local", extra: Sequence[str] = ()) -> dict:
    """``mpmoe eval --load LOAD --tasks TASKS --limit LIMIT --output-path DEST EXTRA`` (no progress
    bar, no bootstrap, batch 8) unless ``DEST/results.json`` exists; its :func:`flat_scores`."""
    from mpmoe.eval.cli import build_parser, evaluate

    dest = Path(dest)
    if not (dest / "results.json").is_file():
        evaluate(build_parser().parse_args(["--load", str(load), "--tasks", tasks, "--limit", str(limit),
                                            "--output-path", str(dest), "--no-progress", "--bootstrap-iters", "0",
                                            "--batch-size", "8", *extra]))
    return flat_scores(json.loads((dest / "results.json").read_text()))
