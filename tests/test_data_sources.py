"""Sources (local files, HF datasets offline, download), tokenizers, and the indexed format itself."""

from __future__ import annotations

import gzip
import json
import os

# No network in tests: the HF-hub code path runs against local datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpmoe.data import (
    DataError,
    HFSource,
    IndexedReader,
    IndexedWriter,
    LocalSource,
    download_hf,
    embedded_texts,
    load_tokenizer,
    prepare,
    train_bpe,
)

TEXTS = [t for t in islice(embedded_texts(), 40)] + ["naïve café 🙂", "second\n\nparagraph"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    try:
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe(TEXTS, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=500)


# ---------------------------------------------------------------- local files


def test_local_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    with open(d / "a.jsonl", "w", encoding="utf-8") as f:
        for t in TEXTS[:10]:
            f.write(json.dumps({"text": t}) + "\n")
        f.write("\n")  # blank lines are ignored
    with gzip.open(d / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in TEXTS[10:20]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
    pq.write_table(pa.table({"text": TEXTS[20:30], "n": list(range(10))}), d / "sub" / "c.parquet", row_group_size=3)
    (d / "z.txt").write_text(TEXTS[30], encoding="utf-8")
    (d / "notes.json").write_text("{}", encoding="utf-8")  # not scanned in folders (state/manifest files)
    docs = list(LocalSource([d]))
    assert docs == TEXTS[:10] + TEXTS[10:20] + TEXTS[20:30] + [TEXTS[30]]
    # a .json file named explicitly is read as jsonl
    (tmp_path / "x.json").write_text(json.dumps({"body": "hi"}) + "\n", encoding="utf-8")
    assert list(LocalSource([tmp_path / "x.json"], text_key="body")) == ["hi"]


def test_txt_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("line one\nline two\n\n\nparagraph two\nstill two\n", encoding="utf-8")
    assert list(LocalSource([f])) == [f.read_text()]
    assert list(LocalSource([f], txt_mode="line")) == ["line one", "line two", "", "", "paragraph two", "still two"]
    assert list(LocalSource([f], txt_mode="paragraph")) == ["line one\nline two", "paragraph two\nstill two\n"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"body": "x"}\n', r"bad\.jsonl:1: no key 'text' \(found 'body'\); set --json-keys"),
        ('{"text": 5}\n', r"bad\.jsonl:1: 'text' is a int, not a string"),
        ('[1, 2]\n', r"bad\.jsonl:1: no key 'text'"),
    ],
)
def test_bad_jsonl_is_one_line_error(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        list(LocalSource([p]))
    assert "\n" not in str(e.value)


def test_bad_local_inputs(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        LocalSource([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        LocalSource([tmp_path / "empty"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported input file type"):
        LocalSource([tmp_path / "x.csv"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        list(LocalSource([tmp_path / "bad.parquet"]))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not UTF-8"):
        list(LocalSource([tmp_path / "bin.txt"]))
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "abc"}\n' * 100)[:40])
    with pytest.raises(DataError, match="trunc.jsonl.gz: cannot read"):
        list(LocalSource([tmp_path / "trunc.jsonl.gz"]))


# ------------------------------------------------------------ HF (offline)


def _hf_dataset(tmp_path: Path, n: int = 30):
    import datasets

    return datasets.Dataset.from_dict({"text": TEXTS[:n], "id": list(range(n))})


def test_hf_path_offline_saved_and_file_folder(tmp_path, tok_dir):
    ds = _hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    assert list(HFSource(str(tmp_path / "saved"))) == TEXTS[:30]
    # a hub-style repository folder goes through datasets.load_dataset(streaming=True)
    src = HFSource(str(tmp_path / "repo"), split="train")
    assert list(src) == TEXTS[:30]
    m = prepare(src, tok_dir, tmp_path / "out" / "hf", split="1", progress=False)
    assert m["source"]["type"] == "hf" and m["counts"]["documents"] == 30
    lp = LocalSource([tmp_path / "repo"])
    m2 = prepare(lp, tok_dir, tmp_path / "out" / "local", split="1", progress=False)
    assert (tmp_path / "out" / "hf_text_document.bin").read_bytes() == (
        tmp_path / "out" / "local_text_document.bin").read_bytes()
    assert m2["counts"] == m["counts"]


def test_hf_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"cannot open HF dataset no-such-org/no-such-data \(x\)") as e:
        list(HFSource("no-such-org/no-such-data", "x"))
    assert "\n" not in str(e.value)
    _hf_dataset(tmp_path).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="no column 'body'"):
        list(HFSource(str(tmp_path / "saved"), text_key="body"))


def test_download_resumes_to_the_same_shards(tmp_path):
    ds = _hf_dataset(tmp_path, 42)
    ds.save_to_disk(str(tmp_path / "saved"))
    src = str(tmp_path / "saved")
    one = download_hf(src, tmp_path / "one", shard_docs=8, progress=False)
    assert one["complete"] and sum(s["documents"] for s in one["shards"]) == 42
    # interrupted after 20 documents (budget), then resumed without a budget
    part = download_hf(src, tmp_path / "two", shard_docs=8, max_docs=20, progress=False)
    assert sum(s["documents"] for s in part["shards"]) == 20 and not part["complete"]
    (tmp_path / "two" / "shard-00099.jsonl.gz.incomplete").write_bytes(b"partial")  # crash debris
    again = download_hf(src, tmp_path / "two", shard_docs=8, progress=False)
    assert again["complete"]
    assert not list((tmp_path / "two").glob("*.incomplete"))
    docs_one = list(LocalSource([tmp_path / "one"]))
    docs_two = list(LocalSource([tmp_path / "two"]))
    assert docs_one == docs_two == TEXTS[:42]
    assert part["stream_state"] is not None  # resumed from the saved stream position
    # without a saved position (older state file), resuming skips the saved rows instead
    part = download_hf(src, tmp_path / "three", shard_docs=8, max_docs=20, progress=False)
    state_file = tmp_path / "three" / "download-state.json"
    st = json.loads(state_file.read_text())
    st["stream_state"] = None
    state_file.write_text(json.dumps(st))
    download_hf(src, tmp_path / "three", shard_docs=8, progress=False)
    assert list(LocalSource([tmp_path / "three"])) == TEXTS[:42]
    with pytest.raises(DataError, match="holds a download of"):
        download_hf(src, tmp_path / "two", name="other", progress=False)


# ----------------------------------------------------------------- tokenizer


def test_train_bpe_is_deterministic_and_loads_with_autotokenizer(tmp_path):
    a = train_bpe(TEXTS, tmp_path / "a", vocab_size=400)
    b = train_bpe(iter(TEXTS), tmp_path / "b", vocab_size=400)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    info = load_tokenizer(a)
    assert info.vocab_size == 400 and info.eod_id == 0 and info.eod_token == "<|endoftext|>"
    assert load_tokenizer(a / "tokenizer.json").sha256 == info.sha256

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(a))
    text = "naïve café 🙂 and some text"
    assert hf.decode(hf(text)["input_ids"]) == text
    assert hf(text)["input_ids"] == info.build().encode(text, add_special_tokens=False).ids
    assert hf.eos_token_id == info.eod_id


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "d")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="cannot load tokenizer 'no-such-org/no-such-tok'") as e:
        load_tokenizer("no-such-org/no-such-tok")
    assert "\n" not in str(e.value)
    d = train_bpe(TEXTS, tmp_path / "t", vocab_size=300)
    with pytest.raises(DataError, match="no token '<eos>'"):
        load_tokenizer(d, eod_token="<eos>")


# -------------------------------------------------------------- index format


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 65535), min_size=1, max_size=40), min_size=1, max_size=20))
def test_writer_matches_megatron_reader(tmp_path_factory, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path_factory.mktemp("idx") / "d")
    with IndexedWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(np.array(d, dtype=np.int64))
    ours = IndexedReader(prefix)
    theirs = IndexedDataset(prefix)
    assert len(ours) == len(theirs) == len(docs)
    assert ours.num_tokens == sum(map(len, docs))
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert ours.document(i).tolist() == theirs[i].tolist() == d


