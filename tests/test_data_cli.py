"""`mpmoe data ...`: subcommands end to end, and one-line errors (exit 2) for bad or corrupt input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from mpmoe.data import embedded_texts
from mpmoe.data.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEXTS = list(islice(embedded_texts(), 200))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mpmoe data: error: "), err
    assert pattern in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A corpus file, a tokenizer trained with the CLI and a dataset prepared with the CLI."""
    d = tmp_path_factory.mktemp("cli")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": t}) + "\n" for t in TEXTS), encoding="utf-8")
    assert main(["tokenizer", "--input", str(corpus), "--json-keys", "content", "--vocab-size", "700",
                 "--output-dir", str(d / "tok"), "--no-progress"]) == 0
    assert main(["prepare", "--input", str(corpus), "--json-keys", "content", "--tokenizer-model", str(d / "tok"),
                 "--output-prefix", str(d / "out" / "corp"), "--split", "90,10", "--workers", "1",
                 "--no-progress"]) == 0
    return d


def test_prepare_and_inspect(built, capsys):
    prefix = built / "out" / "corp_train_content_document"
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()
    manifest = json.loads((built / "out" / "corp.manifest.json").read_text())
    assert set(manifest["outputs"]) == {"train", "valid"}
    assert manifest["counts"]["documents"] == len(TEXTS)
    rc, out, err = run(capsys, "inspect", prefix, "--samples", "2")
    assert rc == 0, err
    n = manifest["outputs"]["train"]["documents"]
    assert f"documents {n:,}" in out and "tokens" in out and "decoded: " in out
    rc, out, _ = run(capsys, "inspect", built / "out" / "corp.manifest.json", "--json")
    report = json.loads(out)
    assert [d["documents"] for d in report["datasets"]] == [manifest["outputs"][s]["documents"] for s in ("train", "valid")]
    sample = report["datasets"][0]["samples"][0]
    assert sample["text"] and any(sample["text"][:40] in t for t in TEXTS)
    rc, out, _ = run(capsys, "inspect", built / "out")
    assert rc == 0 and out.count("[ok]") == 2


def _copy(built: Path, tmp_path: Path, name: str = "d") -> Path:
    src = built / "out" / "corp_train_content_document"
    dst = tmp_path / name
    shutil.copy(src.with_suffix(".bin"), dst.with_suffix(".bin"))
    shutil.copy(src.with_suffix(".idx"), dst.with_suffix(".idx"))
    return dst


def test_truncated_bin(built, tmp_path, capsys):
    d = _copy(built, tmp_path)
    size = d.with_suffix(".bin").stat().st_size
    with open(d.with_suffix(".bin"), "r+b") as f:
        f.truncate(size - 6)
    assert_one_line_error(*run(capsys, "inspect", d)[::2], "d.bin is truncated")


def test_truncated_idx(built, tmp_path, capsys):
    d = _copy(built, tmp_path)
    with open(d.with_suffix(".idx"), "r+b") as f:
        f.truncate(d.with_suffix(".idx").stat().st_size - 8)
    assert_one_line_error(*run(capsys, "inspect", d.with_suffix(".idx"))[::2], "d.idx is truncated")
    with open(d.with_suffix(".idx"), "r+b") as f:
        f.truncate(20)
    assert_one_line_error(*run(capsys, "inspect", d)[::2], "less than the 34-byte header")


def test_mismatched_pair(built, tmp_path, capsys):
    d = _copy(built, tmp_path)
    v = built / "out" / "corp_valid_content_document"
    shutil.copy(v.with_suffix(".bin"), d.with_suffix(".bin"))  # another dataset's .bin
    assert_one_line_error(*run(capsys, "inspect", d)[::2], "mismatched or partly written .bin/.idx pair")


def test_bad_magic_and_missing_files(built, tmp_path, capsys):
    d = _copy(built, tmp_path)
    data = bytearray(d.with_suffix(".idx").read_bytes())
    data[:4] = b"JUNK"
    d.with_suffix(".idx").write_bytes(bytes(data))
    assert_one_line_error(*run(capsys, "inspect", d)[::2], "bad magic")
    e = _copy(built, tmp_path, "e")
    os.replace(e.with_suffix(".idx"), str(e.with_suffix(".idx")) + ".incomplete")
    assert_one_line_error(*run(capsys, "inspect", e)[::2], "the run that wrote it did not finish")
    assert_one_line_error(*run(capsys, "inspect", tmp_path / "nothing")[::2], "missing")


