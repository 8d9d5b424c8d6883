"""Megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``): writer and checker.

The format, as read by ``megatron.core.datasets.indexed_dataset.IndexedDataset``:

``PREFIX.bin``
    the token ids of every sequence, back to back, in one numpy dtype.
``PREFIX.idx`` (little endian)
    ``b"MMIDIDX\\x00\\x00"``, version ``u64 = 1``, dtype code ``u8``,
    sequence count ``S: u64``, document-index count ``D: u64``, then
    ``int32[S]`` sequence lengths, ``int64[S]`` byte offsets of each sequence in
    the .bin, ``int64[D]`` document boundaries (sequence indices, starting at 0,
    ending at ``S``) and, for multimodal data only, ``int8[S]`` modes.

This module writes one sequence per document (what GPT pre-training uses) and
streams: the .bin is appended to as documents arrive and only the per-document
lengths (4 bytes each) are kept in memory. Output is atomic: both files are
written under ``*.incomplete`` names and renamed by :meth:`IndexedWriter.commit`.

:class:`IndexedReader` is an independent, dependency-light reader (numpy only)
that validates a .bin/.idx pair and reports precise, one-line errors; the
tests check that megatron-core's own reader agrees with it.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from mpmoe.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEAD = struct.Struct("<9sQB")  # magic, version, dtype code
_COUNTS = struct.Struct("<QQ")  # sequence count, document-index count
HEADER_BYTES = _HEAD.size + _COUNTS.size

# numeric dtype codes of the format
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

INCOMPLETE = ".incomplete"


def dtype_for_vocab(vocab_size: int) -> type[np.number]:
    """Smallest token dtype megatron uses for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def normalize_prefix(path: str | os.PathLike) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx`` and return ``PREFIX``."""
    s = os.fspath(path)
    for ext in (".bin", ".idx"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


class IndexedWriter:
    """Streaming writer of one ``PREFIX.bin``/``PREFIX.idx`` pair (one sequence per document).

    ``add_document(ids)`` appends a document; ``finish()`` writes the index
    under a temporary name; ``commit()`` renames both files into place (the
    .idx last, so a visible .idx always has its complete .bin). ``abort()``
    removes the temporary files. Usable as a context manager that commits on
    success and aborts on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number] = np.int32) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"unsupported token dtype {self.dtype}")
        self._tmp_bin = Path(f"{bin_path(self.prefix)}{INCOMPLETE}")
        self._tmp_idx = Path(f"{idx_path(self.prefix)}{INCOMPLETE}")
        self._tmp_bin.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("i")  # int32, like the format
        self.num_tokens = 0
        self._finished = False

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document's token ids (any integer array; cast to the writer's dtype)."""
        arr = np.asarray(ids)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        n = int(arr.size)
        if n >= 2**31:
            raise DataError(f"document of {n} tokens is too long for the int32 length field")
        self._bin.write(arr.tobytes())
        self._lengths.append(n)
        self.num_tokens += n

    def finish(self) -> None:
        """Close the .bin and write the .idx (both still under temporary names)."""
        if self._finished:
            return
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        count = lengths.size
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEAD.pack(MAGIC, VERSION, _CODE_OF[self.dtype]))
            f.write(_COUNTS.pack(count, count + 1))
            f.write(lengths.tobytes())
            # byte offsets of each sequence, in chunks to bound memory on huge corpora
            start = np.int64(0)
            step = 1 << 20
            for i in range(0, count, step):
                chunk = lengths[i : i + step].astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(chunk) + start
                f.write(np.concatenate(([start], ends[:-1])).astype(np.int64).tobytes())
                start = ends[-1]
            # one sequence per document: boundaries 0, 1, ..., count
            for i in range(0, count + 1, step):
                f.write(np.arange(i, min(i + step, count + 1), dtype=np.int64).tobytes())
        self._finished = True

    def commit(self) -> None:
        """Finish if needed, then move both files to their final names (.bin first, .idx last)."""
        self.finish()
        final_idx = idx_path(self.prefix)
        final_idx.unlink(missing_ok=True)  # never pair a stale index with a new .bin
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, final_idx)

    def abort(self) -> None:
        """Close and delete the temporary files (nothing that looks complete is left)."""
        if not self._bin.closed:
            self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class IndexedReader:
    """Validating reader of a ``PREFIX.bin``/``PREFIX.idx`` pair.

    Construction checks everything that can be checked cheaply: magic, version,
    dtype code, the .idx size against its counts, document boundaries, that the
    sequence offsets match the lengths, and that the .bin holds exactly the
    bytes the index describes. Any inconsistency raises :class:`DataError`
    naming the file and the mismatch.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = normalize_prefix(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        missing = [str(p) for p in (ipath, bpath) if not p.is_file()]
        if missing:
            hint = ""
            if any(Path(f"{m}{INCOMPLETE}").exists() for m in missing):
                hint = " (an .incomplete file is there: the run that wrote it did not finish)"
            raise DataError(f"missing {' and '.join(missing)}{hint}")
        idx_size = ipath.stat().st_size
        if idx_size < HEADER_BYTES:
            raise DataError(f"{ipath} is truncated: {idx_size} bytes, less than the {HEADER_BYTES}-byte header")
        with open(ipath, "rb") as f:
            magic, version, code = _HEAD.unpack(f.read(_HEAD.size))
            seq_count, doc_count = _COUNTS.unpack(f.read(_COUNTS.size))
        if magic != MAGIC:
            raise DataError(f"{ipath} is not a Megatron indexed-dataset index (bad magic {magic!r})")
        if version != VERSION:
            raise DataError(f"{ipath}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + 12 * seq_count + 8 * doc_count
        if idx_size == expected + seq_count and seq_count:
            self.multimodal = True
        elif idx_size == expected:
            self.multimodal = False
        else:
            state = "truncated" if idx_size < expected else "longer than its header says"
            raise DataError(
                f"{ipath} is {state}: {idx_size} bytes, the header ({seq_count} sequences, "
                f"{doc_count} document boundaries) implies {expected}"
            )
        mm = np.memmap(ipath, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(mm, np.int32, seq_count, off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(mm, np.int64, seq_count, off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(mm, np.int64, doc_count, off)
        di = self.document_indices
        if doc_count == 0 or di[0] != 0 or di[-1] != seq_count or np.any(np.diff(di) < 0):
            raise DataError(f"{ipath}: corrupt document boundaries (must rise from 0 to {seq_count})")
        if np.any(self.sequence_lengths < 0):
            raise DataError(f"{ipath}: corrupt index (negative sequence length)")
        nbytes = self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        starts = np.cumsum(nbytes) - nbytes
        if not np.array_equal(starts, self.sequence_pointers):
            raise DataError(f"{ipath}: corrupt index (sequence offsets do not match the lengths)")
        self.num_sequences = int(seq_count)
        self.num_documents = int(doc_count - 1)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        want = self.num_tokens * self.dtype.itemsize
        have = bpath.stat().st_size
        if have != want:
            state = "truncated" if have < want else "longer than its index"
            raise DataError(
                f"{bpath} is {state}: {have} bytes, but {ipath} describes {self.num_tokens} "
                f"{self.dtype.name} tokens = {want} bytes (mismatched or partly written .bin/.idx pair)"
            )
        self._bin = np.memmap(bpath, dtype=self.dtype, mode="r") if want else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (all its sequences, concatenated)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(i)
        s0, s1 = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if s1 == s0:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[s0]) // self.dtype.itemsize
        stop = int(self.sequence_pointers[s1 - 1]) // self.dtype.itemsize + int(self.sequence_lengths[s1 - 1])
        return np.asarray(self._bin[start:stop])

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        csum = np.concatenate(([0], np.cumsum(self.sequence_lengths, dtype=np.int64)))
        return csum[self.document_indices[1:]] - csum[self.document_indices[:-1]]
