"""CPU compatibility for megatron-core 0.16.1-0.19.x: the few places it hard-codes CUDA.

megatron-core cannot run a GPT MoE forward/backward on a machine without CUDA:
a handful of functions allocate on ``torch.cuda.current_device()``, keep RNG state in
the CUDA generator, or create CUDA streams, and two collectives it uses
(``reduce_scatter``) are not implemented by the gloo backend. Everything that can be
fixed at the spec or subclass level is fixed there (see :mod:`mpmoe.megatron.attention`
for the portable core attention, :mod:`mpmoe.megatron.spec` for the portable spec).
What remains is here, as a list of named patches.

Rules:

* Nothing happens at import. :func:`enable` applies the patches, and only when
  ``torch.cuda.is_available()`` is false; it is idempotent. The model builder
  (:func:`mpmoe.megatron.model.build_gpt_model`) and the process-group set-up
  (:func:`mpmoe.megatron.parallel.init_distributed`) call it.
* Each patch replaces exactly one attribute of one megatron-core object, says what
  upstream does, why that fails without CUDA, and when it can be deleted; each has a
  test in ``tests/test_megatron_cpu_compat.py`` that checks (a) the upstream attribute
  still fails on CPU (when that test starts failing, upstream fixed it: delete the
  patch) and (b) the replacement behaves as documented.
* :func:`disable` restores every original (used by tests).
* A patch whose target is absent from the installed megatron-core, or that this release
  does not need (its ``needed`` check, feature-detected in :mod:`mpmoe.megatron.compat`),
  is skipped, not an error; the tests check upstream still fails wherever it is applied.

The patches (name: target):

``rng_tracker``
    ``tensor_parallel.random.CudaRNGStatesTracker`` (+ the module's
    ``_get_cuda_rng_state``/``_set_cuda_rng_state``): the model-parallel RNG tracker keeps
    CUDA generator states; replaced by a tracker of CPU generator states.
``rotary_inv_freq_device``
    ``RotaryEmbedding.get_emb``: moves ``inv_freq`` to ``torch.cuda.current_device()``.
``router_gating_device``
    ``Router.gating``: moves the router weight to ``torch.cuda.current_device()``.
``router_gating_te_gemm``
    ``moe_utils.te_general_gemm``: name undefined without Transformer Engine, so
    ``RouterGatingLinearFunction`` raises NameError; defined as ``None`` (upstream's own
    ``torch.mm`` fallback then runs). 0.17+ defines it itself: skipped there.
``global_memory_buffer_device``
    ``GlobalMemoryBuffer.get_tensor``: allocates on ``torch.cuda.current_device()``.
``gather_along_first_dim``
    ``tensor_parallel.mappings._gather_along_first_dim``: CUDA output buffer; used by the
    allgather dispatcher (and sequence parallelism).
``reduce_scatter_along_first_dim``
    ``tensor_parallel.mappings._reduce_scatter_along_first_dim``: CUDA output buffer and
    ``reduce_scatter``, which gloo does not implement.
``all_to_all_output_device``
    ``tensor_parallel.mappings._AllToAll.forward``: CUDA output buffer (alltoall dispatcher).
``alltoall_dispatcher_streams``
    ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` and ``._maybe_dtoh_and_synchronize``:
    a ``torch.cuda.Stream()`` created in the constructor and used for device-to-host copies.
``ddp_grad_buffer_device``
    ``distributed.param_and_grad_buffer._ParamAndGradBuffer.__init__``: DDP's contiguous
    param/grad buffers on ``torch.cuda.current_device()``.
``ddp_grad_sync_stream`` (0.19+)
    ``_ParamAndGradBucketGroup.start_grad_sync``: ``torch.cuda.current_stream()``.
``schedule_token_count_device``
    ``pipeline_parallel.schedules.forward_backward_no_pipelining``: token counter created
    with ``device="cuda"``.
``fp32_optimizer_scale_device``
    ``optimizer.optimizer.FP32Optimizer.__init__``: loss scale created with ``device="cuda"``.
``grad_norm_device`` / ``grad_norm_l2_device`` / ``grad_clip_device``
    ``get_grad_norm_fp32`` and ``clip_grad_by_total_norm_fp32`` as ``optimizer.optimizer``
    sees them, and ``clip_grads.l2_norm_impl``: CUDA scratch tensors (and a
    ``torch.cuda.FloatTensor`` type assertion in the clip).
``grad_norm_group_device`` (0.19+)
    ``MegatronOptimizer.has_grad_norm_group``: a flag tensor with ``device="cuda"``.
``dist_ckpt_preload_sync`` / ``dist_ckpt_finalize_device``
    ``FileSystemWriterAsync.preload_tensors`` (``torch.cuda.synchronize()``) and
    ``save_state_dict_async_finalize`` where the save looks it up (``strategies.torch``
    before 0.17, ``state_dict_saver`` from 0.17; failure flag on
    ``torch.cuda.current_device()``): the ``torch_dist`` checkpoint writer.
``inference_kv_cache_device``
    ``transformer.attention.Attention._allocate_memory``: the static-batching KV cache
    (``StaticInferenceContext``, used by ``mpmoe eval`` generation) on
    ``torch.cuda.current_device()``.

Most of the newer patches do not rewrite anything: :func:`_with_cuda_on_cpu` runs upstream's
own function (same code object) with the global name ``torch`` resolving to a view in
which ``torch.cuda.current_device()`` is the CPU, ``device="cuda"`` factories allocate on
the CPU, ``torch.cuda.synchronize()`` does nothing and ``torch.cuda.current_stream()`` is a
stream with nothing to wait for; the rest of that function, and
everything outside it, is untouched.

Not patched: megatron's distributed optimizer (``DistributedOptimizer`` checks parameter
types against ``torch.cuda.*Tensor`` names and its grad buffers reduce-scatter, which gloo
lacks), so CPU training uses megatron's plain optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = [
    "PATCHES",
    "CpuRNGStatesTracker",
    "applicable",
    "disable",
    "enable",
    "enabled_patches",
    "is_enabled",
    "original",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replacement: ``setattr(owner(), attr, replacement())``."""

    name: str
    owner: Callable[[], Any]  # returns the module or class that holds ``attr``
    attr: str
    replacement: Callable[[], Any]  # returns the new value (built lazily)
    doc: str
    # needed(owner): does this megatron-core release need the patch? Default: the target
    # exists. Checks that differ between releases live in mpmoe.megatron.compat.
    needed: Optional[Callable[[Any], bool]] = None

    def is_needed(self, owner: Any) -> bool:
        if self.needed is not None:
            return self.needed(owner)
        return hasattr(owner, self.attr)


