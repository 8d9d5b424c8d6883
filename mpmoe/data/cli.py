"""``mpmoe data``: text -> tokenizer -> Megatron indexed dataset (.bin/.idx).

Subcommands::

    mpmoe data prepare    tokenize local files, a HF dataset or the embedded corpus into .bin/.idx
    mpmoe data tokenizer  train a byte-level BPE tokenizer (tokenizer.json) on a corpus
    mpmoe data download   stream a HF dataset into local jsonl.gz shards (resumable)
    mpmoe data embedded   build (once, cached) the embedded default dataset and print its paths
    mpmoe data inspect    validate a .bin/.idx pair and show counts and a decoded sample

Bad input ends with one line ``mpmoe data: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mpmoe.data.errors import DataError
from mpmoe.errors import ArgumentParser, run_verb
from mpmoe.data.tokenizer import DEFAULT_TOKENIZER

PROG = "mpmoe data"
DEFAULT_HF_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_HF_CONFIG = "sample-10BT"


def _positive(text: str) -> int:
    try:
        v = int(float(text)) if any(c in text for c in "eE.") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _add_source_args(p: argparse.ArgumentParser, *, with_hf: bool = True) -> None:
    g = p.add_argument_group("source (exactly one)")
    g.add_argument("--input", nargs="+", metavar="PATH",
                   help="local .jsonl[.gz]/.json/.parquet/.txt/.md files or folders (searched recursively)")
    if with_hf:
        g.add_argument("--hf-dataset", metavar="ID",
                       help=f"Hugging Face dataset id or local dataset folder, streamed (e.g. {DEFAULT_HF_DATASET})")
    g.add_argument("--embedded", action="store_true",
                   help="the embedded corpus (Python docs, 2.2 MB, no download)")
    if with_hf:
        p.add_argument("--hf-config", metavar="NAME", help=f"dataset config (FineWeb-Edu: {DEFAULT_HF_CONFIG})")
        p.add_argument("--hf-split", default="train", metavar="SPLIT", help="dataset split (default: train)")
        p.add_argument("--hf-revision", metavar="REV", help="dataset revision (commit, tag or branch)")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="field/column holding the text (default: text; one key)")
    p.add_argument("--txt-mode", choices=("file", "line", "paragraph"), default="file",
                   help="documents in .txt/.md files: one per file (default), per line, or per paragraph")


def _source(args) -> object:
    from mpmoe.data.sources import HFSource, LocalSource

    chosen = [n for n in ("input", "hf_dataset", "embedded") if getattr(args, n, None)]
    if len(chosen) != 1:
        flags = "--input, --hf-dataset or --embedded" if hasattr(args, "hf_dataset") else "--input or --embedded"
        raise DataError(f"give exactly one source: {flags}")
    if len(args.json_keys) != 1:
        raise DataError(f"--json-keys: one key is supported per run, got {' '.join(args.json_keys)}")
    key = args.json_keys[0]
    if args.embedded:
        from mpmoe.data.embedded import EmbeddedSource

        return EmbeddedSource()
    if args.input:
        return LocalSource(args.input, text_key=key, txt_mode=args.txt_mode)
    return HFSource(args.hf_dataset, args.hf_config, split=args.hf_split, text_key=key, revision=args.hf_revision)


def _progress(args) -> bool | None:
    return False if args.no_progress else None


def cmd_prepare(args) -> int:
    from mpmoe.data.pipeline import prepare

    if args.tokenizer_type != "HuggingFaceTokenizer":
        raise DataError(f"--tokenizer-type {args.tokenizer_type} is not supported (use HuggingFaceTokenizer)")
    m = prepare(
        _source(args), args.tokenizer_model, args.output_prefix, split=args.split, workers=args.workers,
        append_eod=args.append_eod, json_key=args.json_keys[0], eod_token=args.eod_token,
        max_docs=args.max_docs, max_tokens=args.max_tokens, progress=_progress(args),
    )
    c = m["counts"]
    el = m["elapsed_s"]
    print(f"wrote {c['documents']:,} documents, {c['tokens']:,} tokens from {c['text_bytes'] / 1e6:.1f} MB of text "
          f"in {el:.1f}s ({c['text_bytes'] / 1e6 / max(el, 1e-9):.1f} MB/s, {c['tokens'] / max(el, 1e-9):,.0f} tokens/s)")
    folder = os.path.dirname(args.output_prefix)
    for name, o in m["outputs"].items():
        print(f"  {name:5s} {os.path.join(folder, o['prefix'])}  ({o['documents']:,} documents, {o['tokens']:,} tokens)")
    print(f"  manifest {args.output_prefix}.manifest.json")
    return 0


def cmd_tokenizer(args) -> int:
    from mpmoe.data.tokenizer import train_bpe

    src = _source(args)
    out = train_bpe(iter(src), args.output_dir, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                    show_progress=_progress(args) is not False and sys.stderr.isatty())
    print(f"wrote {out}/tokenizer.json (byte-level BPE, vocab {args.vocab_size})")
    return 0


def cmd_download(args) -> int:
    from mpmoe.data.download import download_hf

    if len(args.json_keys) != 1:
        raise DataError(f"--json-keys: one key is supported per run, got {' '.join(args.json_keys)}")
    state = download_hf(
        args.hf_dataset, args.output_dir, name=args.hf_config, split=args.hf_split, text_key=args.json_keys[0],
        revision=args.hf_revision, max_docs=args.max_docs, max_bytes=args.max_bytes, shard_docs=args.shard_docs,
        progress=_progress(args),
    )
    docs = sum(s["documents"] for s in state["shards"])
    size = sum(s["text_bytes"] for s in state["shards"])
    print(f"{args.output_dir}: {len(state['shards'])} shards, {docs:,} documents, {size / 1e6:.1f} MB of text"
          f"{' (whole split)' if state.get('complete') else ''}")
    return 0


def cmd_embedded(args) -> int:
    from mpmoe.data.embedded import prepare_embedded

    p = prepare_embedded(args.cache_dir, vocab_size=args.vocab_size, split=args.split, workers=args.workers,
                         force=args.force, progress=_progress(args))
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        for k, v in p.to_dict().items():
            print(f"{k:13s} {v}")
    return 0


def cmd_inspect(args) -> int:
    from mpmoe.data.validate import format_report, inspect_dataset

    r = inspect_dataset(args.path, tokenizer=args.tokenizer_model, samples=args.samples,
                        sample_tokens=args.sample_tokens, seed=args.seed)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="text -> tokenizer -> Megatron indexed dataset (.bin/.idx)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `mpmoe data <command> --help` for its options; docs/data.md has recipes.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=ArgumentParser)

    p = sub.add_parser("prepare", help="tokenize a corpus into Megatron indexed datasets (.bin/.idx)",
                       description="Tokenize documents into PREFIX_{train,valid,test}_text_document.{bin,idx} "
                                   "plus PREFIX.manifest.json.")
    _add_source_args(p)
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", help="only HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=DEFAULT_TOKENIZER, metavar="NAME_OR_PATH",
                   help=f"HF hub id, tokenizer folder or tokenizer.json (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="e.g. data/fineweb")
    p.add_argument("--split", default="98,1,1", help="train,valid,test document weights (default 98,1,1; 1 = train only)")
    p.add_argument("--workers", type=_positive, default=1, help="tokenizer processes (default 1; output is identical)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token to every document (default: on)")
    p.add_argument("--eod-token", metavar="TOKEN", help="end-of-document token (default: the tokenizer's eos)")
    p.add_argument("--max-docs", type=_positive, metavar="N", help="stop after N documents")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="stop once N tokens are written (e.g. 1e9)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus",
                       description="Train a byte-level BPE; writes DIR/tokenizer.json (+ tokenizer_config.json).")
    _add_source_args(p, with_hf=False)
    p.add_argument("--vocab-size", type=_positive, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--min-frequency", type=_positive, default=2, help="minimum pair count to merge (default 2)")
    p.add_argument("--output-dir", required=True, metavar="DIR")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("download", help="stream a HF dataset into local jsonl.gz shards (resumable)",
                       description="Save a HF dataset's text as OUTPUT_DIR/shard-NNNNN.jsonl.gz; rerun to resume.")
    p.add_argument("--hf-dataset", default=DEFAULT_HF_DATASET, metavar="ID", help=f"default {DEFAULT_HF_DATASET}")
    p.add_argument("--hf-config", default=DEFAULT_HF_CONFIG, metavar="NAME",
                   help=f"default {DEFAULT_HF_CONFIG}; pass '' for none")
    p.add_argument("--hf-split", default="train", metavar="SPLIT")
    p.add_argument("--hf-revision", metavar="REV")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY")
    p.add_argument("--output-dir", required=True, metavar="DIR")
    p.add_argument("--max-docs", type=_positive, metavar="N")
    p.add_argument("--max-bytes", type=_positive, metavar="N", help="stop after N bytes of text (e.g. 5e9)")
    p.add_argument("--shard-docs", type=_positive, default=50_000, metavar="N", help="documents per shard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("embedded", help="build (once, cached) the embedded dataset and print its paths",
                       description="Tokenizer + train/valid/test data from the embedded corpus, in the cache.")
    p.add_argument("--cache-dir", metavar="DIR", help="default $MPMOE_CACHE or ~/.cache/mpmoe")
    p.add_argument("--vocab-size", type=_positive, default=8192)
    p.add_argument("--split", default="98,1,1")
    p.add_argument("--workers", type=_positive, default=1)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embedded)

    p = sub.add_parser("inspect", help="validate a .bin/.idx pair; counts and a decoded sample",
                       description="PATH: a data prefix, its .bin or .idx, a *.manifest.json or a folder.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--tokenizer-model", metavar="NAME_OR_PATH", help="for decoding (default: from the manifest)")
    p.add_argument("--samples", type=_positive, default=1, help="documents to show (default 1)")
    p.add_argument("--sample-tokens", type=_positive, default=64, help="tokens shown per sample (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The verb (user errors: one line ``mpmoe data: error: ...``, exit 2)."""
    return run_verb(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "hf_config", None) == "":
        args.hf_config = None
    from mpmoe.errors import folder_problem

    prefix = getattr(args, "output_prefix", None)
    for flag, value, folder in (("--output-prefix", prefix, prefix and (os.path.dirname(prefix) or ".")),
                                ("--output-dir", getattr(args, "output_dir", None), None),
                                ("--cache-dir", getattr(args, "cache_dir", None), None)):
        problem = folder_problem(folder or value) if value else None
        if problem:  # before any work (a tokenizer trained or a corpus read for nothing)
            raise DataError(f"{flag} {value}: {problem}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (no partial output was left under a final name)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
