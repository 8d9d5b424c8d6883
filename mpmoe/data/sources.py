"""Document sources: local files and folders, Hugging Face datasets, the embedded corpus.

A source is an iterable of document texts (``str``) with a ``describe()``
dict for the manifest. Sources stream: nothing holds more than one file's
read buffer or one parquet row group in memory.

Local files (:class:`LocalSource`)
    ``.jsonl``/``.json`` (one JSON object per line; the text under
    ``--json-keys``, default ``text``), optionally ``.gz``/``.xz``/``.bz2``
    compressed; ``.parquet`` (the text column); ``.txt``/``.md`` (one document
    per file, per non-empty line, or per blank-line-separated paragraph). A
    folder is searched recursively for ``.jsonl[.gz|.xz|.bz2]``, ``.parquet`` and
    ``.txt``/``.md`` files, in sorted path order.
Hugging Face datasets (:class:`HFSource`)
    ``datasets.load_dataset(path, name, split=..., streaming=True)``; ``path``
    may also be a local folder of data files, or a folder written by
    ``Dataset.save_to_disk`` (read with ``load_from_disk``).
Embedded corpus (:class:`EmbeddedSource`)
    see :mod:`mpmoe.data.embedded`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mpmoe.data.errors import DataError, first_line

_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
JSONL_EXTS = (".jsonl", ".json")
TEXT_EXTS = (".txt", ".md")
TXT_MODES = ("file", "line", "paragraph")
_PARA = re.compile(r"\n[ \t]*\n+")


def _kind(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from a file name, e.g. ('jsonl', '.gz')."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _OPENERS else None
    if comp:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in JSONL_EXTS:
        return "jsonl", comp
    if ext == ".parquet" and comp is None:
        return "parquet", None
    if ext in TEXT_EXTS:
        return "text", comp
    return None, comp


def _open_text(path: Path, comp: str | None):
    if comp:
        return io.TextIOWrapper(_OPENERS[comp](path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Input files for ``paths`` (files as given; folders searched recursively, sorted)."""
    if not paths:
        raise DataError("no input given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(".")
                and _kind(f)[0] is not None and not (f.suffix == ".json" and _kind(f)[1] is None)
            )
            if not found:
                raise DataError(f"no input files (.jsonl[.gz], .parquet, .txt, .md) under {p}")
            files += found
        elif p.is_file():
            if _kind(p)[0] is None:
                raise DataError(f"unsupported input file type: {p} (use .jsonl, .json, .parquet, .txt or .md)")
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    return files


class LocalSource:
    """Documents from local jsonl / parquet / text files and folders."""

    def __init__(self, paths: list[str | os.PathLike], *, text_key: str = "text", txt_mode: str = "file") -> None:
        if txt_mode not in TXT_MODES:
            raise DataError(f"txt mode must be one of {', '.join(TXT_MODES)}, got {txt_mode!r}")
        self.paths = [str(p) for p in paths]
        self.files = expand_inputs(paths)
        self.text_key = text_key
        self.txt_mode = txt_mode

    def describe(self) -> dict:
        return {"type": "local", "inputs": self.paths, "files": len(self.files),
                "json_key": self.text_key, "txt_mode": self.txt_mode}

    def __iter__(self) -> Iterator[str]:
        for f in self.files:
            fmt, comp = _kind(f)
            try:
                if fmt == "jsonl":
                    yield from self._jsonl(f, comp)
                elif fmt == "parquet":
                    yield from self._parquet(f)
                else:
                    yield from self._text(f, comp)
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"{f}: cannot read: {first_line(e)}") from None

    def _jsonl(self, f: Path, comp: str | None) -> Iterator[str]:
        key = self.text_key
        with _open_text(f, comp) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj:
                    keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{f}:{lineno}: no key {key!r} (found {keys}); set --json-keys")
                text = obj[key]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: {key!r} is a {type(text).__name__}, not a string")
                yield text

    def _parquet(self, f: Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - depends on the install
            raise DataError("reading parquet needs `pyarrow` (pip install 'mpmoe[data]')") from None
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid etc.
            raise DataError(f"{f}: not a readable parquet file ({first_line(e)})") from None
        names = pf.schema_arrow.names
        if self.text_key not in names:
            raise DataError(f"{f}: no column {self.text_key!r} (found {', '.join(names[:8])}); set --json-keys")
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[self.text_key]):
                for text in batch.column(0).to_pylist():
                    if text is None:
                        continue
                    if not isinstance(text, str):
                        raise DataError(f"{f}: column {self.text_key!r} is not a string column")
                    yield text
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{f}: corrupt parquet file ({first_line(e)})") from None

    def _text(self, f: Path, comp: str | None) -> Iterator[str]:
        with _open_text(f, comp) as fh:
            if self.txt_mode == "file":
                yield fh.read()
            elif self.txt_mode == "line":
                for line in fh:
                    yield line.rstrip("\n")
            else:
                yield from _PARA.split(fh.read())


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


