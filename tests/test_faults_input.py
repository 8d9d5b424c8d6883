"""Bad input ends in one line, exit 2, naming the flag or file: presets, flag ranges, data files,
tokenizer/data/checkpoint vocabularies, output folders, offline hub, scripts, error formatting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from mpmoe.data.errors import DataError
from mpmoe.errors import MAX_CHARS, UserError, run_verb, user_message
from mpmoe.run.args import POSITIVE, PROBABILITY, ConfigError, Range, parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-iters", "1"]


def _one_line_exit_2(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines[0]) <= MAX_CHARS, lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _mpmoe(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mpmoe", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


# --------------------------------------------------------------------------- flags and presets
@pytest.mark.parametrize("flag, value, words", [
    ("--hidden-size", "-64", ">= 1"),
    ("--moe-router-topk", "0", ">= 1"),
    ("--attention-dropout", "1", "[0, 1)"),
    ("--moe-otep-warmup-fraction", "1.01", "[0, 1]"),
    ("--adam-eps", "0", "> 0"),
    ("--clip-grad", "inf", "finite"),
    ("--weight-decay", "-0.1", ">= 0"),
    ("--eval-interval", "two", "expected an integer"),
    ("--micro-batch-size", "1.5", "expected an integer"),
    ("--lr-warmup-iters", "-1", ">= 0"),
])
def test_numeric_flags_are_range_checked(flag, value, words):
    with pytest.raises(ConfigError) as err:
        parse_args([*TINY, flag, value])
    assert flag in str(err.value) and words in str(err.value)


def _preset(tmp_path, body: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("body, key, words", [
    ('[model]\nuntie_embeddings_and_output_weights = "no"\n', "untie_embeddings_and_output_weights", "true or false"),
    ("[moe]\nmoe_router_topk = 2.0\n", "moe_router_topk", "integer"),
    ('[training]\nlr = "3e-4"\n', "lr", "number"),
    ("[moe]\nnum_experts = true\n", "num_experts", "integer"),
    ("[training]\nadam_beta1 = 1.2\n", "adam_beta1", "[0, 1)"),
    ('[model]\nposition_embedding_type = "alibi"\n', "position_embedding_type", "one of"),
    ("[data]\nsplit = 969\n", "split", "string"),
    ("[model]\nhiden_size = 64\n", "hiden_size", "unknown key"),
    ('[training]\nrecompute_modules = "core_attn"\n', "recompute_modules", "list"),
])
def test_preset_values_are_checked_against_the_flags(tmp_path, body, key, words):
    path = _preset(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        parse_args(["--preset", path, *TINY])
    message = str(err.value)
    assert path in message and key in message and words in message, message


def test_a_valid_preset_file_still_loads(tmp_path):
    path = _preset(tmp_path, "[model]\nswiglu = false\nhidden_dropout = 0.1\n[moe]\nnum_experts = 4\n")
    args = parse_args(["--preset", path, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--seq-length", "16", "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-3",
                       *TINY])
    assert args.swiglu is False and args.num_experts == 4 and args.hidden_dropout == 0.1


@given(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)))
def test_range_check_agrees_with_its_definition(value):
    ok_int = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    assert (POSITIVE.problem(value) is None) == ok_int
    ok_prob = (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
               and 0 <= value < 1)
    assert (PROBABILITY.problem(value) is None) == ok_prob


def test_range_is_a_plain_argparse_type_for_new_flags():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--x", type=Range(float, -1, 1, lo_open=True))
    assert p.parse_args(["--x", "0.5"]).x == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(-1, 1\]"):
        Range(float, -1, 1, lo_open=True)("-1")


# --------------------------------------------------------------------------- output folders
def test_output_paths_that_are_files_are_refused(tmp_path):
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    for flag, path in (("--save", afile), ("--run-dir", afile / "sub"), ("--moe-stats-dir", afile / "a" / "b")):
        with pytest.raises(ConfigError) as err:
            parse_args([*TINY, flag, str(path)])
        assert flag in str(err.value) and str(afile) in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_save_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        parse_args([*TINY, "--save", str(ro / "ckpt")])


def test_train_cli_output_error_is_one_line(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("")
    _one_line_exit_2(_mpmoe("train", *TINY, "--save", str(afile)), "--save", str(afile))


# --------------------------------------------------------------------------- data files
def _dataset(folder: Path, ids_per_doc, *, manifest_tok=None) -> str:
    from mpmoe.data.indexed import IndexedWriter

    prefix = str(folder / "d_train_text_document")
    with IndexedWriter(prefix, dtype=np.uint16) as w:
        for ids in ids_per_doc:
            w.add_document(np.asarray(ids, dtype=np.uint16))
    if manifest_tok is not None:
        (folder / "d.manifest.json").write_text(json.dumps(
            {"tokenizer": manifest_tok, "outputs": {"train": {"prefix": "d_train_text_document"}}}))
    return prefix


def _tok(sha="a" * 64, vocab=100):
    from mpmoe.data.tokenizer import TokenizerInfo

    return TokenizerInfo(name="tok-x", json="{}", sha256=sha, vocab_size=vocab, eod_id=0, eod_token="<e>")


def test_data_files_are_checked_before_training(tmp_path):
    from mpmoe.run.data import check_data_path

    prefix = _dataset(tmp_path, [[1, 2, 3, 90], [4, 5]])
    check_data_path([prefix], 100, None)  # fits
    with pytest.raises(DataError, match=r"largest token id needs a vocabulary of 91 tokens, the model has 64"):
        check_data_path([prefix], 64, None)
    with open(prefix + ".bin", "r+b") as f:  # truncated .bin
        f.truncate(6)
    with pytest.raises(DataError, match=r"d_train_text_document\.bin"):
        check_data_path([prefix], 100, None)
    Path(prefix + ".idx").write_bytes(os.urandom(64))  # garbage .idx
    with pytest.raises(DataError, match=r"d_train_text_document\.idx"):
        check_data_path([prefix], 100, None)


def test_manifest_tokenizer_must_match_the_training_tokenizer(tmp_path):
    from mpmoe.run.data import check_data_path

    prefix = _dataset(tmp_path, [[1, 2, 3]], manifest_tok={"name": "tok-a", "sha256": "b" * 64, "vocab_size": 50})
    with pytest.raises(DataError, match=r"tokenized with tok-a .*not --tokenizer-model tok-x"):
        check_data_path([prefix], 100, _tok())
    check_data_path([prefix], 50, _tok(sha="b" * 64, vocab=50))
    with pytest.raises(DataError, match=r"vocabulary \(50\) needs a vocabulary of 50 tokens, the model has 40"):
        check_data_path([prefix], 40, None)


def test_inspect_accepts_a_prefix_beside_megatrons_cache_folder(tmp_path):
    from mpmoe.data.validate import resolve_prefixes

    prefix = _dataset(tmp_path, [[1, 2]])
    (Path(prefix) / "cache" / "GPTDataset_indices").mkdir(parents=True)
    assert resolve_prefixes(prefix)[0] == [prefix]
    proc = _mpmoe("data", "inspect", prefix, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["datasets"][0]["documents"] == 1


def test_offline_hub_tokenizer_fails_in_seconds(tmp_path):
    start = time.perf_counter()
    proc = _mpmoe("data", "prepare", "--input", str(ROOT / "README.md"), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-model", "someone/uncached-tokenizer",
                  env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    _one_line_exit_2(proc, "someone/uncached-tokenizer", "HF_HUB_OFFLINE")
    assert time.perf_counter() - start < 30  # the process start dominates; no hub retries


def test_unreachable_hub_dataset_fails_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a closed local port: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _mpmoe("data", "download", "--hf-dataset", "someone/uncached-data", "--output-dir", str(tmp_path / "o"),
                  env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
                       "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"})
    _one_line_exit_2(proc, "someone/uncached-data", "cannot be reached")


# --------------------------------------------------------------------------- the one handler
def test_checkpoint_exception_is_unwrapped_to_its_cause():
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        raise KeyError("chained_0.optimizer.state.exp_avg\nmissing in the checkpoint")
    except KeyError as exc:
        inner = exc
    wrapped = CheckpointException("load failed", {0: (inner, traceback.extract_tb(inner.__traceback__))})
    message = user_message(wrapped)
    assert message.startswith("checkpoint: KeyError:") and "FrameSummary" not in message
    from mpmoe.run.checkpoint import _last_line

    assert "FrameSummary" not in _last_line(wrapped) and "KeyError" in _last_line(wrapped)


def test_run_verb_prints_one_bounded_line(capsys, monkeypatch):
    monkeypatch.delenv("MPMOE_DEBUG", raising=False)

    def long_error(argv):
        raise UserError("x" * 1000 + "\nsecond line")

    assert run_verb("mpmoe t", long_error, []) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) <= MAX_CHARS and err.startswith("mpmoe t: error: xxx")

    def missing(argv):
        open("/nonexistent/dir/file.bin")

    assert run_verb("mpmoe t", missing, []) == 2
    assert "/nonexistent/dir/file.bin" in capsys.readouterr().err

    def bug(argv):
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run_verb("mpmoe t", bug, [])
    monkeypatch.setenv("MPMOE_DEBUG", "1")
    with pytest.raises(UserError):
        run_verb("mpmoe t", long_error, [])


# --------------------------------------------------------------------------- scripts
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in list((ROOT / "scripts").glob("*.sh"))
                 + list((ROOT / "scripts").glob("*/*.sh")) if p.name not in ("eval_commands.sh", "launch_env.sh"))  # sourced


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_exit_2_on_missing_arguments_and_0_on_help(script):
    bare = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bare.returncode == 2, (bare.stdout, bare.stderr)
    helped = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert helped.returncode == 0 and helped.stdout.strip()
