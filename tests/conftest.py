import atexit
import os
import shutil
import sys
import tempfile

from hypothesis import settings

# Test helpers (reference implementations, multi-process utilities) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# transformers' remote-code modules (exported MoPE folders) go to one folder per test process,
# set before transformers is imported: never the user's ~/.cache, and never moved mid-process,
# since the package `transformers_modules` is imported once, from the first folder, and a
# folder added later under another path is then not found (ModuleNotFoundError).
_HF_MODULES = tempfile.mkdtemp(prefix="mpmoe-test-hf-modules-")
os.environ["HF_MODULES_CACHE"] = _HF_MODULES
atexit.register(shutil.rmtree, _HF_MODULES, ignore_errors=True)

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. The mode is
# fixed when triton is first imported, so it is chosen here, before any test imports it.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (opt-in: Makefile PYTEST_PARALLEL) each worker gets an equal share of the cores,
# for torch in the worker and for the processes tests start: without it every worker (and
# every `mpmoe train` subprocess) runs one OpenMP thread per core, and their spinning
# threads fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _threads
    try:
        torch.set_num_threads(int(_threads))
    except NameError:  # pragma: no cover - torch missing
        pass

# CI runs the property tests with a fixed seed sequence so that a red run is
# reproducible; locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# --------------------------------------------------------------------------- eval checkpoints
import pytest  # noqa: E402


def _once(tmp_path_factory, name, build):
    """``build(folder)`` once per test session, also across pytest-xdist workers: the first
    worker builds under a file lock in the folder the workers share, the others reuse it."""
    import json

    from filelock import FileLock  # a dependency of torch

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent
    done = root / f"{name}.json"
    with FileLock(str(done) + ".lock"):
        if not done.is_file():
            done.write_text(json.dumps({k: str(v) for k, v in build(root / name).items()}))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One embedded-corpus cache (tokenizer + indexed data) for the whole session."""
    if os.environ.get("MPMOE_TEST_CACHE"):
        return os.environ["MPMOE_TEST_CACHE"]
    # the folder only: whoever uses it first fills it (mpmoe locks the cache while it writes)
    return str(_once(tmp_path_factory, "embedded-cache", lambda d: {"dir": d.mkdir(parents=True, exist_ok=True) or d})["dir"])


@pytest.fixture(scope="session")
def eval_checkpoints(tmp_path_factory, embedded_cache):
    """``{"trained": save dir, "untrained": save dir}``: a tiny MoPE model on the embedded
    corpus, trained for 60 iterations, and the same model after one step at lr 1e-12."""
    from pathlib import Path

    from eval_testing import train_checkpoint

    def build(root):
        return {
            "trained": train_checkpoint(root / "trained", embedded_cache, iters=60),
            "untrained": train_checkpoint(root / "untrained", embedded_cache, iters=1, lr=1e-12),
        }

    return {k: Path(v) for k, v in _once(tmp_path_factory, "eval-ckpts", build).items()}


# --------------------------------------------------------------------------- time per test file
# Printed at the end of every run (CI's log included): test files have time budgets (e.g. the
# Megatron-LM end-to-end module: under 90 s), and pytest's --durations lists single phases only.
_FILE_SECONDS: dict = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    slowest = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:12]
    if slowest:
        terminalreporter.write_sep("=", "slowest test files (set-up + call + tear-down)")
        for path, seconds in slowest:
            terminalreporter.write_line(f"{seconds:8.1f}s {path}")
