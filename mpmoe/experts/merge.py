"""``mpmoe experts merge``: M-SMoE (routing-guided grouping, neuron alignment, frequency-weighted
merge) and its baselines, written as a checkpoint every mpmoe verb reads.

Defaults are the reference's algorithm (UNITES-Lab/MC-SMoE): usage frequencies and
router-logit similarities on calibration tokens of the TRAINING split, the E' most used
experts of a layer lead a group each, every other expert joins its most similar leader,
every expert is aligned to expert 0 by weight matching, each group is the frequency-weighted
average of its members. Layouts (docs/experts.md):

* ``bind``: a stock E-expert checkpoint whose group members hold the same merged weights
  (the reference's function: the router is unchanged);
* ``collapsed``: E' experts stored; the router keeps its E rows and folds its selection into
  the groups (``--moe-expert-groups`` in the checkpoint's flags): the same function as bind,
  in less memory.

``--method drop`` keeps each group's dominant expert and routes nothing to the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from mpmoe.experts.common import (ExpertsError, add_source_arguments, count_parameters, expert_stack, moe_layers,
                                  rebuild, routing_statistics, save_surgery, set_expert, surgery_run)
from mpmoe.surgery import merge as M

LAYOUTS = ("bind", "collapsed")
METHODS = ("merge", "drop")
GROUPINGS = ("dominant", "random")
FREQUENCIES = ("calibration", "saved")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", required=True, help="checkpoint to merge (a save folder or iter_ folder)")
    p.add_argument("--save", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--num-experts", type=int, default=None, metavar="E'",
                   help="groups per MoE layer (with --global-groups: on average); not with --groups")
    p.add_argument("--layout", choices=LAYOUTS, default="bind",
                   help="bind: E experts, members share weights (the reference); collapsed: E' experts stored")
    p.add_argument("--method", choices=METHODS, default="merge",
                   help="merge the members of a group (M-SMoE) or keep the dominant and drop the rest")
    p.add_argument("--grouping", choices=GROUPINGS, default="dominant",
                   help="dominant: the most used experts lead, the rest join the most similar (the reference); "
                        "random: a random partition (baseline)")
    p.add_argument("--groups", default=None, metavar="FILE",
                   help='explicit groups, JSON {"LAYER": [[experts], ...], ...} for every MoE layer')
    p.add_argument("--global-groups", action="store_true",
                   help="groups per layer from one frequency threshold over all layers (the reference's "
                        "globally_group); --num-experts is then the average")
    p.add_argument("--align", choices=M.ALIGN_MODES, default="first",
                   help="weight-matching target: expert 0 of the layer (the reference), the group's dominant, or none")
    p.add_argument("--weighting", choices=M.WEIGHTINGS, default="frequency",
                   help="merge weights: usage frequency (the reference) or uniform")
    p.add_argument("--frequencies", choices=FREQUENCIES, default="calibration",
                   help="usage frequencies from calibration tokens, or a MoPE checkpoint's saved counters")
    p.add_argument("--calibration-tokens", type=int, default=32768, help="calibration tokens (training split)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward")
    add_source_arguments(p, seed_help="calibration sample and random grouping seed")


def _check(args) -> None:
    if args.groups is None and args.num_experts is None:
        raise ExpertsError("give --num-experts E' (or explicit --groups FILE)")
    if args.groups is not None and (args.num_experts is not None or args.grouping != "dominant"
                                    or args.global_groups):
        raise ExpertsError("--groups replaces --num-experts, --grouping and --global-groups")
    if args.num_experts is not None and args.num_experts < 1:
        raise ExpertsError(f"--num-experts must be >= 1, got {args.num_experts}")
    if args.calibration_tokens < 1 or args.batch_size < 1:
        raise ExpertsError("--calibration-tokens and --batch-size must be >= 1")
    if args.global_groups and args.grouping == "random":
        raise ExpertsError("--global-groups applies to --grouping dominant only")


def _read_groups(path, layers, num_experts) -> dict:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExpertsError(f"--groups {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ExpertsError(f"--groups {path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ExpertsError(f'--groups {path}: expected {{"LAYER": [[experts], ...]}}')
    out = {}
    keys = {str(k) for k in raw}
    missing = [n for n in layers if str(n) not in keys]
    extra = sorted(keys - {str(n) for n in layers})
    if missing or extra:
        raise ExpertsError(f"--groups {path}: MoE layers are {list(layers)}; "
                           f"{'missing ' + str(missing) if missing else 'unknown ' + str(extra)}")
    for n in layers:
        try:
            out[n] = M.labels_from_groups(raw[str(n)], num_experts)
        except (ValueError, TypeError) as exc:
            raise ExpertsError(f"--groups {path}: layer {n}: {exc}") from None
    return out


def _saved_counts(mlp) -> torch.Tensor:
    stats = getattr(mlp.router, "cooccurrence_stats", None)
    if stats is None:
        raise ExpertsError("--frequencies saved needs a MoPE checkpoint (top-k checkpoints save no usage counters)")
    return stats.usage.detach().double().cpu()


def plan(args, loaded) -> dict:
    """Groups, dominants, frequencies and similarities of every MoE layer (no weights changed)."""
    from mpmoe import store

    layers = moe_layers(loaded.model)
    num_experts = int(loaded.args.num_experts)
    if args.num_experts is not None and args.num_experts > num_experts:
        raise ExpertsError(f"--num-experts {args.num_experts} > the checkpoint's {num_experts} experts")
    numbers = [n for n, _ in layers]
    explicit = _read_groups(args.groups, numbers, num_experts) if args.groups else None
    need_calib = args.frequencies == "calibration" or (explicit is None and args.grouping == "dominant")
    stats, calib = {}, None
    if need_calib:
        calib = store.calibration_tokens(loaded, num_tokens=args.calibration_tokens, split="train",
                                         seed=args.seed, data_path=args.data_path)
        stats = routing_statistics(loaded, calib, args.batch_size)
    freqs, sims = {}, {}
    for n, mlp in layers:
        counts = stats[n]["counts"] if args.frequencies == "calibration" else _saved_counts(mlp)
        freqs[n] = M.usage_frequencies(counts)
        if n in stats:
            sims[n] = M.logit_similarity(stats[n]["gram"])
    if explicit is not None:
        labels = explicit
        dominants = {n: M.group_dominants(labels[n], freqs[n]) for n in numbers}
    elif args.grouping == "random":
        gen = torch.Generator().manual_seed(args.seed)
        labels = {n: M.random_grouping(num_experts, args.num_experts, gen) for n in numbers}
        dominants = {n: M.group_dominants(labels[n], freqs[n]) for n in numbers}
    else:
        if args.global_groups:
            try:
                counts = M.global_group_counts([freqs[n] for n in numbers], args.num_experts)
            except ValueError as exc:
                raise ExpertsError(f"--global-groups: {exc}") from None
        else:
            counts = [args.num_experts] * len(numbers)
        labels, dominants = {}, {}
        for n, k in zip(numbers, counts):
            labels[n], dominants[n] = M.dominant_grouping(freqs[n], sims[n], k)
    return {"labels": labels, "dominants": dominants, "frequencies": freqs, "similarities": sims,
            "calibration": None if calib is None else {"tokens": int(calib.numel()), "split": "train",
                                                       "seed": args.seed}}


def _merge_weights(args, mlp, labels, dominants, freq):
    fc1, fc2 = expert_stack(mlp)
    gated = fc1.shape[1] == 2 * fc2.shape[2]
    if args.method == "drop":
        g = int(labels.max()) + 1
        merged1 = torch.stack([fc1[d] for d in dominants])
        merged2 = torch.stack([fc2[d] for d in dominants])
        perms = torch.arange(fc2.shape[2]).repeat(fc1.shape[0], 1)
        coef = torch.zeros(fc1.shape[0], dtype=torch.float64)
        coef[dominants] = 1.0
        assert merged1.shape[0] == g
        return merged1, merged2, perms, coef
    return M.merge_layer(fc1, fc2, labels, freq, align=args.align, weighting=args.weighting,
                         dominants=dominants, gated=gated)


def run(args) -> int:
    _check(args)
    start = time.perf_counter()
    with surgery_run(args, verb="merge", allow_grouped=False) as (out, loaded):
        times = {"load": time.perf_counter() - start}
        p = plan(args, loaded)
        times["statistics_and_grouping"] = time.perf_counter() - start - sum(times.values())
        layers = moe_layers(loaded.model)
        num_experts = int(loaded.args.num_experts)
        groups_per_layer = {n: int(p["labels"][n].max()) + 1 for n, _ in layers}
        new_args = copy.copy(loaded.args)
        record = {}
        merged = {}
        for n, mlp in layers:
            labels, dominants, freq = p["labels"][n], p["dominants"][n], p["frequencies"][n]
            m1, m2, perms, coef = _merge_weights(args, mlp, labels, dominants, freq)
            merged[n] = (m1, m2)
            record[str(n)] = {
                "groups": [[int(e) for e in (labels == g).nonzero().flatten()] for g in range(groups_per_layer[n])],
                "labels": labels.tolist(), "dominants": [int(d) for d in dominants],
                "frequencies": [float(f) for f in freq],
                "coefficients": [float(c) for c in coef],
                "permutations": perms.tolist(),
                "similarities": None if n not in p["similarities"] else
                [[round(float(x), 6) for x in row] for row in p["similarities"][n]],
            }
        drop = args.method == "drop"
        if args.layout == "bind":
            for n, mlp in layers:
                labels = p["labels"][n]
                for e in range(num_experts):
                    set_expert(mlp, e, merged[n][0][int(labels[e])], merged[n][1][int(labels[e])])
            if drop:
                new_args.moe_expert_groups = M.format_expert_groups(
                    {n: [e if e in p["dominants"][n] else -1 for e in range(num_experts)] for n, _ in layers})
            model = loaded.model
        else:
            width = max(groups_per_layer.values())
            labels_of = {}
            for n, _ in layers:
                labels = p["labels"][n].tolist()
                if drop:
                    labels = [g if e == p["dominants"][n][g] else -1 for e, g in enumerate(labels)]
                labels_of[n] = labels
            new_args.num_experts = width
            new_args.moe_expert_groups = M.format_expert_groups(labels_of)
            model = rebuild(loaded, new_args)
            for (n, mlp), (n2, old) in zip(moe_layers(model), layers):
                m1, m2 = merged[n]
                for g in range(width):
                    if g < m1.shape[0]:
                        set_expert(mlp, g, m1[g], m2[g])
                    else:  # a layer with fewer groups (global grouping): an expert never routed to
                        set_expert(mlp, g, torch.zeros_like(m1[0]), torch.zeros_like(m2[0]))
        surgery = {
            "verb": "merge", "source": str(loaded.checkpoint), "layout": args.layout, "method": args.method,
            "grouping": "file" if args.groups else args.grouping, "global_groups": bool(args.global_groups),
            "align": "none" if drop else args.align, "weighting": args.weighting,
            "frequencies": args.frequencies, "routing": loaded.trained_routing,
            "num_experts": num_experts, "groups_per_layer": {str(k): v for k, v in groups_per_layer.items()},
            "calibration": p["calibration"], "layers": record,
            "parameters": {"before": count_parameters(loaded.model), "after": count_parameters(model)},
        }
        times["align_and_merge"] = time.perf_counter() - start - sum(times.values())
        surgery = save_surgery(out, loaded, model, new_args, surgery)
    gpl = sorted(set(groups_per_layer.values()))
    print(f"mpmoe experts merge: {args.method} ({args.layout}) {num_experts} -> "
          f"{gpl[0] if len(gpl) == 1 else gpl} experts per layer in {len(layers)} layers; expert "
          f"parameters {surgery['parameters']['before']['experts']} -> {surgery['parameters']['after']['experts']}; "
          f"{time.perf_counter() - start:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
          + f", save {time.perf_counter() - start - sum(times.values()):.1f}) -> {out}")
    import shlex

    print("recovery fine-tuning: mpmoe train --load " + shlex.quote(str(out)) + " --no-load-optim <the run's "
          "flags> " + " ".join(shlex.quote(f) for f in surgery["train_flags"]))
    return 0
