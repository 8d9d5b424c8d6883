"""What the ``mpmoe experts`` subcommands share: the output check, the experts of a loaded
model, calibration statistics, parameter and byte counts."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mpmoe.errors import UserError, folder_problem

__all__ = ["surgery_flags", "ExpertsError", "check_save", "moe_layers", "expert_stack", "set_expert", "routing_statistics",
           "count_parameters", "folder_bytes", "load_source"]


class ExpertsError(UserError, ValueError):
    """A bad ``mpmoe experts`` input (one line)."""


def check_save(save) -> Path:
    """``--save``: a new folder (or an empty one) in a writable parent; checked before any work."""
    out = Path(save)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExpertsError(f"--save {out} exists and is not an empty folder; choose a new one")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ExpertsError(f"--save {out}: {parent} is not a folder")
    if not parent.is_dir():
        raise ExpertsError(f"--save {out}: the folder {parent} does not exist")
    problem = folder_problem(out)
    if problem:
        raise ExpertsError(f"--save {out}: {problem}")
    return out


def load_source(load, *, verb: str, model_flags=None, allow_grouped: bool = True):
    """``store.load_model`` (fp32) with the refusals every subcommand shares."""
    from mpmoe import store

    loaded = store.load_model(load, routing="auto", dtype="fp32", model_flags=model_flags)
    kind = loaded.trained_routing
    if kind == "dense":
        raise ExpertsError(f"{loaded.checkpoint} is a dense model: it has no experts to {verb}")
    if kind == "remoe":
        raise ExpertsError(f"{loaded.checkpoint} routes with ReMoE (ReLU gates): expert {verb} is not "
                           "defined for it (top-k and MoPE checkpoints only)")
    if getattr(loaded.args, "moe_expert_compression", None):
        raise ExpertsError(f"{loaded.checkpoint} already has compressed experts; {verb} the checkpoint "
                           "it was compressed from")
    if not allow_grouped and getattr(loaded.args, "moe_expert_groups", None):
        raise ExpertsError(f"{loaded.checkpoint} already has merged experts (collapsed or dropped); "
                           f"{verb} the checkpoint it was merged from")
    if getattr(loaded.args, "moe_expert_ffn_sizes", None):
        raise ExpertsError(f"{loaded.checkpoint} has experts of different sizes (mpmoe experts split); "
                           f"{verb} needs experts of one size")
    if getattr(loaded.args, "moe_grouped_gemm", False):
        raise ExpertsError(f"{loaded.checkpoint}: expert surgery needs megatron's SequentialMLP experts; "
                           "load it with --model-flags ... --no-moe-grouped-gemm")
    return loaded


def moe_layers(model) -> List[Tuple[int, torch.nn.Module]]:
    """``[(layer_number, MoELayer)]`` of a GPTModel, in order."""
    out = []
    for layer in model.decoder.layers:
        mlp = layer.mlp
        if hasattr(mlp, "router") and hasattr(mlp, "experts"):
            out.append((int(mlp.router.layer_number), mlp))
    return out


def expert_stack(mlp) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(fc1 [E, 2F, H], fc2 [E, H, F])`` copies of a SequentialMLP's expert weights."""
    experts = getattr(mlp.experts, "local_experts", None)
    if experts is None:
        raise ExpertsError(f"expert surgery needs megatron's SequentialMLP experts, got "
                           f"{type(mlp.experts).__name__}")
    fc1 = torch.stack([e.linear_fc1.weight.detach() for e in experts])
    fc2 = torch.stack([e.linear_fc2.weight.detach() for e in experts])
    return fc1.clone(), fc2.clone()


@torch.no_grad()
def set_expert(mlp, index: int, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
    expert = mlp.experts.local_experts[index]
    expert.linear_fc1.weight.copy_(fc1)
    expert.linear_fc2.weight.copy_(fc2)


@torch.no_grad()
def routing_statistics(loaded, tokens: torch.Tensor, batch_size: int) -> Dict[int, dict]:
    """Per MoE layer: ``counts`` [E] (routed selections, the map the router really used:
    OTEP for MoPE), ``gram`` [E, E] (``Z^T Z`` of the router logits), ``tokens``."""
    stats, handles = {}, []
    for number, mlp in moe_layers(loaded.model):
        router = mlp.router
        e = router.weight.shape[0]
        stats[number] = {"counts": torch.zeros(e, dtype=torch.float64),
                         "gram": torch.zeros(e, e, dtype=torch.float64), "tokens": 0}

        def hook(module, inputs, output, slot=stats[number]):
            hidden = inputs[0]
            logits = module.gating(hidden).reshape(-1, module.weight.shape[0]).double()
            routing_map = output[1].reshape(-1, module.weight.shape[0])
            slot["counts"] += routing_map.double().sum(0).cpu()
            slot["gram"] += (logits.t() @ logits).cpu()
            slot["tokens"] += int(logits.shape[0])

        handles.append(router.register_forward_hook(hook))
    try:
        for start in range(0, tokens.shape[0], batch_size):
            loaded.forward(tokens[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return stats


def count_parameters(model) -> Dict[str, int]:
    """Parameters in all, and in the routed experts."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for _, mlp in moe_layers(model) for p in mlp.experts.parameters())
    return {"total": int(total), "experts": int(experts)}


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def surgery_flags(args) -> list:
    """The ``mpmoe train`` flags that describe the experts of ``args`` beyond the source run's
    (what ``mpmoe train --load OUT --no-load-optim`` needs besides the run's own flags)."""
    out = ["--num-experts", str(args.num_experts)]
    for name in ("moe_expert_groups", "moe_expert_compression"):
        value = getattr(args, name, None)
        if value:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out
