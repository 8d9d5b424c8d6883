"""Each cpu_compat patch: active without CUDA, upstream still broken, replacement correct.

The "upstream still fails" checks are the deletion signal: when one of them starts
failing after a megatron-core upgrade, upstream fixed that spot and the patch (and its
test) can go.
"""

from __future__ import annotations

import pytest
import torch

from megatron_testing import run_distributed, tiny_config

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.tensor_parallel import mappings  # noqa: E402
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.router import Router, TopKRouter  # noqa: E402
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher  # noqa: E402
from megatron.core.utils import GlobalMemoryBuffer  # noqa: E402

from mpmoe.megatron import cpu_compat, destroy_distributed, init_distributed  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")

CUDA_ERRORS = (AssertionError, RuntimeError)  # "Torch not compiled with CUDA enabled" & co.
SEED = 42


@pytest.fixture(scope="module", autouse=True)
def single_process():
    init_distributed(seed=SEED)
    yield
    destroy_distributed()


@pytest.fixture()
def reseed():
    yield
    tensor_parallel.model_parallel_cuda_manual_seed(SEED, force_reset_rng=True)


# --------------------------------------------------------------------------- registry


def test_enable_applies_every_patch_once_and_is_idempotent():
    names = cpu_compat.enable()
    assert names == [p.name for p in cpu_compat.PATCHES]
    assert cpu_compat.is_enabled()
    before = {p.name: getattr(p.owner(), p.attr) for p in cpu_compat.PATCHES}
    assert cpu_compat.enable() == names
    after = {p.name: getattr(p.owner(), p.attr) for p in cpu_compat.PATCHES}
    assert all(before[n] is after[n] for n in names)


def test_every_patch_is_documented_and_replaces_something():
    for p in cpu_compat.PATCHES:
        assert len(p.doc) > 60 and ("Upstream" in p.doc or "Part of" in p.doc), p.name
        assert getattr(p.owner(), p.attr) is not cpu_compat.original(p.name) or p.name == (
            "router_gating_te_gemm"), p.name


def test_disable_restores_originals_and_enable_reapplies(reseed):
    originals = {p.name: cpu_compat.original(p.name) for p in cpu_compat.PATCHES}
    try:
        cpu_compat.disable()
        assert not cpu_compat.is_enabled()
        assert Router.gating is originals["router_gating_device"]
        assert mrandom.CudaRNGStatesTracker is originals["rng_tracker"]
        assert MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None
        assert not hasattr(moe_utils, "te_general_gemm")
    finally:
        cpu_compat.enable()
    assert Router.gating is not originals["router_gating_device"]
    assert isinstance(tensor_parallel.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker)


# --------------------------------------------------------------------------- rng_tracker


def test_rng_tracker_upstream_needs_cuda():
    tracker = cpu_compat.original("rng_tracker")()
    with pytest.raises(CUDA_ERRORS):
        tracker.add("x", 1)
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("rng_state_get")()


