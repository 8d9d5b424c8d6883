"""Checkpoints with megatron's dist checkpointing: model, optimizer, schedule, data, RNG, routing.

Layout (Megatron-LM's)::

    <save>/latest_checkpointed_iteration.txt     # "120"
    <save>/iter_0000120/                          # a dist checkpoint (metadata.json, common.pt, ...)

A checkpoint directory appears atomically: it is written as ``iter_XXXXXXX.tmp`` and
renamed when every rank has finished; ``latest_checkpointed_iteration.txt`` is replaced
after the rename. A run killed while saving leaves only a ``.tmp`` directory, which
loading ignores and the next save of that iteration replaces.

Contents: ``model`` (the model's sharded state dict, including each MoPE layer's Sigma
counters), ``optimizer`` (Adam moments sharded like their parameters, or megatron's
distributed-optimizer state), ``rng`` (one ShardedObject per rank: Python, NumPy, torch,
CUDA and megatron's model-parallel tracker states) and ``train_state`` (iteration,
consumed samples = the data-iterator position, scheduler state, router counters, and
from the trainer the run's flags ``args`` and vocabulary ``data``, so that a checkpoint
alone rebuilds its model: :func:`saved_run_info`). The trainer also copies the run's
tokenizer to ``<save>/tokenizer/`` (:func:`save_tokenizer`).

Model-only checkpoints (:func:`mpmoe.store.save_model`: import, expert surgery) have the same
layout with ``model`` and ``train_state`` only (``train_state["model_only"] = True``): they
load with ``load_optim=False`` (``--no-load-optim``); their RNG is not restored.

Tensor storage: megatron's default ``torch_dist`` strategy, on GPU and CPU (on CPU through
:mod:`mpmoe.megatron.cpu_compat`, patches ``dist_ckpt_preload_sync`` and
``dist_ckpt_finalize_device``), so checkpoints reshard and move between CPU and GPU runs.

Writer processes (:func:`writer_dies_with_trainer`): saves are synchronous. megatron's
writer would start a persistent ``multiprocessing`` Manager process (and its
``resource_tracker``) for one result queue, which outlive a SIGKILLed trainer forever; the
trainer hands it an in-process queue instead, so no Manager is started. The writer's
forked worker processes (megatron-core 0.16: one per file) get a parent-death signal, so
they die with the trainer at any moment of a save.
"""

from __future__ import annotations

import os
import re
import queue
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mpmoe.errors import UserError
from mpmoe.megatron import routers, settings

__all__ = ["latest_iteration", "load_checkpoint", "resolve_checkpoint", "resolve_load",
           "save_checkpoint", "save_tokenizer", "saved_run_info", "writer_dies_with_trainer",
           "TOKENIZER_DIR"]

TRACKER = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


# --------------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data) -> ShardedObject:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


# --------------------------------------------------------------------------- routing state
def _router_counters(model) -> dict:
    """Per-router Python counters that are not tensors (MoPE Sigma lives in the state dict)."""
    from mpmoe.megatron.router import iter_routers

    return {str(r.layer_number): int(getattr(r, "_counted_forwards", 0)) for r in iter_routers(model)}


def _set_router_counters(model, counters: dict) -> None:
    from mpmoe.megatron.router import iter_routers

    for r in iter_routers(model):
        if str(r.layer_number) in counters and hasattr(r, "_counted_forwards"):
            r._counted_forwards = counters[str(r.layer_number)]


# --------------------------------------------------------------------------- save / load
def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- writer processes
_PR_SET_PDEATHSIG = 1
_fork_hook = {"installed": False, "prctl": None, "parent": None}


