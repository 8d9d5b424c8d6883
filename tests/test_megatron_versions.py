"""Same results on every supported megatron-core release.

The ``tiny-cpu`` MoPE model (the preset's shape, routing and optimizer) trained 20
iterations on the embedded corpus must give, iteration by iteration, the losses recorded
on Python 3.11 + megatron-core 0.16.1 + torch 2.13.0 (CPU) within 5e-5. On one machine the
two releases agree to 9 decimals; another CPU's matmul kernels sum in another order, which
moves iteration 20 by about 1e-5 (8.6e-6 on an AVX-512/AMX Xeon, for 0.16.1 and 0.19.2
alike, against a reference recorded elsewhere); a numerics change shows far above that.
The config avoids the numerics megatron changed on purpose in 0.17+ (``seq_aux_loss``,
per-token loss, tensor/context parallelism; see docs/megatron.md, "Versions"): MoPE's aux
loss + z-loss on one process.
"""

from __future__ import annotations

import pytest

from train_testing import read_metrics

# Iterations 1..20; recorded with `make test` (Python 3.11.7, megatron-core 0.16.1,
# torch 2.13.0+cpu). Regenerate only when the model or the training loop changes on purpose.
REFERENCE = [
    9.050568581, 9.036602974, 8.773416519, 8.563230515, 8.430432320,
    8.293069839, 8.082065582, 7.881085396, 7.740635872, 7.621203423,
    7.459718227, 7.295758247, 7.365818024, 6.880764961, 6.958884716,
    6.870175362, 6.805203915, 6.896142960, 7.028791428, 6.874072552,
]


def test_tiny_cpu_mope_losses_match_the_0_16_1_reference(tmp_path, embedded_cache):
    from mpmoe.train.cli import main

    run = tmp_path / "run"
    rc = main(["--preset", "tiny-cpu", "--train-iters", "20", "--log-interval", "1",
               "--eval-interval", "20", "--eval-iters", "1", "--run-dir", str(run),
               "--no-progress", "--no-tensorboard", "--embedded-cache-dir", embedded_cache])
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 20
    print("losses:", ", ".join(f"{x:.9f}" for x in losses))
    assert losses == pytest.approx(REFERENCE, abs=5e-5, rel=0)
