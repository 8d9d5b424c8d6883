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


def find_manifest(prefix: str) -> Path | None:
    """The manifest that lists ``prefix`` as an output, if any (same folder)."""
    folder = Path(prefix).parent
    name = Path(prefix).name
    for m in sorted(folder.glob("*.manifest.json")):
        try:
            outs = json.loads(m.read_text(encoding="utf-8")).get("outputs", {})
        except (OSError, ValueError):
            continue
        if any(Path(o.get("prefix", "")).name == name for o in outs.values()):
            return m
    return None


def resolve_prefixes(path: str | os.PathLike) -> tuple[list[str], Path | None]:
    """(data prefixes, manifest or None) named by ``path``."""
    p = Path(path)
    if p.name.endswith(".manifest.json"):
        if not p.is_file():
            raise DataError(f"not found: {p}")
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
            return [str(p.parent / o["prefix"]) for o in m["outputs"].values()], p
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{p} is not an mpmoe data manifest") from None
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
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path else None
    tok_name = tokenizer
    if tok_name is None and manifest:
        tok_name = manifest.get("tokenizer", {}).get("name")
    decoder = None
    if tok_name is not None:
        from mpmoe.data.tokenizer import load_tokenizer

        info = load_tokenizer(tok_name)
        if manifest and tokenizer is not None and manifest["tokenizer"].get("sha256") not in (None, info.sha256):
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
            if decoder is not None and top is not None and top >= decoder.get_vocab_size(with_added_tokens=True):
                raise DataError(f"{prefix}: token id {top} is outside the tokenizer's vocabulary "
                                f"({decoder.get_vocab_size(with_added_tokens=True)}): wrong tokenizer or corrupt data")
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
