"""The embedded corpus and :func:`prepare_embedded`, the zero-download default dataset.

The corpus is English prose about Python that ships inside the package: the
interactive-help topics of ``pydoc_data.topics`` and the docstrings of the
standard library (1609 documents, 2.2 MB of text, 0.5 MB xz-compressed). It
is a snapshot taken from CPython 3.11.7 (``corpus/build_snapshot.py``), so it is
byte-identical on every machine and Python version.

:func:`prepare_embedded` turns it, once, into a trained byte-level BPE
tokenizer plus train/valid/test indexed datasets in a cache folder, and
returns their paths; later calls return the cached result at once. This is
what ``mpmoe train`` uses when no data is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from mpmoe.data.errors import DataError

SNAPSHOT = Path(__file__).with_name("corpus") / "pydocs.jsonl.xz"
EMBEDDED_NAME = "pydocs"
CACHE_VERSION = 1


@lru_cache(maxsize=1)
def snapshot_sha256() -> str:
    """sha256 of the compressed snapshot file (part of the cache key)."""
    if not SNAPSHOT.is_file():
        raise DataError(f"embedded corpus missing from the installation: {SNAPSHOT}")
    return hashlib.sha256(SNAPSHOT.read_bytes()).hexdigest()


def embedded_documents() -> Iterator[dict]:
    """The embedded corpus as ``{"id": ..., "text": ...}`` dicts, in a fixed order."""
    if not SNAPSHOT.is_file():
        raise DataError(f"embedded corpus missing from the installation: {SNAPSHOT}")
    with lzma.open(SNAPSHOT, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def embedded_texts() -> Iterator[str]:
    """The embedded corpus's document texts, in a fixed order."""
    for doc in embedded_documents():
        yield doc["text"]


class EmbeddedSource:
    """The embedded corpus as a pipeline source."""

    def describe(self) -> dict:
        return {"type": "embedded", "name": EMBEDDED_NAME, "snapshot_sha256": snapshot_sha256()}

    def __iter__(self) -> Iterator[str]:
        return embedded_texts()


def default_cache_dir() -> Path:
    """``$MPMOE_CACHE``, else ``$XDG_CACHE_HOME/mpmoe``, else ``~/.cache/mpmoe``."""
    if os.environ.get("MPMOE_CACHE"):
        return Path(os.environ["MPMOE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpmoe"


@dataclass(frozen=True)
class PreparedData:
    """Paths of a prepared dataset.

    ``train``/``valid``/``test`` are Megatron data prefixes (pass them to
    ``GPTDatasetConfig(blend_per_split=[([train], None), ([valid], None), ([test], None)])``
    or Megatron-LM's ``--train-data-path`` etc.); ``valid``/``test`` are None for
    a zero split. ``tokenizer_dir`` loads with ``AutoTokenizer.from_pretrained``
    or :func:`mpmoe.data.load_tokenizer`. ``vocab_size`` counts special tokens and
    ``eod_id`` is the end-of-document id appended to every document.
    """

    train: str
    valid: str | None
    test: str | None
    tokenizer_dir: str
    manifest: str
    vocab_size: int
    eod_id: int

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (several ranks may call prepare_embedded at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _split_key(split) -> str:
    from mpmoe.data.pipeline import parse_split

    return "-".join(f"{w:g}" for w in parse_split(split))


def _from_manifest(manifest_path: Path, tokenizer_dir: Path) -> PreparedData:
    from mpmoe.data.indexed import IndexedReader

    m = json.loads(manifest_path.read_text(encoding="utf-8"))
    outs = {name: info["prefix"] for name, info in m["outputs"].items()}
    base = manifest_path.parent
    resolved = {k: str(base / v) for k, v in outs.items()}
    for prefix in resolved.values():
        IndexedReader(prefix)  # raises DataError if anything is missing or inconsistent
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise DataError(f"missing {tokenizer_dir / 'tokenizer.json'}")
    return PreparedData(
        train=resolved["train"], valid=resolved.get("valid"), test=resolved.get("test"),
        tokenizer_dir=str(tokenizer_dir), manifest=str(manifest_path),
        vocab_size=m["tokenizer"]["vocab_size"], eod_id=m["tokenizer"]["eod_id"],
    )


def prepare_embedded(
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 8192,
    split: str | tuple[float, float, float] = "98,1,1",
    workers: int = 1,
    force: bool = False,
    progress: bool | None = None,
) -> PreparedData:
    """Build (once) and return the embedded dataset: tokenizer + train/valid/test indexed data.

    Args:
        cache_dir: root cache folder; default :func:`default_cache_dir`
            (``$MPMOE_CACHE`` or ``~/.cache/mpmoe``). The result lives in
            ``<cache_dir>/embedded/pydocs-<snapshot hash>-bpe<vocab>-split<split>-v<n>/``
            with ``tokenizer/`` (``tokenizer.json``, ``tokenizer_config.json``),
            ``data/pydocs_{train,valid,test}_text_document.{bin,idx}`` and
            ``data/pydocs.manifest.json``.
        vocab_size: size of the byte-level BPE trained on the corpus (>= 258).
        split: train/valid/test document weights, e.g. ``"98,1,1"``.
        workers: tokenization processes (the result does not depend on it).
        force: rebuild even if a complete cached copy exists.
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        :class:`PreparedData` with absolute paths.

    Idempotent and safe to call from several processes at once (a file lock
    serializes them; the first builds, the others reuse). A build takes a few
    seconds on 2 cores. The manifest is written last, so an interrupted build
    is redone on the next call. Raises :class:`DataError` on bad arguments.
    """
    from mpmoe.data.pipeline import prepare
    from mpmoe.data.tokenizer import train_bpe

    if vocab_size < 258:
        raise DataError(f"vocab_size must be at least 258, got {vocab_size}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = f"{EMBEDDED_NAME}-{snapshot_sha256()[:12]}-bpe{vocab_size}-split{_split_key(split)}-v{CACHE_VERSION}"
    out = (root / "embedded" / key).resolve()
    manifest = out / "data" / f"{EMBEDDED_NAME}.manifest.json"
    tok_dir = out / "tokenizer"
    with _locked(root / "embedded" / f".{key}.lock"):
        if manifest.is_file() and not force:
            try:
                return _from_manifest(manifest, tok_dir)
            except (DataError, KeyError, ValueError):
                pass  # damaged cache: rebuild below
        manifest.unlink(missing_ok=True)
        train_bpe(embedded_texts(), tok_dir, vocab_size=vocab_size)
        prepare(EmbeddedSource(), tok_dir, out / "data" / EMBEDDED_NAME, split=split,
                workers=workers, progress=progress)
        return _from_manifest(manifest, tok_dir)
