"""Training-process faults: signals, kills during a save (no orphans), --load forms,
NaN/inf losses, metrics.jsonl after a resume, optional dependencies, resharding.

The kill tests record every descendant of the trainer while it runs and, whatever the
outcome, kill the ones still alive at the end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from train_testing import make_indexed_dataset, read_metrics, tiny_flags

REPO = Path(__file__).resolve().parents[1]
TRACKER = "latest_checkpointed_iteration.txt"


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_indexed_dataset(tmp_path_factory.mktemp("data"))


class Trainer:
    """``mpmoe train`` in a subprocess; remembers every descendant it was seen with."""

    def __init__(self, flags, tmp_path, env=None, launcher=()):
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, *(launcher or ["-m"]), "mpmoe", "train", *flags],
                                     env={**_env(), **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        self.seen: dict[int, float] = {}  # pid -> create time

    def watch(self) -> list:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for c in children:
            try:
                self.seen.setdefault(c.pid, c.create_time())
            except psutil.NoSuchProcess:
                pass
        return children

    def survivors(self, wait: float = 5.0) -> list:
        """Descendants seen earlier that are still alive after ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            alive = []
            for pid, created in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.stderr_path.read_text()

    def cleanup(self) -> None:
        for p in [self.proc] + self.survivors(wait=0):
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(timeout=30)
        self._err.close()