def _child_dies_with_parent() -> None:
    """In a child just forked by the trainer: SIGKILL when the forking thread dies."""
    _fork_hook["prctl"](_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != _fork_hook["parent"]:  # the parent died before prctl took effect
        os._exit(1)


def writer_dies_with_trainer() -> None:
    """Make checkpoint writing leave no process behind a killed trainer (idempotent).

    1. megatron's ``FileSystemWriterAsync`` takes its result queue from a module global that
       it fills, on first use, with ``multiprocessing.get_context("spawn").Manager().Queue()``:
       a server process plus a ``resource_tracker`` that nothing stops when the trainer is
       SIGKILLed. Saves here are synchronous (``dist_checkpointing.save``), so the queue is
       only used inside this process: an in-process ``queue.Queue`` does the same job and
       starts no process. (megatron-core 0.16.1 to 0.19.x keep the queue in
       ``filesystem_async._results_queue``; if that name goes, nothing is changed.)
    2. Linux: every child this process forks from now on (megatron-core 0.16's writer forks
       one worker per checkpoint file) gets ``PR_SET_PDEATHSIG = SIGKILL``, so it cannot
       outlive the trainer. Children started by fork+exec (``subprocess``) are not affected.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()
    if _fork_hook["installed"] or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        _fork_hook["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    _fork_hook["installed"] = True
    os.register_at_fork(before=lambda: _fork_hook.update(parent=os.getpid()),
                        after_in_child=_child_dies_with_parent)


def save_checkpoint(root, iteration: int, model, optimizer, scheduler, train_state: dict) -> Path:
    """Write ``<root>/iter_XXXXXXX`` atomically and point the tracker file at it."""
    from mpmoe.megatron.router import sync_routing_state

    sync_routing_state(model)  # fold pending Sigma counts so the saved state is complete
    writer_dies_with_trainer()
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "rng": _rng_sharded(_rng_state()),
        "train_state": {
            **train_state,
            "iteration": iteration,
            "scheduler": scheduler.state_dict(),
            "router_counters": _router_counters(model),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        },
    }
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _is_rank0():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = Path(root) / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, Path(root) / TRACKER)
    _barrier()
    return final


def _last_line(exc: BaseException) -> str:
    """The last line of the first rank's failure (torch wraps each as ``(exception, frames)``)."""
    from mpmoe.errors import innermost_error

    inner = innermost_error(exc)
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return f"{type(inner).__name__}: {text}" if inner is not exc else (text or type(exc).__name__)


def latest_iteration(root) -> Optional[int]:
    """The iteration in ``<root>/latest_checkpointed_iteration.txt`` (None: no checkpoint)."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointingException(f"{path}: expected an iteration number, got {text!r}") from None


def _layout(saved_args: Optional[dict]) -> dict:
    """Tensor- and expert-parallel sizes of a saved run (its ``args``) or of this one (None)."""
    if saved_args is not None:
        return {"TP": int(saved_args.get("tensor_model_parallel_size") or 1),
                "EP": int(saved_args.get("expert_model_parallel_size") or 1)}
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"TP": 1, "EP": 1}
    return {"TP": ps.get_tensor_model_parallel_world_size(),
            "EP": ps.get_expert_model_parallel_world_size()}


# Flags whose value decides which tensors the model has (named when a checkpoint and a
# model differ in their tensors); everything else only changes how a run trains. The routing
# ones come from the router registry (its marks) and the settings table (``state=True``).
MODEL_STATE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "swiglu", "normalization", "position_embedding_type",
    "max_position_embeddings", "untie_embeddings_and_output_weights", "add_bias_linear", "qk_layernorm",
    "num_experts", "moe_layer_freq", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_grouped_gemm", "vocab_size", "make_vocab_size_divisible_by",
    *routers.MARKS, *(s.name for s in settings.SETTINGS if s.state),
)


TRAIN_OPT_IN = "--allow-model-change --no-load-optim loads it anyway"


class ModelMismatch(UserError, CheckpointingException):
    """A checkpoint whose tensors are not the model's (its message names the changed flags);
    a user error (one line), and a checkpoint error for callers that catch those."""


def _base_key(key: str) -> str:
    return key.split("/shard_")[0]


def _shape(obj):
    shape = getattr(obj, "global_shape", None)
    return tuple(int(x) for x in shape) if shape is not None else None


def _model_keys_of_checkpoint(path) -> dict:
    """``{tensor name: global shape (None for objects)}`` of a checkpoint's model state."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    # optimizer state is "optimizer.*", or "chained_N.optimizer.*" when EP > 1 chains two
    # optimizers; megatron-core 0.19 also keeps the common state ("common_state") in the shards
    return {_base_key(k): _shape(v) for k, v in load_sharded_metadata(str(path)).items()
            if not re.match(r"(chained_\d+\.)?optimizer\.|rng_state|common_state\b", k)}


def _model_keys_of(model) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return {_base_key(v.key): _shape(v) for v in nested_values(sd) if hasattr(v, "key")}


def _layers_of(keys: set) -> str:
    """A short description of tensor names: the layers they belong to, else the first name."""
    names = sorted(keys)
    # 1-based, as --moe-mask-experts and the statistics files count layers (megatron's keys are 0-based)
    layers = sorted({int(m.group(1)) + 1 for k in names for m in [re.match(r"decoder\.layers\.(\d+)\.", k)] if m})
    leaves = sorted({k.rsplit(".", 1)[-1] for k in names})
    if layers and all(re.match(r"decoder\.layers\.\d+\.", k) for k in names):
        what = f" ({', '.join(leaves)})" if len(leaves) <= 2 else ""
        return f"{len(names)} tensor(s){what} of layer(s) {','.join(map(str, layers))}"
    return f"{len(names)} tensor(s) ({', '.join(leaves[:3])}{', ...' if len(leaves) > 3 else ''})"


def changed_model_settings(saved_args: Optional[dict], run_args: Optional[dict]) -> list:
    """``--flag saved -> now`` for the flags in :data:`MODEL_STATE_FLAGS` that differ."""
    if not saved_args or not run_args:
        return []
    out = []
    for name in MODEL_STATE_FLAGS:
        if name in saved_args and name in run_args and saved_args[name] != run_args[name]:
            old, new = (str(v).replace(" ", "") for v in (saved_args[name], run_args[name]))
            out.append(f"--{name.replace('_', '-')} {old[:40]} -> {new[:40]}")
    return out


def check_model_matches(path, model, saved_args: Optional[dict] = None, run_args: Optional[dict] = None,
                        *, allow_change: bool = False, opt_in: str = TRAIN_OPT_IN,
                        keys: Optional[tuple[dict, dict]] = None) -> tuple[set, set]:
    """Refuse (:class:`CheckpointingException`, one line naming the differing flags) a
    checkpoint whose tensors differ from the model's: state the model would drop (more
    layers, MoPE's Sigma, ReMoE's coefficient, expert biases...) or lack. Returns
    ``(dropped, missing)`` tensor names (empty unless ``allow_change``). ``keys``: the
    checkpoint's and the model's ``{tensor name: global shape}`` when the caller maps
    names (a Megatron-LM checkpoint); else both are read here."""
    if keys is not None:
        saved, wanted = keys
    else:
        try:
            saved = _model_keys_of_checkpoint(path)
        except Exception:  # noqa: BLE001 - unreadable metadata: the load itself reports it
            return set(), set()
        wanted = _model_keys_of(model)
    # routing statistics (MoPE's Sigma counts) a checkpoint lacks start fresh (top-k or imported
    # checkpoints trained on as MoPE; load_checkpoint names it): not a refusal
    dropped = set(saved) - set(wanted)
    missing = {k for k in set(wanted) - set(saved) if ".cooccurrence_stats." not in k}
    reshaped = sorted(k for k in set(saved) & set(wanted)
                      if saved[k] is not None and wanted[k] is not None and saved[k] != wanted[k])
    if reshaped or ((dropped or missing) and not allow_change):
        parts = []
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} tensor(s) have other shapes ({k}: {list(saved[k])} in the "
                         f"checkpoint, {list(wanted[k])} here)")
        if dropped:
            parts.append(f"this model would drop {_layers_of(dropped)}")
        if missing:
            parts.append(f"it lacks {_layers_of(missing)}")
        changed = changed_model_settings(saved_args, run_args)
        why = f" ({', '.join(changed[:3])})" if changed else ""
        hint = f" ({opt_in})" if not reshaped else ""
        raise ModelMismatch(f"{path} holds another model{why}{hint}: {'; '.join(parts)}")
    return dropped, missing