_MISSING = object()
# name -> list of (owner, attr, original value or _MISSING)
_APPLIED: Dict[str, List[Tuple[Any, str, Any]]] = {}


# ---------------------------------------------------------------------------------------
# rng_tracker
# ---------------------------------------------------------------------------------------


def _random_module():
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom


def _make_cpu_tracker_class():
    base = _original_or_current(_random_module, "CudaRNGStatesTracker")

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """Model-parallel RNG tracker over the CPU default generator.

        Same contract as megatron's ``CudaRNGStatesTracker`` (named states, ``add``,
        ``fork``, ``get_states``/``set_states``), but every state is a CPU generator
        state (``torch.get_rng_state()`` layout): ``add(name, seed)`` stores the state of a
        generator seeded with ``seed``; ``fork(name)`` swaps that state into the CPU
        default generator for the duration of the block and stores the advanced state
        back on exit. ``use_cudagraphable_rng`` is not supported (no CUDA graphs on CPU).
        """

        def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
            if use_cudagraphable_rng:
                raise ValueError("CUDA-graph-safe RNG is not available without CUDA")
            super().__init__(use_cudagraphable_rng=False,
                             is_inference_rng_tracker=is_inference_rng_tracker)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=None):
            if name is None:
                name = _random_module()._MODEL_PARALLEL_RNG_TRACKER_NAME
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    """CPU stand-in for ``random._get_cuda_rng_state``: the CPU generator state."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    """CPU stand-in for ``random._set_cuda_rng_state``: sets the CPU generator state."""
    torch.set_rng_state(new_state)


# The class is built once (it subclasses the *original* tracker class).
_TRACKER_CLASS: Optional[type] = None


def _tracker_class():
    global _TRACKER_CLASS
    if _TRACKER_CLASS is None:
        _TRACKER_CLASS = _make_cpu_tracker_class()
    return _TRACKER_CLASS


def __getattr__(name):  # lazily expose CpuRNGStatesTracker without importing megatron early
    if name == "CpuRNGStatesTracker":
        return _tracker_class()
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------
# rotary_inv_freq_device
# ---------------------------------------------------------------------------------------


def _rotary_cls():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding


def _rotary_get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """RoPE angles ``[s, 1, 1, dim]`` computed where ``inv_freq`` lives (CPU here)."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
    if self.rotary_interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)  # f0 f0 f1 f1 ...
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...
    return emb[:, None, None, :]


