"""The Megatron-LM patch series (patches/megatron-lm/core_r0.19.0) on a stock tree.

The tree is assembled in a temporary git repository from the installed megatron-core
wheel's ``megatron/`` (0.19.2 ships ``megatron.training`` identical to Megatron-LM's
``core_r0.19.0``) and the pristine top-level scripts in
``../shared/upstream/megatron-lm-core_r0.19.0/``. Needs the Python 3.12 +
megatron-core 0.19 environment; skipped elsewhere.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpmoe.megatron_lm.flags import preset_flags

ROOT = Path(__file__).resolve().parents[1]
SERIES = sorted((ROOT / "patches" / "megatron-lm" / "core_r0.19.0").glob("*.patch"))
UPSTREAM = ROOT.parent / "shared" / "upstream" / "megatron-lm-core_r0.19.0"
PROBE = Path(__file__).with_name("megatron_lm_probe.py")
SCRIPTS = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "LICENSE")


def _skip_reason():
    if importlib.util.find_spec("megatron.training") is None:
        return "needs megatron-core 0.19 (megatron.training; Python 3.12: make test-megatron-latest)"
    from megatron.core.package_info import __version__

    if not __version__.startswith("0.19."):
        return f"the series targets Megatron-LM core_r0.19.0; megatron-core {__version__} is installed"
    if not all((UPSTREAM / name).is_file() for name in SCRIPTS):
        return f"upstream scripts not found in {UPSTREAM}"
    if shutil.which("git") is None:
        return "git not found"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "core.autocrlf=false"]

# What a CPU run needs on top of a preset: no Transformer Engine / Apex fusions, CPU init.
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo", "--no-rope-fusion",
             "--use-cpu-initialization", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
             "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-gradient-accumulation-fusion"]


def _git(cwd, *args):
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """``{"base": unpatched tree, "patched": tree with the series applied by git am}``."""
    import megatron

    root = tmp_path_factory.mktemp("megatron-lm")
    base = root / "base"
    shutil.copytree(Path(megatron.__path__[0]), base / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in SCRIPTS:
        shutil.copy(UPSTREAM / name, base / name)
    _git(base, "init", "-q")
    _git(base, "add", "-A")
    _git(base, "commit", "-qm", "upstream")
    patched = root / "patched"
    _git(base, "worktree", "add", "-q", str(patched))
    _git(patched, "apply", "--check", *map(str, SERIES))
    _git(patched, "am", "-q", *map(str, SERIES))
    return {"base": base, "patched": patched}


def _tiny_flags(router, tmp_path, **extra):
    flags = preset_flags("tiny-cpu", router, train_iters=4, mock_data=True) + CPU_FLAGS
    flags += ["--micro-batch-size", "2", "--global-batch-size", "2", "--seed", "1234"]
    for key, value in extra.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def _env(tree, site=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(tree), env.get("PYTHONPATH")) if p)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _probe(tree, flags, tmp_path, name):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(PROBE), str(out), *flags], cwd=tree, env=_env(tree),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_series_is_small_and_applies_in_order(trees):
    assert [p.name[:4] for p in SERIES] == [f"{i:04d}" for i in range(1, len(SERIES) + 1)]
    log = _git(trees["patched"], "log", "--format=%s", f"-{len(SERIES)}").splitlines()
    assert len(log) == len(SERIES)
    stat = _git(trees["patched"], "diff", "--numstat", "HEAD~%d" % len(SERIES))
    files = {line.split("\t")[2] for line in stat.splitlines()}
    assert files == {"pretrain_gpt.py", "megatron/training/arguments.py",
                     "megatron/training/argument_utils.py", "megatron/training/training.py"}
    added = sum(int(line.split("\t")[0]) for line in stat.splitlines())
    assert added < 40, f"the series adds {added} lines: logic belongs in mpmoe/megatron_lm/"


def test_mope_command_line_builds_mope_routers_and_runs_the_hooks(trees, tmp_path):
    stats = tmp_path / "stats"
    flags = _tiny_flags("mope", tmp_path, moe_otep_warmup_fraction=0.25, moe_sigma_update_every=3,
                        moe_stats_dir=stats, moe_plot_every=2)
    got = _probe(trees["patched"], flags, tmp_path, "mope")
    assert got["config_class"] == "MoPEConfig"
    assert got["config"] == {
        "moe_router_load_balancing_type": "otep", "moe_otep_warmup_fraction": 0.25,
        "moe_sigma_update_every": 3, "moe_stats_dir": str(stats), "moe_plot_every": 2,
        "moe_dynamic_mask_mode": None, "moe_dynamic_mask_seed": 1234,
        "num_moe_experts": 8, "moe_router_topk": 2,
    }
    assert got["spec"] == ["mpmoe.megatron_lm.spec", "gpt_block_spec"]  # set by check_args
    # tiny-cpu: dense first layer, then MoE layers, each with a MoPE router on the model's config
    assert [layer["router"] for layer in got["layers"]] == [None, "MoPERouter", "MoPERouter", "MoPERouter"]
    assert all(layer["router_config_is_model_config"] for layer in got["layers"][1:])
    # the hooks: warm-up clock set, a statistics window written, aux loss tracked
    assert got["routers"] == [["MoPERouter", 0, 4]] * 3
    assert got["stats_files"] == [f"layer{n}_seg0_mope.npz" for n in (2, 3, 4)]
    assert got["track_names"] == ["load_balancing_loss"]


def test_topk_run_of_a_patched_tree_is_the_unpatched_run(trees, tmp_path):
    flags = _tiny_flags("moe", tmp_path)
    patched = _probe(trees["patched"], flags, tmp_path, "patched")
    base = _probe(trees["base"], flags, tmp_path, "base")
    assert patched["config_class"] == base["config_class"] == "TransformerConfig"
    assert patched["spec"] is None and base["spec"] is None
    assert patched["layers"] == base["layers"]
    assert [layer["router"] for layer in base["layers"]] == [None, "TopKRouter", "TopKRouter", "TopKRouter"]
    assert patched["parameters"] == base["parameters"]
    added = set(patched["args"]) - set(base["args"])
    assert all(name.startswith("moe_") for name in added)  # mpmoe's flags, at their defaults
    assert {k: v for k, v in patched["args"].items() if k not in added} == base["args"]
    assert patched["track_names"] == []
    assert patched["routers"] == [] and patched["stats_files"] == []


def test_invalid_mope_flags_are_one_line_errors(trees, tmp_path):
    flags = _tiny_flags("mope", tmp_path, moe_otep_warmup_fraction=2)
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "x.json"), *flags],
                          cwd=trees["patched"], env=_env(trees["patched"]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "error: argument --moe-otep-warmup-fraction: must be in [0, 1], got 2.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pretrain_gpt_runs_until_megatron_training_requires_cuda(trees, tmp_path):
    """The patched pretrain_gpt.py, as a user runs it, on CPU (mpmoe's CPU compatibility
    enabled by a sitecustomize of this test, not by the patch).

    megatron.training cannot train without CUDA: ``initialize_megatron`` asserts
    ``torch.cuda.is_available()`` and ``pretrain()`` gives no way around it (and past that,
    ``_initialize_distributed`` builds the model-parallel groups only when
    ``torch.cuda.device_count() > 0``; ``get_batch`` moves batches with ``Tensor.cuda()``).
    Everything before it - mpmoe's arguments, Megatron-LM's validation, mpmoe's check and
    MoPE config - runs; model building and the hooks are covered by the probe tests.
    """
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path; test_pretrain_gpt_trains_on_gpu covers CUDA")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from mpmoe.megatron import cpu_compat\ncpu_compat.enable()\n")
    flags = _tiny_flags("mope", tmp_path, moe_otep_warmup_fraction=0.25)
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *flags], cwd=trees["patched"],
                          env=_env(trees["patched"], str(site)), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"moe_router_load_balancing_type \.+ otep\n", out)  # parsed and validated
    assert re.search(r"moe_otep_warmup_fraction \.+ 0\.25\n", out)
    assert "AssertionError: Megatron requires CUDA." in out, out[-3000:]


@pytest.mark.cuda
def test_pretrain_gpt_trains_on_gpu(trees, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    flags = preset_flags("tiny-cpu", "mope", train_iters=3, mock_data=True)
    flags += [f for f in CPU_FLAGS if f not in ("--distributed-backend", "gloo", "--use-cpu-initialization")]
    flags += ["--log-interval", "1",
              "--eval-iters", "1", "--eval-interval", "2", "--moe-stats-dir", str(tmp_path / "s"),
              "--moe-plot-every", "1", "--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                           "pretrain_gpt.py", *flags], cwd=trees["patched"],
                          env=_env(trees["patched"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "load_balancing_loss" in proc.stdout
    assert sorted(os.listdir(tmp_path / "s"))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").is_file()