def load_checkpoint(root, model, optimizer, scheduler, *, load_optim: bool = True,
                    load_rng: bool = True, iteration: Optional[int] = None,
                    run_args: Optional[dict] = None, allow_model_change: bool = False,
                    opt_in: str = TRAIN_OPT_IN) -> Optional[dict]:
    """Restore the latest checkpoint under ``root`` (or its ``iteration``); returns its
    ``train_state`` (None: no checkpoint).

    A checkpoint whose tensors are not exactly the model's is refused (see
    :func:`check_model_matches`; ``run_args``, this run's flags, let the error name what
    changed) unless ``allow_model_change``: then the tensors both have are loaded and the
    others are named on stderr."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise CheckpointingException(f"{path} does not exist")
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_world = common["train_state"]["world_size"]
    model_only = bool(common["train_state"].get("model_only"))  # mpmoe.store.save_model
    if load_optim and model_only:
        raise CheckpointingException(
            f"{path} holds the model only (no optimizer state: written by an mpmoe tool, not by a "
            f"training run); pass --no-load-optim to train from it")
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_layout, layout = _layout(common["train_state"].get("args") or {}), _layout(None)
    if load_optim and (saved_layout["EP"] > 1) != (layout["EP"] > 1):
        # megatron keeps expert and dense parameters in two chained optimizers only when EP > 1,
        # and their saved state (keys and param groups) does not map onto one optimizer
        raise CheckpointingException(
            f"{path}: its optimizer state (expert-model-parallel-size {saved_layout['EP']}) does "
            f"not load with expert-model-parallel-size {layout['EP']}; pass --no-load-optim to "
            f"load the model alone (it reshards)")
    dropped, missing = check_model_matches(path, model, common["train_state"].get("args"), run_args,
                                           allow_change=allow_model_change, opt_in=opt_in)
    if (dropped or missing) and _is_rank0():
        print(f"mpmoe: loading {path} into a different model (--allow-model-change): "
              f"{'dropped ' + _layers_of(dropped) if dropped else 'nothing dropped'}; "
              f"{'left at initialisation ' + _layers_of(missing) if missing else 'nothing missing'}",
              file=sys.stderr, flush=True)
    model_sd = model.sharded_state_dict()
    fresh = _fresh_sigma_keys(path, model_sd)
    for key in fresh:  # a top-k checkpoint loaded into a MoPE model: Sigma starts from the identity
        del model_sd[key]
    if fresh and _is_rank0():
        print(f"mpmoe: {path} holds no routing statistics (a top-k or imported checkpoint): "
              "they start fresh (MoPE's Sigma from the identity)", file=sys.stderr, flush=True)
    request = {"model": model_sd}
    if load_optim:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    restore_rng = load_rng and saved_world == world and not model_only
    if restore_rng:
        request["rng"] = _rng_sharded(None)
    try:
        if missing:  # state the checkpoint lacks keeps its initialisation (--allow-model-change)
            from megatron.core.dist_checkpointing.validation import StrictHandling

            state, _, _ = dist_checkpointing.load(request, str(path), strict=StrictHandling.RETURN_ALL)
        else:
            state = dist_checkpointing.load(request, str(path))
    except CheckpointException as exc:
        # torch's CheckpointException derives from BaseException (so `except Exception`
        # misses it) and carries every rank's traceback; keep the first failure's last line.
        hint = ("; if the model fits, pass --no-load-optim (the optimizer state may not reshard "
                f"from {saved_layout} to {layout})" if load_optim and saved_layout != layout else "")
        raise CheckpointingException(
            f"{path} does not fit this model: {_last_line(exc)}{hint}"
        ) from exc
    if fresh:
        own = model.state_dict()
        state["model"].update({k: own[k] for k in fresh})
    model.load_state_dict(state["model"], strict=not missing)
    if load_optim:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["train_state"]["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    _set_router_counters(model, state["train_state"].get("router_counters", {}))
    return state["train_state"]


def _fresh_sigma_keys(path, model_sd) -> list:
    """MoPE routers' Sigma state (``cooccurrence_stats``) that the checkpoint lacks: it was
    trained with top-k routing (or imported) and is now trained or fine-tuned as MoPE. Only
    Sigma may be missing; anything else still fails the load."""
    wanted = [k for k in model_sd if ".cooccurrence_stats." in k]
    if not wanted:
        return []
    saved = set(dist_checkpointing.load_tensors_metadata(str(path)))
    return [k for k in wanted if getattr(model_sd[k], "key", k) not in saved]


# --------------------------------------------------------------------------- for eval / analysis
def save_tokenizer(root, tokenizer_dir) -> Optional[Path]:
    """Copy the run's tokenizer files to ``<root>/tokenizer/`` (once; rank 0 calls it)."""
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file():
        return None
    dst = Path(root) / TOKENIZER_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).is_file():
            tmp = dst / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
    return dst