# ---------------------------------------------------------------------------------------
# router_gating_device / router_gating_te_gemm
# ---------------------------------------------------------------------------------------


def _router_cls():
    from megatron.core.transformer.moe.router import Router

    return Router


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _router_gating(self, input: torch.Tensor) -> torch.Tensor:
    """Router logits without moving the weight to a CUDA device."""
    router_dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
    return _moe_utils().router_gating_linear(input, self.weight, self.bias, router_dtype)


# ---------------------------------------------------------------------------------------
# global_memory_buffer_device
# ---------------------------------------------------------------------------------------


def _utils_buffer_cls():
    from megatron.core.utils import GlobalMemoryBuffer

    return GlobalMemoryBuffer


def _buffer_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """Same contract as upstream (a reused flat buffer per (name, dtype)), on CPU."""
    numel = 1
    for d in tensor_shape:
        numel *= int(d)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with (mem_alloc_context or contextlib.nullcontext)():
            buf = torch.empty(numel, dtype=dtype, device="cpu", requires_grad=False)
        self.buffer[(name, dtype)] = buf
    return buf[:numel].view(*tensor_shape)


# ---------------------------------------------------------------------------------------
# gather_along_first_dim / reduce_scatter_along_first_dim / all_to_all_output_device
# ---------------------------------------------------------------------------------------


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """All-gather along dim 0 with gloo-supported ``all_gather`` into ``input_``'s device.

    ``use_global_buffer`` is accepted and ignored (a fresh tensor is returned).
    """
    assert group is not None, "group should not be None"
    world = group.size()
    if world == 1:
        return input_
    input_ = input_.contiguous()
    if output_split_sizes is None:
        output_split_sizes = [input_.size(0)] * world
    output_split_sizes = [int(s) for s in output_split_sizes]
    output = input_.new_empty([sum(output_split_sizes)] + list(input_.shape[1:]))
    chunks = list(torch.split(output, output_split_sizes, dim=0))
    if len(set(output_split_sizes)) == 1:
        torch.distributed.all_gather(chunks, input_, group=group)
    else:  # gloo's all_gather needs equal sizes: pad to the largest, then trim
        largest = max(output_split_sizes)
        padded = input_.new_zeros([largest] + list(input_.shape[1:]))
        padded[: input_.size(0)] = input_
        gathered = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded, group=group)
        for dst, src, n in zip(chunks, gathered, output_split_sizes):
            dst.copy_(src[:n])
    return output


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """Reduce-scatter along dim 0 as ``all_reduce`` + own slice (gloo has no reduce_scatter).

    Sums in the same order on every rank, so results are identical across ranks.
    ``use_global_buffer`` is accepted and ignored.
    """
    assert group is not None, "group should not be None"
    world = group.size()
    if world == 1:
        return input_
    rank = group.rank()
    if input_split_sizes is None:
        if input_.size(0) % world != 0:
            raise ValueError(
                "First dimension of the tensor should be divisible by tensor parallel size"
            )
        input_split_sizes = [input_.size(0) // world] * world
    input_split_sizes = [int(s) for s in input_split_sizes]
    reduced = input_.contiguous().clone()
    torch.distributed.all_reduce(reduced, group=group)
    start = sum(input_split_sizes[:rank])
    return reduced[start : start + input_split_sizes[rank]].contiguous()


def _all_to_all_forward(ctx, group, input, output_split_sizes, input_split_sizes,
                        use_nccl_stream=False):
    """``_AllToAll.forward`` with the output allocated on ``input``'s device.

    ``use_nccl_stream`` (0.18+) is kept for upstream's backward; without CUDA there is no
    NCCL stream, so the exchange is the same synchronous all-to-all either way."""
    ctx.group = group
    ctx.output_split_sizes = output_split_sizes
    ctx.input_split_sizes = input_split_sizes
    ctx.use_nccl_stream = use_nccl_stream
    if group.size() == 1:
        return input
    input = input.contiguous()
    if output_split_sizes is None:
        output = torch.empty_like(input)
    else:
        output_split_sizes = [int(s) for s in output_split_sizes]
        output = input.new_empty([sum(output_split_sizes)] + list(input.shape[1:]))
    if input_split_sizes is not None:
        input_split_sizes = [int(s) for s in input_split_sizes]
    torch.distributed.all_to_all_single(
        output,
        input,
        output_split_sizes=output_split_sizes,
        input_split_sizes=input_split_sizes,
        group=group,
    )
    return output


def _all_to_all_cls():
    return _mappings()._AllToAll


# ---------------------------------------------------------------------------------------
# alltoall_dispatcher_streams
# ---------------------------------------------------------------------------------------


def _alltoall_cls():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return MoEAlltoAllTokenDispatcher


class _NoStream:
    """Placeholder for the dispatcher's class-level ``cuda_dtoh_stream`` on CPU.

    Its presence makes the upstream constructor skip ``torch.cuda.Stream()``; nothing
    is ever scheduled on it (see :func:`_alltoall_dtoh_and_synchronize`).
    """

    def __repr__(self):
        return "<mpmoe cpu_compat: no CUDA stream>"

    def wait_event(self, event):  # nothing runs asynchronously on the CPU
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


_NO_STREAM = _NoStream()


def _to_host_splits(x):
    if torch.is_tensor(x):
        return x.cpu().numpy()
    return x


def _alltoall_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """Stream-free version: at ``cuda_dtoh_point`` turn the split sizes into host numpy
    arrays (what upstream's side-stream copy produces); there is nothing to synchronize."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        if torch.is_tensor(tokens_per_expert):
            tokens_per_expert = tokens_per_expert.cpu()
        self.input_splits = _to_host_splits(self.input_splits)
        self.output_splits = _to_host_splits(self.output_splits)
        self.output_splits_tp = _to_host_splits(self.output_splits_tp)
        if torch.is_tensor(self.num_out_tokens):
            self.num_out_tokens = self.num_out_tokens.cpu()
        if self.num_local_experts > 1 and torch.is_tensor(
            getattr(self, "num_global_tokens_per_local_expert", None)
        ):
            self.num_global_tokens_per_local_expert = self.num_global_tokens_per_local_expert.cpu()
    return tokens_per_expert


# ---------------------------------------------------------------------------------------
# Functions that only need "the CUDA device" to mean the CPU: ddp_grad_buffer_device,
# schedule_token_count_device, fp32_optimizer_scale_device, grad_norm_device,
# dist_ckpt_preload_sync, dist_ckpt_finalize_device
# ---------------------------------------------------------------------------------------


def _cpu_device(device):
    """``device`` with any CUDA device replaced by the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCudaView:
    """``torch.cuda`` as one patched upstream function sees it: the current device is the
    CPU and ``synchronize`` has nothing to wait for; every other name is ``torch.cuda``'s."""

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def current_stream(device=None):
        return _NO_STREAM

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _factory_on_cpu(factory):
    def call(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_device(device), **kwargs)

    call.__name__ = factory.__name__
    return call


class _CpuTorchView:
    """``torch`` as one patched upstream function sees it: ``torch.cuda`` is
    :class:`_CpuCudaView` and the tensor factories put ``device="cuda"`` tensors on the CPU;
    every other name is ``torch``'s."""

    cuda = _CpuCudaView()
    zeros = staticmethod(_factory_on_cpu(torch.zeros))
    ones = staticmethod(_factory_on_cpu(torch.ones))
    empty = staticmethod(_factory_on_cpu(torch.empty))
    full = staticmethod(_factory_on_cpu(torch.full))
    tensor = staticmethod(_factory_on_cpu(torch.tensor))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorchView()


class _GlobalsWithCpuTorch(dict):
    """A function's globals: the name ``torch`` is :data:`_CPU_TORCH`, every other name is
    looked up (live) in the upstream module's namespace."""

    def __init__(self, module_globals: dict):
        super().__init__(torch=_CPU_TORCH, __builtins__=module_globals.get("__builtins__"))
        self._module_globals = module_globals

    def __missing__(self, name):
        return self._module_globals[name]


def _with_cuda_on_cpu(fn):
    """Upstream's own function ``fn`` (same code object, defaults, closure), run with the
    global name ``torch`` bound to :data:`_CPU_TORCH`: its ``torch.cuda.current_device()``
    and ``device="cuda"`` allocations land on the CPU, ``torch.cuda.synchronize()`` is a
    no-op. Nothing outside that one function changes."""
    patched = types.FunctionType(fn.__code__, _GlobalsWithCpuTorch(fn.__globals__),
                                 fn.__name__, fn.__defaults__, fn.__closure__)
    patched.__kwdefaults__ = fn.__kwdefaults__
    patched.__dict__.update(fn.__dict__)
    patched.__wrapped__ = fn
    functools.update_wrapper(patched, fn, assigned=("__module__", "__qualname__", "__doc__"),
                             updated=())
    return patched


def _upstream(owner_fn: Callable[[], Any], attr: str, static: bool = False):
    """``replacement`` factory: upstream's ``owner.attr`` run with CUDA routed to the CPU."""

    def build():
        fn = _original_or_current(owner_fn, attr)
        if isinstance(fn, staticmethod):
            fn = fn.__func__
        patched = _with_cuda_on_cpu(fn)
        return staticmethod(patched) if static else patched

    return build


def _grad_buffer_cls():
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    return _ParamAndGradBuffer


def _schedules():
    from megatron.core.pipeline_parallel import schedules

    return schedules


def _fp32_optimizer_cls():
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return FP32Optimizer


def _optimizer_module():
    from megatron.core.optimizer import optimizer

    return optimizer


@torch.no_grad()
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale fp32 gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is < 1
    (``.decoupled_grad`` instead of ``.grad`` when ``use_decoupled_grad``)."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    name = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [to_local_if_dtensor(g).detach() for g in
             (getattr(p, name, None) for p in parameters) if g is not None]
    allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
    assert all(g.dtype in allowed for g in grads), "clip_grad_by_total_norm_fp32: fp32 grads only"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)


