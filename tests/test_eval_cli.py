"""``mpmoe eval`` through lm-eval's real evaluator on the offline tasks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["mpmoe_docs_mc", "mpmoe_docs_gen", "mpmoe_docs_ppl", "mpmoe_docs_lastword"]


def _eval(argv, capsys=None) -> int:
    from mpmoe.eval.cli import main

    return main([*argv, "--no-progress", "--bootstrap-iters", "0"])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def evaluated(eval_checkpoints, tmp_path_factory):
    """Both checkpoints on the full offline suite (all four request types)."""
    out = {}
    for name in ("trained", "untrained"):
        path = tmp_path_factory.mktemp(f"eval-{name}")
        assert _eval(["--load", str(eval_checkpoints[name]), "--tasks", "mpmoe_local",
                      "--output-path", str(path), "--batch-size", "16"]) == 0
        out[name] = path
    return out


def test_all_request_types_through_the_evaluator(evaluated):
    res = _results(evaluated["trained"])
    meta = res["mpmoe"]
    assert meta["iteration"] == 60 and meta["routing"] == "mope" and meta["dtype"] == "fp32"
    assert meta["checkpoint"].endswith("iter_0000060") and meta["world_size"] == 1
    r = res["results"]
    assert set(LOCAL) <= set(r)
    assert {"acc,none", "acc_norm,none"} <= set(r["mpmoe_docs_mc"])               # loglikelihood (MC)
    assert {"exact_match,none", "word_prefix,none"} <= set(r["mpmoe_docs_gen"])    # generate_until
    assert {"bits_per_byte,none", "word_perplexity,none"} <= set(r["mpmoe_docs_ppl"])  # rolling
    assert {"acc,none", "perplexity,none"} <= set(r["mpmoe_docs_lastword"])        # loglikelihood
    assert res["n-samples"]["mpmoe_docs_mc"]["effective"] == 200
    table = (evaluated["trained"] / "results.md").read_text()
    assert "mpmoe_docs_ppl" in table and "bits_per_byte" in table and "iteration 60" in table


def test_trained_model_beats_untrained_on_held_out_text(evaluated):
    trained = _results(evaluated["trained"])["results"]
    untrained = _results(evaluated["untrained"])["results"]
    bpb_t = trained["mpmoe_docs_ppl"]["bits_per_byte,none"]
    bpb_u = untrained["mpmoe_docs_ppl"]["bits_per_byte,none"]
    assert bpb_t < bpb_u - 0.3, (bpb_t, bpb_u)
    acc_t = trained["mpmoe_docs_mc"]["acc_norm,none"]
    acc_u = untrained["mpmoe_docs_mc"]["acc_norm,none"]
    assert acc_t > acc_u + 0.05, (acc_t, acc_u)
    # the untrained model is at chance on 4-way choices
    assert 0.15 < acc_u < 0.35


def test_routing_topk_and_samples(eval_checkpoints, tmp_path):
    out = tmp_path / "topk"
    assert _eval(["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_docs_lastword",
                  "--routing", "topk", "--limit", "8", "--log-samples", "--output-path", str(out)]) == 0
    res = _results(out)
    assert res["mpmoe"]["routing"] == "topk" and res["mpmoe"]["limit"] == 8
    rows = (out / "samples_mpmoe_docs_lastword.jsonl").read_text().splitlines()
    assert len(rows) == 8 and "resps" in json.loads(rows[0])


def test_standard_errors_are_bootstrapped_without_a_forked_pool(eval_checkpoints, tmp_path, monkeypatch):
    """lm-eval bootstraps perplexity's standard error in a fork()ed multiprocessing pool; forked
    from mpmoe's threaded process a worker can deadlock and the evaluation hang (seen in CI:
    `mpmoe eval harness`, about 1 run in 8). mpmoe's eval bootstraps in its own process."""
    import multiprocessing

    from mpmoe.eval.cli import main

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval started a multiprocessing pool")

    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    out = tmp_path / "out"
    assert main(["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_docs_lastword", "--limit", "8",
                 "--bootstrap-iters", "2000", "--output-path", str(out), "--no-progress"]) == 0
    assert _results(out)["results"]["mpmoe_docs_lastword"]["perplexity_stderr,none"] > 0