def checkpoint_tokenizer_sha256(iteration_path) -> Optional[tuple[str, str]]:
    """``(sha256, where)`` of the tokenizer a checkpoint was trained with: recorded in the
    checkpoint itself (``train_state.data.tokenizer_sha256``), else the copy in its save
    folder's ``tokenizer/``; None when neither says."""
    it_dir = Path(iteration_path)
    try:
        recorded = (saved_run_info(it_dir).get("data") or {}).get("tokenizer_sha256")
    except CheckpointingException:
        recorded = None
    if recorded:
        return str(recorded), f"recorded in {it_dir}"
    own = it_dir.parent / TOKENIZER_DIR
    if (own / "tokenizer.json").is_file():
        from mpmoe.data import load_tokenizer

        try:
            return load_tokenizer(own).sha256, str(own)
        except Exception:  # noqa: BLE001 - an unreadable copy says nothing
            return None
    return None


def check_tokenizer(iteration_path, sha256: Optional[str], what: str) -> None:
    """Refuse to resume a checkpoint with another tokenizer (even of the same size: the
    embeddings would be read with the wrong ids, and a new --save would get the wrong copy)."""
    if not sha256:
        return
    known = checkpoint_tokenizer_sha256(iteration_path)
    if known is not None and known[0] != sha256:
        raise CheckpointingException(
            f"{iteration_path} was trained with another tokenizer (sha256 {known[0][:12]}, {known[1]}) "
            f"than {what} (sha256 {sha256[:12]})")