def _clip_grads_module():
    from megatron.core.optimizer import clip_grads

    return clip_grads


def _fs_writer_cls():
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    return FileSystemWriterAsync


def _attention_cls():
    from megatron.core.transformer.attention import Attention

    return Attention


def _torch_strategy_module():
    from mpmoe.megatron.compat import dist_ckpt_finalize_owner

    return dist_ckpt_finalize_owner()


def _bucket_group_cls():
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    return _ParamAndGradBucketGroup


def _megatron_optimizer_cls():
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return MegatronOptimizer


def _te_gemm_needed(owner) -> bool:
    from mpmoe.megatron.compat import te_general_gemm_undefined

    return te_general_gemm_undefined(owner)


def _grad_sync_stream_needed(owner) -> bool:
    from mpmoe.megatron.compat import start_grad_sync_uses_cuda_stream

    return start_grad_sync_uses_cuda_stream(getattr(owner, "start_grad_sync", None))


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------

PATCHES: Tuple[Patch, ...] = (
    Patch(
        "rng_tracker",
        _random_module,
        "CudaRNGStatesTracker",
        _tracker_class,
        "Upstream: megatron.core.tensor_parallel.random.CudaRNGStatesTracker stores CUDA "
        "generator states (torch.cuda.get_rng_state / manual_seed) and is what "
        "model_parallel_cuda_manual_seed and get_cuda_rng_tracker().fork() use (dropout, "
        "GPU-style init, MoE random logits, activation recompute). Without CUDA: "
        "AssertionError 'Torch not compiled with CUDA enabled'. Replacement: "
        "CpuRNGStatesTracker (same API, CPU generator states). Delete when megatron-core's "
        "tracker is device-agnostic.",
    ),
    Patch(
        "rng_state_get",
        _random_module,
        "_get_cuda_rng_state",
        lambda: _cpu_get_rng_state,
        "Part of rng_tracker. Upstream: _get_cuda_rng_state reads the CUDA generator "
        "(activation-recompute CheckpointFunction saves it). Replacement returns the CPU "
        "generator state.",
    ),
    Patch(
        "rng_state_set",
        _random_module,
        "_set_cuda_rng_state",
        lambda: _cpu_set_rng_state,
        "Part of rng_tracker. Upstream: _set_cuda_rng_state writes the CUDA generator. "
        "Replacement writes the CPU generator state.",
    ),
    Patch(
        "rotary_inv_freq_device",
        _rotary_cls,
        "get_emb",
        lambda: _rotary_get_emb,
        "Upstream: RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() "
        "on the first call when it is on CPU (GPTModel builds RotaryEmbedding itself, so "
        "no spec can replace it). Replacement computes the same [s,1,1,dim] angles where "
        "inv_freq lives. Delete when get_emb stops forcing CUDA.",
    ),
    Patch(
        "router_gating_device",
        _router_cls,
        "gating",
        lambda: _router_gating,
        "Upstream: Router.gating moves weight/bias to torch.cuda.current_device() when they "
        "are on CPU. Replacement: the same logits (router_gating_linear in "
        "moe_router_dtype) without the move. Only stock routers need it; mpmoe's routers "
        "override gating. Delete when Router.gating is device-agnostic.",
    ),
    Patch(
        "router_gating_te_gemm",
        _moe_utils,
        "te_general_gemm",
        lambda: None,
        "Upstream: moe_utils imports te_general_gemm only when Transformer Engine is "
        "installed, but RouterGatingLinearFunction tests 'te_general_gemm is not None' "
        "unconditionally -> NameError without TE. Replacement: define it as None so "
        "upstream's own torch.mm/addmm path runs. Applied only if the name is missing "
        "(0.17+ sets te_general_gemm = None itself). Delete with 0.16 support.",
        needed=_te_gemm_needed,
    ),
    Patch(
        "global_memory_buffer_device",
        _utils_buffer_cls,
        "get_tensor",
        lambda: _buffer_get_tensor,
        "Upstream: GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device() "
        "(used by the allgather dispatcher's gather and by DotProductAttention). "
        "Replacement: the same reusable buffer on CPU. Delete when it takes a device.",
    ),
    Patch(
        "gather_along_first_dim",
        _mappings,
        "_gather_along_first_dim",
        lambda: _gather_along_first_dim,
        "Upstream: mappings._gather_along_first_dim allocates its output on "
        "torch.cuda.current_device() (allgather dispatcher, sequence parallel). "
        "Replacement: all_gather (gloo-supported, uneven sizes padded) into a tensor on "
        "the input's device. Delete when upstream allocates on input_.device.",
    ),
    Patch(
        "reduce_scatter_along_first_dim",
        _mappings,
        "_reduce_scatter_along_first_dim",
        lambda: _reduce_scatter_along_first_dim,
        "Upstream: mappings._reduce_scatter_along_first_dim allocates on "
        "torch.cuda.current_device() and calls reduce_scatter(_tensor), which gloo does not "
        "implement (allgather dispatcher combine, backward of its gather). Replacement: "
        "all_reduce then keep this rank's slice. Delete when upstream is device-agnostic "
        "and gloo gains reduce_scatter.",
    ),
    Patch(
        "all_to_all_output_device",
        _all_to_all_cls,
        "forward",
        lambda: staticmethod(_all_to_all_forward),
        "Upstream: mappings._AllToAll.forward allocates the all-to-all-v output on "
        "torch.cuda.current_device() (alltoall dispatcher). Replacement: allocate on the "
        "input's device; split sizes passed as int lists (gloo). Delete when upstream "
        "allocates on input.device.",
    ),
    Patch(
        "alltoall_dispatcher_stream",
        _alltoall_cls,
        "cuda_dtoh_stream",
        lambda: _NO_STREAM,
        "Upstream: MoEAlltoAllTokenDispatcher.__init__ creates a class-wide "
        "torch.cuda.Stream() for device-to-host copies when the class attribute is None. "
        "Replacement: a CPU placeholder so the constructor skips it. Delete with "
        "alltoall_dispatcher_dtoh.",
    ),
    Patch(
        "alltoall_dispatcher_dtoh",
        _alltoall_cls,
        "_maybe_dtoh_and_synchronize",
        lambda: _alltoall_dtoh_and_synchronize,
        "Upstream: MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize copies split "
        "sizes to the host on that CUDA stream and records/synchronizes a CUDA event. "
        "Replacement: host numpy splits, no stream. Delete when the dispatcher supports "
        "a CPU device.",
    ),
    Patch(
        "ddp_grad_buffer_device",
        _grad_buffer_cls,
        "__init__",
        _upstream(_grad_buffer_cls, "__init__"),
        "Upstream: distributed._ParamAndGradBuffer.__init__ allocates the contiguous "
        "param/grad buffers on torch.cuda.current_device(), so megatron's "
        "DistributedDataParallel cannot be built without CUDA. Replacement: upstream's own "
        "__init__ with torch.cuda.current_device() answering the CPU (buffers on CPU). "
        "Delete when the buffer allocates on its parameters' device.",
    ),
    Patch(
        "ddp_grad_sync_stream",
        _bucket_group_cls,
        "start_grad_sync",
        _upstream(_bucket_group_cls, "start_grad_sync"),
        "Upstream (0.19+): distributed._ParamAndGradBucketGroup.start_grad_sync calls "
        "torch.cuda.current_stream() to wait on CUDA-graph weight-gradient events before "
        "reducing gradients. Replacement: upstream's own method with a current stream that "
        "has nothing to wait for. Applied only where start_grad_sync asks for the stream. "
        "Delete when it asks only under CUDA graphs.",
        needed=_grad_sync_stream_needed,
    ),
    Patch(
        "schedule_token_count_device",
        _schedules,
        "forward_backward_no_pipelining",
        _upstream(_schedules, "forward_backward_no_pipelining"),
        "Upstream: schedules.forward_backward_no_pipelining (what get_forward_backward_func() "
        "returns without pipeline parallelism) counts tokens in torch.zeros(..., "
        "device='cuda'). Replacement: upstream's own schedule with that counter on the CPU. "
        "Delete when the schedule allocates on the model's device.",
    ),
    Patch(
        "fp32_optimizer_scale_device",
        _fp32_optimizer_cls,
        "__init__",
        _upstream(_fp32_optimizer_cls, "__init__"),
        "Upstream: optimizer.FP32Optimizer.__init__ (get_megatron_optimizer's fp32 "
        "optimizer) creates its loss scale with torch.tensor(..., device='cuda'). "
        "Replacement: upstream's own __init__ with that tensor on the CPU. Delete when "
        "FP32Optimizer allocates on the parameters' device.",
    ),
    Patch(
        "grad_norm_device",
        _optimizer_module,
        "get_grad_norm_fp32",
        _upstream(_optimizer_module, "get_grad_norm_fp32"),
        "Upstream: clip_grads.get_grad_norm_fp32 (imported by name into "
        "optimizer.optimizer, which MegatronOptimizer.get_grad_norm/clip_grad_norm call) "
        "creates its overflow buffer and norm with device='cuda'. Replacement: upstream's "
        "own function with those tensors on the CPU, bound where the optimizer looks it up. "
        "Delete when the grad norm allocates on the gradients' device.",
    ),
    Patch(
        "grad_norm_l2_device",
        _clip_grads_module,
        "l2_norm_impl",
        _upstream(_clip_grads_module, "l2_norm_impl"),
        "Upstream: without Apex/Transformer Engine, clip_grads.l2_norm_impl is "
        "utils.local_multi_tensor_l2_norm, which returns the norm in a tensor created with "
        "device='cuda'. Replacement: that same function with the tensor on the CPU. Delete "
        "when the local fallback allocates on the gradients' device.",
    ),
    Patch(
        "grad_clip_device",
        _optimizer_module,
        "clip_grad_by_total_norm_fp32",
        lambda: _clip_grad_by_total_norm_fp32,
        "Upstream: clip_grads.clip_grad_by_total_norm_fp32 (imported by name into "
        "optimizer.optimizer) asserts grad.type() == 'torch.cuda.FloatTensor' and creates "
        "its overflow buffer with device='cuda'. Replacement: the same in-place scaling by "
        "max_norm / (total_norm + 1e-6) when that is < 1, asserting fp32 grads on any "
        "device; bound where the optimizer looks it up. Delete when upstream checks the "
        "dtype instead of the CUDA tensor type.",
    ),
    Patch(
        "dist_ckpt_preload_sync",
        _fs_writer_cls,
        "preload_tensors",
        _upstream(_fs_writer_cls, "preload_tensors", static=True),
        "Upstream: filesystem_async.FileSystemWriterAsync.preload_tensors (torch_dist save) "
        "copies tensors to the host and calls torch.cuda.synchronize(), which raises "
        "without CUDA. Replacement: upstream's own static method with synchronize a no-op "
        "(CPU copies are synchronous). Delete when it synchronizes only when CUDA is used.",
    ),
    Patch(
        "dist_ckpt_finalize_device",
        _torch_strategy_module,
        "save_state_dict_async_finalize",
        _upstream(_torch_strategy_module, "save_state_dict_async_finalize"),
        "Upstream: state_dict_saver.save_state_dict_async_finalize (imported by name into "
        "strategies.torch, which the torch_dist save calls) broadcasts its failure flag in a "
        "tensor on torch.cuda.current_device(). Replacement: upstream's own function with "
        "that tensor on the CPU (gloo), bound where strategies.torch looks it up. Delete "
        "when it allocates on the process group's device.",
    ),
    Patch(
        "inference_kv_cache_device",
        _attention_cls,
        "_allocate_memory",
        _upstream(_attention_cls, "_allocate_memory"),
        "Upstream: transformer.attention.Attention._allocate_memory (the KV cache of a "
        "StaticInferenceContext, allocated on a layer's first inference forward) uses "
        "device=torch.cuda.current_device(). Replacement: upstream's own method with that "
        "device the CPU. Delete when it allocates on the device of the keys.",
    ),
    Patch(
        "grad_norm_group_device",
        _megatron_optimizer_cls,
        "has_grad_norm_group",
        _upstream(_megatron_optimizer_cls, "has_grad_norm_group"),
        "Upstream (0.19+): optimizer.MegatronOptimizer.has_grad_norm_group (asked by "
        "get_grad_norm/clip_grad_norm) all-reduces a flag created with device='cuda'. "
        "Replacement: upstream's own method with that flag on the CPU (gloo). Delete when "
        "the flag is allocated on the grad-stats group's device.",
    ),
)

