"""Round trip and output properties of mpmoe.data.prepare (text -> ids -> .bin/.idx -> GPTDataset -> text)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from mpmoe.data import (
    DataError,
    IndexedReader,
    LocalSource,
    embedded_texts,
    load_tokenizer,
    prepare,
    prepare_embedded,
    train_bpe,
)
from mpmoe.data import pipeline

UNICODE_DOCS = [
    "Naïve café résumé — déjà vu, straße, Ελληνικά, русский текст.",
    "日本語のテキストと絵文字 🙂🚀, mixed with ASCII words.",
    "Tabs\tand\nnew lines\r\nand trailing spaces   ",
]


def corpus(n: int = 120) -> list[str]:
    return list(islice(embedded_texts(), n)) + UNICODE_DOCS


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, key: t}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe(corpus(), tmp_path_factory.mktemp("tok") / "bpe", vocab_size=600)


def files_bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_round_trip_ids_and_megatron_reader(tmp_path, tok_dir):
    texts = corpus()
    src = write_jsonl(tmp_path / "in" / "docs.jsonl", texts)
    m = prepare(LocalSource([src]), tok_dir, tmp_path / "out" / "c", split="1", progress=False)
    prefix = str(tmp_path / "out" / "c_text_document")
    assert m["outputs"]["train"]["prefix"] == "c_text_document"
    assert m["counts"]["documents"] == len(texts)

    info = load_tokenizer(tok_dir)
    tok = info.build()
    expected = [tok.encode(t, add_special_tokens=False).ids + [info.eod_id] for t in texts]
    assert m["counts"]["tokens"] == sum(map(len, expected))

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    ours = IndexedReader(prefix)
    assert len(ds) == len(ours) == len(texts)
    assert ds.index.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
        assert ours.document(i).tolist() == ids
        # decoding gives the text back (byte-level BPE is lossless)
        assert tok.decode(ids[:-1], skip_special_tokens=False) == texts[i]


class _MegatronTokenizerAdapter:
    """What GPTDatasetConfig reads from a tokenizer: vocab size, EOD id, a cache identity."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "mpmoe-test-bpe", "vocab_size": vocab_size}


