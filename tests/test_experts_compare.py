"""The split comparison script's quick mode runs end to end and reports every run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experts" / "compare_split.py"


@pytest.mark.slow
def test_compare_split_quick(tmp_path, embedded_cache):
    spec = importlib.util.spec_from_file_location("compare_split", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path), "--quick", "--embedded-cache-dir", str(embedded_cache)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"dense/all/s1", "ilp/routers/s1", "random-heterogeneous/routers/s1"}
    for run in summary["runs"].values():
        assert math.isfinite(run["val"]) and run["local"]
    ilp = summary["runs"]["ilp/routers/s1"]["ilp"]
    rnd = summary["runs"]["random-heterogeneous/routers/s1"]["ilp"]
    # random-heterogeneous has exactly the ILP split's sizes (--sizes-from), solving no ILP of its own
    assert [v["sizes_neurons"] for v in ilp.values()] == [v["sizes_neurons"] for v in rnd.values()]
    assert all(v["status"] is None for v in rnd.values()) and all(v["status"] for v in ilp.values())
    assert summary["stages_s"]["fine-tuning"]["wall"] > 0 and summary["cpu_s"] > 0
    assert "| ilp | routers |" in (tmp_path / "report.md").read_text()
