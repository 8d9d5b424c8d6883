"""Tokenizers: any Hugging Face tokenizer by name or path, and a small trained byte-level BPE.

The pipeline tokenizes with the Rust ``tokenizers`` backend (what every "fast"
Hugging Face tokenizer wraps). :func:`load_tokenizer` resolves a name or path
once, in the main process, to a :class:`TokenizerInfo`: the backend's
serialized JSON, its hash (:func:`tokenizer_sha256`, recorded in every
manifest), the vocabulary size
and the end-of-document id. Worker processes rebuild the tokenizer from that
JSON, so they never touch the network or the HF cache.

:func:`train_bpe` trains a GPT-2-style byte-level BPE on an iterable of texts
and saves a directory (``tokenizer.json`` + ``tokenizer_config.json``) that
``transformers.AutoTokenizer.from_pretrained(DIR)`` loads offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mpmoe.data.errors import DataError, first_line

EOD_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER = "EleutherAI/pythia-12b"
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """A resolved tokenizer: what the workers need and what the manifest records."""

    name: str  # as given (hub id or path)
    json: str  # the backend tokenizer, serialized
    sha256: str  # tokenizer_sha256(json)
    vocab_size: int  # including added/special tokens
    eod_id: int
    eod_token: str

    def build(self):
        """A ``tokenizers.Tokenizer`` built from the serialized JSON (cheap, offline)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.json)

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "eod_token": self.eod_token}


# Parts of a serialized tokenizer that do not change the ids of encode(text, add_special_tokens=False);
# transformers, for one, adds a post-processor when it loads a tokenizer.json.
_NOT_HASHED = ("truncation", "padding", "post_processor")


def tokenizer_sha256(tokenizer_json: str) -> str:
    """sha256 of a serialized tokenizer, canonicalized (sorted keys) and without
    truncation, padding and post-processor: equal hashes mean equal ids in the data."""
    obj = json.loads(tokenizer_json)
    for key in _NOT_HASHED:
        obj.pop(key, None)
    canon = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _find_eod(tok, requested: str | None, configured: str | None, where: str) -> tuple[int, str]:
    names = [requested] if requested else ([configured] if configured else []) + list(_EOD_CANDIDATES)
    for name in names:
        if name:
            tid = tok.token_to_id(name)
            if tid is not None:
                return tid, name
    if requested:
        raise DataError(f"tokenizer {where} has no token {requested!r} (given as the end-of-document token)")
    raise DataError(f"tokenizer {where} has no end-of-document token; name one with --eod-token")


def _config_eos(directory: Path) -> str | None:
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        p = directory / fname
        if p.is_file():
            try:
                eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token")
            except (OSError, ValueError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def _check_hub_tokenizer(spec: str) -> None:
    """DataError at once when ``spec`` is not cached and the hub cannot be reached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(spec, name), str)
               for name in ("tokenizer.json", "tokenizer_config.json")):
            return
    except Exception:  # noqa: BLE001 - not a valid repo id, or no huggingface_hub: probe
        pass
    from mpmoe.data.hub import hub_unreachable

    reason = hub_unreachable()
    if reason:
        raise DataError(f"cannot load tokenizer {spec!r}: {reason}; pass a local tokenizer folder or "
                        "tokenizer.json (--tokenizer-model)")


def _hub_tokenizer(auto_tokenizer, spec: str):
    """``AutoTokenizer.from_pretrained(spec)``: from the local cache when there, else from the
    hub (:func:`_check_hub_tokenizer` has checked that it answers)."""
    try:
        return auto_tokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or incomplete): ask the hub
        pass
    try:
        return auto_tokenizer.from_pretrained(spec)
    except Exception as e:  # OSError, ValueError, HF hub errors ...
        raise DataError(f"cannot load tokenizer {spec!r}: {first_line(e)}") from None


def load_tokenizer(name_or_path: str | os.PathLike, *, eod_token: str | None = None) -> TokenizerInfo:
    """Resolve a tokenizer to a :class:`TokenizerInfo`.

    ``name_or_path`` is a ``tokenizer.json`` file, a directory holding one
    (e.g. from :func:`train_bpe` or ``save_pretrained``), or a Hugging Face hub
    id such as ``EleutherAI/pythia-12b`` (loaded with
    ``transformers.AutoTokenizer``, which uses the local HF cache and, unless
    ``HF_HUB_OFFLINE=1``, the network). The end-of-document token is
    ``eod_token`` if given, else the tokenizer's ``eos_token``, else the first
    of ``<|endoftext|>``, ``</s>``, ``<eos>`` it knows.
    """
    from tokenizers import Tokenizer

    spec = os.fspath(name_or_path)
    path = Path(spec).expanduser()
    configured = None
    if path.is_file() or (path.is_dir() and (path / "tokenizer.json").is_file()):
        file = path if path.is_file() else path / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception on a bad file
            raise DataError(f"cannot read tokenizer {file}: {first_line(e)}") from None
        configured = _config_eos(file.parent)
    elif path.is_dir():
        raise DataError(f"tokenizer directory {spec} has no tokenizer.json")
    elif spec.startswith((".", "/", "~")) or spec.endswith(".json"):
        raise DataError(f"tokenizer not found: {spec}")
    else:
        _check_hub_tokenizer(spec)  # before importing transformers (seconds): offline fails fast
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - depends on the install
            raise DataError("loading a hub tokenizer needs `transformers` (pip install 'mpmoe[data]')") from None
        hf = _hub_tokenizer(AutoTokenizer, spec)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DataError(f"tokenizer {spec!r} has no fast (Rust) version; the pipeline needs one")
        tok = Tokenizer.from_str(backend.to_str())
        configured = hf.eos_token if isinstance(hf.eos_token, str) else None
    eod_id, eod_name = _find_eod(tok, eod_token, configured, spec)
    js = tok.to_str()
    return TokenizerInfo(
        name=spec, json=js, sha256=tokenizer_sha256(js),
        vocab_size=tok.get_vocab_size(with_added_tokens=True), eod_id=eod_id, eod_token=eod_name,
    )


def _batched_texts(texts: Iterable[str], limit: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= limit:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe(
    texts: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    eod_token: str = EOD_TOKEN,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE (GPT-2 style) on ``texts`` and save it to ``output_dir``.

    Deterministic for the same texts and settings; a few seconds for a few MB
    of text. Writes ``tokenizer.json`` and ``tokenizer_config.json`` (which
    makes ``transformers.AutoTokenizer.from_pretrained(output_dir)`` work
    offline) into a temporary directory that replaces ``output_dir`` at the
    end. ``eod_token`` is the only special token (id 0) and serves as EOS/BOS.
    Returns ``output_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"--vocab-size must be at least 258 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched_texts(texts), trainer=trainer)
    if tok.get_vocab_size() < 258:
        raise DataError("the training corpus is empty: cannot train a tokenizer on no text")
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".incomplete", dir=out.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eod_token,
            "bos_token": eod_token,
            "unk_token": None,
            "pad_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