def _wait_until(trainer: Trainer, condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if trainer.proc.poll() is not None:
            raise AssertionError(f"training exited early: {trainer.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def _logged(run_dir: Path, iteration: int):
    def check():
        path = run_dir / "metrics.jsonl"
        return path.is_file() and f'"iteration": {iteration},' in path.read_text()
    return check


# --------------------------------------------------------------------------- kills and signals
@pytest.mark.slow  # two trainers (or ranks) on 2 CPU cores: 30-60 s
def test_sigkill_during_a_save_leaves_no_process_and_resume_logs_each_iteration_once(tmp_path, dataset,
                                                                                    capsys):
    """SIGKILL while a checkpoint is written (a ``.tmp`` folder exists, writer children if
    any are running): no descendant of the trainer survives; the resumed run's
    metrics.jsonl holds every iteration exactly once."""
    ck, run = tmp_path / "ck", tmp_path / "run"
    common = {"save": str(ck), "save-interval": 1, "no-progress": True, "eval-interval": 100}
    t = Trainer(tiny_flags(dataset, run, **{"train-iters": 60, **common}), tmp_path)
    try:
        saves = set()

        def mid_save():
            tmp = [p.name for p in ck.glob("iter_*.tmp")]
            saves.update(tmp)
            # the kill lands inside a save (not the first: resume from a checkpoint), one with
            # writer children running if the writer has any, else the 8th
            return bool(tmp) and len(saves) >= 3 and (bool(t.watch()) or len(saves) >= 8)

        _wait_until(t, mid_save)
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait(timeout=30)
        assert t.proc.returncode == -signal.SIGKILL
        assert not t.survivors(), [(p.pid, p.cmdline()[:3]) for p in t.survivors(wait=0)]
    finally:
        t.cleanup()
    from mpmoe.train.cli import main

    killed_at = max(m["iteration"] for m in read_metrics(run))
    start = int((ck / TRACKER).read_text())
    assert start <= killed_at

    common.pop("save-interval")
    capsys.readouterr()
    assert main(tiny_flags(dataset, run, load=str(ck), **{"train-iters": killed_at + 2, **common})) == 0
    assert f"resuming from {ck / f'iter_{start:07d}'} (iteration {start})" in capsys.readouterr().err
    iterations = [m["iteration"] for m in read_metrics(run)]
    assert iterations == list(range(1, killed_at + 3)), iterations


@pytest.mark.parametrize("sig,code,save_on_signal", [(signal.SIGTERM, 143, True),
                                                     (signal.SIGINT, 130, False)])
def test_signal_stops_at_a_step_boundary(tmp_path, dataset, sig, code, save_on_signal):
    """One line, exit 128 + signal, no traceback, no process left; a checkpoint of the last
    step unless --no-save-on-signal."""
    ck, run = tmp_path / "ck", tmp_path / "run"
    t = Trainer(tiny_flags(dataset, run, save=str(ck), **{
        "train-iters": 500, "no-progress": True, "eval-interval": 100,
        "no-save-on-signal": not save_on_signal}), tmp_path)
    try:
        _wait_until(t, _logged(run, 2))
        t.watch()  # no save is running: descendants, if any, are megatron's or torch's helpers
        t.proc.send_signal(sig)
        t.proc.wait(timeout=120)
        assert not t.survivors()
    finally:
        t.cleanup()
    err = t.stderr()
    assert t.proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    stopped = max(m["iteration"] for m in read_metrics(run))
    head = f"mpmoe train: stopped by {signal.Signals(sig).name} at iteration {stopped}; "
    if save_on_signal:
        assert last == head + f"checkpoint {ck / f'iter_{stopped:07d}'}"
        assert int((ck / TRACKER).read_text()) == stopped
    else:
        assert last == head + "no checkpoint written (no --save, or --no-save-on-signal)"
        assert not (ck / TRACKER).exists()


def test_stop_signals_second_signal_exits_at_once():
    """In a child process: the first SIGTERM is recorded, a second one after the grace
    period exits 128 + signal at once, with one line."""
    code = (
        "import os, signal, time\n"
        "from mpmoe.train.faults import StopSignals\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.05)\n"
        "    assert s.signum == signal.SIGINT, s.signum\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # within the grace second: the same request\n"
        "    time.sleep(0.05)\n"
        "    print('recorded', flush=True)\n"
        "    time.sleep(s.GRACE_S + 0.1)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 143, r.stderr
    assert r.stdout.strip() == "recorded"
    assert r.stderr.strip() == "mpmoe train: SIGTERM again: stopping now, without a checkpoint"


# --------------------------------------------------------------------------- --load forms
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset):
    """A save folder with iterations 2 and 4 (latest: 4)."""
    from mpmoe.train.cli import main

    tmp = tmp_path_factory.mktemp("ck")
    ck = tmp / "ck"
    assert main(tiny_flags(dataset, tmp / "run", save=str(ck), **{
        "train-iters": 4, "save-interval": 2, "no-progress": True})) == 0
    return ck


def test_load_accepts_a_save_folder_or_one_iteration_folder(tmp_path, dataset, checkpoint, capsys):
    from mpmoe.train.cli import main

    for load, start in ((checkpoint, 4), (checkpoint / "iter_0000002", 2)):
        run = tmp_path / f"run{start}"
        capsys.readouterr()
        assert main(tiny_flags(dataset, run, load=str(load), **{"train-iters": 5,
                                                                "no-progress": True})) == 0
        err = capsys.readouterr().err
        assert f"mpmoe train: resuming from {checkpoint / f'iter_{start:07d}'} (iteration {start})" in err
        assert [m["iteration"] for m in read_metrics(run)] == list(range(start + 1, 6))


def test_load_without_a_checkpoint(tmp_path, dataset, capsys):
    """An empty or absent --load folder is an error, unless it is also --save (auto-resume)."""
    from mpmoe.train.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(tiny_flags(dataset, tmp_path / "a", load=str(empty), **{"train-iters": 1})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpmoe train: error: --load {empty} holds no checkpoint")
    (tmp_path / "iter_x").mkdir()
    assert main(tiny_flags(dataset, tmp_path / "a", load=str(tmp_path / "iter_x"),
                           **{"train-iters": 1})) == 2
    assert "not an iter_XXXXXXX checkpoint folder" in capsys.readouterr().err

    auto = tmp_path / "auto"  # absent: the first run of a requeued job
    flags = tiny_flags(dataset, tmp_path / "b", load=str(auto), save=str(auto),
                       **{"train-iters": 2, "no-progress": True})
    assert main(flags) == 0
    assert f"mpmoe train: no checkpoint in {auto} yet: starting from scratch" in capsys.readouterr().err
    assert main(flags + ["--train-iters", "3"]) == 0
    assert f"resuming from {auto / 'iter_0000002'} (iteration 2)" in capsys.readouterr().err


# --------------------------------------------------------------------------- NaN / inf
def _nan_at(monkeypatch, iterations: set):
    """Make the loss of the given (1-based) iterations NaN."""
    import torch

    from mpmoe.train import loop

    real = loop._loss_func
    state = {"calls": 0}

    def loss_func(loss_mask, output_tensor):
        loss_sum, n, report = real(loss_mask, output_tensor)
        if not output_tensor.requires_grad:  # evaluation
            return loss_sum, n, report
        it = state["calls"] // 2 + 1  # 2 micro-batches per iteration in tiny_flags
        state["calls"] += 1
        if it in iterations:
            loss_sum = loss_sum * float("nan")
            report = {"lm loss": report["lm loss"] * torch.tensor([float("nan"), 1.0])}
        return loss_sum, n, report

    monkeypatch.setattr(loop, "_loss_func", loss_func)


def test_nan_loss_stops_with_one_line(tmp_path, dataset, monkeypatch, capsys):
    from mpmoe.train.cli import main

    _nan_at(monkeypatch, {3})
    ck = tmp_path / "ck"
    rc = main(tiny_flags(dataset, tmp_path / "run", save=str(ck), **{
        "train-iters": 6, "eval-interval": 100, "no-progress": True, "save-interval": 2}))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mpmoe train: error: iteration 3: the loss is nan; stopped before "
                              "the optimizer step"), err[-3:]
    assert int((ck / TRACKER).read_text()) == 2  # the last good checkpoint is kept


def test_nan_loss_skip_keeps_the_model_finite(tmp_path, dataset, monkeypatch, capsys):
    from mpmoe.train.cli import main

    _nan_at(monkeypatch, {2, 3})
    run = tmp_path / "run"
    assert main(tiny_flags(dataset, run, **{"train-iters": 5, "eval-interval": 5, "on-nan": "skip",
                                           "no-progress": True})) == 0
    err = capsys.readouterr().err
    assert "mpmoe train: iteration 2: the loss is nan: update skipped (--on-nan skip)" in err
    metrics = {m["iteration"]: m for m in read_metrics(run)}
    assert [metrics[i]["skipped"] for i in range(1, 6)] == [False, True, True, False, False]
    assert metrics[5]["nan_skipped"] == 2
    assert math.isfinite(metrics[5]["loss"]) and math.isfinite(metrics[5]["val_loss"])
    # the schedule did not advance on skipped steps: iteration 5 has iteration 3's LR
    assert metrics[5]["lr"] == pytest.approx(_lr_after(dataset, tmp_path, 3))


def test_a_run_that_only_skipped_nan_steps_is_not_done_nor_nothing_to_do(tmp_path, dataset, monkeypatch, capsys):
    from mpmoe.train.cli import main

    _nan_at(monkeypatch, {1, 2})
    rc = main(tiny_flags(dataset, tmp_path / "run", **{"train-iters": 2, "eval-interval": 100, "on-nan": "skip",
                                                      "no-progress": True, "split": "100,0,0"}))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("mpmoe train: error: iteration 2: the run ended with train loss nan"), last
    assert "2 of 2 updates skipped" in last


def test_a_non_finite_expert_bias_stops_naming_its_flag(tmp_path, dataset, monkeypatch, capsys):
    """The bias is driven to inf (as --moe-router-bias-update-rate inf did): the run stops
    before saving, names the flag, whatever --on-nan says."""
    from mpmoe.megatron import remoe as balancing
    from mpmoe.train.cli import main

    real = balancing.update_balancing_state

    def poisoned(models):
        real(models)
        for r in balancing.iter_routers(models):
            if getattr(r, "expert_bias", None) is not None:
                r.expert_bias.fill_(float("inf"))

    monkeypatch.setattr(balancing, "update_balancing_state", poisoned)
    ck = tmp_path / "ck"
    rc = main(tiny_flags(dataset, tmp_path / "run", save=str(ck), **{
        "train-iters": 3, "eval-interval": 100, "no-progress": True, "on-nan": "skip",
        "moe-router-enable-expert-bias": True, "moe-router-score-function": "sigmoid",
        "moe-router-load-balancing-type": "none"}))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "iteration 1: the expert bias of layer" in last and "--moe-router-bias-update-rate" in last, last
    assert not (ck / TRACKER).exists()


def _lr_after(dataset, tmp_path, steps: int) -> float:
    from mpmoe.train.cli import main

    run = tmp_path / "ref"
    assert main(tiny_flags(dataset, run, **{"train-iters": 5, "eval-interval": 5,
                                           "no-progress": True})) == 0
    return {m["iteration"]: m for m in read_metrics(run)}[steps]["lr"]


def test_real_divergence_is_named(tmp_path, dataset, capsys):
    """No monkeypatch: a learning rate of 1e30 makes the loss or gradients non-finite."""
    from mpmoe.train.cli import main

    rc = main(tiny_flags(dataset, tmp_path / "run", **{
        "train-iters": 6, "lr": 1e30, "min-lr": 1e29, "eval-interval": 100, "no-progress": True,
        "clip-grad": 0.0}))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-3:]
    assert " is nan" in err[-1] or " is inf" in err[-1], err[-1]


# --------------------------------------------------------------------------- metrics.jsonl
def test_metrics_keep_lines_up_to_the_resumed_iteration(tmp_path):
    from mpmoe.train.metrics import _drop_lines_after

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "loss": 1.0}) for i in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"iteration": 8, "lo')  # cut short by a kill
    _drop_lines_after(path, 5)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- resharding
