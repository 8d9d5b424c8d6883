"""mpmoe.data: text -> tokenizer -> Megatron indexed dataset (.bin/.idx).

Python API (all paths may be str or Path; errors are :class:`DataError`):

- :func:`prepare_embedded` -- tokenizer + train/valid/test data from the
  embedded corpus, built once in a cache; what ``mpmoe train`` uses by default.
- :func:`prepare` -- tokenize a source into indexed datasets with a manifest.
- :class:`LocalSource`, :class:`HFSource`, :class:`EmbeddedSource` -- document sources.
- :func:`load_tokenizer`, :func:`train_bpe` -- HF tokenizers by name/path; a small trained BPE.
- :func:`download_hf` -- a HF dataset to local jsonl.gz shards, resumable.
- :func:`inspect_dataset`, :class:`IndexedReader`, :class:`IndexedWriter` -- the format.

The command line is ``mpmoe data ...`` (:mod:`mpmoe.data.cli`); docs/data.md
documents both. Importing this package is cheap: ``datasets`` and
``transformers`` are imported only when a function needs them.
"""

from mpmoe.data.download import download_hf
from mpmoe.data.embedded import (
    EmbeddedSource,
    PreparedData,
    default_cache_dir,
    embedded_documents,
    embedded_texts,
    prepare_embedded,
)
from mpmoe.data.errors import DataError
from mpmoe.data.indexed import IndexedReader, IndexedWriter, dtype_for_vocab
from mpmoe.data.pipeline import output_prefixes, parse_split, prepare
from mpmoe.data.sources import HFSource, LocalSource
from mpmoe.data.tokenizer import (
    DEFAULT_TOKENIZER,
    EOD_TOKEN,
    TokenizerInfo,
    load_tokenizer,
    tokenizer_sha256,
    train_bpe,
)
from mpmoe.data.validate import inspect_dataset

__all__ = [
    "DEFAULT_TOKENIZER", "EOD_TOKEN", "DataError", "EmbeddedSource", "HFSource", "IndexedReader",
    "IndexedWriter", "LocalSource", "PreparedData", "TokenizerInfo", "default_cache_dir", "download_hf",
    "dtype_for_vocab", "embedded_documents", "embedded_texts", "inspect_dataset", "load_tokenizer",
    "output_prefixes", "parse_split", "prepare", "prepare_embedded", "tokenizer_sha256", "train_bpe",
]
