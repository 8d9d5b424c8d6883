"""``mpmoe data inspect``: check an indexed dataset and summarize it.

:func:`inspect_dataset` accepts a data prefix (``PREFIX``, ``PREFIX.bin`` or
``PREFIX.idx``), a manifest (``*.manifest.json``) or a folder (every complete
.bin/.idx pair in it), validates each pair with
:class:`~mpmoe.data.indexed.IndexedReader` (a truncated or mismatched pair is a
:class:`~mpmoe.data.errors.DataError`) and returns counts, length statistics
and, given a tokenizer (or one named by the manifest), a decoded sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mpmoe.data.errors import DataError
from mpmoe.data.indexed import INCOMPLETE, IndexedReader, bin_path, idx_path, normalize_prefix


def read_manifest(path: str | os.PathLike) -> dict:
    """A data manifest (``*.manifest.json``), checked: an object whose ``outputs`` maps split
    names to ``{"prefix": ...}`` and whose optional ``tokenizer`` is an object with a string
    ``sha256`` and an int ``vocab_size``; else a one-line :class:`DataError`."""
    p = Path(path)
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"not found: {p}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{p} is not an mpmoe data manifest ({type(exc).__name__})") from None
    problem = None
    if not isinstance(m, dict):
        problem = f"a JSON {type(m).__name__}, not an object"
    elif not isinstance(m.get("outputs"), dict) or not m["outputs"]:
        problem = "no 'outputs' object naming the prefixes"
    elif not all(isinstance(o, dict) and isinstance(o.get("prefix"), str) and o["prefix"]
                 for o in m["outputs"].values()):
        problem = "an output without a 'prefix' string"
    elif "tokenizer" in m:
        tok = m["tokenizer"]
        if not isinstance(tok, dict):
            problem = "'tokenizer' is not an object"
        elif tok.get("sha256") is not None and not isinstance(tok["sha256"], str):
            problem = "tokenizer 'sha256' is not a string"
        elif tok.get("vocab_size") is not None and (isinstance(tok["vocab_size"], bool)
                                                    or not isinstance(tok["vocab_size"], int)
                                                    or tok["vocab_size"] < 1):
            problem = "tokenizer 'vocab_size' is not a positive int"
    if problem:
        raise DataError(f"{p} is not an mpmoe data manifest: {problem}")
    return m


def find_manifest(prefix: str) -> Path | None:
    """The manifest that lists ``prefix`` as an output, if any (same folder). A damaged
    manifest that mentions the prefix is an error (its tokenizer check would be skipped)."""
    folder = Path(prefix).parent
    name = Path(prefix).name
    for m in sorted(folder.glob("*.manifest.json")):
        try:
            outs = read_manifest(m)["outputs"]
        except DataError:
            try:
                mentioned = name in m.read_text(encoding="utf-8", errors="replace")
            except OSError:
                mentioned = False
            if mentioned:
                raise
            continue
        if any(Path(o["prefix"]).name == name for o in outs.values()):
            return m
    return None


def resolve_prefixes(path: str | os.PathLike) -> tuple[list[str], Path | None]:
    """(data prefixes, manifest or None) named by ``path``."""
    p = Path(path)
    if p.name.endswith(".manifest.json"):
        m = read_manifest(p)
        return [str(p.parent / o["prefix"]) for o in m["outputs"].values()], p
    # a training run makes PREFIX/cache/ next to PREFIX.bin (megatron's index cache): PREFIX
    # with its .bin/.idx is a prefix even when a folder of that name exists
    if p.is_dir() and not (bin_path(p).exists() or idx_path(p).exists()):
        prefixes = sorted({str(f)[:-4] for f in p.iterdir() if f.suffix in (".bin", ".idx")})
        if not prefixes:
            hint = " (only .incomplete files: an unfinished run)" if any(p.glob(f"*{INCOMPLETE}")) else ""
            raise DataError(f"no .bin/.idx files in {p}{hint}")
        return prefixes, None
    prefix = normalize_prefix(p)
    return [prefix], find_manifest(prefix)


def inspect_dataset(path: str | os.PathLike, *, tokenizer: str | None = None, samples: int = 1,
                    sample_tokens: int = 64, seed: int = 0) -> dict:
    """Validate and summarize the dataset(s) at ``path``; see the module docstring."""
    prefixes, manifest_path = resolve_prefixes(path)
    manifest = read_manifest(manifest_path) if manifest_path else None
    tok_name = tokenizer
    if tok_name is None and manifest:
        tok_name = manifest.get("tokenizer", {}).get("name")
    decoder = None
    if tok_name is not None:
        from mpmoe.data.tokenizer import load_tokenizer

        info = load_tokenizer(tok_name)
        if manifest and tokenizer is not None and manifest.get("tokenizer", {}).get("sha256") not in (None, info.sha256):
            raise DataError(f"tokenizer {tokenizer} differs from the one the data was written with "
                            f"({manifest['tokenizer'].get('name')}, sha256 {manifest['tokenizer']['sha256'][:12]})")
        decoder = info.build()
    rng = np.random.default_rng(seed)
    report = {"manifest": str(manifest_path) if manifest_path else None,
              "tokenizer": tok_name, "datasets": []}
    for prefix in prefixes:
        r = IndexedReader(prefix)
        lengths = r.document_lengths()
        entry = {
            "prefix": prefix, "dtype": r.dtype.name, "documents": r.num_documents,
            "sequences": r.num_sequences, "tokens": r.num_tokens,
            "doc_tokens_min": int(lengths.min()) if lengths.size else 0,
            "doc_tokens_mean": float(lengths.mean()) if lengths.size else 0.0,
            "doc_tokens_max": int(lengths.max()) if lengths.size else 0,
            "samples": [],
        }
        if r.num_tokens:
            top = int(r._bin.max()) if r.num_tokens <= 50_000_000 else None
            entry["max_token_id"] = top
            vocab = (decoder.get_vocab_size(with_added_tokens=True) if decoder is not None
                     else (manifest or {}).get("tokenizer", {}).get("vocab_size"))
            if vocab is not None and top is not None and top >= vocab:
                raise DataError(f"{prefix}: token id {top} is outside the tokenizer's vocabulary "
                                f"({vocab}): wrong tokenizer or corrupt data")
        if r.num_documents:
            picks = rng.choice(r.num_documents, size=min(samples, r.num_documents), replace=False)
            for i in sorted(int(x) for x in picks):
                ids = r.document(i)[:sample_tokens].tolist()
                s = {"document": i, "ids": ids}
                if decoder is not None:
                    s["text"] = decoder.decode(ids, skip_special_tokens=False)
                entry["samples"].append(s)
        report["datasets"].append(entry)
    return report


def format_report(report: dict) -> str:
    lines = []
    if report["manifest"]:
        lines.append(f"manifest:  {report['manifest']}")
    lines.append(f"tokenizer: {report['tokenizer'] or '(none; pass --tokenizer-model to decode)'}")
    for d in report["datasets"]:
        lines += [
            "",
            f"{d['prefix']}  [ok]",
            f"  documents {d['documents']:,}  tokens {d['tokens']:,}  dtype {d['dtype']}",
            f"  tokens/document min {d['doc_tokens_min']:,}  mean {d['doc_tokens_mean']:,.1f}  max {d['doc_tokens_max']:,}",
        ]
        for s in d["samples"]:
            lines.append(f"  document {s['document']}, first {len(s['ids'])} ids: {s['ids'][:16]}{' ...' if len(s['ids']) > 16 else ''}")
            if "text" in s:
                lines.append("  decoded: " + repr(s["text"]))
    return "\n".join(lines)
