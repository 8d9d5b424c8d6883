"""mpmoe.store: load_model -> save_model round trips, calibration sampling, held-out loss,
and the refusals (one-line errors, nothing half-written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_testing import train_checkpoint
from train_testing import make_indexed_dataset, tiny_flags

from mpmoe import store

KINDS = {  # routing kind -> extra `mpmoe train` flags
    "mope": (),  # the tiny-cpu preset routes with MoPE
    "remoe": ("--moe-relu-routing", "--moe-router-load-balancing-type", "none",
              "--moe-relu-l1-reg-coeff-init", "1e-3", "--moe-relu-l1-reg-coeff-multiplier", "1.5"),
    "bias": ("--moe-router-load-balancing-type", "none", "--moe-router-enable-expert-bias",
             "--moe-router-bias-update-rate", "0.01"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, embedded_cache):
    """One 3-iteration checkpoint per routing kind, on the embedded corpus (tokenizer copied)."""
    root = tmp_path_factory.mktemp("store-ckpts")
    return {k: train_checkpoint(root / k, embedded_cache, iters=3, extra=extra) for k, extra in KINDS.items()}


@pytest.fixture()
def dist():
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    yield
    destroy_distributed()


def _tensors(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _counters(model) -> dict:
    from mpmoe.megatron.router import iter_routers

    return {r.layer_number: r._counted_forwards for r in iter_routers(model)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_keeps_logits_and_routing_state(ckpts, kind, tmp_path, dist):
    a = store.load_model(ckpts[kind])
    assert a.trained_routing == {"mope": "mope", "remoe": "remoe", "bias": "topk"}[kind]
    assert a.root == ckpts[kind] and a.iteration == 3 and a.tokenizer is not None
    tokens = torch.randint(0, a.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits_a = a.forward(tokens)
    state_a, counters_a = _tensors(a.model), _counters(a.model)
    # the routing state the round trip must carry is really there (not a default)
    if kind == "mope":
        sigma = [v for k, v in state_a.items() if k.endswith("cooccurrence_stats.covariance")]
        assert sigma and all(not torch.equal(s, torch.eye(s.shape[0])) for s in sigma)  # Sigma learned
        assert all(float(v) > 0 for k, v in state_a.items() if k.endswith("cooccurrence_stats.num_tokens"))
        assert all(c > 0 for c in counters_a.values())
    if kind == "remoe":
        coeff = [v for k, v in state_a.items() if k.endswith("relu_l1_coeff")]
        assert coeff and all(float(c) != 1e-3 for c in coeff)  # updated by training
    if kind == "bias":
        bias = [v for k, v in state_a.items() if k.endswith("expert_bias")]
        assert bias and any(float(b.abs().max()) > 0 for b in bias)

    out = store.save_model(tmp_path / "saved", a, args=a.args, extra_files={
        "surgery.json": {"note": "identity"}, "provenance.json": '{"x": 1}', "raw.bin": b"\x00\x01"})
    assert sorted(p.name for p in out.iterdir()) == [
        "iter_0000000", "latest_checkpointed_iteration.txt", "provenance.json", "raw.bin", "surgery.json",
        "tokenizer"]
    assert (out / "raw.bin").read_bytes() == b"\x00\x01"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    b = store.load_model(out)
    assert b.iteration == 0 and b.trained_routing == a.trained_routing and b.routing == a.routing
    assert b.tokenizer_dir == out / "tokenizer" and b.vocab_size == a.vocab_size and b.eod_id == a.eod_id
    assert torch.equal(b.forward(tokens), logits_a)
    state_b = _tensors(b.model)
    assert state_b.keys() == state_a.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert _counters(b.model) == counters_a


def test_dtype_checkpoint_loads_the_weights_in_the_dtype_they_were_saved_in(ckpts, tmp_path, dist):
    """dtype="checkpoint": an fp32 run loads in fp32, a model saved in bf16 loads in bf16 with
    the very tensors saved (no fp32 copy); Sigma stays fp32 either way."""
    a = store.load_model(ckpts["mope"], dtype="checkpoint")
    assert a.dtype == torch.float32 and not a.args.bf16
    h = store.load_model(ckpts["mope"], dtype="bf16")
    assert h.dtype == torch.bfloat16
    args = type(h.args)(**vars(h.args))
    out = store.save_model(tmp_path / "bf16", h, args=args)
    b = store.load_model(out, dtype="checkpoint")
    assert b.dtype == torch.bfloat16 and b.args.bf16
    saved, loaded = _tensors(h.model), _tensors(b.model)
    assert saved.keys() == loaded.keys()
    assert loaded["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    sigma = [k for k in loaded if k.endswith("cooccurrence_stats.covariance")]
    assert sigma and all(loaded[k].dtype == torch.float32 for k in sigma)
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype and torch.equal(saved[k], loaded[k]), k


def test_readers_accept_a_saved_model(ckpts, tmp_path, capsys, embedded_cache):
    """mpmoe eval's loader, analyze checkpoint and train --load --no-load-optim read it."""
    from mpmoe.analysis.cli import main as analyze
    from mpmoe.eval.loader import EvalModel, load_eval_model
    from mpmoe.megatron import destroy_distributed, init_distributed
    from mpmoe.train.cli import main as train

    out = tmp_path / "saved"
    init_distributed(seed=1)
    try:
        a = store.load_model(ckpts["mope"])
        store.save_model(out, a, args=a.args)
        e = load_eval_model(out, dtype="fp32")
        assert isinstance(e, EvalModel) and e.trained_routing == "mope" and e.tokenizer is not None
    finally:
        destroy_distributed()
    assert analyze(["checkpoint", "--load", str(out), "--out", str(tmp_path / "report"), "--num-tokens", "32",
                    "--ot-samples", "0", "--layers", "2", "--no-progress"]) == 0

    from eval_testing import MODEL_FLAGS

    run = [*MODEL_FLAGS, "--global-batch-size", "4", "--micro-batch-size", "4", "--eval-iters", "1",
           "--eval-interval", "100", "--no-tensorboard", "--no-progress", "--load", str(out),
           "--embedded-cache-dir", embedded_cache, "--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    # without --no-load-optim: one line naming the flag, nothing written
    assert train([*run, "--train-iters", "2", "--save", str(tmp_path / "cont0")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpmoe train: error:") and "--no-load-optim" in err and "\n" not in err
    assert not (tmp_path / "cont0" / "iter_0000002").exists()
    assert train([*run, "--train-iters", "2", "--no-load-optim", "--save", str(tmp_path / "cont")]) == 0
    assert (tmp_path / "cont" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert "resuming from" in capsys.readouterr().err


def test_heldout_loss_matches_a_hand_written_log_softmax(ckpts, dist):
    m = store.load_model(ckpts["mope"])
    windows = store._windows(m, 3, "valid", 0, 20)  # [3, 21]: 20 predictions per row
    got = store.heldout_loss(m, tokens=windows, batch_size=2)
    assert got["tokens"] == 60 and got["sequences"] == 3
    nll = []
    for row in windows:
        x = row[:-1].unsqueeze(0)
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        with torch.no_grad():
            logits = m.model(x, pos, None)[0, :, : m.vocab_size].double()
        for t, label in enumerate(row[1:].tolist()):
            z = logits[t]
            top = z.max()
            nll.append(float(top + torch.log(torch.exp(z - top).sum()) - z[label]))
    assert got["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    # the sampled default scores the same windows calibration sampling gives (seq_length predictions)
    d = store.heldout_loss(m, num_tokens=2 * m.max_length, batch_size=4)
    assert d["sequences"] == 2 and d["tokens"] == 2 * m.max_length and d["split"] == "valid"
    w = store._windows(m, 2, "valid", 0, None)
    assert d["loss"] == pytest.approx(store.heldout_loss(m, tokens=w)["loss"], rel=1e-9)
    assert 0 < d["loss"] < 2 * np.log(m.vocab_size)


def test_calibration_tokens_are_deterministic_per_seed_and_split(ckpts, dist):
    m = store.load_model(ckpts["mope"])
    a = store.calibration_tokens(m, num_tokens=100, seq_length=32)
    assert a.dtype == torch.long and a.shape == (4, 32)  # ceil(100 / 32)
    assert torch.equal(a, store.calibration_tokens(m, num_tokens=100, seq_length=32))
    assert not torch.equal(a, store.calibration_tokens(m, num_tokens=100, seq_length=32, seed=1))
    v = store.calibration_tokens(m, num_tokens=100, seq_length=32, split="valid")
    assert not torch.equal(a, v)
    assert int(a.min()) >= 0 and int(a.max()) < m.vocab_size
    assert store.calibration_tokens(m, num_tokens=1).shape == (1, m.max_length)
    with pytest.raises(store.StoreError, match="split must be one of"):
        store.calibration_tokens(m, num_tokens=10, split="dev")


@pytest.fixture(scope="module")
def data_path_ckpt(tmp_path_factory):
    """A 2-iteration run on a --data-path dataset (no tokenizer): (save folder, data prefix)."""
    from mpmoe.train.cli import main as train

    root = tmp_path_factory.mktemp("store-datapath")
    prefix = make_indexed_dataset(root / "data")
    save = root / "ckpt"
    assert train(tiny_flags(prefix, root / "run", **{"train-iters": 2, "save": str(save), "no-progress": True})) == 0
    return save, prefix


def test_moved_data_is_one_line_naming_the_flag(data_path_ckpt, tmp_path, dist):
    save, prefix = data_path_ckpt
    m = store.load_model(save)
    assert m.tokenizer is None and m.tokenizer_dir is None and m.vocab_size == 128
    before = store.calibration_tokens(m, num_tokens=64, split="valid")
    moved = tmp_path / "moved"
    shutil.copytree(Path(prefix).parent, moved, ignore=shutil.ignore_patterns("index-cache"))
    for suffix in (".bin", ".idx"):
        Path(prefix + suffix).rename(str(tmp_path / ("gone" + suffix)))
    try:
        with pytest.raises(store.StoreError, match="--data-path") as info:
            store.calibration_tokens(m, num_tokens=64)
        assert "\n" not in str(info.value)
        again = store.calibration_tokens(m, num_tokens=64, split="valid",
                                         data_path=str(moved / Path(prefix).name))
        assert torch.equal(before, again)
        with pytest.raises(store.StoreError, match="no test split"):  # --split 90,10,0
            store.calibration_tokens(m, num_tokens=8, split="test", data_path=str(moved / Path(prefix).name))
    finally:
        for suffix in (".bin", ".idx"):
            (tmp_path / ("gone" + suffix)).rename(prefix + suffix)
    # a model without a tokenizer saves and loads back (vocabulary from the record)
    out = store.save_model(tmp_path / "saved", m, args=m.args)
    assert not (out / "tokenizer").exists() and store.load_model(out).vocab_size == 128


def test_save_refusals_leave_nothing_behind(ckpts, tmp_path, dist, monkeypatch):
    m = store.load_model(ckpts["mope"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(store.StoreError, match="not empty"):
        store.save_model(full, m, args=m.args)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(store.StoreError, match="parent"):
        store.save_model(blocker / "out", m, args=m.args)
    for bad in ({"iter_0000001": "x"}, {"tokenizer": "x"}, {"a/b": "x"}, {"x.json": object()}):
        with pytest.raises(store.StoreError):
            store.save_model(tmp_path / "bad", m, args=m.args, extra_files=bad)
    with pytest.raises(store.StoreError, match="iteration"):
        store.save_model(tmp_path / "bad", m, args=m.args, iteration=-1)
    assert not (tmp_path / "bad").exists()

    def boom(folder, files):  # a failure after the tensors are written
        assert (folder / "iter_0000000").is_dir()
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(store, "_write_extra", boom)
    with pytest.raises(RuntimeError, match="injected"):
        store.save_model(tmp_path / "out", m, args=m.args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "full"]  # no out, no temp folder
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    monkeypatch.undo()
    assert store.save_model(empty, m, args=m.args) == empty and (empty / "iter_0000000").is_dir()
