"""``mpmoe experts merge`` / ``compress`` on micro checkpoints: layouts agree, the saved weights
are what surgery.json says, planted duplicates merge exactly, every reader loads the outputs,
and bad inputs are one line with nothing written."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from eval_testing import train_checkpoint

from mpmoe import store
from mpmoe.cli import main as mpmoe_main
from mpmoe.experts.common import expert_stack, moe_layers
from mpmoe.surgery import merge as M

pytestmark = pytest.mark.slow  # trains two micro checkpoints; each merge loads and saves models

TOPK = ("--moe-router-load-balancing-type", "aux_loss")
CAL = ["--calibration-tokens", "512", "--batch-size", "4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, embedded_cache):
    root = tmp_path_factory.mktemp("experts-src")
    return {"topk": train_checkpoint(root / "topk", str(embedded_cache), iters=3, extra=TOPK),
            "mope": train_checkpoint(root / "mope", str(embedded_cache), iters=3)}


@pytest.fixture()
def dist():
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    yield
    destroy_distributed()


def _run(*argv) -> int:
    return mpmoe_main(["experts", *map(str, argv)])


def _tokens(vocab, n=2, s=32):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(0))


def _logits(path, tokens=None):
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    try:
        m = store.load_model(path, dtype="fp32")
        tokens = _tokens(m.vocab_size) if tokens is None else tokens
        return m.forward(tokens).float(), m
    finally:
        destroy_distributed()


@pytest.mark.parametrize("kind", ["topk", "mope"])
def test_bind_and_collapsed_agree(sources, kind, tmp_path):
    bind, coll = tmp_path / "bind", tmp_path / "coll"
    assert _run("merge", "--load", sources[kind], "--save", bind, "--num-experts", 3, *CAL) == 0
    assert _run("merge", "--load", sources[kind], "--save", coll, "--num-experts", 3, "--layout", "collapsed",
                *CAL) == 0
    a, ma = _logits(bind)
    b, mb = _logits(coll)
    assert (a - b).abs().max() <= 1e-5
    sa, sb = (json.loads((p / "surgery.json").read_text()) for p in (bind, coll))
    assert sa["layers"].keys() == sb["layers"].keys()
    for n in sa["layers"]:
        assert sa["layers"][n]["groups"] == sb["layers"][n]["groups"]
    assert mb.args.num_experts == 3 and ma.args.num_experts == 8
    assert sb["parameters"]["after"]["experts"] * 8 == sa["parameters"]["after"]["experts"] * 3
    # the source itself differs (the merge changed the function)
    src, _ = _logits(sources[kind])
    assert (src - a).abs().max() > 1e-4


def test_identity_is_bit_for_bit(sources, tmp_path):
    for layout in ("bind", "collapsed"):
        out = tmp_path / layout
        assert _run("merge", "--load", sources["mope"], "--save", out, "--num-experts", 8, "--layout", layout,
                    *CAL) == 0
    src, msrc = _logits(sources["mope"])
    for layout in ("bind", "collapsed"):
        got, m = _logits(tmp_path / layout)
        assert torch.equal(src, got), layout
        for (_, a), (_, b) in zip(moe_layers(msrc.model), moe_layers(m.model)):
            for x, y in zip(expert_stack(a), expert_stack(b)):
                assert torch.equal(x, y)


def test_saved_weights_recomputed_from_surgery_json(sources, tmp_path):
    out = tmp_path / "coll"
    assert _run("merge", "--load", sources["mope"], "--save", out, "--num-experts", 4, "--layout", "collapsed",
                "--align", "dominant", *CAL) == 0
    rec = json.loads((out / "surgery.json").read_text())
    _, src = _logits(sources["mope"])
    _, got = _logits(out)
    for (n, a), (_, b) in zip(moe_layers(src.model), moe_layers(got.model)):
        layer = rec["layers"][str(n)]
        fc1, fc2 = expert_stack(a)
        f = fc2.shape[2]
        g1, g2 = expert_stack(b)
        for g, members in enumerate(layer["groups"]):
            exp1 = torch.zeros_like(fc1[0], dtype=torch.float64)
            exp2 = torch.zeros_like(fc2[0], dtype=torch.float64)
            for e in members:
                p = torch.tensor(layer["permutations"][e])
                w1 = torch.cat([fc1[e][:f][p], fc1[e][f:][p]]).double()  # gate and up rows, one permutation
                exp1 += layer["coefficients"][e] * w1
                exp2 += layer["coefficients"][e] * fc2[e][:, p].double()
            assert torch.allclose(g1[g].double(), exp1, atol=1e-6)
            assert torch.allclose(g2[g].double(), exp2, atol=1e-6)
            assert layer["dominants"][g] in members
            freq = torch.tensor(layer["frequencies"])
            assert abs(sum(layer["coefficients"][e] for e in members) - 1) < 1e-9
            assert layer["dominants"][g] == max(members, key=lambda e: (float(freq[e]), -e))


def _planted(source, out):
    """``source`` with experts 4-7 of every layer randomly permuted copies of 0-3 (weights made
    large enough that the experts matter)."""
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.experts.common import set_expert

    init_distributed(seed=1)
    try:
        m = store.load_model(source, dtype="fp32")
        g = torch.Generator().manual_seed(7)
        for _, mlp in moe_layers(m.model):
            fc1, fc2 = expert_stack(mlp)
            fc1 = torch.randn(fc1.shape, generator=g) * 0.3
            fc2 = torch.randn(fc2.shape, generator=g) * 0.3
            for e in range(4, 8):
                fc1[e], fc2[e] = M.permute_expert(fc1[e - 4], fc2[e - 4], torch.randperm(fc2.shape[2], generator=g))
            for e in range(8):
                set_expert(mlp, e, fc1[e], fc2[e])
        store.save_model(out, m, args=m.args)
    finally:
        destroy_distributed()


def test_planted_duplicates(sources, tmp_path):
    planted = tmp_path / "planted"
    _planted(sources["topk"], planted)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({n: [[0, 4], [1, 5], [2, 6], [3, 7]] for n in ("2", "3")}))
    ref, _ = _logits(planted)
    moved = {}
    for align in ("first", "none"):
        out = tmp_path / align
        assert _run("merge", "--load", planted, "--save", out, "--groups", groups, "--align", align,
                    "--layout", "collapsed", *CAL) == 0
        got, _ = _logits(out)
        moved[align] = float((got - ref).abs().max())
    assert moved["first"] <= 1e-4
    assert moved["none"] > 0.1


def test_drop_routes_nothing_to_the_dropped(sources, tmp_path):
    outs = {}
    for layout in ("bind", "collapsed"):
        outs[layout] = tmp_path / layout
        assert _run("merge", "--load", sources["topk"], "--save", outs[layout], "--num-experts", 3,
                    "--method", "drop", "--layout", layout, *CAL) == 0
    a, ma = _logits(outs["bind"])
    b, _ = _logits(outs["collapsed"])
    assert (a - b).abs().max() <= 1e-5
    rec = json.loads((outs["bind"] / "surgery.json").read_text())
    groups = M.parse_expert_groups(ma.args.moe_expert_groups)
    for n, layer in rec["layers"].items():
        dropped = [e for e in range(8) if e not in layer["dominants"]]
        assert [e for e, g in enumerate(groups[int(n)]) if g < 0] == dropped
        for _, mlp in moe_layers(ma.model):
            if mlp.router.layer_number == int(n):
                assert set(mlp.router.static_mask_ids) == set(dropped)


def test_global_groups(sources, tmp_path):
    out = tmp_path / "g"
    assert _run("merge", "--load", sources["mope"], "--save", out, "--num-experts", 3, "--global-groups",
                "--layout", "collapsed", "--frequencies", "saved", *CAL) == 0
    rec = json.loads((out / "surgery.json").read_text())
    freqs = [torch.tensor(rec["layers"][n]["frequencies"]) for n in ("2", "3")]
    _, src = _logits(sources["mope"])
    for (n, mlp), f in zip(moe_layers(src.model), freqs):  # the checkpoint's own MoPE counters
        usage = mlp.router.cooccurrence_stats.usage.double()
        assert usage.sum() > 0 and torch.allclose(f.double(), usage / usage.sum())
    expect = M.global_group_counts(freqs, 3)
    assert [rec["groups_per_layer"][n] for n in ("2", "3")] == expect
    _, m = _logits(out)
    assert m.args.num_experts == max(expect)


def test_compress_full_rank_reproduces_and_low_rank_is_smaller(sources, tmp_path):
    merged = tmp_path / "merged"
    assert _run("merge", "--load", sources["topk"], "--save", merged, "--num-experts", 4, "--layout", "collapsed",
                *CAL) == 0
    full = tmp_path / "full"
    assert _run("compress", "--load", merged, "--save", full, "--rank", 64, "--sparse-keep", 1.0) == 0
    ref, mref = _logits(merged)
    got, mgot = _logits(full)
    assert (ref - got).abs().max() <= 1e-4
    for (_, a), (_, b) in zip(moe_layers(mref.model), moe_layers(mgot.model)):
        for e, expert in enumerate(b.experts.local_experts):
            assert torch.allclose(expert.linear_fc1.dense_weight(), a.experts.local_experts[e].linear_fc1.weight,
                                  atol=1e-5)
    small = tmp_path / "small"
    assert _run("compress", "--load", merged, "--save", small, "--rank", 4, "--sparse-keep", 0.25, "--steps", 6,
                "--final-warmup", 2, "--calibration-tokens", 256) == 0
    _, m = _logits(small)
    h, f = 64, 64  # MODEL_FLAGS: hidden 64, expert ffn 64 (SwiGLU: fc1 has 2F rows)
    per_expert = 4 * (2 * f + h) + 32 * h + 4 * (h + f) + 16 * f
    layers = moe_layers(m.model)
    assert sum(p.numel() for _, mlp in layers for p in mlp.experts.parameters()) == per_expert * 4 * len(layers)
    rec = json.loads((small / "surgery.json").read_text())
    assert rec["parameters"]["after"]["experts"] == per_expert * 4 * len(layers)
    saved = sum(p.stat().st_size for p in (small / "iter_0000000").rglob("*") if p.is_file())
    unsaved = sum(p.stat().st_size for p in (merged / "iter_0000000").rglob("*") if p.is_file())
    # the checkpoint shrank by the experts' fp32 bytes, less the kept rows' int64 indices and
    # torch_dist's per-tensor overhead (4 tensors per compressed expert instead of 2)
    expert_bytes = 4 * (rec["parameters"]["before"]["experts"] - per_expert * 4 * len(layers))
    rows_bytes = 8 * (32 + 16) * 4 * len(layers)
    extra_tensors = 2 * 4 * len(layers)
    assert expert_bytes - rows_bytes - 4096 * extra_tensors <= unsaved - saved <= expert_bytes


def test_readers_accept_the_outputs(sources, tmp_path, embedded_cache):
    from eval_testing import MODEL_FLAGS

    from mpmoe.analysis.cli import main as analyze
    from mpmoe.eval.loader import load_eval_model
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.train.cli import main as train

    merged, small = tmp_path / "merged", tmp_path / "small"
    assert _run("merge", "--load", sources["mope"], "--save", merged, "--num-experts", 4, "--layout", "collapsed",
                *CAL) == 0
    assert _run("compress", "--load", merged, "--save", small, "--rank", 4, "--sparse-keep", 0.5, "--steps", 6,
                "--final-warmup", 2, "--calibration-tokens", 256) == 0
    for out in (merged, small):
        init_distributed(seed=1)
        try:
            e = load_eval_model(out, dtype="fp32")
            assert e.args.num_experts == 4
        finally:
            destroy_distributed()
        assert analyze(["checkpoint", "--load", str(out), "--out", str(out) + "-report", "--num-tokens", "32",
                        "--ot-samples", "0", "--no-progress"]) == 0
    for out in (merged, small):  # no transformers class for folded or factorised experts: one line
        assert mpmoe_main(["export", "hf", "--load", str(out), "--out", str(out) + "-hf"]) == 2
        assert not Path(str(out) + "-hf").exists()
    run = [*MODEL_FLAGS, "--global-batch-size", "4", "--micro-batch-size", "4", "--eval-iters", "1",
           "--eval-interval", "100", "--no-tensorboard", "--no-progress", "--load", str(small), "--no-load-optim",
           "--embedded-cache-dir", str(embedded_cache), "--run-dir", str(tmp_path / "run"), "--train-iters", "2",
           "--save", str(tmp_path / "cont"), *json.loads((small / "surgery.json").read_text())["train_flags"]]
    assert train(run) == 0
    _, m = _logits(tmp_path / "cont")
    assert m.args.moe_expert_compression and m.args.num_experts == 4


def _fabricate(source, out, **changes):
    """A checkpoint of the source's shape with ``changes`` to its flags (dense, ReMoE)."""
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.run.model import build_model

    init_distributed(seed=1)
    try:
        m = store.load_model(source, dtype="fp32")
        args = copy.copy(m.args)
        for k, v in changes.items():
            setattr(args, k, v)
        _, model, _ = build_model(args, int(m.model.embedding.word_embeddings.weight.shape[0]))
        store.save_model(out, model, args=args, tokenizer_dir=m.tokenizer_dir)
    finally:
        destroy_distributed()


