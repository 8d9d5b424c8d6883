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


def _applied():
    """The patches this megatron-core release needs (all applied by enable())."""
    return [p for p in cpu_compat.PATCHES if p.name in cpu_compat.applicable()]


def needs_patch(name):
    """Skip a test of a patch this megatron-core release does not need (nothing to fix)."""
    return pytest.mark.skipif(name not in cpu_compat.applicable(),
                              reason=f"{name}: not needed by this megatron-core")


def test_enable_applies_every_needed_patch_once_and_is_idempotent():
    names = cpu_compat.enable()
    assert names == [p.name for p in _applied()]
    assert cpu_compat.is_enabled()
    before = {p.name: getattr(p.owner(), p.attr) for p in _applied()}
    assert cpu_compat.enable() == names
    after = {p.name: getattr(p.owner(), p.attr) for p in _applied()}
    assert all(before[n] is after[n] for n in names)


def test_every_patch_is_documented_and_replaces_something():
    for p in cpu_compat.PATCHES:
        assert len(p.doc) > 60 and ("Upstream" in p.doc or "Part of" in p.doc), p.name
    for p in _applied():
        if p.name == "router_gating_te_gemm":  # defines a missing name (as None)
            assert hasattr(p.owner(), p.attr)
            continue
        assert getattr(p.owner(), p.attr) is not cpu_compat.original(p.name), p.name


def test_patches_this_release_does_not_need_are_skipped():
    # Each skipped patch's test checks upstream works there (e.g. te_general_gemm below).
    assert cpu_compat.enabled_patches() == cpu_compat.applicable()
    skipped = {p.name for p in cpu_compat.PATCHES} - set(cpu_compat.applicable())
    cpu_compat.disable()
    try:
        assert set(cpu_compat.applicable()).isdisjoint(skipped)
    finally:
        cpu_compat.enable()


def test_disable_restores_originals_and_enable_reapplies(reseed):
    originals = {p.name: cpu_compat.original(p.name) for p in cpu_compat.PATCHES}
    try:
        cpu_compat.disable()
        assert not cpu_compat.is_enabled()
        assert Router.gating is originals["router_gating_device"]
        assert mrandom.CudaRNGStatesTracker is originals["rng_tracker"]
        assert MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None
        if "router_gating_te_gemm" in originals and "router_gating_te_gemm" in cpu_compat.applicable():
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
    if "router_gating_te_gemm" not in cpu_compat.applicable():  # 0.17+: upstream defines it
        assert moe_utils.te_general_gemm is None
        torch.testing.assert_close(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.t())
        return
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


# --------------------------------------------------------------------------- DDP, schedule, optimizer


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return DistributedDataParallel(model.config, ddp_config, model)


def _tiny_gpt(seed=0):
    from mpmoe.megatron import build_gpt_model

    torch.manual_seed(seed)
    return build_gpt_model(tiny_config(), 64, 16)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 17), generator=g)
        yield ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _schedule_step(data, model):
    tokens, labels = next(data)
    out = model(tokens, torch.arange(16).expand(2, 16), None, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

    return out, loss_func


def test_ddp_grad_buffer_upstream_needs_cuda(monkeypatch):
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    monkeypatch.setattr(_ParamAndGradBuffer, "__init__", cpu_compat.original("ddp_grad_buffer_device"))
    with pytest.raises(CUDA_ERRORS):
        _ddp(_tiny_gpt())


def test_schedule_upstream_needs_cuda(monkeypatch, restore_moe_loss_scale):
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.setattr(schedules, "forward_backward_no_pipelining",
                        cpu_compat.original("schedule_token_count_device"))
    model = _tiny_gpt()
    with pytest.raises(CUDA_ERRORS):
        schedules.get_forward_backward_func()(
            forward_step_func=_schedule_step, data_iterator=_batches(1), model=model,
            num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=True)


@pytest.fixture()
def restore_moe_loss_scale():
    """megatron's schedule sets the process-wide MoE aux-loss gradient scale
    (1 / micro-batches); put back what later tests expect."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def test_ddp_and_schedule_on_cpu_match_plain_autograd(restore_moe_loss_scale):
    """megatron's DDP (CPU buffers) + get_forward_backward_func() over 2 micro-batches give
    the loss and gradient of plain autograd on the unwrapped model."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reference = _tiny_gpt()
    ref_losses = []
    for tokens, labels in _batches(2):
        loss = reference(tokens, torch.arange(16).expand(2, 16), None, labels=labels).mean() / 2
        loss.backward()
        ref_losses.append(loss.detach() * 2)

    model = _tiny_gpt()
    ddp = _ddp(model)
    assert all(p.main_grad.device.type == "cpu" for p in model.parameters())
    model.config.finalize_model_grads_func = finalize_model_grads
    try:
        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=_schedule_step, data_iterator=_batches(2), model=ddp,
            num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False)
    finally:
        model.config.finalize_model_grads_func = None
    torch.testing.assert_close(torch.stack([r["loss"] for r in reports]), torch.stack(ref_losses))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def _megatron_adam(model, clip_grad=1.0):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    oc = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=clip_grad,
                         bf16=False, params_dtype=torch.float32, use_distributed_optimizer=False)
    return get_megatron_optimizer(oc, [model])