_BY_NAME = {p.name: p for p in PATCHES}


def _original_or_current(owner_fn: Callable[[], Any], attr: str) -> Any:
    owner = owner_fn()
    for entries in _APPLIED.values():
        for o, a, orig in entries:
            if o is owner and a == attr:
                return orig
    return getattr(owner, attr)


def _owner_or_none(patch: Patch) -> Any:
    try:
        return patch.owner()
    except (ImportError, AttributeError):  # target's module or class gone upstream
        return None


def applicable() -> List[str]:
    """Names of the patches the installed megatron-core needs (target present and needed)."""
    names = []
    for patch in PATCHES:
        if patch.name in _APPLIED:  # judged before it changed the target
            names.append(patch.name)
            continue
        owner = _owner_or_none(patch)
        if owner is not None and patch.is_needed(owner):
            names.append(patch.name)
    return names


def is_enabled() -> bool:
    """True when the patches are applied in this process."""
    return bool(_APPLIED)


def enabled_patches() -> List[str]:
    """Names of the applied patches (empty when CUDA is available)."""
    return list(_APPLIED)


def original(name: str) -> Any:
    """The upstream object a patch replaced (or the current one when not applied).

    Raises KeyError for an unknown patch name.
    """
    patch = _BY_NAME[name]
    owner = patch.owner()
    for o, a, orig in _APPLIED.get(name, []):
        if o is owner and a == patch.attr:
            return None if orig is _MISSING else orig
    return owner.__dict__.get(patch.attr, getattr(owner, patch.attr, None))