def test_writer_int32_and_abort(tmp_path):
    prefix = str(tmp_path / "big")
    with IndexedWriter(prefix, np.int32) as w:
        w.add_document(np.array([70000, 1, 2**31 - 1]))
    assert IndexedReader(prefix).document(0).tolist() == [70000, 1, 2**31 - 1]
    w = IndexedWriter(str(tmp_path / "gone"), np.int32)
    w.add_document(np.arange(5))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "big.idx"]


def test_hub_tokenizer_id_resolves_offline_from_the_hf_cache(tmp_path):
    """A hub id (like EleutherAI/pythia-12b) goes through transformers.AutoTokenizer; here the
    "hub" is a populated local HF cache and HF_HUB_OFFLINE=1, so nothing is downloaded."""
    import subprocess
    import sys

    src = train_bpe(TEXTS, tmp_path / "bpe", vocab_size=350)
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mpmoe-test--tiny-bpe"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (snap / f).write_bytes((src / f).read_bytes())
    # the cache's record that the repo has no config.json (a tokenizer-only repo)
    (repo / ".no_exist" / rev).mkdir(parents=True)
    (repo / ".no_exist" / rev / "config.json").touch()
    code = (
        "import json\nfrom mpmoe.data import load_tokenizer\n"
        "i = load_tokenizer('mpmoe-test/tiny-bpe')\n"
        "print(json.dumps([i.name, i.vocab_size, i.eod_id, i.sha256]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    name, vocab, eod, sha = json.loads(r.stdout.strip().splitlines()[-1])
    assert (name, vocab, eod) == ("mpmoe-test/tiny-bpe", 350, 0)
    assert sha == load_tokenizer(src).sha256  # the same tokenizer, whichever way it is loaded