class HFSource:
    """Documents from a Hugging Face dataset, streamed (no full download).

    ``path`` is a hub id (``HuggingFaceFW/fineweb-edu``), a local folder of data
    files (loaded by ``datasets`` the same way, offline), or a folder written
    by ``save_to_disk``. ``skip`` drops that many rows first (to resume).
    """

    def __init__(self, path: str, name: str | None = None, *, split: str = "train",
                 text_key: str = "text", revision: str | None = None, skip: int = 0,
                 resume_state: dict | None = None) -> None:
        self.path, self.name, self.split = path, name, split
        self.text_key, self.revision, self.skip = text_key, revision, skip
        self.resume_state = resume_state
        self._ds = None

    def state_dict(self) -> dict | None:
        """The stream position after the last document yielded (``datasets``'
        ``IterableDataset.state_dict``), or None if unavailable. Passing it back as
        ``resume_state`` continues from there without re-reading what came before."""
        fn = getattr(self._ds, "state_dict", None)
        if fn is None:
            return None
        try:
            return fn()
        except Exception:  # older datasets, or a dataset type without resumable state
            return None

    def describe(self) -> dict:
        return {"type": "hf", "dataset": self.path, "config": self.name, "split": self.split,
                "revision": self.revision, "json_key": self.text_key}

    def _check_hub(self, where: str) -> None:
        """A hub dataset that is neither local nor cached needs the hub: when it cannot be
        reached, stop in seconds (the hub client retries for a minute)."""
        if Path(self.path).exists():
            return
        from mpmoe.data.hub import (dataset_cached, enable_offline_mode, hub_endpoint, hub_unreachable,
                                    offline_env, url_reachable)

        if dataset_cached(self.path, self.name):
            if not offline_env() and not url_reachable(hub_endpoint(), timeout=3.0):
                enable_offline_mode()  # read the cache at once
            return
        reason = hub_unreachable()
        if reason:
            raise DataError(f"cannot open HF dataset {where}: {reason}")

    def _open(self):
        try:
            import datasets
        except ImportError:  # pragma: no cover - depends on the install
            raise DataError("reading HF datasets needs `datasets` (pip install 'mpmoe[data]')") from None
        datasets.logging.set_verbosity_error()
        where = self.path + (f" ({self.name})" if self.name else "")
        try:
            local = Path(self.path)
            if _is_saved_to_disk(local):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataError(f"dataset {where} has no split {self.split!r} (has {', '.join(ds)})")
                    ds = ds[self.split]
                ds = ds.to_iterable_dataset()
            else:
                self._check_hub(where)
                ds = datasets.load_dataset(self.path, self.name, split=self.split, streaming=True,
                                           revision=self.revision)
        except DataError:
            raise
        except Exception as e:  # DatasetNotFoundError, ConnectionError, ValueError, FileNotFoundError ...
            raise DataError(f"cannot open HF dataset {where}: {first_line(e)}") from None
        features = getattr(ds, "features", None)
        if features is not None and self.text_key not in features:
            raise DataError(f"HF dataset {where} has no column {self.text_key!r} "
                            f"(found {', '.join(list(features)[:8])}); set --json-keys")
        if self.resume_state is not None:
            try:
                ds.load_state_dict(self.resume_state)
            except Exception as e:
                raise DataError(f"cannot resume HF dataset {where} from the saved position: {first_line(e)}") from None
        elif self.skip:
            ds = ds.skip(self.skip)
        self._ds = ds
        return ds, where

    def __iter__(self) -> Iterator[str]:
        ds, where = self._open()
        key = self.text_key
        try:
            for row in ds:
                text = row.get(key)
                if text is None:
                    if key not in row:
                        raise DataError(f"HF dataset {where} has no column {key!r}; set --json-keys")
                    continue
                yield text
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading HF dataset {where} failed: {first_line(e)}") from None