def _train_rank(rank, world_size, flags):
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from mpmoe.run.args import parse_args
    from mpmoe.train.loop import train

    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        return train(parse_args(flags))["iteration"]
    except CheckpointingException as exc:
        return str(exc)


@pytest.mark.slow  # two trainers (or ranks) on 2 CPU cores: 30-60 s
def test_one_process_checkpoint_into_two_processes(tmp_path, dataset, checkpoint):
    """DP=2 loads everything (the plain optimizer's state is replicated, keyed by global
    parameter); EP=2 refuses the optimizer in one line naming --no-load-optim (the model
    alone reshards: tests/test_train_distributed.py)."""
    from megatron_testing import run_distributed

    common = {"train-iters": 5, "no-progress": True, "load": str(checkpoint)}
    assert run_distributed(_train_rank, 2, tiny_flags(dataset, tmp_path / "dp2", **common)) == [5, 5]
    assert [m["iteration"] for m in read_metrics(tmp_path / "dp2")] == [5]
    errors = run_distributed(_train_rank, 2, tiny_flags(dataset, tmp_path / "ep2", **{
        **common, "expert-model-parallel-size": 2}))
    assert errors[0] == errors[1] == (
        f"{checkpoint / 'iter_0000004'}: its optimizer state (expert-model-parallel-size 1) does "
        "not load with expert-model-parallel-size 2; pass --no-load-optim to load the model "
        "alone (it reshards)")