def test_bad_inputs_one_line_nothing_written(sources, tmp_path, capsys):
    dense, remoe = tmp_path / "dense", tmp_path / "remoe"
    _fabricate(sources["topk"], dense, num_experts=None)
    _fabricate(sources["topk"], remoe, moe_relu_routing=True, moe_router_load_balancing_type="none")
    bad_groups = tmp_path / "groups.json"
    bad_groups.write_text(json.dumps({"2": [[0, 1, 9], [2, 3, 4, 5, 6, 7]], "3": [[0, 1, 2, 3, 4, 5, 6, 7]]}))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    src = sources["topk"]
    cases = [
        (["merge", "--load", src, "--save", tmp_path / "o1", "--num-experts", 0], "--num-experts"),
        (["merge", "--load", src, "--save", tmp_path / "o2", "--num-experts", 9], "9"),
        (["merge", "--load", dense, "--save", tmp_path / "o3", "--num-experts", 2], "dense"),
        (["merge", "--load", remoe, "--save", tmp_path / "o4", "--num-experts", 2], "ReMoE"),
        (["merge", "--load", src, "--save", tmp_path / "o5", "--groups", bad_groups], "expert 9"),
        (["merge", "--load", src, "--save", bad_groups / "out", "--num-experts", 2], "not a folder"),
        (["compress", "--load", src, "--save", tmp_path / "o6", "--rank", 0], "--rank"),
        (["compress", "--load", src, "--save", tmp_path / "o7", "--sparse-keep", 1.5], "--sparse-keep"),
        (["merge", "--load", src, "--save", tmp_path / "o8", "--num-experts", 2, "--layout", "nope"], "layout"),
    ]
    if os.geteuid() != 0:  # root writes into a read-only folder
        cases.append((["merge", "--load", src, "--save", locked / "out", "--num-experts", 2], "not writable"))
    try:
        for argv, needle in cases:
            capsys.readouterr()
            assert _run(*argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("mpmoe experts: error:") and "\n" not in err and needle in err, (argv, err)
            out = Path(argv[argv.index("--save") + 1])
            assert not out.exists(), argv
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_sigma_push_forward_equals_recount_from_eval_dump(sources, tmp_path):
    """MoPE: the counters of the grouped experts pushed forward (N, A u, A C A^T) equal a recount
    of the grouped routing of an eval routing dump; the collapsed model's router selects over
    the E experts exactly as the source's (first MoE layer: same input)."""
    import numpy as np

    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.routing.cooccurrence import covariance_from_counts

    out = tmp_path / "coll"
    assert _run("merge", "--load", sources["mope"], "--save", out, "--num-experts", 3, "--layout", "collapsed",
                *CAL) == 0
    labels = {int(n): torch.tensor(v["labels"]) for n, v in json.loads((out / "surgery.json").read_text())["layers"].items()}
    dumps = {}
    for name, path in (("src", sources["mope"]), ("coll", out)):
        init_distributed(seed=1)
        try:
            m = store.load_model(path, dtype="fp32", routing_dump_dir=str(tmp_path / name))
            m.forward(_tokens(m.vocab_size, n=4, s=64))
        finally:
            destroy_distributed()
        dumps[name] = {}
        for n in labels:
            (f,) = sorted((tmp_path / name).glob(f"layer{n}_rank0_fwd*.npz"))
            dumps[name][n] = np.load(f)["experts"]
    first = min(labels)
    assert np.array_equal(dumps["src"][first], dumps["coll"][first])
    for n, lab in labels.items():
        experts = torch.as_tensor(dumps["src"][n])
        routing = torch.zeros(experts.shape[0], lab.numel(), dtype=torch.float64)
        routing.scatter_(1, experts.clamp_min(0), (experts >= 0).double())
        counts = (torch.tensor(float(routing.shape[0]), dtype=torch.float64), routing.sum(0), routing.t() @ routing)
        a = M.membership_matrix(lab)
        pushed = M.push_forward_counters(*counts, a)
        grouped = routing @ a.t()
        assert torch.equal(pushed[1], grouped.sum(0)) and torch.equal(pushed[2], grouped.t() @ grouped)
        assert torch.allclose(covariance_from_counts(*pushed), a @ covariance_from_counts(*counts) @ a.t(), atol=1e-12)


@pytest.mark.parametrize("kind", ["topk", "mope"])
def test_fold_select_at_evaluation(sources, kind, tmp_path):
    """``moe_expert_group_routing="fold-select"`` (an evaluation option): on a collapsed E' = E
    merge (every expert its own group) it reproduces the source's logits; on E' = 3 it routes
    differently from select-fold; on a checkpoint without groups it is a one-line refusal."""
    from mpmoe.megatron import destroy_distributed, init_distributed

    fold = {"moe_expert_group_routing": "fold-select"}
    ident, three = tmp_path / "ident", tmp_path / "three"
    for out, n in ((ident, 8), (three, 3)):
        assert _run("merge", "--load", sources[kind], "--save", out, "--num-experts", n, "--layout", "collapsed",
                    *CAL) == 0
    src, _ = _logits(sources[kind])
    init_distributed(seed=1)
    try:
        got = store.load_model(ident, dtype="fp32", routing_ablation=fold).forward(_tokens(src.shape[-1])).float()
        assert (got - src).abs().max() <= 1e-5
        folded = store.load_model(three, dtype="fp32", routing_ablation=fold).forward(_tokens(src.shape[-1])).float()
        with pytest.raises(store.StoreError, match="fold-select routes over merged experts; .* has none"):
            store.load_model(sources[kind], dtype="fp32", routing_ablation=fold)
    finally:
        destroy_distributed()
    selected, _ = _logits(three)
    assert (folded - selected).abs().max() > 1e-4