def resolve_checkpoint(path, step: Optional[int] = None) -> tuple[Path, Path, int]:
    """``(root, iteration directory, iteration)`` of a checkpoint given as a save folder
    (its latest iteration, or ``step``) or as one ``iter_XXXXXXX`` folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointingException(f"{path}: no such checkpoint directory")
    if path.name.startswith("iter_") and not path.name.endswith(".tmp"):
        try:
            it = int(path.name[len("iter_"):])
        except ValueError:
            raise CheckpointingException(f"{path}: not an iter_XXXXXXX checkpoint folder") from None
        if step is not None and step != it:
            raise CheckpointingException(f"{path} is iteration {it}, not the requested {step}")
        return path.parent, path, it
    it = step if step is not None else latest_iteration(path)
    if it is None:
        raise CheckpointingException(f"{path}: no checkpoint ({TRACKER} is missing)")
    it_dir = iteration_dir(path, it)
    if not it_dir.is_dir():
        raise CheckpointingException(f"{it_dir} does not exist")
    return path, it_dir, it


def resolve_load(load, save=None) -> Optional[tuple[Path, int]]:
    """What ``mpmoe train --load`` resumes from: ``(iteration folder, iteration)``, or None
    to start from scratch.

    ``load`` is what ``mpmoe eval --load`` takes: a save folder (its latest checkpoint) or
    one ``iter_XXXXXXX`` folder. A folder without a checkpoint (absent, or no
    ``latest_checkpointed_iteration.txt``) is an error, except when it is also ``--save``:
    that is the auto-resume idiom (``--load DIR --save DIR`` in a job that may be requeued),
    and the first run of it starts from scratch.
    """
    path = Path(load)
    same_as_save = save is not None and os.path.abspath(path) == os.path.abspath(save)
    is_iter_dir = path.name.startswith("iter_")
    if not is_iter_dir and not (path / TRACKER).is_file():
        if same_as_save and (not path.exists() or path.is_dir()):
            return None
        what = "does not exist" if not path.exists() else f"holds no checkpoint ({TRACKER} is missing)"
        raise CheckpointingException(
            f"--load {path} {what}: give a save folder or one of its iter_XXXXXXX folders "
            f"(or the same folder as --save to resume it when it exists)")
    _, it_dir, it = resolve_checkpoint(path)
    return it_dir, it


def saved_run_info(iteration_path) -> dict:
    """The ``train_state`` a checkpoint folder stores without loading tensors: ``iteration``,
    and from checkpoints written by ``mpmoe train``, ``args`` (the run's flags) and ``data``."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(iteration_path))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign folder: one line
        raise CheckpointingException(f"{iteration_path}: cannot read the checkpoint's metadata "
                                     f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    return dict(common.get("train_state", {}))