# --------------------------------------------------------------------------- optional deps
_BLOCKING_MAIN = """
import importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from mpmoe.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("blocked,argv,expect", [
    ("psutil", ["train", "--save", "{tmp}/ck", "--train-iters", "1"], "psutil (a dependency of mpmoe"),
    ("tokenizers", ["train", "--train-iters", "1"], "mpmoe[data]"),
    ("tokenizers", ["data", "inspect", "{tmp}/x"], "mpmoe[data]"),
    ("lm_eval", ["eval", "--load", "{tmp}"], "mpmoe[eval]"),
    ("ot", ["analyze", "stats", "{tmp}"], "mpmoe[analysis]"),
])
def test_a_missing_dependency_stops_the_verb_in_one_line(tmp_path, blocked, argv, expect):
    """As after a plain `pip install mpmoe` (the module made unimportable in a subprocess):
    exit 2 and one line naming what to install, before any work (never a hang)."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-c", _BLOCKING_MAIN, blocked, *argv], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"mpmoe {argv[0]}: error: ") and blocked in lines[0] and expect in lines[0]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "runs").exists()


def test_help_needs_no_optional_dependency():
    r = subprocess.run([sys.executable, "-c", _BLOCKING_MAIN, "lm_eval", "eval", "--help"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-1000:]


@pytest.mark.slow  # two trainers (or ranks) on 2 CPU cores: 30-60 s
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, dataset):
    """Two ranks launched as torchrun does (RANK/WORLD_SIZE/MASTER_* env); SIGTERM to rank 1
    only: both stop at the same step, write one checkpoint together, exit 143."""
    from mpmoe.megatron.parallel import find_free_port

    ck, run = tmp_path / "ck", tmp_path / "run"
    flags = tiny_flags(dataset, run, save=str(ck), **{"train-iters": 500, "no-progress": True,
                                                      "eval-interval": 100})
    port = str(find_free_port())
    ranks = []
    try:
        for rank in (0, 1):
            t = Trainer(flags, tmp_path, env={"RANK": str(rank), "LOCAL_RANK": str(rank),
                                              "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": port})
            ranks.append(t)
        _wait_until(ranks[0], _logged(run, 2))
        ranks[1].proc.send_signal(signal.SIGTERM)
        for t in ranks:
            t.proc.wait(timeout=120)
            assert not t.survivors()
    finally:
        for t in ranks:
            t.cleanup()
    assert [t.proc.returncode for t in ranks] == [143, 143], ranks[0].stderr()[-2000:]
    stopped = max(m["iteration"] for m in read_metrics(run))
    assert ranks[0].stderr().strip().splitlines()[-1] == (
        f"mpmoe train: stopped by SIGTERM at iteration {stopped}; checkpoint {ck / f'iter_{stopped:07d}'}")
    assert int((ck / TRACKER).read_text()) == stopped
    assert "Traceback" not in ranks[0].stderr() + ranks[1].stderr()


