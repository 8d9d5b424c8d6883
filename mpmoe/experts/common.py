"""What the ``mpmoe experts`` subcommands share: the output check, loading the source and saving
the result (:func:`surgery_run`, :func:`rebuild`, :func:`save_surgery`), the experts of a loaded
model, calibration statistics, parameter and byte counts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mpmoe.errors import UserError, folder_problem

__all__ = ["surgery_flags", "ExpertsError", "add_source_arguments", "check_save", "moe_layers", "expert_stack",
           "set_expert", "routing_statistics",
           "count_parameters", "folder_bytes", "load_source", "copy_non_experts", "rebuild", "surgery_run",
           "save_surgery"]


class ExpertsError(UserError, ValueError):
    """A bad ``mpmoe experts`` input (one line)."""


def add_source_arguments(p, *, seed_help: str) -> None:
    """The flags of a rewrite's source and its calibration data: ``--seed``, ``--data-path``,
    ``--model-flags`` (last: it takes the rest of the command line)."""
    import argparse

    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--data-path", nargs="+", default=None,
                   help="the run's data, if it moved (default: as the checkpoint records it)")
    p.add_argument("--model-flags", nargs=argparse.REMAINDER, default=None,
                   help="mpmoe train flags for a checkpoint that does not record them (last)")


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


class _LastRouterDone(Exception):
    """Raised by the last MoE layer's router hook: the rest of the forward is not needed."""


@torch.no_grad()
def routing_statistics(loaded, tokens: torch.Tensor, batch_size: int) -> Dict[int, dict]:
    """Per MoE layer: ``counts`` [E] (routed selections, the map the router really used:
    OTEP for MoPE), ``gram`` [E, E] (``Z^T Z`` of the router logits), ``tokens``.

    Each forward stops after the last MoE layer's router: that layer's experts, the final
    norm and the output layer (``seq x hidden x vocab``, about a third of a flame-moe-38m
    forward's FLOPs) decide nothing here."""
    stats, handles = {}, []
    layers = moe_layers(loaded.model)
    for i, (number, mlp) in enumerate(layers):
        router = mlp.router
        e = router.weight.shape[0]
        stats[number] = {"counts": torch.zeros(e, dtype=torch.float64),
                         "gram": torch.zeros(e, e, dtype=torch.float64), "tokens": 0}

        def hook(module, inputs, output, slot=stats[number], last=i == len(layers) - 1):
            hidden = inputs[0]
            logits = module.gating(hidden).reshape(-1, module.weight.shape[0]).double()
            routing_map = output[1].reshape(-1, module.weight.shape[0])
            slot["counts"] += routing_map.double().sum(0).cpu()
            slot["gram"] += (logits.t() @ logits).cpu()
            slot["tokens"] += int(logits.shape[0])
            if last:
                raise _LastRouterDone

        handles.append(router.register_forward_hook(hook))
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                loaded.forward(tokens[start:start + batch_size])
            except _LastRouterDone:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def copy_non_experts(new_model, old_model) -> None:
    """Every tensor of ``new_model`` that is not a routed expert's, from ``old_model``."""
    old = old_model.state_dict()
    new = new_model.state_dict()
    missing = []
    with torch.no_grad():
        for key, value in new.items():
            if ".experts.local_experts." in key or not isinstance(value, torch.Tensor):
                continue
            src = old.get(key)
            if src is None or src.shape != value.shape:
                missing.append(key)
                continue
            value.copy_(src)
    if missing:
        raise RuntimeError(f"rebuilt model: no source for {missing[:3]}")
    from mpmoe.megatron.router import iter_routers

    for a, b in zip(iter_routers(new_model), iter_routers(old_model)):
        a._counted_forwards = b._counted_forwards


def rebuild(loaded, new_args):
    """The model ``new_args`` describe (other experts: merged, compressed), every tensor but the
    routed experts' copied from ``loaded.model``; the caller fills in every expert."""
    from mpmoe.run.model import build_model

    padded = int(loaded.model.embedding.word_embeddings.weight.shape[0])
    _, model, _ = build_model(new_args, padded, initialize=False)  # every tensor is set by the caller
    model.eval()
    copy_non_experts(model, loaded.model)
    return model


@contextlib.contextmanager
def surgery_run(args, *, verb: str, allow_grouped: bool = True):
    """What every ``mpmoe experts`` rewrite does around its surgery: ``--save`` checked before
    any work, a 1-process group, ``--load`` loaded with the shared refusals. Yields
    ``(out, loaded)``."""
    from mpmoe.megatron import destroy_distributed, init_distributed

    out = check_save(args.save)
    init_distributed(seed=1)
    try:
        yield out, load_source(args.load, verb=verb, model_flags=args.model_flags, allow_grouped=allow_grouped)
    finally:
        destroy_distributed()


def save_surgery(out, loaded, model, new_args, surgery: dict) -> dict:
    """Save ``model`` (flags ``new_args``) with ``surgery.json`` (``train_flags`` first: what
    ``mpmoe train --load OUT`` needs besides the run's own flags); returns the record."""
    from mpmoe import store

    record = {"train_flags": surgery_flags(new_args), **surgery}
    store.save_model(out, model, args=new_args, tokenizer_dir=loaded.tokenizer_dir,
                     extra_files={"surgery.json": record})
    return record


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
