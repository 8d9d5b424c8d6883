import os
import sys

from hypothesis import settings

# Test helpers (reference implementations, multi-process utilities) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. The mode is
# fixed when triton is first imported, so it is chosen here, before any test imports it.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs the property tests with a fixed seed sequence so that a red run is
# reproducible; locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# --------------------------------------------------------------------------- eval checkpoints
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One embedded-corpus cache (tokenizer + indexed data) for the whole session."""
    return os.environ.get("MPMOE_TEST_CACHE") or str(tmp_path_factory.mktemp("embedded-cache"))


@pytest.fixture(scope="session")
def eval_checkpoints(tmp_path_factory, embedded_cache):
    """``{"trained": save dir, "untrained": save dir}``: a tiny MoPE model on the embedded
    corpus, trained for 60 iterations, and the same model after one step at lr 1e-12."""
    from eval_testing import train_checkpoint

    root = tmp_path_factory.mktemp("eval-ckpts")
    return {
        "trained": train_checkpoint(root / "trained", embedded_cache, iters=60),
        "untrained": train_checkpoint(root / "untrained", embedded_cache, iters=1, lr=1e-12),
    }
