"""Round-3 faults (issue 28): masks naming layers without experts, checkpoints of another
model, non-finite runs, default run folders; fast, in-process where possible."""

from __future__ import annotations

import pytest

from mpmoe.megatron.settings import moe_layer_numbers
from mpmoe.run.args import ConfigError, parse_args

TINY = ["--train-iters", "1", "--num-layers", "3", "--num-experts", "4", "--moe-router-topk", "2"]


@pytest.mark.parametrize("layers, freq, experts, expect", [
    (4, 1, 8, [1, 2, 3, 4]), (4, 2, 8, [1, 3]), (3, [0, 1, 1], 8, [2, 3]), (3, [0, 1, 1], None, []),
    (3, [1, 1], 8, None),
])
def test_moe_layer_numbers_follow_megatrons_freq(layers, freq, experts, expect):
    assert moe_layer_numbers(layers, freq, experts) == expect


@pytest.mark.parametrize("flags, words", [
    (["--moe-layer-freq", "[0,1,1]", "--moe-mask-experts", "1:0"], "--moe-mask-experts: layer(s) 1 have no experts"),
    (["--moe-layer-freq", "1", "--moe-mask-experts", "7:0"], "layer(s) 7 have no experts (expert layers: 1,2,3"),
    (["--moe-layer-freq", "2", "--moe-dynamic-mask", "random", "--moe-dynamic-mask-layers", "2,3"],
     "--moe-dynamic-mask-layers: layer(s) 2 have no experts (expert layers: 1,3"),
])
def test_masks_on_layers_without_experts_are_refused(flags, words, monkeypatch):
    for var in ("MOE_MASK_EXPERTS", "MOE_DYNAMIC_MASK_MODE", "MOE_DYNAMIC_MASK_LAYERS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as err:
        parse_args([*TINY, *flags])
    assert words in str(err.value)


def test_mask_variable_naming_a_dense_layer_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOE_MASK_EXPERTS", "1:0")
    with pytest.raises(ConfigError, match=r"--moe-mask-experts \(from MOE_MASK_EXPERTS\): layer\(s\) 1"):
        parse_args([*TINY, "--moe-layer-freq", "[0,1,1]"])


def test_masks_on_expert_layers_still_parse(monkeypatch):
    monkeypatch.delenv("MOE_MASK_EXPERTS", raising=False)
    args = parse_args([*TINY, "--moe-layer-freq", "[0,1,1]", "--moe-mask-experts", "2:0,1;3:1"])
    assert args.moe_mask_experts == {"2": [0, 1], "3": [1]}


def test_allow_model_change_needs_no_load_optim_and_load():
    with pytest.raises(ConfigError, match="--no-load-optim"):
        parse_args([*TINY, "--load", "x", "--allow-model-change"])
    with pytest.raises(ConfigError, match="without --load"):
        parse_args([*TINY, "--no-load-optim", "--allow-model-change"])


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, monkeypatch):
    """The checkpoint's recorded tokenizer (or its save folder's copy) decides, manifest or not."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from mpmoe.run import checkpoint as ckpt

    it_dir = tmp_path / "ck" / "iter_0000004"
    it_dir.mkdir(parents=True)
    monkeypatch.setattr(ckpt, "saved_run_info", lambda p: {"data": {"tokenizer_sha256": "a" * 64}})
    ckpt.check_tokenizer(it_dir, "a" * 64, "--tokenizer-model t")
    ckpt.check_tokenizer(it_dir, None, "--tokenizer-model t")  # nothing known about this run's: no check
    with pytest.raises(CheckpointingException, match=r"another tokenizer \(sha256 aaaaaaaaaaaa, recorded in .*"
                                                    r"than --tokenizer-model t \(sha256 bbbbbbbbbbbb\)"):
        ckpt.check_tokenizer(it_dir, "b" * 64, "--tokenizer-model t")
    monkeypatch.setattr(ckpt, "saved_run_info", lambda p: {"data": {}})  # older checkpoint: no record
    assert ckpt.checkpoint_tokenizer_sha256(it_dir) is None
    ckpt.check_tokenizer(it_dir, "b" * 64, "--tokenizer-model t")


@pytest.mark.parametrize("body, words", [
    ("[]", "a JSON list, not an object"), ("{}", "no 'outputs'"), ('{"outputs": {"train": {}}}', "without a 'prefix'"),
    ('{"outputs": {"train": {"prefix": "d"}}, "tokenizer": {"vocab_size": "300"}}', "'vocab_size' is not"),
    ("{", "JSONDecodeError"),
])
def test_damaged_manifests_are_reported_not_trusted(tmp_path, body, words):
    from mpmoe.data.errors import DataError
    from mpmoe.data.validate import find_manifest, resolve_prefixes

    m = tmp_path / "d.manifest.json"
    m.write_text(body)
    with pytest.raises(DataError, match="is not an mpmoe data manifest") as err:
        resolve_prefixes(m)
    assert words in str(err.value)
    if '"d"' in body:  # it names the prefix: beside the data it is an error, not skipped
        with pytest.raises(DataError):
            find_manifest(str(tmp_path / "d"))
    else:
        assert find_manifest(str(tmp_path / "d")) is None


def test_run_verb_ends_signals_in_one_line(capsys, monkeypatch):
    import os
    import signal
    import time

    from mpmoe.errors import run_verb

    monkeypatch.delenv("MPMOE_DEBUG", raising=False)
    handler_before = signal.getsignal(signal.SIGTERM)

    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    assert run_verb("mpmoe x", terminated, []) == 143
    assert capsys.readouterr().err == "mpmoe x: stopped by SIGTERM\n"

    def swallowed(argv):  # a library that catches Ctrl-C and carries on: still 130
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        return 0

    assert run_verb("mpmoe x", swallowed, []) == 130
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handlers restored
    assert run_verb("mpmoe x", lambda argv: 0, []) == 0  # an earlier verb's signal does not count
    from mpmoe.cli import main

    assert main(["--version"]) == 0  # nor in `mpmoe.cli.main` (it made every later in-process verb 143)
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_a_verb_that_ignores_its_stop_signal_is_ended(tmp_path):
    """A verb that swallows Ctrl-C and goes on is ended STOP_GRACE_S later, with the one line."""
    import subprocess
    import sys
    import time

    code = ("import os, signal, time\n"
            "import mpmoe.errors as e\n"
            "e.STOP_GRACE_S = 1.0\n"
            "def main(argv):\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(5)\n"
            "    except KeyboardInterrupt:\n"
            "        pass\n"
            "    time.sleep(60)\n"
            "    return 0\n"
            "raise SystemExit(e.run_verb('mpmoe x', main, []))\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "mpmoe x: stopped by SIGINT\n", proc.stderr
    assert time.perf_counter() - start < 30


def test_a_signal_while_the_command_exits_is_the_one_line(tmp_path):
    """After the verb has finished (results written), a Ctrl-C / SIGTERM while the process is
    still exiting ends it at once with the one line and 130 / 143, not a traceback or -2."""
    import signal
    import subprocess
    import sys

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        script = ("import os, signal, sys, time\n"
                  "from mpmoe.cli import main\n"
                  "sys.argv = ['mpmoe', '--version']\n"
                  "assert main() == 0\n"
                  f"os.kill(os.getpid(), {int(sig)})\n"
                  "time.sleep(10)\n")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == code and r.stderr == f"mpmoe: stopped by {sig.name}\n", (r.returncode, r.stderr)
