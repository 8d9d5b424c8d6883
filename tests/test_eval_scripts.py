"""scripts/eval_benchmark.sh and scripts/run_all_evals.sh: the commands they run.

DRY_RUN=1 runs check the printed commands; real runs use a fake `mpmoe` (MPMOE=...) that
logs its arguments, writes a results.json per `mpmoe eval` call and hands `mpmoe eval table`
to the real mpmoe.eval.table.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "eval_benchmark.sh"
RUN_ALL = ROOT / "scripts" / "run_all_evals.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_SCRIPT_VARS = ("SUITE", "TASKS", "MMLU_SHOTS", "BBH_SHOTS", "GSM8K_SHOTS", "CUSTOM_SHOTS",
                "BBH_MAX_GEN_TOKS", "BATCH_SIZE", "GEN_BATCH_SIZE", "ROUTING", "LIMIT", "NPROC",
                "MPMOE", "PYTHON", "TORCHRUN", "FORCE", "DRY_RUN", "EVAL_BENCHMARK")

FAKE_MPMOE = r'''
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
assert args[0] == "eval", args
if args[1:2] == ["table"]:
    sys.path.insert(0, os.environ["MPMOE_ROOT"])
    from mpmoe.eval.table import main
    sys.exit(main(args[2:]))
opts = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
tasks = opts["--tasks"].split(",")
if any(t in os.environ.get("FAKE_FAIL_TASKS", "").split(",") for t in tasks):
    print("mpmoe eval: error: cannot get the data of the requested tasks: hub dataset "
          "'allenai/ai2_arc' config 'ARC-Easy' for task arc_easy", file=sys.stderr)
    sys.exit(2)
shots = int(opts["--num-fewshot"])
out = Path(opts["--output-path"])
out.mkdir(parents=True, exist_ok=True)
load = os.path.abspath(opts["--load"])
iteration = int(Path(load).name.split("_")[1]) if Path(load).name.startswith("iter_") else 0
(out / "results.json").write_text(json.dumps({
    "results": {t: {"alias": t, "acc,none": 0.5} for t in tasks},
    "group_subtasks": {}, "n-shot": {t: shots for t in tasks},
    "mpmoe": {"checkpoint": load, "iteration": iteration, "routing": "mope", "tasks": tasks,
              "num_fewshot": shots},
}))
'''


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    env.update(MPMOE="mpmoe", NPROC="1", FAKE_LOG=str(tmp_path / "calls.log"), MPMOE_ROOT=str(ROOT))
    env.update(extra)
    return env


def _run(script: Path, args: list, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    """The printed `+ cmd ...` lines, split like the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _opt(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


@pytest.fixture
def fake_mpmoe(tmp_path):
    path = tmp_path / "fake_mpmoe.py"
    path.write_text(FAKE_MPMOE)
    return f"{sys.executable} {path}"


def _calls(tmp_path: Path) -> list[list[str]]:
    import json

    log = tmp_path / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------- syntax and help
@pytest.mark.parametrize("script", [BENCH, RUN_ALL])
def test_syntax_executable_and_help(script, tmp_path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(script, os.X_OK)
    for flag in ("-h", "--help"):
        proc = _run(script, [flag], _env(tmp_path))
        assert "DRY_RUN" in proc.stdout and proc.stderr == ""
    proc = _run(script, [], _env(tmp_path), check=False)
    assert proc.returncode == 2 and "error" in proc.stderr


# --------------------------------------------------------------------------- eval_benchmark.sh
def test_benchmark_default_suite(tmp_path):
    out = tmp_path / "out"
    proc = _run(BENCH, ["ck/iter_0000100", out, "--dtype", "bf16"], _env(tmp_path, DRY_RUN="1"))
    cmds = _commands(proc.stdout)
    assert not out.exists()                                       # dry run: nothing written
    evals, table = cmds[:-1], cmds[-1]
    assert [c[:2] for c in evals] == [["mpmoe", "eval"]] * 5
    got = [(_opt(c, "--tasks"), _opt(c, "--num-fewshot"), _opt(c, "--batch-size"),
            _opt(c, "--output-path"), _opt(c, "--gen-kwargs")) for c in evals]
    assert got == [
        ("mmlu", "5", "32", f"{out}/mmlu", None),
        ("boolq,hellaswag,arc_easy,arc_challenge", "0", "32", f"{out}/zeroshot", None),
        ("bbh_fewshot", "3", "16", f"{out}/bbh", "max_gen_toks=64"),
        ("gsm8k", "3", "16", f"{out}/gsm8k", None),
        ("piqa,winogrande,openbookqa,sciq,lambada_openai", "0", "32", f"{out}/flame", None),
    ]
    for c in evals:
        assert _opt(c, "--load") == "ck/iter_0000100" and _opt(c, "--routing") == "auto"
        assert c[-2:] == ["--dtype", "bf16"] and "--limit" not in c
    assert table == ["mpmoe", "eval", "table", str(out), "--out", f"{out}/summary.md"]


def test_benchmark_env_overrides(tmp_path):
    env = _env(tmp_path, DRY_RUN="1", SUITE="bbh mmlu", MMLU_SHOTS="0", BBH_SHOTS="1",
               BATCH_SIZE="8", GEN_BATCH_SIZE="4", ROUTING="topk", LIMIT="10", BBH_MAX_GEN_TOKS="32")
    cmds = _commands(_run(BENCH, ["ck", tmp_path / "o"], env).stdout)[:-1]
    assert [(_opt(c, "--tasks"), _opt(c, "--num-fewshot"), _opt(c, "--batch-size")) for c in cmds] == [
        ("bbh_fewshot", "1", "4"), ("mmlu", "0", "8")]
    assert _opt(cmds[0], "--gen-kwargs") == "max_gen_toks=32"
    assert all(_opt(c, "--routing") == "topk" and _opt(c, "--limit") == "10" for c in cmds)


def test_benchmark_torchrun_when_nproc_2(tmp_path):
    env = _env(tmp_path, DRY_RUN="1", NPROC="2", TORCHRUN="torchrun", SUITE="gsm8k")
    cmds = _commands(_run(BENCH, ["ck", tmp_path / "o"], env).stdout)
    assert cmds[0][:8] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "mpmoe",
                           "eval", "--load"]
    assert cmds[-1][:3] == ["mpmoe", "eval", "table"]          # the table is not distributed


def test_benchmark_custom_tasks(tmp_path):
    env = _env(tmp_path, DRY_RUN="1", TASKS="mpmoe_local", SUITE="mmlu")
    cmds = _commands(_run(BENCH, ["ck", tmp_path / "o"], env).stdout)
    assert len(cmds) == 2
    assert (_opt(cmds[0], "--tasks"), _opt(cmds[0], "--num-fewshot"), _opt(cmds[0], "--output-path")) == (
        "mpmoe_local", "0", f"{tmp_path}/o/custom")


def test_benchmark_skips_done_groups_unless_forced(tmp_path):
    out = tmp_path / "o"
    (out / "zeroshot").mkdir(parents=True)
    (out / "zeroshot" / "results.json").write_text("{}")
    proc = _run(BENCH, ["ck", out], _env(tmp_path, DRY_RUN="1", SUITE="mmlu zeroshot"))
    assert [_opt(c, "--tasks") for c in _commands(proc.stdout)[:-1]] == ["mmlu"]
    assert "skip zeroshot" in proc.stderr
    proc = _run(BENCH, ["ck", out], _env(tmp_path, DRY_RUN="1", SUITE="mmlu zeroshot", FORCE="1"))
    assert len(_commands(proc.stdout)) == 3


@pytest.mark.parametrize("bad", [{"SUITE": "mmlu nope"}, {"MMLU_SHOTS": "five"}, {"NPROC": "0"},
                                 {"LIMIT": "all"}])
def test_benchmark_bad_settings_run_nothing(tmp_path, bad):
    proc = _run(BENCH, ["ck", tmp_path / "o"], _env(tmp_path, DRY_RUN="1", **bad), check=False)
    assert proc.returncode == 2 and "error" in proc.stderr and not _commands(proc.stdout)


def test_benchmark_real_run_with_fake_mpmoe(tmp_path, fake_mpmoe):
    out = tmp_path / "o"
    ck = tmp_path / "ckpt" / "iter_0000100"
    ck.mkdir(parents=True)
    _run(BENCH, [ck, out], _env(tmp_path, MPMOE=fake_mpmoe))
    calls = _calls(tmp_path)
    assert [c[1] for c in calls] == ["--load"] * 5 + ["table"]
    for group in ("mmlu", "zeroshot", "bbh", "gsm8k", "flame"):
        assert (out / group / "results.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "| mmlu (5) | boolq (0) |" in summary and "bbh_fewshot (3)" in summary
    # a second run skips every group and only remakes the table
    _run(BENCH, [ck, out], _env(tmp_path, MPMOE=fake_mpmoe))
    assert [c[1] for c in _calls(tmp_path)[6:]] == ["table"]


def test_benchmark_stops_at_a_hub_error(tmp_path, fake_mpmoe):
    out = tmp_path / "o"
    env = _env(tmp_path, MPMOE=fake_mpmoe, FAKE_FAIL_TASKS="arc_easy")
    (tmp_path / "ck").mkdir()
    proc = _run(BENCH, [tmp_path / "ck", out], env, check=False)
    assert proc.returncode == 2
    assert "mpmoe eval: error: cannot get the data" in proc.stderr
    assert "group zeroshot failed (exit 2)" in proc.stderr
    assert [_opt(c, "--tasks") for c in _calls(tmp_path)] == ["mmlu", "boolq,hellaswag,arc_easy,arc_challenge"]
    assert not (out / "summary.md").exists()


# --------------------------------------------------------------------------- run_all_evals.sh
@pytest.fixture
def run_tree(tmp_path):
    """A run folder: 3 checkpoints (two runs, one nested), a .tmp one, one without metadata."""
    run = tmp_path / "runs"
    good = ["a/iter_0000100", "a/iter_0000200", "b/save/iter_0000050"]
    for rel in good + ["a/iter_0000300.tmp"]:
        (run / rel).mkdir(parents=True)
        (run / rel / "metadata.json").write_text("{}")
    (run / "a" / "iter_0000400").mkdir()          # still being written / not a checkpoint
    (run / "a" / "latest_checkpointed_iteration.txt").write_text("200")
    return run, good


def test_run_all_dry_run_finds_checkpoints(tmp_path, run_tree):
    run, good = run_tree
    out = run / "eval"
    (out / "a/iter_0000100/mmlu").mkdir(parents=True)
    (out / "a/iter_0000100/mmlu/results.json").write_text("{}")
    proc = _run(RUN_ALL, [run], _env(tmp_path, DRY_RUN="1", SUITE="mmlu zeroshot"))
    cmds = _commands(proc.stdout)
    evals = [c for c in cmds if c[:2] == ["mpmoe", "eval"] and c[2] != "table"]
    loads = [_opt(c, "--load") for c in evals]
    assert loads == [str(run / good[0])] + [str(run / good[1])] * 2 + [str(run / good[2])] * 2
    assert [_opt(c, "--output-path") for c in evals] == [
        f"{out}/a/iter_0000100/zeroshot",
        f"{out}/a/iter_0000200/mmlu", f"{out}/a/iter_0000200/zeroshot",
        f"{out}/b/save/iter_0000050/mmlu", f"{out}/b/save/iter_0000050/zeroshot"]
    assert "skip mmlu" in proc.stderr
    assert cmds[-1] == ["mpmoe", "eval", "table", str(out), "--out", f"{out}/summary.md",
                        "--csv", f"{out}/summary.csv"]
    assert not (out / "summary.md").exists()


def test_run_all_out_dir_and_flags_pass_through(tmp_path, run_tree):
    run, _ = run_tree
    env = _env(tmp_path, DRY_RUN="1", SUITE="gsm8k", NPROC="2", TORCHRUN="torchrun", GSM8K_SHOTS="8")
    cmds = _commands(_run(RUN_ALL, [run, tmp_path / "ev", "--dtype", "fp32"], env).stdout)
    evals = [c for c in cmds if c[0] == "torchrun"]
    assert len(evals) == 3
    assert all(_opt(c, "--num-fewshot") == "8" and c[-2:] == ["--dtype", "fp32"] for c in evals)
    assert _opt(evals[0], "--output-path") == f"{tmp_path}/ev/a/iter_0000100/gsm8k"


def test_run_all_without_checkpoints_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(RUN_ALL, [tmp_path / "empty"], _env(tmp_path, DRY_RUN="1"), check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_run_all_real_run_one_table(tmp_path, run_tree, fake_mpmoe):
    run, good = run_tree
    env = _env(tmp_path, MPMOE=fake_mpmoe, SUITE="zeroshot flame")
    _run(RUN_ALL, [run], env)
    out = run / "eval"
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| checkpoint | iter | routing | boolq (0) |")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:5]]
    assert [(r[0], r[1]) for r in body] == [("a", "100"), ("a", "200"), ("b/save", "50")]
    assert (out / "summary.csv").read_text().count("\n") == 4
    n_calls = len(_calls(tmp_path))
    _run(RUN_ALL, [run], env)          # everything done: only the tables again
    assert all(c[1] == "table" for c in _calls(tmp_path)[n_calls:])


def test_benchmark_refuses_a_missing_checkpoint(tmp_path, fake_mpmoe):
    proc = _run(BENCH, [tmp_path / "nope", tmp_path / "o"], _env(tmp_path, MPMOE=fake_mpmoe), check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and not _calls(tmp_path)
