"""Training data: megatron's GPTDataset via BlendedMegatronDatasetBuilder, and batch order.

Datasets come from ``--data-path`` (Megatron prefixes + ``--split``) or, by default, the
embedded corpus (:func:`mpmoe.data.prepare_embedded`: train/valid/test prefixes and a
tokenizer). Sample order is megatron's (the GPTDataset shuffle index); which samples an
iteration reads is a pure function of the number of samples consumed so far, so resuming
needs only that number (``consumed_samples``): global batch ``i`` is samples
``[i*G, (i+1)*G)``; data-parallel rank ``r`` reads its contiguous ``G/DP`` slice, split
into micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["DataSpec", "resolve_data", "build_datasets", "micro_batches"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the tokens come from and the vocabulary the model needs."""

    blend: Optional[list]            # Megatron blend ([prefixes], [weights] | None) or None
    blend_per_split: Optional[list]  # [(train), (valid), (test)] blends or None
    split: Optional[str]
    vocab_size: int                  # tokenizer vocabulary (before padding)
    eod_id: int
    tokenizer_dir: Optional[str]
    source: str                      # "embedded" or "data-path"
    tokenizer_sha256: Optional[str] = None  # identity of the tokenizer (recorded in checkpoints)


#: ``--data-path`` files without a manifest are scanned for their largest token id up to this
#: many tokens (a memory-mapped max: about a second per 10^9 tokens); larger ones are not.
SCAN_TOKENS = 200_000_000


def check_data_path(prefixes: list[str], vocab_size: int, tokenizer=None) -> None:
    """Each ``--data-path`` prefix is a valid .bin/.idx pair whose token ids fit ``vocab_size``,
    and was written with ``tokenizer`` (a :class:`~mpmoe.data.tokenizer.TokenizerInfo`) when
    its manifest records one; else a one-line :class:`~mpmoe.data.errors.DataError`."""
    from mpmoe.data.errors import DataError
    from mpmoe.data.indexed import IndexedReader
    from mpmoe.data.validate import find_manifest, read_manifest

    for prefix in prefixes:
        reader = IndexedReader(prefix)  # truncated / garbage files: DataError naming the file
        manifest_path = find_manifest(prefix)
        recorded = {}
        if manifest_path is not None:
            recorded = read_manifest(manifest_path).get("tokenizer") or {}
        if tokenizer is not None and recorded.get("sha256") not in (None, tokenizer.sha256):
            raise DataError(f"--data-path {prefix} was tokenized with {recorded.get('name')} (sha256 "
                            f"{recorded['sha256'][:12]}, per {manifest_path.name}), not --tokenizer-model "
                            f"{tokenizer.name} (sha256 {tokenizer.sha256[:12]})")
        if recorded.get("vocab_size") is not None:
            top, what = int(recorded["vocab_size"]) - 1, f"its tokenizer's vocabulary ({recorded['vocab_size']})"
        elif 0 < reader.num_tokens <= SCAN_TOKENS:
            top, what = int(reader._bin.max()), "its largest token id"
        else:
            continue
        if top >= vocab_size:
            raise DataError(f"--data-path {prefix}: {what} needs a vocabulary of {top + 1} tokens, the model "
                            f"has {vocab_size} (--tokenizer-model / --vocab-size): wrong tokenizer or corrupt data")


def resolve_data(args) -> DataSpec:
    """The data of a run: ``--data-path`` or the embedded corpus (built once, cached)."""
    if args.data_path:
        paths = list(args.data_path)
        try:
            float(paths[0])
            blend = (paths[1::2], [float(w) for w in paths[0::2]])
        except ValueError:
            blend = (paths, None)
        info = None
        if args.tokenizer_model is not None:
            from mpmoe.data import load_tokenizer

            info = load_tokenizer(args.tokenizer_model)
            vocab, eod = int(info.vocab_size), int(info.eod_id)
            if args.vocab_size is not None and args.vocab_size < vocab:
                from mpmoe.data.errors import DataError

                raise DataError(f"--vocab-size {args.vocab_size} is smaller than --tokenizer-model "
                                f"{args.tokenizer_model}'s vocabulary ({vocab})")
        else:
            vocab, eod = args.vocab_size, 0
        check_data_path(blend[0], vocab, info)
        return DataSpec(blend=blend, blend_per_split=None, split=args.split, vocab_size=vocab,
                        eod_id=eod, tokenizer_dir=args.tokenizer_model, source="data-path",
                        tokenizer_sha256=info.sha256 if info is not None else None)
    from mpmoe.data import prepare_embedded

    from mpmoe.data import load_tokenizer

    prepared = prepare_embedded(args.embedded_cache_dir, progress=False)
    splits = [([prepared.train], None)]
    splits.append(([prepared.valid], None) if prepared.valid else None)
    splits.append(([prepared.test], None) if prepared.test else None)
    return DataSpec(blend=None, blend_per_split=splits, split=None,
                    vocab_size=prepared.vocab_size, eod_id=prepared.eod_id,
                    tokenizer_dir=prepared.tokenizer_dir, source="embedded",
                    tokenizer_sha256=load_tokenizer(prepared.tokenizer_dir).sha256)


@dataclasses.dataclass
class _DatasetTokenizer:
    """What GPTDatasetConfig reads from a tokenizer: its vocabulary size and EOD id."""

    vocab_size: int
    eod: int
    unique_identifiers: dict = dataclasses.field(default_factory=dict)


def build_datasets(spec: DataSpec, args, seed: int):
    """(train, valid, test) GPTDatasets sized for the run (valid/test may be None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    gbs = args.global_batch_size
    n_evals = args.train_iters // args.eval_interval + 1
    sizes = [args.train_iters * gbs, n_evals * args.eval_iters * gbs, args.eval_iters * gbs]
    tokenizer = _DatasetTokenizer(vocab_size=spec.vocab_size, eod=spec.eod_id)
    tokenizer.unique_identifiers = {"class": "mpmoe", "vocab_size": spec.vocab_size, "eod": spec.eod_id}
    cache = args.data_cache_path
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=args.seq_length,
        blend=spec.blend,
        blend_per_split=spec.blend_per_split,
        split=spec.split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return tuple(datasets)


def micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> Iterator[dict]:
    """This rank's micro-batches of the global batch starting at ``consumed_samples``."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples + dp_rank * per_rank
    n = len(dataset)
    for m in range(per_rank // micro_batch_size):
        idx = [(start + m * micro_batch_size + j) % n for j in range(micro_batch_size)]
        samples = [dataset[i] for i in idx]
        yield {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples])
               for k in ("tokens", "labels", "loss_mask", "position_ids")}


def describe(spec: DataSpec) -> str:
    return json.dumps({"source": spec.source, "vocab_size": spec.vocab_size,
                       "tokenizer": spec.tokenizer_dir and os.path.basename(spec.tokenizer_dir)})
