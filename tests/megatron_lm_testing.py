"""Helpers of the Megatron-LM tests: a stock / patched tree, CPU flags and environment.

The tree is assembled in a temporary git repository from the installed megatron-core
wheel's ``megatron/`` (0.19.2 ships ``megatron.training`` identical to Megatron-LM's
``core_r0.19.0``) and the pristine top-level scripts in
``../shared/upstream/megatron-lm-core_r0.19.0/``; the patched tree is a worktree of it
with the series applied by ``git am``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERIES = sorted((ROOT / "patches" / "megatron-lm" / "core_r0.19.0").glob("*.patch"))
UPSTREAM = ROOT.parent / "shared" / "upstream" / "megatron-lm-core_r0.19.0"
SCRIPTS = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "LICENSE")
#: sitecustomize.py that lets pretrain_gpt.py run without CUDA (tests only).
CPU_SHIM = Path(__file__).with_name("megatron_lm_cpu_shim")

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "core.autocrlf=false"]

# What a CPU run needs on top of a preset: no Transformer Engine / Apex fusions, CPU init.
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo", "--no-rope-fusion",
             "--use-cpu-initialization", "--no-persist-layer-norm", "--no-masked-softmax-fusion",
             "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-gradient-accumulation-fusion"]


def skip_reason():
    """Why the Megatron-LM tree tests cannot run here (None when they can)."""
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


def git(cwd, *args):
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def assemble_trees(root: Path) -> dict:
    """``{"base": unpatched tree, "patched": tree with the series applied by git am}``."""
    import megatron

    base = root / "base"
    shutil.copytree(Path(megatron.__path__[0]), base / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in SCRIPTS:
        shutil.copy(UPSTREAM / name, base / name)
    git(base, "init", "-q")
    git(base, "add", "-A")
    git(base, "commit", "-qm", "upstream")
    patched = root / "patched"
    git(base, "worktree", "add", "-q", str(patched))
    git(patched, "apply", "--check", *map(str, SERIES))
    git(patched, "am", "-q", *map(str, SERIES))
    return {"base": base, "patched": patched}


def tree_env(tree, site=None, **extra) -> dict:
    """Environment of one process run in ``tree`` (``site``: a sitecustomize folder)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (tree, site, ROOT, env.get("PYTHONPATH")) if p)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1",
               HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_dist_checkpoint(path) -> dict:
    """Every tensor and object of a ``torch_dist`` checkpoint folder (``iter_NNNNNNN``),
    read in this process without a process group."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=str(path))