def test_errors_are_one_line(tmp_path, eval_checkpoints, capsys):
    assert _eval(["--load", str(tmp_path / "missing"), "--tasks", "mpmoe_local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpmoe eval: error:") and "missing" in err[0]
    assert _eval(["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_docs_mcq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mpmoe_docs_mcq" in err[0] and "mpmoe_docs_mc" in err[0]
    assert _eval(["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_local",
                  "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert _eval(["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_local",
                  "--moe-dynamic-mask", "cooccurrence", "--output-path", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "mpmoe eval: error: --moe-dynamic-mask-mode cooccurrence needs --moe-cooccurrence-stats-dir"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_task_fails_fast_naming_the_dataset(eval_checkpoints, tmp_path, monkeypatch, capsys):
    """boolq needs the hub: unreachable + not cached -> exit 2 in seconds, before the model loads."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    rc = _eval(["--load", str(eval_checkpoints["trained"]), "--tasks", "boolq,mpmoe_docs_mc",
                "--output-path", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2
    assert "boolq" in err and "super_glue" in err, err
    assert not (tmp_path / "out").exists()
    assert elapsed < 90, elapsed  # lm-eval's task index is most of it; no network retries


def test_data_parallel_two_ranks_match_one(eval_checkpoints, tmp_path):
    """torchrun with 2 CPU ranks (gloo): each rank evaluates half the documents; the
    gathered metrics equal the single-process ones."""
    common = ["--load", str(eval_checkpoints["trained"]), "--tasks", "mpmoe_docs_mc,mpmoe_docs_ppl",
              "--limit", "12", "--no-progress", "--bootstrap-iters", "0"]
    assert _eval([*common, "--output-path", str(tmp_path / "one")]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mpmoe", "eval", *common, "--output-path", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert two["mpmoe"]["world_size"] == 2
    for task, metric in (("mpmoe_docs_mc", "acc_norm,none"), ("mpmoe_docs_mc", "acc,none"),
                         ("mpmoe_docs_ppl", "bits_per_byte,none")):
        assert two["results"][task][metric] == pytest.approx(one["results"][task][metric], rel=1e-4)
    assert two["n-samples"]["mpmoe_docs_mc"]["effective"] == 12


def test_run_all_evals_script_end_to_end(eval_checkpoints, tmp_path):
    """scripts/run_all_evals.sh on a real run folder with the offline tasks: one table,
    and a second call skips what is done."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(eval_checkpoints["trained"], run / "mope")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TASKS="mpmoe_docs_mc",
               LIMIT="4", MPMOE=f"{sys.executable} -m mpmoe", NPROC="1")
    cmd = ["bash", str(REPO / "scripts" / "run_all_evals.sh"), str(run), str(tmp_path / "out"),
           "--bootstrap-iters", "0", "--no-progress"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "mpmoe_docs_mc (0)" in table and "| 60 |" in table and "mope" in table
    res = _results(tmp_path / "out" / "mope" / "iter_0000060" / "custom")
    assert res["n-samples"]["mpmoe_docs_mc"]["effective"] == 4
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "skip" in second.stdout + second.stderr


def test_lm_eval_own_cli_resolves_the_mpmoe_model(eval_checkpoints, tmp_path):
    """`mpmoe eval harness ...` is lm-eval's CLI with the model registered; --model_args
    batch_size wins over the CLI's default, and its default --device cuda:0 falls back
    to the CPU here."""
    from mpmoe.eval import TASKS_DIR

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mpmoe", "eval", "harness", "--model", "mpmoe",
           "--model_args", f"load={eval_checkpoints['trained']},batch_size=4,progress=false",
           "--tasks", "mpmoe_docs_lastword", "--include_path", str(TASKS_DIR), "--limit", "4",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mpmoe_docs_lastword" in proc.stdout
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    res = json.loads(written[0].read_text())
    assert "perplexity,none" in res["results"]["mpmoe_docs_lastword"]
