"""Process groups for a run: ``torch.distributed`` + megatron's ``parallel_state`` + RNG.

Typical use (trainer, eval, tests)::

    from mpmoe.megatron import init_distributed, destroy_distributed
    init_distributed(tensor_model_parallel_size=1, expert_model_parallel_size=2, seed=1234)
    ...
    destroy_distributed()

Under ``torchrun`` the rank, world size and rendezvous come from the environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). Without them a
single process (world size 1) is set up on 127.0.0.1 with a free port. The backend is
``nccl`` when CUDA is available and ``gloo`` otherwise; without CUDA
:func:`mpmoe.megatron.cpu_compat.enable` is called first.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mpmoe.megatron import cpu_compat

__all__ = [
    "ParallelInfo",
    "current_parallel_info",
    "destroy_distributed",
    "reset_moe_globals",
    "find_free_port",
    "init_distributed",
    "token_parallel_group",
    "token_parallel_world_size",
]

# True when init_distributed created the default process group (so destroy may end it).
_OWNS_DEFAULT_GROUP = False


@dataclasses.dataclass(frozen=True)
class ParallelInfo:
    """Sizes and ranks of this process after :func:`init_distributed`."""

    backend: str
    world_size: int
    rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    expert_model_parallel_size: int
    expert_tensor_parallel_size: int
    data_parallel_size: int
    data_parallel_rank: int
    expert_model_parallel_rank: int


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_sizes(world, tp, pp, cp, ep, etp) -> None:
    for name, v in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep),
                    ("expert tensor", etp)):
        if v < 1:
            raise ValueError(f"{name} model parallel size must be >= 1, got {v}")
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}"
        )
    if world % (etp * ep * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by ETP*EP*PP = {etp}*{ep}*{pp} = {etp * ep * pp}"
        )


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    *,
    backend: Optional[str] = None,
    seed: int = 1234,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
    timeout_minutes: int = 30,
) -> ParallelInfo:
    """Initialise ``torch.distributed`` (if needed), megatron's model-parallel groups and RNG.

    Args:
        tensor/pipeline/expert/context_model_parallel_size: megatron's parallel sizes.
            Data parallelism is what is left of the world size.
        expert_tensor_parallel_size: default (None) as megatron: equal to TP.
        backend: ``None`` = ``nccl`` with CUDA, ``gloo`` without.
        seed: seeds the torch default generator (identical on all ranks, so replicated
            weights initialise identically) and megatron's model-parallel RNG tracker.
        rank / world_size / init_method: override the environment (``RANK``,
            ``WORLD_SIZE``, ``env://``). With neither given nor in the environment: one
            process on ``tcp://127.0.0.1:<free port>``.

    Re-entrant: when ``torch.distributed`` is already initialised it is reused, and
    existing model-parallel groups are destroyed and rebuilt with the new sizes.
    Raises ValueError (one line) for sizes that do not divide the world size.
    """
    global _OWNS_DEFAULT_GROUP
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("backend='nccl' needs CUDA; use 'gloo' on CPU")

    if not dist.is_initialized():
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if init_method is None:
            if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
                init_method = "env://"
            elif world_size == 1:
                init_method = f"tcp://127.0.0.1:{find_free_port()}"
            else:
                raise ValueError("world_size > 1 needs MASTER_ADDR/MASTER_PORT or init_method")
        if cuda and backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
        _OWNS_DEFAULT_GROUP = True

    world = dist.get_world_size()
    etp = tensor_model_parallel_size if expert_tensor_parallel_size is None else (
        expert_tensor_parallel_size
    )
    _check_sizes(
        world,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        expert_model_parallel_size,
        etp,
    )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=True,
    )
    reset_moe_globals()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return current_parallel_info()


def current_parallel_info() -> ParallelInfo:
    """Sizes and ranks of the current model-parallel set-up."""
    ps = parallel_state
    return ParallelInfo(
        backend=str(dist.get_backend()),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        data_parallel_rank=ps.get_data_parallel_rank(),
        expert_model_parallel_rank=ps.get_expert_model_parallel_rank(),
    )


def reset_moe_globals() -> None:
    """Clear megatron-core's process-global MoE state, so one run cannot leak into the next.

    * the layer-wise aux-loss logging tracker, sized for the last model's layer count
      (a model with more layers built later in the process would index past it);
    * ``MoEAuxLossAutoScaler.main_loss_backward_scale``, the aux-loss gradient scale the
      forward-backward schedule sets (1 / micro-batches): left over, it rescales the aux
      loss of the next run's backward; and a 0-d scale left by a backward outside the
      schedule makes the schedule's ``copy_`` of its 1-element scale fail.

    :func:`init_distributed` and :func:`destroy_distributed` both call it.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mpmoe.megatron.compat import reset_moe_metrics

    reset_moe_metrics()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def destroy_distributed() -> None:
    """End a run: destroy megatron's groups, the default group if :func:`init_distributed`
    made it, and megatron's process-global MoE state (:func:`reset_moe_globals`)."""
    global _OWNS_DEFAULT_GROUP

    reset_moe_globals()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWNS_DEFAULT_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_DEFAULT_GROUP = False


def token_parallel_group(sequence_parallel: bool = False) -> dist.ProcessGroup:
    """The process group of all ranks that route *different* tokens through a given layer.

    Use it to sum routing statistics (Sigma counters, usage counts) so that every token
    is counted exactly once:

    * data-parallel ranks see different sequences; expert-parallel ranks are data-parallel
      ranks for the non-expert part of the model, so they see different tokens too (EP is
      carved out of DP in megatron);
    * context-parallel ranks see different slices of a sequence;
    * tensor-parallel ranks see the *same* tokens at the router, unless sequence
      parallelism is on: then each TP rank routes its own sequence shard;
    * pipeline stages hold different layers, so a layer's statistics live on one stage.

    So the group is DP x CP (``get_data_parallel_group(with_context_parallel=True)``),
    or TP x DP x CP when ``sequence_parallel`` is true. Pass ``config.sequence_parallel``.
    """
    if sequence_parallel:
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def token_parallel_world_size(sequence_parallel: bool = False) -> int:
    """Size of :func:`token_parallel_group`."""
    return dist.get_world_size(group=token_parallel_group(sequence_parallel))
