"""``mpmoe experts split``: a dense checkpoint -> an MoE of heterogeneous experts (HEMoE).

::

    mpmoe experts split --load DENSE --save OUT --num-experts 8 --moe-router-topk 4 \\
        [--domain-data DIR | --num-domains 4] [--partitioner ilp|moefication|random-homogeneous|
        random-heterogeneous|contiguous]

Steps (docs/experts.md, section Split): domains (one text file per domain in
``--domain-data``, or clustered from the model's own final hidden states: a documented
deviation); per domain, per-sample first-order neuron importance of every FFN neuron of the
layers to split; ``log1p`` + per-domain L2 normalisation; per layer, neurons clustered into
``--num-modules`` equal modules, then the ILP (:func:`mpmoe.surgery.split.solve_split_ilp`)
assigns modules to experts; each expert is its neurons' slice of the dense FFN
(:class:`mpmoe.megatron.hetero.HeteroSequentialMLP` holds them at their real sizes). The first
and last layers stay dense (``--dense-layers``). The router is new (N(0, 0.001)); with
``--gates unit`` (default) every routed expert weighs 1, so routing all experts reproduces the
dense model. ``surgery.json`` records per layer the partitioner, status, objective, MIP gap
and sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mpmoe.errors import UserError

__all__ = ["PARTITIONERS", "SplitError", "add_arguments", "add_parser", "main", "run", "split_model"]

PARTITIONERS = ("ilp", "moefication", "random-homogeneous", "random-heterogeneous", "contiguous")
PROG = "mpmoe experts split"
HELP = "split a dense checkpoint's FFNs into experts of different sizes (HEMoE) or a baseline partition"
#: The split model's flags as a preset, written beside the checkpoint.
PRESET_FILE = "preset.toml"


class SplitError(UserError, ValueError):
    """A split that cannot be done as asked (one line)."""


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``split`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("split", help=HELP, description=HELP + " See docs/experts.md.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mpmoe experts split``."""
    p.add_argument("--load", required=True, help="the dense checkpoint (save folder or iter_ folder)")
    p.add_argument("--save", required=True, help="where the split checkpoint is written (new folder)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=4)
    p.add_argument("--partitioner", choices=PARTITIONERS, default="ilp",
                   help="ilp: HEMoE; the others are the baselines (random-heterogeneous uses the ILP's sizes)")
    p.add_argument("--sizes-from", default=None, metavar="SPLIT",
                   help="random-heterogeneous only: take the expert sizes from this split (its folder or "
                        "surgery.json, e.g. the ILP split of the same model) instead of solving the ILP again")
    p.add_argument("--domain-data", default=None,
                   help="folder with one text file per domain (the reference's input); default: "
                        "domains clustered from the model's hidden states on its training data")
    p.add_argument("--num-domains", type=int, default=4, help="domains to cluster (without --domain-data)")
    p.add_argument("--samples-per-domain", type=int, default=32, help="sequences per domain for importance")
    p.add_argument("--num-modules", type=int, default=32, help="equal-size neuron modules per layer")
    p.add_argument("--size-ratio", type=float, default=4.0, help="largest / smallest expert bound R (>= 1)")
    p.add_argument("--coherence", type=float, default=2.0,
                   help="each domain is served by at most round(coherence * E / D) experts")
    p.add_argument("--ilp-time-limit", type=float, default=60.0, help="seconds per layer")
    p.add_argument("--dense-layers", default=None,
                   help="1-based layers kept dense (default: the first and the last)")
    p.add_argument("--gates", choices=["unit", "softmax"], default="unit",
                   help="unit: HEMoE (weight 1 per routed expert); softmax: megatron's top-k weights")
    p.add_argument("--balance-coeff", type=float, default=5e-4, help="size-weighted balance loss coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--model-flags", nargs=argparse.REMAINDER, default=None)


def run(args: argparse.Namespace) -> int:
    """The verb: load, split, save. Raises :class:`SplitError` (one line) for bad input."""
    from mpmoe.megatron import init_distributed

    _check_options(args)
    out = Path(args.save)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SplitError(f"--save {out} exists and is not an empty folder")
    domains = _read_domain_files(args.domain_data) if args.domain_data else None
    sizes_from = read_sizes(args.sizes_from) if args.sizes_from else None
    dense_layers = _parse_layers(args.dense_layers)
    init_distributed()
    loaded = _load(args)
    model, split_args, report = split_model(
        loaded, num_experts=args.num_experts, topk=args.moe_router_topk, partitioner=args.partitioner,
        domain_texts=domains, num_domains=args.num_domains, samples_per_domain=args.samples_per_domain,
        num_modules=args.num_modules, size_ratio=args.size_ratio, coherence=args.coherence,
        time_limit=args.ilp_time_limit, dense_layers=dense_layers,
        gates=args.gates, balance_coeff=args.balance_coeff, seed=args.seed, expert_sizes=sizes_from)
    if args.sizes_from:
        for entry in report["layers"].values():
            entry["sizes_from"] = str(args.sizes_from)
    report["source"] = str(args.load)
    path = _save(out, model, split_args, loaded, report)
    sizes = "; ".join(f"layer {k}: {v['sizes_neurons']}" for k, v in report["layers"].items())
    print(f"{PROG}: wrote {path} ({args.num_experts} experts, top-{args.moe_router_topk}, "
          f"{args.partitioner}; {sizes}); train it with: mpmoe train --preset {path / PRESET_FILE} "
          f"--load {path} --no-load-optim [--trainable-params routers]")
    return 0


def _check_options(a) -> None:
    if a.num_experts < 1:
        raise SplitError(f"--num-experts must be >= 1, got {a.num_experts}")
    if not 1 <= a.moe_router_topk <= a.num_experts:
        raise SplitError(f"--moe-router-topk {a.moe_router_topk} must be between 1 and --num-experts {a.num_experts}")
    if not a.size_ratio >= 1:
        raise SplitError(f"--size-ratio must be >= 1 (largest / smallest expert), got {a.size_ratio}")
    if a.num_modules < a.num_experts:
        raise SplitError(f"--num-experts {a.num_experts} > --num-modules {a.num_modules}: every expert "
                         "needs at least one module")
    if a.num_domains < 1 or a.samples_per_domain < 1:
        raise SplitError("--num-domains and --samples-per-domain must be >= 1")
    if not a.coherence > 0 or not a.ilp_time_limit > 0 or a.balance_coeff < 0:
        raise SplitError("--coherence and --ilp-time-limit must be > 0, --balance-coeff >= 0")
    if a.sizes_from is not None and a.partitioner != "random-heterogeneous":
        raise SplitError(f"--sizes-from applies to --partitioner random-heterogeneous only, not {a.partitioner}")


def read_sizes(path) -> Dict[int, List[int]]:
    """``{layer: [neurons per expert]}`` of a split (its folder, iteration folder or surgery.json)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("**/surgery.json")) if p.is_dir() else []
    if not files:
        raise SplitError(f"--sizes-from {p}: no surgery.json there (a folder written by {PROG})")
    try:
        layers = json.loads(files[-1].read_text())["layers"]
        return {int(k): [int(n) for n in v["sizes_neurons"]] for k, v in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SplitError(f"--sizes-from {files[-1]}: not a surgery.json of {PROG}") from None


def _parse_layers(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return sorted({int(t) for t in text.replace(" ", ",").split(",") if t})
    except ValueError:
        raise SplitError(f"--dense-layers: expected comma-separated layer numbers, got {text!r}") from None


def _read_domain_files(folder) -> Dict[str, str]:
    path = Path(folder)
    if not path.is_dir():
        raise SplitError(f"--domain-data {path} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SplitError(f"--domain-data {path} holds no files (one text file per domain)")
    texts = {}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SplitError(f"--domain-data {f}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
        if not text.strip():
            raise SplitError(f"--domain-data {f} is empty")
        texts[f.stem] = text
    return texts


def _load(args):
    from mpmoe.store import load_model

    return load_model(args.load, routing="auto", model_flags=args.model_flags, tokenizer=args.tokenizer,
                      dtype="fp32", device="cpu" if not torch.cuda.is_available() else None)


def _save(out: Path, model, split_args, loaded, report) -> Path:
    from mpmoe.store import save_model

    return Path(save_model(out, model, args=split_args, tokenizer_dir=getattr(loaded, "tokenizer_dir", None),
                           extra_files={"surgery.json": report, PRESET_FILE: preset_text(split_args)}))


def _toml_value(value) -> Optional[str]:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)) and value and all(_toml_value(v) is not None and not isinstance(v, (list, tuple))
                                                          for v in value):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return None


#: run-specific flags a preset must not carry (where to read / write, logging, this run's seed)
_NOT_IN_PRESET = {"help", "preset", "load", "save", "run_dir", "tensorboard_dir", "no_tensorboard", "wandb_project",
                  "wandb_exp_name", "progress", "no_load_optim", "no_load_rng", "moe_stats_dir", "moe_eval_dump_dir"}


def preset_text(args: argparse.Namespace) -> str:
    """A preset (TOML) with every model, routing and training flag of ``args`` (the split model's):
    ``mpmoe train --preset OUT/preset.toml --load OUT --no-load-optim`` then builds the split model
    (the trainer's flags must describe the model it loads); flags after it override it."""
    from mpmoe.run.args import build_parser

    lines = ["# written by `mpmoe experts split`: the flags of the split model (docs/experts.md)",
             "# mpmoe train --preset THIS_FILE --load THIS_FOLDER --no-load-optim [--trainable-params routers]"]
    seen = set()
    for action in build_parser()._actions:
        dest = action.dest
        if dest in seen or dest in _NOT_IN_PRESET or not hasattr(args, dest):
            continue
        seen.add(dest)
        text = _toml_value(getattr(args, dest))
        if text is not None:
            lines.append(f"{dest} = {text}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- data
def _domain_samples(loaded, texts: Dict[str, str], per_domain: int, seq: int) -> List[torch.Tensor]:
    """Per domain ``[n, seq + 1]`` token windows of its file (tokens and their next tokens)."""
    if loaded.tokenizer is None:
        raise SplitError("--domain-data needs the model's tokenizer: pass --tokenizer DIR")
    out = []
    for name, text in texts.items():
        ids = loaded.tokenizer.encode(text).ids
        n = min(per_domain, len(ids) // (seq + 1))
        if n < 1:
            raise SplitError(f"--domain-data {name}: {len(ids)} tokens, fewer than one sequence of {seq + 1}")
        out.append(torch.tensor(ids[: n * (seq + 1)], dtype=torch.long).view(n, seq + 1))
    return out


def _calibration(loaded, n: int, seq: int, seed: int) -> torch.Tensor:
    """``[n, seq + 1]`` windows of the model's training data (the store's calibration sampler)."""
    from mpmoe.store import calibration_tokens

    tokens = calibration_tokens(loaded, num_tokens=n * (seq + 1), split="train", seed=seed, seq_length=seq + 1)
    # [n, seq + 1] windows of the training split
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < n * (seq + 1):
        raise SplitError(f"the training data gave {tokens.numel()} calibration tokens, {n * (seq + 1)} needed")
    return tokens[: n * (seq + 1)].view(n, seq + 1)


def _forward(model, window: torch.Tensor, *, labels: bool):
    device = next(model.parameters()).device
    tokens = window[:, :-1].to(device)
    pos = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None, labels=window[:, 1:].to(device) if labels else None)


@torch.no_grad()
def _cluster_domains(loaded, windows: torch.Tensor, num_domains: int, seed: int) -> List[torch.Tensor]:
    """Equal-size domains from the mean final hidden state of each sequence (the deviation)."""
    from mpmoe.surgery.split import balanced_kmeans

    feats = []
    norm = loaded.model.decoder.final_layernorm
    box = {}
    handle = norm.register_forward_hook(lambda m, i, o: box.__setitem__("h", o))
    try:
        for w in windows.split(8):
            _forward(loaded.model, w, labels=False)
            feats.append(box["h"].float().mean(dim=0).cpu())  # [s, b, h] -> [b, h]
    finally:
        handle.remove()
    x = torch.cat(feats)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = balanced_kmeans(x, num_domains, seed=seed)
    return [windows[labels == d] for d in range(num_domains)]


# --------------------------------------------------------------------------- importance
def _ffn(model, layer: int):
    mlp = model.decoder.layers[layer - 1].mlp
    return mlp.linear_fc1.weight, mlp.linear_fc2.weight


def domain_importance(model, layers: Sequence[int], domains: Sequence[torch.Tensor], *, gated: bool
                      ) -> Dict[int, torch.Tensor]:
    """``{layer: [F, D]}``: per domain, ``sum over samples |first-order score|`` of each neuron
    (one backward per sample, batch 1, as the reference)."""
    from mpmoe.surgery.split import accumulate_importance, neuron_scores

    params = [p for layer in layers for p in _ffn(model, layer)]
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    out = {layer: [] for layer in layers}
    try:
        for windows in domains:
            acc = {layer: None for layer in layers}
            for w in windows:
                loss = _forward(model, w.unsqueeze(0), labels=True).float().mean()
                grads = torch.autograd.grad(loss, params)
                for i, layer in enumerate(layers):
                    fc1, fc2 = _ffn(model, layer)
                    total = neuron_scores(fc1, grads[2 * i], fc2, grads[2 * i + 1], gated=gated)["total"]
                    acc[layer] = accumulate_importance(acc[layer], total)
            for layer in layers:
                out[layer].append(acc[layer])
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    return {layer: torch.stack(cols, dim=1) for layer, cols in out.items()}


# --------------------------------------------------------------------------- the split
def split_model(loaded, *, num_experts: int, topk: int, partitioner: str = "ilp",
                domain_texts: Optional[Dict[str, str]] = None, num_domains: int = 4,
                samples_per_domain: int = 32, num_modules: int = 32, size_ratio: float = 4.0,
                coherence: float = 2.0, time_limit: float = 60.0, dense_layers: Optional[List[int]] = None,
                gates: str = "unit", balance_coeff: float = 5e-4, seed: int = 0,
                expert_sizes: Optional[Dict[int, List[int]]] = None):
    """Split ``loaded`` (a dense model from :func:`mpmoe.store.load_model`); returns
    ``(model, args, report)``: the new MoE model (weights filled), the ``mpmoe train`` flags
    that rebuild it, and the ``surgery.json`` record. ``expert_sizes`` (random-heterogeneous
    only): ``{layer: neurons per expert}`` instead of the ILP's. Raises :class:`SplitError`."""
    from mpmoe.megatron import routers
    from mpmoe.megatron.hetero import format_expert_sizes
    from mpmoe.surgery import split as S

    src = loaded.args
    if getattr(loaded, "trained_routing", "dense") != "dense" or getattr(src, "num_experts", None):
        raise SplitError(f"{getattr(loaded, 'checkpoint', 'the checkpoint')} already has experts "
                         f"({src.num_experts}); split needs a dense model")
    if partitioner not in PARTITIONERS:
        raise SplitError(f"unknown partitioner {partitioner!r} (one of {', '.join(PARTITIONERS)})")
    n_layers, f, gated = int(src.num_layers), int(src.ffn_hidden_size), bool(src.swiglu)
    dense = [1, n_layers] if dense_layers is None else list(dense_layers)
    if any(not 1 <= d <= n_layers for d in dense):
        raise SplitError(f"--dense-layers {dense}: layers are 1..{n_layers}")
    layers = [i for i in range(1, n_layers + 1) if i not in dense]
    if not layers:
        raise SplitError(f"no layer left to split (dense layers {dense} of {n_layers})")
    if not 1 <= topk <= num_experts:
        raise SplitError(f"--moe-router-topk {topk} must be between 1 and --num-experts {num_experts}")
    if num_experts > num_modules:
        raise SplitError(f"--num-experts {num_experts} > --num-modules {num_modules}")
    if f % num_modules:
        raise SplitError(f"the FFN has {f} neurons, not divisible into --num-modules {num_modules}")
    if partitioner in ("moefication", "random-homogeneous") and f % num_experts:
        raise SplitError(f"{partitioner}: {f} neurons do not split into {num_experts} equal experts")
    if not size_ratio >= 1:
        raise SplitError(f"--size-ratio must be >= 1, got {size_ratio}")
    if expert_sizes is not None:
        if partitioner != "random-heterogeneous":
            raise SplitError(f"expert sizes given apply to random-heterogeneous only, not {partitioner}")
        if sorted(expert_sizes) != layers:
            raise SplitError(f"--sizes-from has layers {sorted(expert_sizes)}, this split {layers}")
        bad = [k for k, v in expert_sizes.items() if len(v) != num_experts or sum(v) != f or min(v) < 1]
        if bad:
            raise SplitError(f"--sizes-from layer {bad[0]}: sizes {expert_sizes[bad[0]]} are not {num_experts} "
                             f"experts of >= 1 neurons summing to the FFN's {f}")
    elif partitioner in ("ilp", "random-heterogeneous"):
        try:
            S.check_ilp_inputs(num_modules, len(domain_texts) if domain_texts else num_domains,
                               num_experts, size_ratio, coherence)
        except ValueError as exc:
            raise SplitError(str(exc)) from None
    report: dict = {"method": "hemoe", "partitioner": partitioner, "num_experts": num_experts, "topk": topk,
                    "gates": gates, "num_modules": num_modules, "size_ratio": size_ratio,
                    "coherence": coherence, "ilp_time_limit": time_limit, "seed": seed,
                    "dense_layers": dense, "layers": {}}
    model = loaded.model
    needs_scores = partitioner == "ilp" or (partitioner == "random-heterogeneous" and expert_sizes is None)
    start = time.perf_counter()
    scores = None
    if needs_scores:
        seq = int(getattr(src, "seq_length", loaded.max_length))
        if domain_texts:
            domains = _domain_samples(loaded, domain_texts, samples_per_domain, seq)
            report["domains"] = {"from": "files", "names": list(domain_texts),
                                 "samples": [int(d.shape[0]) for d in domains]}
        else:
            windows = _calibration(loaded, num_domains * samples_per_domain, seq, seed)
            domains = _cluster_domains(loaded, windows, num_domains, seed)
            report["domains"] = {"from": "hidden-states (deviation: the reference embeds instruction data "
                                         "with an external model)", "names": [f"cluster{d}" for d in range(num_domains)],
                                 "samples": [int(d.shape[0]) for d in domains]}
        raw = domain_importance(model, layers, domains, gated=gated)
        normed = S.normalize_importance([raw[layer] for layer in layers])
        scores = dict(zip(layers, normed))
        report["importance_seconds"] = round(time.perf_counter() - start, 2)
    labels: Dict[int, torch.Tensor] = {}
    for layer in layers:
        fc1, fc2 = _ffn(model, layer)
        entry = {"partitioner": partitioner}
        if expert_sizes is not None:
            lab = S.random_heterogeneous(f, expert_sizes[layer], seed=seed + layer)
        elif partitioner in ("ilp", "random-heterogeneous"):
            modules = S.balanced_kmeans(S.gate_features(fc1, gated=gated), num_modules, seed=seed)
            res = S.solve_split_ilp(S.module_scores(scores[layer], modules, num_modules), num_experts,
                                    size_ratio=size_ratio, coherence=coherence, time_limit=time_limit)
            entry.update(res.as_json())
            lab = S.expert_of_neuron(modules, res.expert_of_module)
            if partitioner == "random-heterogeneous":
                sizes = torch.bincount(lab, minlength=num_experts).tolist()
                lab = S.random_heterogeneous(f, sizes, seed=seed + layer)
                entry["sizes_from"] = "ilp"
        elif partitioner == "moefication":
            lab = S.moefication_partition(fc1, num_experts, gated=gated, seed=seed + layer)
        elif partitioner == "random-homogeneous":
            lab = S.random_homogeneous(f, num_experts, seed=seed + layer)
        else:
            lab = S.contiguous_partition(f, num_experts)
        entry["sizes_neurons"] = torch.bincount(lab, minlength=num_experts).tolist()
        if min(entry["sizes_neurons"]) < 1:
            raise SplitError(f"layer {layer}: an expert got no neurons")
        labels[layer] = lab
        report["layers"][str(layer)] = entry
    report["seconds"] = round(time.perf_counter() - start, 2)

    # the split model's flags: the dense run's, plus the experts
    args = copy.deepcopy(src)
    sizes = {layer: tuple(report["layers"][str(layer)]["sizes_neurons"]) for layer in layers}
    args.num_experts = num_experts
    args.moe_router_topk = topk
    args.moe_layer_freq = [0 if i in dense else 1 for i in range(1, n_layers + 1)]
    args.moe_ffn_hidden_size = max(1, f // num_experts)
    args.moe_expert_ffn_sizes = format_expert_sizes(sizes)
    args.moe_shared_expert_intermediate_size = None
    routers.select(vars(args), "topk")  # the split's router is top-k (with unit gates); clears MoPE/ReMoE marks
    args.moe_router_load_balancing_type = "none"  # HEMoE's size-weighted balance loss instead
    args.moe_aux_loss_coeff = 0.0
    args.moe_z_loss_coeff = None
    args.moe_router_unit_gates = gates == "unit"
    args.moe_size_aux_loss_coeff = float(balance_coeff)
    args.moe_router_pre_softmax = False
    args.moe_grouped_gemm = False
    args.moe_router_enable_expert_bias = False
    args.moe_router_score_function = "softmax"
    args.moe_expert_capacity_factor = None
    args.moe_stats_dir = None
    report["train_flags"] = [
        "--num-experts", str(num_experts), "--moe-router-topk", str(topk),
        "--moe-layer-freq", json.dumps(args.moe_layer_freq), "--moe-ffn-hidden-size", str(args.moe_ffn_hidden_size),
        "--moe-expert-ffn-sizes", args.moe_expert_ffn_sizes, "--moe-router-load-balancing-type", "none",
        "--moe-aux-loss-coeff", "0", "--moe-size-aux-loss-coeff", str(float(balance_coeff)),
        *(["--moe-router-unit-gates"] if gates == "unit" else [])]  # beyond the dense run's; or its preset.toml
    new = _build_split(args, loaded, labels, gated, seed)
    return new, args, report


def _build_split(args, loaded, labels: Dict[int, torch.Tensor], gated: bool, seed: int):
    """The MoE model of ``args`` with the dense weights, the experts sliced by ``labels``."""
    from mpmoe.surgery.split import split_ffn
    from mpmoe.run.model import build_model

    dense_model = loaded.model
    vocab = dense_model.embedding.word_embeddings.weight.shape[0] if hasattr(dense_model, "embedding") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, model, _ = build_model(args, vocab)
    dense_sd = dense_model.state_dict()
    new_sd = model.state_dict()
    filled = set()
    with torch.no_grad():
        for key, value in new_sd.items():
            if "_extra_state" in key:
                filled.add(key)
                continue
            src_key = key
            if key not in dense_sd and ".pre_mlp_layernorm." in key:
                src_key = key.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
            if src_key in dense_sd and dense_sd[src_key].shape == value.shape:
                value.copy_(dense_sd[src_key])
                filled.add(key)
        for layer, lab in labels.items():
            mlp = model.decoder.layers[layer - 1].mlp
            fc1, fc2 = _ffn(dense_model, layer)
            parts = split_ffn(fc1.detach(), fc2.detach(), lab, args.num_experts, gated=gated)
            prefix = f"decoder.layers.{layer - 1}.mlp."
            for e, expert in enumerate(mlp.experts.local_experts):
                expert.linear_fc1.weight.copy_(parts[e][0])
                expert.linear_fc2.weight.copy_(parts[e][1])
                filled |= {f"{prefix}experts.local_experts.{e}.linear_fc1.weight",
                           f"{prefix}experts.local_experts.{e}.linear_fc2.weight"}
            g = torch.Generator().manual_seed(seed * 1009 + layer)
            mlp.router.weight.copy_(torch.randn(mlp.router.weight.shape, generator=g) * 1e-3)  # HEMoE: N(0, 0.001)
            filled.add(f"{prefix}router.weight")
            if getattr(mlp.router, "expert_bias", None) is not None:
                filled.add(f"{prefix}router.expert_bias")
    missing = [k for k in new_sd if k not in filled and not k.endswith("local_tokens_per_expert")]
    if missing:
        raise SplitError(f"the split model has weights the dense model does not fill: {missing[:3]}")
    model.eval()
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``mpmoe experts split ARGS`` as a function (scripts and tests call it in-process)."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return run(parser.parse_args(list(argv or [])))
