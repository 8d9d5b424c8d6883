"""scripts/reproduce/experts_tiny.py --quick: train, merge with every method, compress, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_experts_tiny_quick(tmp_path, embedded_cache):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "scripts/reproduce/experts_tiny.py"), str(out), "--quick",
                        "--train-flags", f"--embedded-cache-dir {embedded_cache}"],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    methods = {(x["routing"], x["experts"], x["method"]) for x in rows}
    for routing in ("top-k", "MoPE"):
        assert (routing, 16, "original") in methods
        for size in (8, 4):
            for method in ("M-SMoE", "naive", "no-align", "drop", "MC-SMoE"):
                assert (routing, size, method) in methods
    for x in rows:
        assert 3 < x["loss"] < 12 and x["params"]["experts"] > 0 and x["bytes"] > 0 and x["scores"]
    by = {(x["routing"], x["experts"], x["method"]): x for x in rows}
    for routing in ("top-k", "MoPE"):
        # collapsed merges store E' experts; compression stores fewer parameters still
        assert by[(routing, 8, "M-SMoE")]["params"]["experts"] * 2 == by[(routing, 16, "original")]["params"]["experts"]
        assert by[(routing, 4, "MC-SMoE")]["params"]["experts"] < by[(routing, 4, "M-SMoE")]["params"]["experts"]
        assert by[(routing, 4, "MC-SMoE")]["bytes"] < by[(routing, 4, "M-SMoE")]["bytes"]
    report = (out / "report.md").read_text()
    assert "Does MoPE merge worse than top-k?" in report and "| MoPE | 4 | drop |" in report