def test_a_present_but_broken_psutil_counts_as_missing(monkeypatch):
    """psutil is imported, not only looked up: megatron's writer hangs on a broken one."""
    from mpmoe.deps import missing

    assert missing(["psutil"], "mpmoe train") is None
    monkeypatch.setitem(sys.modules, "psutil", None)  # present on disk, fails to import
    assert "psutil" in missing(["psutil"], "mpmoe train")


def test_the_missing_dependency_line_names_each_module_and_extra():
    from mpmoe.deps import missing

    one = missing(["no_such_module_a"], "mpmoe x")
    two = missing(["no_such_module_a", "no_such_module_b"], "mpmoe x")
    assert one == "mpmoe x needs no_such_module_a, which is not installed; install no_such_module_a (pip install no_such_module_a)"
    assert two.startswith("mpmoe x needs no_such_module_a, no_such_module_b, which are not installed; install ")


@pytest.mark.slow  # two ranks under torchrun on 2 CPU cores: ~40 s
def test_workers_die_with_their_torchrun_agent(tmp_path, dataset):
    """SIGKILL to the torchrun agent (gloo, 127.0.0.1): both workers end within seconds,
    no checkpoint appears after the kill, and the last complete one stays loadable."""
    from mpmoe.megatron.parallel import find_free_port

    ck, run = tmp_path / "ck", tmp_path / "run"
    flags = tiny_flags(dataset, run, save=str(ck), **{"train-iters": 2000, "no-progress": True,
                                                      "eval-interval": 1000, "save-interval": 3})
    agent = Trainer(flags, tmp_path, launcher=[
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(find_free_port()), "-m"])
    try:
        def checkpoint_and_workers():
            agent.watch()
            return (ck / TRACKER).is_file() and len(agent.seen) >= 2
        _wait_until(agent, checkpoint_and_workers)
        agent.watch()
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(timeout=30)
        time.sleep(0.5)
        complete = sorted(p.name for p in ck.glob("iter_*") if not p.name.endswith(".tmp"))
        tracked = (ck / TRACKER).read_text()
        alive = agent.survivors(wait=10.0)
        assert not alive, [p.cmdline() for p in alive]
        time.sleep(2)
        assert sorted(p.name for p in ck.glob("iter_*") if not p.name.endswith(".tmp")) == complete
        assert (ck / TRACKER).read_text() == tracked
        assert f"iter_{int(tracked):07d}" in complete
    finally:
        agent.cleanup()


def test_default_run_directories_are_claimed_once(tmp_path, monkeypatch):
    """Two runs started in the same second without --run-dir get two folders (mkdir claims
    a name atomically); ranks other than 0 claim nothing."""
    import argparse

    from mpmoe.train import loop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop.time, "strftime", lambda fmt: "20260101-000000")
    args = argparse.Namespace(preset="tiny-cpu")
    first, second, third = (loop._default_run_dir(args) for _ in range(3))
    assert [first, second, third] == ["runs/tiny-cpu-20260101-000000", "runs/tiny-cpu-20260101-000000-2",
                                      "runs/tiny-cpu-20260101-000000-3"]
    assert all((tmp_path / d).is_dir() for d in (first, second, third))
    assert loop._default_run_dir(args, rank=1) == ""
    assert len(list((tmp_path / "runs").iterdir())) == 3