def test_rng_tracker_on_cpu_follows_megatron_seeding(reseed):
    tensor_parallel.model_parallel_cuda_manual_seed(7, force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    # megatron: tensor-model-parallel state seeded with seed + 2718 + tp_rank,
    # expert-parallel state with seed + 1024 + 100 * ep_rank + etp_rank.
    expected_tp = torch.rand(4, generator=torch.Generator().manual_seed(7 + 2718))
    expected_ep = torch.rand(4, generator=torch.Generator().manual_seed(7 + 1024))
    outside_state = torch.get_rng_state()
    with tracker.fork():
        got_tp = torch.rand(4)
    with tracker.fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
        got_ep = torch.rand(4)
    torch.testing.assert_close(got_tp, expected_tp)
    torch.testing.assert_close(got_ep, expected_ep)
    assert torch.equal(torch.get_rng_state(), outside_state)  # default stream untouched
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(second, got_tp)  # the forked state advanced
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("nope"):
            pass


def test_rng_state_functions_read_and_write_the_cpu_generator(reseed):
    state = mrandom._get_cuda_rng_state()
    a = torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    torch.testing.assert_close(torch.rand(3), a)


def test_activation_recompute_replays_dropout(reseed):
    """megatron's CheckpointFunction saves/restores RNG states through the patched functions."""
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def block(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x, p=0.5, training=True) * 3.0

    x = torch.randn(64, requires_grad=True)
    state, tracker_states = torch.get_rng_state(), tracker.get_states()
    tracker_states = {k: v.clone() for k, v in tracker_states.items()}
    direct = block(x)
    direct.sum().backward()
    g_direct = x.grad.clone()
    x.grad = None
    torch.set_rng_state(state)
    tracker.set_states(tracker_states)
    out = tensor_parallel.checkpoint(block, False, x)
    out.sum().backward()
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(x.grad, g_direct)


# --------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_get_emb_stays_on_cpu(interleaved):
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_interleaved=interleaved,
                           use_cpu_initialization=True)
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("rotary_inv_freq_device")(rope, 5)
    emb = rope.get_emb(5, offset=2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    angles = torch.outer(torch.arange(5, dtype=torch.float32) + 2, inv_freq)
    if interleaved:
        expected = torch.stack((angles, angles), dim=-1).reshape(5, 8)
    else:
        expected = torch.cat((angles, angles), dim=-1)
    assert emb.shape == (5, 1, 1, 8) and emb.device.type == "cpu"
    torch.testing.assert_close(emb[:, 0, 0], expected)
    assert rope.inv_freq.device.type == "cpu"


# --------------------------------------------------------------------------- router gating


def test_router_gating_upstream_needs_cuda_and_replacement_computes_logits():
    cfg = tiny_config(moe_router_dtype="fp64")
    router = TopKRouter(cfg, pg_collection=_pgs())
    x = torch.randn(5, 2, cfg.hidden_size)
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("router_gating_device")(router, x)
    logits = router.gating(x)
    assert logits.dtype == torch.float64 and logits.shape == (5, 2, cfg.num_moe_experts)
    torch.testing.assert_close(logits, x.double() @ router.weight.double().t())
    # the stock router routes end to end on CPU
    probs, routing_map = router(x)
    assert routing_map.sum(-1).eq(cfg.moe_router_topk).all()


def test_router_gating_linear_te_gemm_name(monkeypatch):
    x, w = torch.randn(6, 4), torch.randn(3, 4)
    monkeypatch.delattr(moe_utils, "te_general_gemm")
    with pytest.raises(NameError, match="te_general_gemm"):
        moe_utils.router_gating_linear(x, w, None, torch.float32)
    monkeypatch.undo()
    assert moe_utils.te_general_gemm is None
    torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.t())


# --------------------------------------------------------------------------- memory buffer


def test_global_memory_buffer_on_cpu():
    buf = GlobalMemoryBuffer()
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("global_memory_buffer_device")(buf, (2, 3), torch.float32, "t")
    a = buf.get_tensor((2, 3), torch.float32, "t")
    b = buf.get_tensor((5,), torch.float32, "t")
    assert a.shape == (2, 3) and a.device.type == "cpu"
    assert a.data_ptr() == b.data_ptr()  # reused, as upstream
    c = buf.get_tensor((4, 4), torch.float32, "t")  # grows
    assert c.numel() == 16


# --------------------------------------------------------------------------- alltoall dispatcher


