"""Loaders and metrics of the offline ``mpmoe_local`` lm-eval tasks (YAML files beside this one).

lm-eval calls a task's ``custom_dataset`` as ``custom_dataset(**metadata, **dataset_kwargs)``
instead of ``datasets.load_dataset``; the loaders here read the task's JSON lines from
``data/`` next to this file (no hub, no network, no absolute path) and ignore those
keyword arguments. The data is built by :mod:`mpmoe.eval.local_tasks`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"

_WORD_CHARS = re.compile(r"[^\w\s]")


def _load(name: str) -> datasets.DatasetDict:
    path = DATA_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**_: object) -> datasets.DatasetDict:
    """``mpmoe_docs_mc``: context, choices (4 strings), gold (index of the true continuation)."""
    return _load("mpmoe_docs_mc")


def load_gen(**_: object) -> datasets.DatasetDict:
    """``mpmoe_docs_gen``: context (verbatim text ending with a line break), target (the next line)."""
    return _load("mpmoe_docs_gen")


def load_ppl(**_: object) -> datasets.DatasetDict:
    """``mpmoe_docs_ppl``: text (a held-out document, at most 4000 characters)."""
    return _load("mpmoe_docs_ppl")


def load_lastword(**_: object) -> datasets.DatasetDict:
    """``mpmoe_docs_lastword``: context (text before a sentence's last word), target (that word)."""
    return _load("mpmoe_docs_lastword")


def normalized_words(text: str) -> list[str]:
    """``text``'s words, lower-cased, with punctuation removed (words that were only punctuation vanish)."""
    return _WORD_CHARS.sub("", text.lower()).split()


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """Scores one ``mpmoe_docs_gen`` generation against the target line.

    * ``exact_match``: 1.0 when the generated line and the target have the same
      :func:`normalized_words` (case, punctuation and spacing ignored), else 0.0.
    * ``word_prefix``: the length of the common leading run of normalized words,
      divided by the target's word count (0.0 to 1.0; partial credit).
    """
    generated = normalized_words(results[0])
    target = normalized_words(doc["target"])
    prefix = 0
    for g, t in zip(generated, target):
        if g != t:
            break
        prefix += 1
    return {
        "exact_match": float(generated == target),
        "word_prefix": prefix / len(target) if target else 0.0,
    }
