"""`mpmoe experts split` (HEMoE) end to end on a tiny dense checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DENSE_FLAGS = ["--preset", "tiny-cpu-dense", "--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "128",
               "--num-attention-heads", "2", "--seq-length", "32", "--max-position-embeddings", "32"]
SMALL = ["--num-modules", "8", "--num-domains", "2", "--samples-per-domain", "2", "--ilp-time-limit", "2"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory, embedded_cache):
    from mpmoe.train.cli import main

    root = tmp_path_factory.mktemp("split")
    save = root / "dense"
    assert main([*DENSE_FLAGS, "--train-iters", "2", "--global-batch-size", "4", "--micro-batch-size", "4",
                 "--eval-interval", "2", "--eval-iters", "1", "--save", str(save), "--run-dir", str(root / "run"),
                 "--no-tensorboard", "--no-progress", "--embedded-cache-dir", str(embedded_cache)]) == 0
    return save


def _split(dense, out, *extra):
    from mpmoe.experts.split import main

    assert main(["--load", str(dense), "--save", str(out), *SMALL, *extra]) == 0
    return out


def _logits(path, tokens):
    from mpmoe.megatron import init_distributed
    from mpmoe.store import load_model

    init_distributed()
    m = load_model(str(path))
    return m, m.forward(tokens).float()


def test_split_all_experts_equals_dense_and_records_the_ilp(dense, tmp_path):
    out = _split(dense, tmp_path / "split", "--num-experts", "4", "--moe-router-topk", "4")
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    d_model, d = _logits(dense, tokens)
    s_model, s = _logits(out, tokens)
    assert (s - d).abs().max() <= 1e-4
    report = json.loads((out / "surgery.json").read_text())
    assert report["domains"]["from"].startswith("hidden-states")
    assert list(report["layers"]) == ["2"]  # the first and last layers stay dense
    layer = report["layers"]["2"]
    assert layer["status"] in ("optimal", "time_limit", "time_limit_fallback")
    assert {"objective", "mip_gap", "sizes_modules", "sizes_neurons", "partitioner"} <= set(layer)
    assert sum(layer["sizes_neurons"]) == 128 and layer["sizes_neurons"] == [16 * m for m in layer["sizes_modules"]]
    experts = s_model.model.decoder.layers[1].mlp.experts
    assert [e.linear_fc2.weight.shape[1] for e in experts.local_experts] == layer["sizes_neurons"]
    n_dense = sum(p.numel() for p in d_model.model.decoder.layers[1].mlp.parameters())
    n_split = sum(p.numel() for p in experts.parameters())
    assert n_split == n_dense  # the experts are the dense FFN, parameter for parameter
    assert s_model.args.moe_router_unit_gates and s_model.trained_routing == "topk"
    assert (out / "preset.toml").is_file()
    from mpmoe.export.hf import ExportError, hf_kind

    with pytest.raises(ExportError, match="different sizes"):  # `mpmoe export hf` refuses it
        hf_kind(s_model.model, "topk")


@pytest.mark.parametrize("part", ["moefication", "random-homogeneous", "random-heterogeneous", "contiguous"])
def test_baseline_partitioners_keep_the_dense_function(dense, part):
    from mpmoe.experts.split import split_model
    from mpmoe.megatron import init_distributed
    from mpmoe.store import load_model

    init_distributed()
    loaded = load_model(str(dense))
    model, args, report = split_model(loaded, num_experts=4, topk=4, partitioner=part, num_modules=8,
                                      num_domains=2, samples_per_domain=2, time_limit=2)
    sizes = report["layers"]["2"]["sizes_neurons"]
    assert sum(sizes) == 128
    if part in ("moefication", "random-homogeneous", "contiguous"):
        assert sizes == [32] * 4
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    with torch.no_grad():
        assert (model(tokens, pos, None) - loaded.model(tokens, pos, None)).abs().max() <= 1e-4


def test_domain_data_files(dense, tmp_path):
    domains = tmp_path / "domains"
    domains.mkdir()
    (domains / "code.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (domains / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = _split(dense, tmp_path / "split", "--num-experts", "4", "--moe-router-topk", "2",
                 "--domain-data", str(domains))
    report = json.loads((out / "surgery.json").read_text())
    assert report["domains"]["from"] == "files" and report["domains"]["names"] == ["code", "prose"]


def _run_cli(argv, capsys):
    from mpmoe.errors import run_verb
    from mpmoe.experts.split import main

    rc = run_verb("mpmoe experts split", main, argv)
    return rc, capsys.readouterr().err.strip()


def test_sizes_from_gives_random_heterogeneous_the_ilp_split_sizes(dense, tmp_path, capsys):
    ilp = _split(dense, tmp_path / "ilp", "--num-experts", "4", "--moe-router-topk", "2")
    rnd = _split(dense, tmp_path / "rnd", "--num-experts", "4", "--moe-router-topk", "2",
                 "--partitioner", "random-heterogeneous", "--sizes-from", str(ilp), "--seed", "3")
    a, b = (json.loads((p / "surgery.json").read_text())["layers"]["2"] for p in (ilp, rnd))
    assert b["sizes_neurons"] == a["sizes_neurons"] and b["sizes_from"] == str(ilp)
    assert "status" not in b  # no ILP solved again
    # other neurons than the ILP's: the experts' fc2 columns differ where the sizes agree
    from mpmoe.megatron import init_distributed
    from mpmoe.store import load_model

    init_distributed()
    ea = load_model(str(ilp)).model.decoder.layers[1].mlp.experts.local_experts
    eb = load_model(str(rnd)).model.decoder.layers[1].mlp.experts.local_experts
    assert any(not torch.equal(x.linear_fc2.weight, y.linear_fc2.weight) for x, y in zip(ea, eb))
    # sizes of another shape: one line, nothing written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"2": {"sizes_neurons": [64, 64]}}}))
    rc, err = _run_cli(["--load", str(dense), "--save", str(tmp_path / "x"), *SMALL, "--num-experts", "4",
                        "--partitioner", "random-heterogeneous", "--sizes-from", str(bad)], capsys)
    assert rc == 2 and "are not 4 experts" in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


def test_split_router_goes_through_the_registry(dense):
    """A dense run that recorded another router's mark (ReMoE's) still splits into top-k + unit gates."""
    from mpmoe.experts.split import split_model
    from mpmoe.megatron import init_distributed, routers
    from mpmoe.store import load_model

    init_distributed()
    loaded = load_model(str(dense))
    loaded.args.moe_relu_routing = True
    _, args, _ = split_model(loaded, num_experts=4, topk=2, partitioner="contiguous", num_modules=8)
    assert routers.kind_of(args) == "topk" and args.router == "topk" and args.moe_relu_routing is False
    assert args.moe_router_unit_gates and args.moe_router_load_balancing_type == "none"


def test_refusals_are_one_line_and_write_nothing(dense, tmp_path, capsys):
    split = tmp_path / "split"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty_file = tmp_path / "emptyfile"
    empty_file.mkdir()
    (empty_file / "a.txt").write_text("  \n")
    cases = [
        (["--num-experts", "16", "--num-modules", "8"], "--num-modules"),
        (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk"),
        (["--size-ratio", "0.5"], "--size-ratio"),
        (["--domain-data", str(tmp_path / "missing")], "not a folder"),
        (["--domain-data", str(empty_dir)], "no files"),
        (["--domain-data", str(empty_file)], "is empty"),
        (["--sizes-from", str(tmp_path / "missing")], "--sizes-from applies to"),  # default partitioner: ilp
        (["--partitioner", "random-heterogeneous", "--sizes-from", str(tmp_path / "missing")], "no surgery.json"),
        (["--partitioner", "random-heterogeneous", "--sizes-from", str(empty_file / "a.txt")], "not a surgery.json"),
    ]
    for extra, needle in cases:
        rc, err = _run_cli(["--load", str(dense), "--save", str(split), *SMALL, *extra], capsys)
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (extra, err)
        assert err.startswith("mpmoe experts split: error:")
        assert not split.exists() and not any(p.name.startswith(".split") for p in tmp_path.iterdir())
    moe = _split(dense, tmp_path / "moe", "--num-experts", "4", "--moe-router-topk", "2", "--partitioner",
                 "contiguous")
    rc, err = _run_cli(["--load", str(moe), "--save", str(split), *SMALL], capsys)
    assert rc == 2 and "already has experts" in err and len(err.splitlines()) == 1
    assert not split.exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["routers", "all"])
def test_train_from_split_keeps_sizes(dense, tmp_path, embedded_cache, mode):
    from mpmoe.train.cli import main

    split = _split(dense, tmp_path / "split", "--num-experts", "4", "--moe-router-topk", "2")
    save = tmp_path / "ft"
    assert main(["--preset", str(split / "preset.toml"), "--load", str(split), "--no-load-optim",
                 "--trainable-params", mode, "--train-iters", "3", "--global-batch-size", "4",
                 "--micro-batch-size", "4", "--eval-interval", "3", "--eval-iters", "1", "--lr", "1e-2",
                 "--save", str(save), "--run-dir", str(tmp_path / "run"), "--no-tensorboard", "--no-progress",
                 "--embedded-cache-dir", str(embedded_cache)]) == 0
    from mpmoe.megatron import init_distributed
    from mpmoe.store import load_model

    init_distributed()
    before, after = load_model(str(split)), load_model(str(save))
    sizes = json.loads((split / "surgery.json").read_text())["layers"]["2"]["sizes_neurons"]
    b_mlp, a_mlp = before.model.decoder.layers[1].mlp, after.model.decoder.layers[1].mlp
    assert [e.linear_fc2.weight.shape[1] for e in a_mlp.experts.local_experts] == sizes
    assert not torch.equal(b_mlp.router.weight, a_mlp.router.weight)
    same_experts = all(torch.equal(p, q) for p, q in zip(b_mlp.experts.parameters(), a_mlp.experts.parameters()))
    same_attn = torch.equal(before.model.decoder.layers[0].self_attention.linear_qkv.weight,
                            after.model.decoder.layers[0].self_attention.linear_qkv.weight)
    assert same_experts == same_attn == (mode == "routers")


@pytest.mark.slow
def test_eval_and_analyze_read_a_split_checkpoint(dense, tmp_path):
    from mpmoe.analysis.cli import main as analyze
    from mpmoe.eval.cli import build_parser, evaluate

    split = _split(dense, tmp_path / "split", "--num-experts", "4", "--moe-router-topk", "2")
    sizes = json.loads((split / "surgery.json").read_text())["layers"]["2"]["sizes_neurons"]
    report = tmp_path / "an"
    assert analyze(["checkpoint", "--load", str(split), "--out", str(report), "--num-tokens", "32",
                    "--ot-samples", "0", "--no-progress"]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["runs"][0]["layers"]["2"]["expert_sizes"] == sizes
    assert (report / "pca.png").is_file()
    out = tmp_path / "ev"
    evaluate(build_parser().parse_args(["--load", str(split), "--tasks", "mpmoe_local", "--limit", "2",
                                        "--output-path", str(out), "--no-progress", "--bootstrap-iters", "0"]))
    results = json.loads((out / "results.json").read_text())["results"]
    assert results and all(isinstance(v, dict) for v in results.values())


def test_preset_text_round_trips_the_flags(tmp_path):
    from mpmoe.experts.split import preset_text
    from mpmoe.run.args import parse_args

    a = parse_args(["--preset", "tiny-cpu-dense", "--data-path", "x", "y", "--hidden-size", "96"], check=False)
    a.num_experts, a.moe_layer_freq, a.moe_expert_ffn_sizes = 4, [0, 1, 1, 0], "2:64,64,64,320;3:128,128,128,128"
    a.moe_router_unit_gates = True
    (tmp_path / "p.toml").write_text(preset_text(a))
    b = parse_args(["--preset", str(tmp_path / "p.toml")], check=False)
    assert {k for k in vars(a) if getattr(a, k) != getattr(b, k)} == {"preset"}