def test_alltoall_dispatcher_constructor_and_single_process_forward():
    cfg = tiny_config(moe_token_dispatcher_type="alltoall")
    saved = MoEAlltoAllTokenDispatcher.cuda_dtoh_stream
    try:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # upstream's initial value
        with pytest.raises(RuntimeError, match="CUDA"):
            MoEAlltoAllTokenDispatcher(8, list(range(8)), cfg, pg_collection=_pgs())
    finally:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = saved
    from mpmoe.megatron import build_gpt_model

    model = build_gpt_model(cfg, 64, 16)
    tokens = torch.randint(0, 64, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    loss = model(tokens, pos, None, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)


def _pgs():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


# --------------------------------------------------------------------------- collectives (2 ranks)


def collectives_worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    init_distributed(seed=SEED)
    group = ps.get_data_parallel_group()
    out = {}
    # upstream versions still need CUDA (deletion signal)
    x = torch.full((2, 3), float(rank + 1))
    for name, call in (
        ("gather_along_first_dim", lambda f: f(x, group)),
        ("reduce_scatter_along_first_dim", lambda f: f(torch.ones(4, 3), group)),
        ("all_to_all_output_device",
         lambda f: f(type("Ctx", (), {})(), group, torch.ones(3, 2), [1, 2], [2, 1])),
    ):
        try:
            call(cpu_compat.original(name))
            out[f"upstream_{name}"] = "ok"
        except Exception as exc:  # noqa: BLE001
            out[f"upstream_{name}"] = type(exc).__name__
    # patched: equal and uneven gathers
    out["gather"] = mappings._gather_along_first_dim(x, group)
    uneven = torch.arange(rank + 1, dtype=torch.float32).unsqueeze(1) + 10 * rank
    out["gather_uneven"] = mappings._gather_along_first_dim(uneven, group, [1, 2])
    # reduce-scatter: rank r contributes r+1 everywhere; chunk sizes equal and uneven
    y = torch.arange(8, dtype=torch.float32).reshape(4, 2) * (rank + 1)
    out["reduce_scatter"] = mappings._reduce_scatter_along_first_dim(y, group)
    out["reduce_scatter_uneven"] = mappings._reduce_scatter_along_first_dim(y, group, [1, 3])
    # all-to-all-v through megatron's autograd wrapper (forward and backward)
    send = [2, 1] if rank == 0 else [1, 3]  # rows this rank sends to rank 0, 1
    recv = [2, 1] if rank == 0 else [1, 3]  # rows it receives from rank 0, 1
    inp = (torch.arange(sum(send), dtype=torch.float32) + 100 * rank).unsqueeze(1)
    inp.requires_grad_(True)
    got = mappings.all_to_all(group, inp, recv, send)
    (got * (rank + 1)).sum().backward()
    out["a2a"] = got.detach()
    out["a2a_grad"] = inp.grad
    dist.barrier()
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def collectives():
    return run_distributed(collectives_worker, 2)


def test_collectives_upstream_still_need_cuda(collectives):
    for r in collectives:
        for name in ("gather_along_first_dim", "reduce_scatter_along_first_dim",
                     "all_to_all_output_device"):
            assert r[f"upstream_{name}"] in ("AssertionError", "RuntimeError"), (name, r)


def test_gather_along_first_dim_on_gloo(collectives):
    for r in collectives:
        torch.testing.assert_close(r["gather"], torch.cat([torch.full((2, 3), 1.0),
                                                           torch.full((2, 3), 2.0)]))
        torch.testing.assert_close(r["gather_uneven"], torch.tensor([[0.0], [10.0], [11.0]]))


def test_reduce_scatter_along_first_dim_on_gloo(collectives):
    total = torch.arange(8, dtype=torch.float32).reshape(4, 2) * 3  # (1 + 2) * y
    torch.testing.assert_close(collectives[0]["reduce_scatter"], total[:2])
    torch.testing.assert_close(collectives[1]["reduce_scatter"], total[2:])
    torch.testing.assert_close(collectives[0]["reduce_scatter_uneven"], total[:1])
    torch.testing.assert_close(collectives[1]["reduce_scatter_uneven"], total[1:])


def test_all_to_all_on_gloo_forward_and_backward(collectives):
    # rank 0 sends rows [0,1] to itself and [2] to rank 1; rank 1 sends [100] to rank 0 and
    # [101,102,103] to itself.
    torch.testing.assert_close(collectives[0]["a2a"], torch.tensor([[0.0], [1.0], [100.0]]))
    torch.testing.assert_close(collectives[1]["a2a"], torch.tensor([[2.0], [101.0], [102.0],
                                                                    [103.0]]))
    # d/d(input) of sum(received * (receiver + 1)): each row gets its receiver's factor
    torch.testing.assert_close(collectives[0]["a2a_grad"], torch.tensor([[1.0], [1.0], [2.0]]))
    torch.testing.assert_close(collectives[1]["a2a_grad"], torch.tensor([[1.0], [2.0], [2.0],
                                                                         [2.0]]))