def test_megatron_optimizer_upstream_needs_cuda(monkeypatch):
    from megatron.core.optimizer import clip_grads, optimizer

    grads = [torch.ones(3)]
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("grad_norm_device")(grads)
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("grad_norm_l2_device")(2048, torch.zeros(1, dtype=torch.int), [grads], False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("grad_clip_device")([p], 1.0, 10.0)
    monkeypatch.setattr(optimizer.FP32Optimizer, "__init__",
                        cpu_compat.original("fp32_optimizer_scale_device"))
    with pytest.raises(CUDA_ERRORS):
        _megatron_adam(_ddp(_tiny_gpt()))
    assert clip_grads.l2_norm_impl is not cpu_compat.original("grad_norm_l2_device")


def test_megatron_optimizer_on_cpu_clips_by_global_norm_and_steps():
    # the patched pieces on their own
    grads = [torch.full((4,), 3.0), torch.full((9,), 4.0)]  # squares: 36 + 144
    from megatron.core.optimizer import optimizer as moptimizer

    norm = moptimizer.get_grad_norm_fp32(grads, grad_stats_parallel_group=None)
    assert abs(float(norm) - 180 ** 0.5) < 1e-5
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32([p], 1.0, 5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    moptimizer.clip_grad_by_total_norm_fp32([p], 10.0, 1.0)  # below the limit: unchanged
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)

    # get_megatron_optimizer over megatron's DDP: one clipped Adam step
    model = _tiny_gpt()
    ddp = _ddp(model)
    opt = _megatron_adam(ddp, clip_grad=0.5)
    ddp.zero_grad_buffer()
    for tokens, labels in _batches(1):
        model(tokens, torch.arange(16).expand(2, 16), None, labels=labels).mean().backward()
    expected_norm = torch.sqrt(sum(q.main_grad.double().pow(2).sum() for q in model.parameters()))
    before = [q.detach().clone() for q in model.parameters()]
    ok, grad_norm, _ = opt.step()
    assert ok and abs(grad_norm - float(expected_norm)) <= 1e-4 * float(expected_norm)
    assert expected_norm > 0.5  # so the step clipped
    moved = [float((q.detach() - b).abs().max()) for q, b in zip(model.parameters(), before)]
    assert max(moved) == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr * sign(grad)
    assert float(opt.get_loss_scale()) == 1.0


# --------------------------------------------------------------------------- torch_dist checkpoints


def test_dist_ckpt_preload_upstream_needs_cuda():
    bucket = ("f", "k", ([], [("item", torch.ones(2))]))
    with pytest.raises(CUDA_ERRORS):
        cpu_compat.original("dist_ckpt_preload_sync")([bucket], True)
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    (got,) = FileSystemWriterAsync.preload_tensors([bucket], True)
    assert got[:2] == ("f", "k") and torch.equal(got[2][1][0][1], torch.ones(2))


def _sharded(value):
    from megatron.core.dist_checkpointing import ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("w", value, replica_id=0),
            "step": 3}


def test_torch_dist_save_upstream_needs_cuda(monkeypatch, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from mpmoe.megatron.compat import dist_ckpt_finalize_owner

    monkeypatch.setattr(filesystem_async.FileSystemWriterAsync, "preload_tensors",
                        staticmethod(lambda buckets, non_blocking=True: [
                            (f, k, (b, [(i, t.cpu()) for i, t in ts])) for f, k, (b, ts) in buckets]))
    monkeypatch.setattr(dist_ckpt_finalize_owner(), "save_state_dict_async_finalize",
                        cpu_compat.original("dist_ckpt_finalize_device"))
    with pytest.raises(CUDA_ERRORS):
        dist_checkpointing.save(_sharded(torch.ones(2, 3)), str(tmp_path))


def test_torch_dist_checkpoint_round_trip_on_cpu(tmp_path):
    from megatron.core import dist_checkpointing

    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    dist_checkpointing.save(_sharded(value), str(tmp_path))
    loaded = dist_checkpointing.load(_sharded(torch.zeros(2, 3)), str(tmp_path))
    torch.testing.assert_close(loaded["w"], value)
    assert loaded["step"] == 3


# --------------------------------------------------------------------------- KV cache
def _decode_with_kv_cache(model, ids, prefill):
    """Logits of each position after ``prefill``, decoded one token at a time."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, s = ids.shape
    ctx = StaticInferenceContext(b, s)
    pos = torch.arange(s).expand(b, s)
    out = [model(ids[:, :prefill], pos[:, :prefill], None, inference_context=ctx,
                 runtime_gather_output=True)[:, -1]]
    ctx.sequence_len_offset = prefill
    for t in range(prefill, s - 1):
        out.append(model(ids[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx,
                         runtime_gather_output=True)[:, -1])
        ctx.sequence_len_offset = t + 1
    return torch.stack(out, dim=1)  # predictions for positions prefill .. s-1


def test_kv_cache_upstream_needs_cuda(monkeypatch):
    from megatron.core.transformer.attention import Attention

    monkeypatch.setattr(Attention, "_allocate_memory", cpu_compat.original("inference_kv_cache_device"))
    model = _tiny_gpt().eval()
    with torch.no_grad(), pytest.raises(CUDA_ERRORS):
        _decode_with_kv_cache(model, torch.randint(0, 64, (2, 8)), 4)


def test_kv_cache_decoding_on_cpu_matches_full_forward():
    model = _tiny_gpt().eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, torch.arange(12).expand(2, 12), None)
        cached = _decode_with_kv_cache(model, ids, 5)
    torch.testing.assert_close(cached, full[:, 4:11], rtol=1e-4, atol=1e-5)
    assert cached.device.type == "cpu"