def test_gptdataset_samples_decode_to_source_text(tmp_path, tok_dir):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    texts = corpus(60)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    m = prepare(LocalSource([src]), tok_dir, tmp_path / "c", split="8,1,1", progress=False)
    base = tmp_path
    info = load_tokenizer(tok_dir)
    blend = [([str(base / m["outputs"][s]["prefix"])], None) for s in ("train", "valid", "test")]
    cfg = GPTDatasetConfig(
        random_seed=1234, sequence_length=64, blend_per_split=blend,
        tokenizer=_MegatronTokenizerAdapter(info.vocab_size, info.eod_id),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"), mmap_bin_files=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [20, 4, 4], lambda: True, cfg).build()
    assert len(train) >= 20 and len(valid) >= 4 and len(test) >= 4
    tok = info.build()
    eod = info.eod_token
    for ds in (train, valid, test):
        for i in range(4):
            sample = ds[i]
            tokens = sample["tokens"].tolist()
            assert len(tokens) == 64
            assert sample["labels"][:-1].tolist() == tokens[1:]
            text = tok.decode(tokens, skip_special_tokens=False)
            pieces = [p for p in text.split(eod) if p]
            assert pieces
            for p in pieces:
                # every run between EOD tokens is a piece of one source document
                assert any(p in t for t in texts), p[:80]


def test_worker_count_does_not_change_output(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(pipeline, "BATCH_DOCS", 7)  # many batches in flight, out-of-order completion possible
    src = write_jsonl(tmp_path / "docs.jsonl", corpus())
    outs = {}
    for w in (1, 2):
        m = prepare(LocalSource([src]), tok_dir, tmp_path / f"w{w}" / "c", split="90,5,5", workers=w, progress=False)
        m.pop("elapsed_s")
        outs[w] = (m, {s: files_bytes(str(tmp_path / f"w{w}" / o["prefix"])) for s, o in m["outputs"].items()})
    assert outs[1][1] == outs[2][1]
    assert outs[1][0] == outs[2][0]
    assert Path(tmp_path / "w1" / "c.manifest.json").read_bytes() == Path(tmp_path / "w2" / "c.manifest.json").read_bytes()


def test_budgets_cut_deterministically(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(pipeline, "BATCH_DOCS", 5)
    texts = corpus()
    m = prepare(iter(texts), tok_dir, tmp_path / "d", split="1", max_docs=17, progress=False)
    assert m["counts"]["documents"] == 17 and m["complete_source"] is False
    assert IndexedReader(tmp_path / "d_text_document").num_documents == 17

    full = prepare(iter(texts), tok_dir, tmp_path / "f", split="1", progress=False)
    lengths = IndexedReader(tmp_path / "f_text_document").document_lengths()
    budget = int(lengths[:30].sum()) - 3  # reached inside document 30
    for w in (1, 2):
        m = prepare(iter(texts), tok_dir, tmp_path / f"t{w}", split="1", max_tokens=budget, workers=w, progress=False)
        assert m["counts"]["documents"] == 30
        assert m["counts"]["tokens"] == int(lengths[:30].sum()) >= budget
    assert files_bytes(str(tmp_path / "t1_text_document")) == files_bytes(str(tmp_path / "t2_text_document"))
    assert full["complete_source"] is True
    # the background reader stopped with the run, though the source was not exhausted
    import threading

    assert not [t for t in threading.enumerate() if t.name == "mpmoe-data-reader"]


def test_split_partitions_documents_in_order(tmp_path, tok_dir):
    texts = [f"document number {i} says hello" for i in range(1000)]
    m = prepare(iter(texts), tok_dir, tmp_path / "s", split="80,15,5", progress=False)
    counts = {s: o["documents"] for s, o in m["outputs"].items()}
    assert sum(counts.values()) == 1000
    assert abs(counts["train"] - 800) <= 5 and abs(counts["valid"] - 150) <= 5 and abs(counts["test"] - 50) <= 5
    tok = load_tokenizer(tok_dir).build()
    seen = []
    for s, o in m["outputs"].items():
        r = IndexedReader(tmp_path / o["prefix"])
        nums = [int(tok.decode(r.document(i)[:-1].tolist()).split()[2]) for i in range(len(r))]
        assert nums == sorted(nums)  # each split keeps the source order
        seen += nums
    assert sorted(seen) == list(range(1000))
    # no valid/test files for a train-only split
    m = prepare(iter(texts[:10]), tok_dir, tmp_path / "only", split="1,0,0", progress=False)
    assert list(m["outputs"]) == ["train"]
    assert not list(tmp_path.glob("only_valid*"))


def test_no_eod_and_empty_documents(tmp_path, tok_dir):
    info = load_tokenizer(tok_dir)
    m = prepare(iter(["hello world", "", "   \n", "again"]), info, tmp_path / "e", split="1",
                append_eod=False, progress=False)
    assert m["counts"]["documents"] == 2 and m["counts"]["skipped_empty"] == 2
    r = IndexedReader(tmp_path / "e_text_document")
    assert info.eod_id not in r.document(0).tolist()
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(iter(["", " "]), info, tmp_path / "z", split="1", progress=False)
    assert not list(tmp_path.glob("z*"))


def test_crash_leaves_nothing_that_looks_complete(tmp_path, tok_dir):
    out = tmp_path / "crash"
    seen_during_run = []

    def docs():
        for i, t in enumerate(corpus()):
            if i == 50:
                seen_during_run.extend(sorted(p.name for p in tmp_path.iterdir()))
                raise RuntimeError("disk on fire")
            yield t

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(docs(), tok_dir, out, split="1", progress=False)
    # while running, only temporary names exist
    assert seen_during_run and all(n.endswith(".incomplete") for n in seen_during_run)
    assert list(tmp_path.iterdir()) == []

    # a rerun over an existing complete output replaces it atomically
    prepare(iter(corpus(10)), tok_dir, out, split="1", progress=False)
    with pytest.raises(RuntimeError):
        prepare(docs(), tok_dir, out, split="1", progress=False)
    assert IndexedReader(str(out) + "_text_document").num_documents == len(corpus(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash.manifest.json", "crash_text_document.bin",
                                                           "crash_text_document.idx"]


def test_prepare_embedded_is_cached_and_repairs(tmp_path):
    p = prepare_embedded(tmp_path, vocab_size=1024, progress=False)
    assert Path(p.tokenizer_dir, "tokenizer.json").is_file()
    assert p.vocab_size == 1024 and p.eod_id == 0
    sizes = {s: IndexedReader(getattr(p, s)).num_documents for s in ("train", "valid", "test")}
    assert sizes["train"] > 1000 and sizes["valid"] > 0 and sizes["test"] > 0
    mtime = Path(p.train + ".bin").stat().st_mtime_ns
    assert prepare_embedded(tmp_path, vocab_size=1024) == p
    assert Path(p.train + ".bin").stat().st_mtime_ns == mtime  # reused, not rebuilt
    # a damaged cache is rebuilt on the next call
    with open(p.valid + ".bin", "r+b") as f:
        f.truncate(10)
    again = prepare_embedded(tmp_path, vocab_size=1024)
    assert again == p and IndexedReader(p.valid).num_documents == sizes["valid"]

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(p.tokenizer_dir)
    assert hf.eos_token_id == p.eod_id
    ids = IndexedReader(p.train).document(0).tolist()
    assert ids[-1] == p.eod_id and hf.decode(ids[:-1]).strip()


def test_embedded_corpus_is_the_snapshot():
    texts = list(embedded_texts())
    size = sum(len(t.encode("utf-8")) for t in texts)
    assert len(texts) == 1609
    assert 1.5e6 < size < 2.5e6
    assert texts == list(embedded_texts())
    assert texts[0].startswith('The "assert" statement')  # pydoc topics first, sorted by key


def test_empty_split_is_left_out_with_a_warning(tmp_path, tok_dir, capsys):
    m = prepare(iter(["one doc", "two docs"]), tok_dir, tmp_path / "tiny", split="98,1,1", progress=False)
    assert list(m["outputs"]) == ["train"] or all(o["documents"] > 0 for o in m["outputs"].values())
    assert "split got none of the 2 documents" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.incomplete"))