def enable(force: bool = False) -> List[str]:
    """Apply all patches if CUDA is absent (or ``force``); idempotent.

    Returns the names of the patches that are active after the call.
    """
    if torch.cuda.is_available() and not force:
        return enabled_patches()
    for patch in PATCHES:
        if patch.name in _APPLIED:
            continue
        owner = _owner_or_none(patch)
        if owner is None or not patch.is_needed(owner):
            log.debug("mpmoe cpu_compat: %s not needed by this megatron-core, skipped", patch.name)
            continue
        orig = owner.__dict__.get(patch.attr, _MISSING) if isinstance(owner, type) else getattr(
            owner, patch.attr, _MISSING
        )
        setattr(owner, patch.attr, patch.replacement())
        _APPLIED[patch.name] = [(owner, patch.attr, orig)]
    _reset_rng_tracker_if_cuda_one()
    log.debug("mpmoe cpu_compat enabled: %s", ", ".join(_APPLIED))
    return enabled_patches()


def disable() -> None:
    """Restore every original attribute (reverse order)."""
    for name in reversed(list(_APPLIED)):
        for owner, attr, orig in _APPLIED.pop(name):
            if orig is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(owner, attr)
            else:
                setattr(owner, attr, orig)
    _reset_rng_tracker_if_cuda_one()


def _reset_rng_tracker_if_cuda_one() -> None:
    """Drop an already-built RNG tracker of the wrong kind (CUDA one while patched, CPU one
    after :func:`disable`) so that the next ``get_cuda_rng_tracker()`` builds the right one."""
    mrandom = _random_module()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is None:
        return
    if isinstance(tracker, _tracker_class()) != ("rng_tracker" in _APPLIED):
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
