"""Shared helpers for the megatron model tests (no tests in this module).

* :func:`run_distributed` spawns N processes on 127.0.0.1 (gloo), runs a module-level
  function in each and returns the per-rank results (or raises with the worker's
  traceback).
* :func:`tiny_config` is the tiny GPT MoE used across tests.
* :func:`allreduce_gradients` is the data-parallel gradient sync the tests use instead of
  megatron's DistributedDataParallel (whose grad buffers are allocated on CUDA in
  megatron-core 0.16.1): non-expert grads are summed over DP x CP, expert grads over the
  expert-data-parallel group, and both are divided by the DP x CP size, i.e. the gradient
  of the mean of the per-rank mean losses (megatron DDP's "average" semantics).
* :func:`shard_experts` / :func:`global_param_name` map between a single-process
  ``state_dict`` and an expert-parallel rank's local expert numbering.
"""

from __future__ import annotations

import io
import os
import queue
import re
import traceback
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.multiprocessing as mp

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")

from mpmoe.megatron.parallel import find_free_port  # noqa: E402

DEFAULT_TIMEOUT_S = 180


def tiny_config(config_cls=None, **overrides):
    """A 2-layer GPT MoE: hidden 64, 4 heads (2 KV groups), 8 experts, top-2, fp32.

    ``config_cls``: megatron's ``TransformerConfig`` by default (``MoPEConfig`` for MoPE).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=False,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
    )
    kwargs.update(overrides)
    return (config_cls or TransformerConfig)(**kwargs)


def make_batch(seed: int, batch: int = 4, seq: int = 32, vocab: int = 128):
    """(tokens, position_ids, labels) of a fixed random batch, ``[batch, seq]`` each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    return ids[:, :-1].contiguous(), pos, ids[:, 1:].contiguous()


def allreduce_gradients(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel replicas (see module docstring)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    edp_group = ps.get_expert_data_parallel_group()
    scale = 1.0 / ps.get_data_parallel_world_size(with_context_parallel=True)
    for p in model.parameters():
        if p.grad is None:
            continue
        group = dp_group if getattr(p, "allreduce", True) else edp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        p.grad.mul_(scale)


_EXPERT_KEY = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def global_param_name(name: str, ep_rank: int, num_local_experts: int) -> str:
    """``...local_experts.{i}...`` on EP rank r -> ``...local_experts.{r*n + i}...``."""
    m = _EXPERT_KEY.fullmatch(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * num_local_experts + int(m.group(2))}{m.group(3)}"


def shard_experts(full_state: Dict[str, torch.Tensor], local_keys: Sequence[str],
                  ep_rank: int, num_local_experts: int) -> Dict[str, torch.Tensor]:
    """The entries of a single-process state dict that an EP rank's model holds."""
    return {k: full_state[global_param_name(k, ep_rank, num_local_experts)] for k in local_keys}


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        results.put((rank, True, _to_bytes(out)))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S
                    ) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    ``fn`` must be importable (module level). Each worker has ``MASTER_ADDR=127.0.0.1``,
    a fresh ``MASTER_PORT``, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, one intra-op
    thread, and should call :func:`mpmoe.megatron.init_distributed`. Returns the results
    ordered by rank; a worker exception is re-raised here as RuntimeError with its
    traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    # Not daemonic: like torchrun's workers, they may start processes of their own (megatron's
    # torch_dist checkpoint writer forks writer processes). Leftovers are killed below.
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: Dict[int, Any] = {}
    errors: List[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"distributed workers timed out after {timeout}s") from None
            if ok:
                out[rank] = _from_bytes(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
