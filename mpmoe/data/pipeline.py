"""Tokenize a document source into Megatron indexed datasets: :func:`prepare`.

Flow: the main process reads documents from the source and groups them into
batches (~1 MB of text); batches are tokenized in-process (``workers=1``; the
Rust tokenizer already uses every core for a batch) or by ``workers`` spawned
processes, at most ``2*workers+1`` batches in flight so memory stays flat
however large the corpus. Results are consumed in submission order, so the
output bytes do not depend on the worker count. Each document becomes one
sequence (its ids, plus the end-of-document id with ``append_eod``) in the
train, valid or test dataset chosen by a low-discrepancy sequence over the
document number (deterministic, evenly interleaved, exact proportions in the
limit). Output files appear only when everything is written (see
:class:`mpmoe.data.indexed.IndexedWriter`); the manifest, written last, marks
a finished run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from mpmoe.data.errors import DataError
from mpmoe.data.indexed import IndexedWriter, bin_path, dtype_for_vocab
from mpmoe.data.tokenizer import TokenizerInfo, load_tokenizer

SPLIT_NAMES = ("train", "valid", "test")
MANIFEST_FORMAT = "mpmoe-data/1"
BATCH_BYTES = 1 << 20  # characters of text per batch (about bytes for mostly-ASCII text)
BATCH_DOCS = 4096
_WEYL = 0x9E3779B97F4A7C15  # 2**64 / golden ratio


def parse_split(split: str | Iterable[float]) -> tuple[float, float, float]:
    """Parse ``"98,1,1"`` (or a sequence of up to 3 weights) into train/valid/test weights."""
    try:
        parts = [float(x) for x in (split.replace("/", ",").split(",") if isinstance(split, str) else split)]
    except (TypeError, ValueError):
        raise DataError(f"--split must be comma-separated numbers like 98,1,1, got {split!r}") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 or p != p for p in parts) or sum(parts) <= 0 or parts[0] <= 0:
        raise DataError(f"--split must be 1 to 3 non-negative weights with train > 0, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    return tuple(parts)  # type: ignore[return-value]


def split_thresholds(weights: tuple[float, float, float]) -> tuple[int, int]:
    """Integer thresholds on [0, 2**64) for :func:`split_of`."""
    total = sum(weights)
    t0 = int(weights[0] / total * 2**64)
    t1 = int((weights[0] + weights[1]) / total * 2**64)
    return t0, t1


def split_of(doc_number: int, thresholds: tuple[int, int]) -> int:
    """0 (train), 1 (valid) or 2 (test) for document number ``doc_number``."""
    r = (doc_number * _WEYL) & 0xFFFFFFFFFFFFFFFF
    return 0 if r < thresholds[0] else (1 if r < thresholds[1] else 2)


def output_prefixes(output_prefix: str | os.PathLike, weights, json_key: str = "text") -> dict[str, str]:
    """Output data prefix per split with non-zero weight.

    Megatron-LM's naming: ``<output-prefix>_<key>_document`` when everything is
    train, else ``<output-prefix>_<split>_<key>_document``.
    """
    base = os.fspath(output_prefix)
    active = [n for n, w in zip(SPLIT_NAMES, weights) if w > 0]
    if active == ["train"]:
        return {"train": f"{base}_{json_key}_document"}
    return {n: f"{base}_{n}_{json_key}_document" for n in active}


class Encoder:
    """Texts -> (flat token ids, per-document lengths), with EOD appended per document."""

    def __init__(self, tokenizer_json: str, eod_id: int, append_eod: bool, dtype: str) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eod_id, self.append_eod, self.dtype = eod_id, append_eod, np.dtype(dtype)
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        if self.append_eod:
            eod = self.eod_id
            for x in ids:
                x.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths


_WORKER_ENCODER: Encoder | None = None


def _worker_init(args: tuple, parallel: bool) -> None:
    global _WORKER_ENCODER
    # Ctrl-C reaches the whole process group: the parent stops and terminates the pool, so a
    # worker ignoring it keeps its KeyboardInterrupt traceback (or a BrokenPipe) off the screen
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    _WORKER_ENCODER = Encoder(*args)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(texts)


def _batches(texts: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """(non-empty documents, empty documents skipped before them), in batches of about BATCH_BYTES."""
    batch: list[str] = []
    size = skipped = 0
    for t in texts:
        if not isinstance(t, str):
            raise DataError(f"a document is a {type(t).__name__}, not a string")
        if not t or t.isspace():
            skipped += 1
            continue
        batch.append(t)
        size += len(t)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch, skipped
            batch, size, skipped = [], 0, 0
    if batch or skipped:
        yield batch, skipped


_DONE = object()


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Yield ``items`` in order, produced by a background thread ``depth`` ahead.

    Reading (file I/O, JSON parsing, HF streaming over the network) then overlaps
    with tokenization, which releases the GIL. Exceptions are re-raised here;
    closing this generator stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer
            put((_DONE, e))

    thread = threading.Thread(target=run, name="mpmoe-data-reader", daemon=True)
    thread.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is _DONE:
                return
            yield x
    finally:
        stop.set()
        thread.join(timeout=30)  # a reader blocked on the network gives up with the daemon thread


def _in_order(batches: Iterator[tuple[list[str], int]], encoder_args: tuple,
              workers: int) -> Iterator[tuple[list[str], int, tuple]]:
    """(texts, skipped, encoded) per batch, in input order; bounded look-ahead with a process pool."""
    if workers <= 1:
        enc = Encoder(*encoder_args)
        for b, skipped in batches:
            yield b, skipped, enc(b)
        return
    ctx = mp.get_context("spawn")
    cpus = os.cpu_count() or 1
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(encoder_args, workers < cpus))
    try:
        pending: deque = deque()
        window = 2 * workers + 1
        for b, skipped in batches:
            pending.append((b, skipped, pool.apply_async(_worker_encode, (b,))))
            if len(pending) >= window:
                texts, sk, res = pending.popleft()
                yield texts, sk, res.get()
        while pending:
            texts, sk, res = pending.popleft()
            yield texts, sk, res.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _Describe:
    def __init__(self, it: Iterable[str]) -> None:
        self.it = it

    def describe(self) -> dict:
        return {"type": "iterable"}

    def __iter__(self):
        return iter(self.it)


def _rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def prepare(
    source,
    tokenizer: str | os.PathLike | TokenizerInfo,
    output_prefix: str | os.PathLike,
    *,
    split: str | Iterable[float] = "98,1,1",
    workers: int = 1,
    append_eod: bool = True,
    json_key: str = "text",
    eod_token: str | None = None,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Tokenize ``source`` with ``tokenizer`` into indexed datasets under ``output_prefix``.

    Args:
        source: a source (:class:`~mpmoe.data.sources.LocalSource`,
            :class:`~mpmoe.data.sources.HFSource`,
            :class:`~mpmoe.data.embedded.EmbeddedSource`) or any iterable of strings.
        tokenizer: a name/path for :func:`~mpmoe.data.tokenizer.load_tokenizer`
            or a resolved :class:`~mpmoe.data.tokenizer.TokenizerInfo`.
        output_prefix: e.g. ``data/fineweb``; writes
            ``data/fineweb_{train,valid,test}_text_document.{bin,idx}`` (see
            :func:`output_prefixes`) and ``data/fineweb.manifest.json``.
        split: train/valid/test document weights (``"1"`` for train only).
        workers: tokenizer processes; 1 tokenizes in-process (multi-threaded).
        append_eod: append the end-of-document id to every document.
        json_key: only used in the output names (the source picks the text).
        max_docs, max_tokens: stop after this many documents / once this many
            tokens (EOD included) are written; the cut is deterministic.
        progress: tqdm bar on stderr (default: when stderr is a terminal).

    Returns:
        the manifest dict (also written as JSON next to the outputs).
    """
    from tqdm.auto import tqdm

    weights = parse_split(split)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    for name, v in (("max_docs", max_docs), ("max_tokens", max_tokens)):
        if v is not None and v < 1:
            raise DataError(f"{name} must be >= 1, got {v}")
    if not hasattr(source, "describe"):
        if isinstance(source, (str, bytes, os.PathLike)):
            raise DataError("source must be a source object or an iterable of texts, not a path")
        source = _Describe(source)
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else load_tokenizer(tokenizer, eod_token=eod_token)
    dtype = np.dtype(dtype_for_vocab(info.vocab_size))
    prefixes = output_prefixes(output_prefix, weights, json_key)
    manifest_path = Path(f"{os.fspath(output_prefix)}.manifest.json")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    thresholds = split_thresholds(weights)
    index_of = {i: name for i, name in enumerate(SPLIT_NAMES) if name in prefixes}

    skipped_empty = 0
    batches = None
    writers = {name: IndexedWriter(p, dtype) for name, p in prefixes.items()}
    docs = tokens = text_bytes = 0
    exhausted = True
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=max_docs, unit=" docs", unit_scale=True, disable=not show, dynamic_ncols=True,
               desc=f"tokenize ({workers} worker{'s' * (workers > 1)})")
    t0 = last = time.perf_counter()
    try:
        encoder_args = (info.json, info.eod_id, append_eod, dtype.name)
        batches = _prefetch(_batches(source))
        for texts, skipped, (flat, lengths) in _in_order(batches, encoder_args, workers):
            skipped_empty += skipped
            if not texts:
                continue
            ends = np.cumsum(lengths)
            start = 0
            for j, end in enumerate(ends.tolist()):
                s = split_of(docs, thresholds)
                writers[index_of[s]].add_document(flat[start:end])
                tokens += end - start
                text_bytes += len(texts[j].encode("utf-8"))
                start = end
                docs += 1
                if (max_docs is not None and docs >= max_docs) or (max_tokens is not None and tokens >= max_tokens):
                    exhausted = False
                    break
            bar.update(j + 1)
            now = time.perf_counter()
            if now - last > 0.5:
                el = now - t0
                bar.set_postfix_str(f"{_rate(tokens / el)} tok/s, {text_bytes / el / 1e6:.1f} MB/s", refresh=False)
                last = now
            if not exhausted:
                break
        elapsed = time.perf_counter() - t0
        if docs == 0:
            raise DataError("the source has no non-empty documents")
        for name in [n for n, w in writers.items() if w.num_documents == 0]:
            # megatron cannot open an empty .bin: leave the split out, say so
            writers.pop(name).abort()
            print(f"mpmoe data: warning: the {name} split got none of the {docs} documents; "
                  f"no {name} files written", file=sys.stderr)
        for w in writers.values():
            w.finish()
        manifest_path.unlink(missing_ok=True)
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if batches is not None:
            batches.close()  # stop the reader thread now (a budget may end the run early)
        bar.close()

    base = manifest_path.parent
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source.describe(),
        "tokenizer": info.describe(),
        "dtype": dtype.name,
        "append_eod": append_eod,
        "json_key": json_key,
        "split": list(weights),
        "max_docs": max_docs,
        "max_tokens": max_tokens,
        "complete_source": exhausted,
        "counts": {"documents": docs, "tokens": tokens, "text_bytes": text_bytes,
                   "skipped_empty": skipped_empty},
        "outputs": {
            name: {
                "prefix": os.path.relpath(prefixes[name], base),
                "documents": w.num_documents,
                "tokens": w.num_tokens,
                "bin_bytes": bin_path(prefixes[name]).stat().st_size,
            }
            for name, w in writers.items()
        },
    }
    tmp = manifest_path.with_name(manifest_path.name + ".incomplete")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    manifest["elapsed_s"] = elapsed
    return manifest
