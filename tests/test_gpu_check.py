"""benchmarks/gpu_check.sh without a GPU: arguments, the dry run's JSON, skipped steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args, env=None, timeout=300):
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--out"], "--out needs a folder"),
    (["--budget", "x", "--out", "d"], "--budget needs a number"),
    ([], "no output folder"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_help():
    res = run("--help")
    assert res.returncode == 0 and "--dry-run" in res.stdout and "bench_train" in res.stdout


def test_dry_run_writes_json_and_skips_what_is_absent(tmp_path):
    # lm_eval made unimportable: the generation benchmark is skipped with the reason
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util as u\n_f = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'lm_eval' else _f(name, *a)\n")
    out = tmp_path / "out"
    res = run("--dry-run", "--out", str(out), env={"PYTHONPATH": str(hide)})
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] is True
    # the distribution's version; its local tag may differ from torch.__version__'s (2.14.1
    # vs 2.14.1+cu130)
    assert doc["environment"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert doc["environment"]["lm_eval"] is None
    steps = doc["steps"]
    assert list(steps) == ["cuda_tests", "bench_otep", "bench_train", "bench_eval", "megatron_lm"]
    assert steps["bench_eval"]["status"] == "skipped" and "lm_eval" in steps["bench_eval"]["reason"]
    assert steps["bench_otep"]["status"] == "dry-run"
    assert "16384x64x8,4096x128x8,1x64x8,8x64x8,64x64x8" in steps["bench_otep"]["command"]
    assert "flame-moe-38m" in steps["bench_train"]["command"] and "alltoall" in steps["bench_train"]["command"]
    assert all(s["limit_s"] <= 530 for s in steps.values())
    assert "bench_megatron_lm.py --preset flame-moe-38m --iters 20" in steps["megatron_lm"]["command"]
    assert "bench_eval: skipped" in (out / "gpu_check.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_real_run_without_cuda_is_refused(tmp_path):
    res = run("--out", str(tmp_path))
    assert res.returncode == 2 and "no CUDA device" in res.stdout + res.stderr
