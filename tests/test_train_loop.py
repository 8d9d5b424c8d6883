"""The training loop: embedded default learns, SIGKILL + --load continues the same curve."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_testing import make_indexed_dataset, read_metrics, tiny_flags

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _cli(argv):
    return [sys.executable, "-m", "mpmoe.train.cli", *argv]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_indexed_dataset(tmp_path_factory.mktemp("data"))


def test_embedded_default_lowers_validation_loss(tmp_path):
    """tiny-cpu with no data flag: embedded corpus + tokenizer, a MoPE model, val loss falls."""
    from mpmoe.train.cli import main

    run = tmp_path / "run"
    rc = main(["--train-iters", "24", "--eval-interval", "8", "--eval-iters", "1",
               "--global-batch-size", "4", "--micro-batch-size", "4", "--seq-length", "64",
               "--log-interval", "4", "--run-dir", str(run), "--no-progress",
               "--embedded-cache-dir", os.environ.get("MPMOE_TEST_CACHE", str(tmp_path / "cache"))])
    assert rc == 0
    metrics = read_metrics(run)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3
    assert val[-1] < val[0] - 0.3, val
    logged = [m for m in metrics if "loss" in m]
    assert {"iteration", "loss", "lr", "tokens_per_s"} <= set(logged[0])
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in logged)
    config = (run / "config.json").read_text()
    assert '"source": "embedded"' in config
    # TensorBoard event file with the MoE scalars
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_scalars(tmp_path, dataset):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mpmoe.train.cli import main

    run = tmp_path / "run"
    flags = tiny_flags(dataset, run, **{"train-iters": 4, "no-tensorboard": False,
                                        "log-interval": 2, "eval-interval": 2})
    assert main(flags) == 0
    (events,) = list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/tokens_per_s", "val/loss",
                "moe/load_max_over_mean/layer_2", "moe/load_min/layer_2", "moe/load_std/layer_2",
                "mope/sigma_diag_mean/layer_2", "mope/sigma_max_corr/layer_2"]:
        assert tag in tags, sorted(tags)
    assert any(t.startswith("moe/load_balancing_loss/layer_") for t in tags), sorted(tags)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.01)


def kill_and_resume(tmp_path: Path, dataset: str, common: dict) -> tuple[dict, dict, int]:
    """An uninterrupted run, and a run SIGKILLed after its first checkpoint then resumed with
    --load: (metrics by iteration of the first, of the resumed one, the resumed iteration)."""
    full = tmp_path / "full"
    a = subprocess.run(_cli(tiny_flags(dataset, full, save=str(tmp_path / "ck_full"), **common)),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr
    ck = tmp_path / "ck"
    killed = subprocess.Popen(_cli(tiny_flags(dataset, tmp_path / "killed", save=str(ck), **common)),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(ck / "latest_checkpointed_iteration.txt", killed, timeout=300)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    start = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert (ck / f"iter_{start:07d}" / "metadata.json").is_file()
    resumed = tmp_path / "resumed"
    c = subprocess.run(_cli(tiny_flags(dataset, resumed, save=str(ck), load=str(ck), **common)),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr
    return ({m["iteration"]: m for m in read_metrics(full)},
            {m["iteration"]: m for m in read_metrics(resumed)}, start)


@pytest.mark.parametrize("extra", [{}, {"moe-sigma-decay-rate": 0.05, "moe-sigma-shrinkage": 0.1,
                                       "last-trainable-layers": 1}], ids=["default", "decay-prior-frozen"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, dataset, extra):
    """SIGKILL after the first checkpoint; --load continues the same losses (fp32: 1e-6)."""
    common = {"train-iters": 40, "save-interval": 5, "eval-interval": 10, "no-progress": True, **extra}
    ref, got, start = kill_and_resume(tmp_path, dataset, common)
    assert min(got) == start + 1 and max(got) == 40
    for it, m in got.items():
        assert abs(m["loss"] - ref[it]["loss"]) <= 1e-6, (it, m["loss"], ref[it]["loss"])
        assert abs(m["lr"] - ref[it]["lr"]) <= 1e-12
        if "val_loss" in m:
            assert abs(m["val_loss"] - ref[it]["val_loss"]) <= 1e-6


def test_checkpoint_directory_is_atomic(tmp_path, dataset):
    from mpmoe.train.cli import main

    ck = tmp_path / "ck"
    (ck / "iter_0000002.tmp").mkdir(parents=True)  # debris of a run killed mid-save
    assert main(tiny_flags(dataset, tmp_path / "run", save=str(ck),
                           **{"train-iters": 2, "save-interval": 2})) == 0
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    # resuming a finished run does no more iterations and keeps the state
    assert main(tiny_flags(dataset, tmp_path / "run2", load=str(ck), **{"train-iters": 2})) == 0


def test_loading_a_checkpoint_of_another_shape_is_a_one_line_error(tmp_path, dataset, capsys):
    from mpmoe.train.cli import main

    ckpt = tmp_path / "ckpt"
    assert main(tiny_flags(dataset, tmp_path / "a", **{"train-iters": 0}) + ["--save", str(ckpt)]) == 0
    assert (ckpt / "latest_checkpointed_iteration.txt").is_file()
    capsys.readouterr()
    rc = main(tiny_flags(dataset, tmp_path / "b", **{"train-iters": 1, "hidden-size": 48}) + ["--load", str(ckpt)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mpmoe train: error:") and "holds another model (--hidden-size 32 -> 48" in err[-1], err[-3:]