def test_wrong_tokenizer_is_detected(built, tmp_path, capsys):
    small = tmp_path / "small"
    assert main(["tokenizer", "--embedded", "--vocab-size", "300", "--output-dir", str(small), "--no-progress"]) == 0
    capsys.readouterr()
    rc, _, err = run(capsys, "inspect", built / "out" / "corp.manifest.json", "--tokenizer-model", small)
    assert_one_line_error(rc, err, "differs from the one the data was written with")


def test_prepare_input_errors(built, tmp_path, capsys):
    tok = built / "tok"
    base = ["prepare", "--tokenizer-model", tok, "--output-prefix", tmp_path / "o", "--no-progress"]
    assert_one_line_error(*run(capsys, *base, "--input", tmp_path / "missing.jsonl")[::2], "input not found")
    assert_one_line_error(*run(capsys, *base)[::2], "give exactly one source")
    assert_one_line_error(*run(capsys, *base, "--embedded", "--input", tmp_path)[::2], "give exactly one source")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    assert_one_line_error(*run(capsys, *base, "--input", bad)[::2], "bad.jsonl:2: invalid JSON")
    assert_one_line_error(*run(capsys, *base, "--input", bad, "--split", "x,y")[::2], "--split")
    assert_one_line_error(*run(capsys, "prepare", "--embedded", "--output-prefix", tmp_path / "o", "--no-progress",
                               "--tokenizer-model", tmp_path / "nope")[::2], "tokenizer not found")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]  # nothing written on failure


def test_entry_point_exit_code_and_embedded(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPMOE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "mpmoe.cli", "data", "inspect", str(tmp_path / "x.idx")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("mpmoe data: error: missing") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mpmoe.cli", "data", "embedded", "--vocab-size", "512", "--json",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    paths = json.loads(r.stdout)
    assert paths["train"].startswith(str(tmp_path / "cache")) and paths["vocab_size"] == 512
    assert Path(paths["train"] + ".idx").is_file() and Path(paths["tokenizer_dir"], "tokenizer.json").is_file()


def test_fineweb_scripts_offline(tmp_path):
    """pipeline_fineweb.sh (download -> tokenize -> inspect) against a local dataset, no network."""
    import datasets

    texts = TEXTS[:50]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    from mpmoe.data import train_bpe

    tok = train_bpe(texts, tmp_path / "tok", vocab_size=400)
    script = Path(__file__).resolve().parents[1] / "scripts" / "dataset" / "pipeline_fineweb.sh"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_DATASET=str(tmp_path / "hf"), HF_CONFIG="", TOKENIZER=str(tok), SHARD_DOCS="20",
               MPMOE=f"{sys.executable} -m mpmoe.cli")
    r = subprocess.run(["bash", str(script), str(tmp_path / "work"), "", "2"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "work" / "raw").iterdir()) == [
        "download-state.json", "shard-00000.jsonl.gz", "shard-00001.jsonl.gz", "shard-00002.jsonl.gz"]
    m = json.loads((tmp_path / "work" / "tokenized" / "fineweb.manifest.json").read_text())
    assert m["counts"]["documents"] == 50 and m["tokenizer"]["name"] == str(tok)
    assert "[ok]" in r.stdout and "decoded:" in r.stdout
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "usage:" in r.stdout


def test_import_is_light_and_layered():
    """mpmoe.data imports no heavy library at import time and nothing from higher layers."""
    code = (
        "import sys, mpmoe.data, mpmoe.data.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'datasets', 'transformers', 'torch')"
        " or m.startswith(('mpmoe.megatron', 'mpmoe.train', 'mpmoe.eval', 'mpmoe.analysis'))]\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    src = Path(__file__).resolve().parents[1] / "mpmoe" / "data"
    for f in src.rglob("*.py"):
        text = f.read_text()
        for layer in ("mpmoe.megatron", "mpmoe.train", "mpmoe.eval", "mpmoe.analysis"):
            assert f"import {layer}" not in text and f"from {layer}" not in text, (f, layer)


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"
    r = subprocess.run([sys.executable, str(bench), "--mb", "0.3", "--repeats", "1", "--vocab-size", "1000",
                        "--skip-memory"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "pipeline        workers=2" in r.stdout and "x raw encode_batch" in r.stdout
