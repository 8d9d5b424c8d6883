"""The Megatron-LM route end to end on CPU: the patched ``pretrain_gpt.py`` trains a tiny
MoPE model with ``--mock-data``, evaluates, saves ``torch_dist`` checkpoints and resumes
from one bit-identically; a top-k run of the patched tree equals an unpatched tree's.

The runs use a test-side CPU shim (``tests/megatron_lm_cpu_shim/sitecustomize.py``: it acts
only in a process whose ``argv[0]`` ends in ``pretrain_gpt.py``), never part of the patches
or of mpmoe. One module-scoped set of runs; the other tests of this module (``mpmoe eval``
and ``mpmoe analyze checkpoint`` on these checkpoints) reuse them. Needs Python 3.12 +
megatron-core 0.19 (``make test-megatron-latest``); skipped elsewhere.
"""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from megatron_lm_testing import (CPU_FLAGS, CPU_SHIM, ROOT, assemble_trees, load_dist_checkpoint,
                                 skip_reason, tree_env)
from mpmoe.megatron_lm.flags import preset_flags

pytestmark = [pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
              pytest.mark.slow]

LAUNCHER = ROOT / "scripts" / "megatron_lm" / "pretrain.sh"
ITERS = 4
RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--seed", "1234", "--log-interval", "1"]
# MoPE: top-k for the first 0.25 x 4 = 1 step, OTEP from step 2 on.
MOPE = RUN + ["--train-iters", str(ITERS), "--moe-otep-warmup-fraction", "0.25",
              "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "2"]
TOPK = RUN + ["--eval-iters", "0", "--save-interval", "2"]
ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?lm loss: (\S+) \|.*?grad norm: (\S+) \|")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, tree, cwd, log):
    env = tree_env(tree, CPU_SHIM, MASTER_PORT=_free_port(), PYTHON=sys.executable, NPROC_PER_NODE=1)
    f = open(log, "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT), f, log


def _pretrain(tree, flags, log):
    return _start([sys.executable, "pretrain_gpt.py", *flags], tree, tree, log)


def _wait(*started):
    """Wait for runs started together (two at a time: CI machines have 2+ cores)."""
    out = []
    for proc, f, log in started:
        proc.wait(timeout=600)
        f.close()
        text = log.read_text()
        assert proc.returncode == 0, text[-4000:]
        out.append(text)
    return out


def _iterations(log):
    return {int(m[0]): (m[2], m[3]) for m in ITER_LINE.findall(log)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the CPU route; the cuda-marked tests cover a GPU")
    root = tmp_path_factory.mktemp("megatron-lm-e2e")
    trees = assemble_trees(root)
    patched, base = trees["patched"], trees["base"]
    out = {"root": root, **trees}
    mope = preset_flags("tiny-cpu", "mope", train_iters=ITERS, mock_data=True) + CPU_FLAGS + MOPE
    topk = preset_flags("tiny-cpu", "moe", train_iters=2, mock_data=True) + CPU_FLAGS + TOPK
    # MoPE through the launcher (preset flags, --mock-data and gloo added by it), beside a
    # top-k (aux_loss) run of the patched tree.
    out["mope_log"], out["topk_log"] = _wait(
        _start(["bash", str(LAUNCHER), "tiny-cpu", "mope", str(patched), *CPU_FLAGS, *MOPE,
                "--save", str(root / "mope")], patched, ROOT, root / "mope.log"),
        _pretrain(patched, topk + ["--save", str(root / "topk")], root / "topk.log"))
    # The MoPE run resumed from its iteration-2 checkpoint, beside the unpatched top-k run.
    out["resumed_log"], out["base_log"] = _wait(
        _pretrain(patched, mope + ["--load", str(root / "mope"), "--ckpt-step", "2",
                                   "--save", str(root / "resumed")], root / "resumed.log"),
        _pretrain(base, topk + ["--save", str(root / "base-topk")], root / "base.log"))
    return out


def _tensors(state):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_mope_trains_and_routes_with_otep_after_the_warmup(runs):
    log = runs["mope_log"]
    assert "pretrain.sh: preset tiny-cpu (mope)" in log
    assert sorted(_iterations(log)) == [1, 2, 3, 4]
    assert "validation loss at iteration 2" in log and "validation loss at iteration 4" in log
    routing = {int(m[0]): m[1] for m in re.findall(r"mpmoe routing \| iteration\s+(\d+) \| (.*)", log)}
    assert sorted(routing) == [1, 2, 3, 4]
    assert re.findall(r"layer (\d+): (otep|top-k warm-up)", routing[1]) == [(n, "top-k warm-up") for n in "234"]
    for it in (2, 3, 4):
        assert re.findall(r"layer (\d+): (otep|top-k warm-up)", routing[it]) == [(n, "otep") for n in "234"]
        assert re.findall(r"experts/token (\S+)", routing[it]) == ["2.000"] * 3  # exactly k
    assert "mpmoe: --rerun-mode validate_results -> disabled" in log
    # Sigma: none before any count, then rebuilt from the counts each step
    first = re.findall(r"sigma offdiag (\S+)", routing[1])
    assert first == ["0.0000e+00"] * 3
    two, four = (load_dist_checkpoint(runs["root"] / "mope" / f"iter_000000{i}") for i in (2, 4))
    sigmas = [k for k in two if k.endswith("router.cooccurrence_stats.covariance")]
    assert len(sigmas) == 3
    for key in sigmas:
        assert not torch.equal(two[key], four[key])
        off = four[key] - torch.diag(four[key].diagonal())
        assert off.abs().sum() > 0
    assert int(four["decoder.layers.1.mlp.router.cooccurrence_stats.num_tokens"]) > int(
        two["decoder.layers.1.mlp.router.cooccurrence_stats.num_tokens"])


def test_resumed_run_equals_the_uninterrupted_one(runs):
    """Weights, Adam moments, Sigma and the co-occurrence counts at iteration 4."""
    assert sorted(_iterations(runs["resumed_log"])) == [3, 4]
    mope, resumed = _iterations(runs["mope_log"]), _iterations(runs["resumed_log"])
    assert mope[3] == resumed[3]
    # (Megatron-LM's log line at iteration 4 of the resumed run shows the mean lm loss of
    # iterations 3 and 4: its loss window is not reset after the first line of a resumed
    # run. The grad norm is the step's own.)
    assert mope[4][1] == resumed[4][1]
    assert float(resumed[4][0]) == pytest.approx((float(mope[3][0]) + float(mope[4][0])) / 2, abs=2e-6)
    a = load_dist_checkpoint(runs["root"] / "mope" / "iter_0000004")
    b = load_dist_checkpoint(runs["root"] / "resumed" / "iter_0000004")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ta)
    assert any(k.endswith("cooccurrence_stats.cooccurrence") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert different == []
    common_a, common_b = a["common_state/shard_0_1"][0], b["common_state/shard_0_1"][0]
    assert common_a["iteration"] == common_b["iteration"] == 4
    assert common_a["optimizer"]["param_groups"] == common_b["optimizer"]["param_groups"]


def test_topk_run_of_the_patched_tree_equals_the_unpatched_tree(runs):
    patched, base = _iterations(runs["topk_log"]), _iterations(runs["base_log"])
    assert sorted(patched) == [1, 2] and patched == base
    assert "mpmoe routing" not in runs["topk_log"]
    a = _tensors(load_dist_checkpoint(runs["root"] / "topk" / "iter_0000002"))
    b = _tensors(load_dist_checkpoint(runs["root"] / "base-topk" / "iter_0000002"))
    assert a.keys() == b.keys()
    assert "decoder.layers.1.mlp.router.weight" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# --------------------------------------------------------------------------- reading them
def test_train_record_is_an_explicit_table_over_megatron_lms_args(runs):
    """Every `mpmoe train` option is either read under its own name from Megatron-LM's
    args, renamed, mpmoe-only, or not read; a setting mpmoe cannot build is named."""
    from mpmoe.run.megatron_lm import MPMOE_ONLY, NOT_READ, RENAMED, read_common, train_record
    from mpmoe.run.args import parse_args

    margs = read_common(runs["root"] / "mope" / "iter_0000004")["args"]
    stock = read_common(runs["root"] / "base-topk" / "iter_0000002")["args"]
    defaults = vars(parse_args(["--train-iters", "1"], check=False))
    same = set(defaults) - NOT_READ - MPMOE_ONLY - set(RENAMED)
    assert same <= set(vars(stock)), same - set(vars(stock))  # an unpatched tree has them all
    assert set(MPMOE_ONLY) & set(vars(stock)) == set()  # ...and none of mpmoe's own
    record = train_record(margs, defaults)
    assert record["norm_epsilon"] == margs.layernorm_epsilon
    assert (record["moe_router_load_balancing_type"], record["moe_otep_warmup_fraction"]) == ("otep", 0.25)
    assert record["num_experts"] == 8 and record["moe_layer_freq"] == [0, 1, 1, 1]
    assert "moe_sigma_shrinkage" not in train_record(stock, defaults)  # mpmoe's default applies
    bad = dict(vars(stock), multi_latent_attention=True, moe_shared_expert_gate=True)
    with pytest.raises(ValueError, match=r"setting\(s\) --multi-latent-attention True, "
                                         r"--moe-shared-expert-gate True have no mpmoe counterpart"):
        train_record(bad, defaults)
    with pytest.raises(ValueError, match="lack --num-experts"):
        train_record({k: v for k, v in vars(stock).items() if k != "num_experts"}, defaults)


def test_store_loads_megatron_lm_checkpoints_mope_and_stock_topk(runs, monkeypatch):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from mpmoe import store
    from mpmoe.megatron import destroy_distributed, init_distributed

    init_distributed(seed=1)
    try:
        for name, trained in (("mope/iter_0000004", "mope"), ("base-topk/iter_0000002", "topk")):
            path = runs["root"] / name
            m = store.load_model(path)
            assert (m.trained_routing, m.routing, m.vocab_size, m.tokenizer) == (trained, trained, 8192, None)
            saved = load_dist_checkpoint(path)
            checked = []
            def tensors(value):  # ShardedTensors, factories (SwiGLU's fc1) built into theirs
                if isinstance(value, ShardedTensorFactory):
                    value = value.build()
                if isinstance(value, ShardedTensor):
                    yield value
                elif isinstance(value, dict):
                    for v in value.values():
                        yield from tensors(v)
                elif isinstance(value, (list, tuple)):
                    for v in value:
                        yield from tensors(v)

            for sh in tensors(m.model.sharded_state_dict()):  # each tensor where megatron saves it
                key = sh.key if sh.key in saved else sh.key.replace(
                    "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")  # stock spec
                p = sh.prepend_axis_num
                index = tuple(sh.global_offset[:p]) + tuple(
                    slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.data.shape))
                assert torch.equal(sh.data, saved[key][index]), sh.key
                checked.append(key)
            model_keys = {k for k in saved if not k.startswith(("optimizer.", "common_state", "rerun_state", "rng_state"))
                          and "_extra_state" not in k}
            assert model_keys == set(checked), (sorted(model_keys - set(checked)), sorted(set(checked) - model_keys))
            sigmas = [k for k in checked if k.endswith("cooccurrence_stats.covariance")]
            assert len(sigmas) == (3 if trained == "mope" else 0)
        from mpmoe.run import megatron_lm as ck

        real = ck.run_info  # a HuggingFaceTokenizer run whose tokenizer folder is not here
        monkeypatch.setattr(ck, "run_info", lambda it_dir, common=None: dict(
            real(it_dir, common), tokenizer=None, tokenizer_type="HuggingFaceTokenizer"))
        with pytest.raises(store.StoreError, match="holds no tokenizer; pass --tokenizer"):
            store.load_model(runs["root"] / "base-topk")
    finally:
        destroy_distributed()


def test_readers_refuse_a_megatron_lm_checkpoint_of_another_model(runs, capsys):
    """State the rebuilt model would drop (a layer, MoPE's Sigma) is refused in one line
    naming the flags that differ, as for mpmoe's own checkpoints; eval and analyze say so."""
    from mpmoe import store
    from mpmoe.analysis.cli import main as analyze
    from mpmoe.eval.cli import main as evaluate
    from mpmoe.megatron import destroy_distributed, init_distributed

    mope = runs["root"] / "mope" / "iter_0000004"
    init_distributed(seed=1)
    try:
        for flags, words in (
                (["--router", "topk"], ["(--moe-router-load-balancing-type otep -> aux_loss)",
                                        "would drop 12 tensor(s) of layer(s) 2,3,4"]),  # Sigma and its counts
                (["--num-layers", "3", "--moe-layer-freq", "[0,1,1]"],
                 ["(--num-layers 4 -> 3, --moe-layer-freq [0,1,1,1] -> [0,1,1])", "would drop 13 tensor(s)",
                  "of layer(s) 4"]),
                (["--num-layers", "5", "--moe-layer-freq", "[0,1,1,1,1]"], ["--num-layers 4 -> 5", "lacks",
                                                                             "of layer(s) 5"])):
            with pytest.raises(store.StoreError) as err:
                store.load_model(mope, model_flags=["--preset", "tiny-cpu", *flags])
            msg = str(err.value)
            assert "holds another model" in msg and all(w in msg for w in words), msg
        # a stock top-k run read as MoPE (explicit flags): Sigma starts from the identity, as on resume
        m = store.load_model(runs["root"] / "base-topk" / "iter_0000002", model_flags=["--preset", "tiny-cpu"])
        assert "holds no routing statistics" in capsys.readouterr().err
        sigmas = [v for k, v in m.model.state_dict().items() if k.endswith("cooccurrence_stats.covariance")]
        assert len(sigmas) == 3 and all(torch.equal(v, torch.eye(8, dtype=v.dtype)) for v in sigmas)
    finally:
        destroy_distributed()
    topk = ["--preset", "tiny-cpu", "--router", "topk"]
    for verb, argv in ((evaluate, ["--load", str(mope), "--model-flags", " ".join(topk), "--tasks",
                                   "mpmoe_docs_mc"]),
                       (analyze, ["checkpoint", "--load", str(mope), "--out", str(runs["root"] / "no-analysis"),
                                  *topk])):
        assert verb(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds another model (--moe-router-load-balancing-type otep -> aux_loss" in err[0]
    assert not (runs["root"] / "no-analysis").exists()


def test_mpmoe_eval_and_run_all_evals_on_a_megatron_lm_run_folder(runs, embedded_cache, tmp_path, monkeypatch):
    """scripts/run_all_evals.sh over Megatron-LM run folders (the MoPE and the stock top-k
    checkpoint, one script each, side by side; --tokenizer: a local folder of the vocabulary's
    size), and `mpmoe analyze checkpoint` of the MoPE one meanwhile, in this process."""
    import json
    import os
    import signal

    from mpmoe.cli import main as mpmoe_main
    from mpmoe.data import prepare_embedded

    tok = prepare_embedded(embedded_cache, progress=False).tokenizer_dir
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TASKS="mpmoe_docs_mc", LIMIT="4",
               MPMOE=f"{sys.executable} -m mpmoe", NPROC="1", MPMOE_CACHE=str(embedded_cache))
    procs = {}
    for name in ("mope/iter_0000004", "base-topk/iter_0000002"):
        run = tmp_path / name.split("/")[0]
        (run / name).parent.mkdir(parents=True)
        os.symlink(runs["root"] / name, run / name)
        procs[name] = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "run_all_evals.sh"), str(run), str(run / "out"), "--tokenizer",
             str(tok), "--bootstrap-iters", "0", "--no-progress"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # (a second interpreter importing megatron would cost seconds of the CI budget)
        monkeypatch.setenv("MPMOE_CACHE", str(embedded_cache))
        out = tmp_path / "analysis"
        assert mpmoe_main(["analyze", "checkpoint", "--load", str(runs["root"] / "mope"), "--out", str(out),
                           "--num-tokens", "256", "--ot-samples", "0", "--no-progress"]) == 0
        assert any(out.iterdir())
        for name, proc in procs.items():
            log = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, log[-3000:]
            run = tmp_path / name.split("/")[0]
            assert name.split("/")[0] in (run / "out" / "summary.md").read_text()
            res = json.loads((run / "out" / name / "custom" / "results.json").read_text())
            assert res["n-samples"]["mpmoe_docs_mc"]["effective"] == 4
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # the script and the evaluations it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_export_hf_of_megatron_lm_checkpoints_matches_mpmoes_forward(runs, embedded_cache, tmp_path, monkeypatch):
    """`mpmoe export hf` of the patched tree's MoPE checkpoint (remote code, Sigma) and of
    the stock tree's top-k one (qwen2_moe): the folders' logits equal mpmoe's forward of the
    checkpoint (fp32) on random ids and on real text."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import json
    from pathlib import Path

    from export_testing import hf_logits, real_text_ids, set_hf_home
    from mpmoe import store
    from mpmoe.data import prepare_embedded
    from mpmoe.export.hf import export_hf
    from mpmoe.megatron import destroy_distributed, init_distributed

    for key in ("HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    set_hf_home(tmp_path / "hf-home")
    tok = Path(prepare_embedded(embedded_cache, progress=False).tokenizer_dir)
    ids = torch.cat([torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0)),
                     real_text_ids(tok)])
    init_distributed(seed=1)
    try:
        for name, model_type in (("mope/iter_0000004", "mpmoe"), ("base-topk/iter_0000002", "qwen2_moe")):
            path = runs["root"] / name
            folder = export_hf(path, tmp_path / name.replace("/", "-"), tokenizer=tok)
            conf = json.loads((folder / "config.json").read_text())
            assert conf["model_type"] == model_type and conf["mlp_only_layers"] == [0]
            ref = store.load_model(path, tokenizer=tok, dtype="fp32").forward(ids).float()
            got = hf_logits(folder, ids, trust_remote_code=model_type == "mpmoe")
            assert ref.abs().max() > 1.0 and (got - ref).abs().max().item() <= 1e-4, name
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------- on a GPU
GPU_FLAGS = [f for f in CPU_FLAGS if f not in ("--distributed-backend", "gloo", "--use-cpu-initialization")]


@pytest.mark.cuda
def test_pretrain_gpt_trains_saves_and_resumes_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tree = assemble_trees(tmp_path)["patched"]
    flags = preset_flags("tiny-cpu", "mope", train_iters=ITERS, mock_data=True) + GPU_FLAGS + MOPE
    env = tree_env(tree, None, MASTER_PORT=_free_port())
    for extra in (["--save", str(tmp_path / "a")],
                  ["--load", str(tmp_path / "a"), "--ckpt-step", "2", "--save", str(tmp_path / "b")]):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                               "--master-port", env["MASTER_PORT"], "pretrain_gpt.py", *flags, *extra],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "load_balancing_loss" in proc.stdout and ": otep " in proc.stdout
    a = _tensors(load_dist_checkpoint(tmp_path / "a" / "iter_0000004"))
    b = _tensors(load_dist_checkpoint(tmp_path / "b" / "iter_0000004"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.cuda
def test_flame_moe_38m_mope_vs_topk_step_on_gpu(tmp_path):
    """The gpu_check.sh step: flame-moe-38m, 20 iterations each, bf16 (figures in the JSON)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_megatron_lm.py"), "--preset",
                           "flame-moe-38m", "--iters", "20", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    import json

    doc = json.loads(out.read_text())
    assert doc["runs"]["mope"]["iterations"] == doc["runs"]["moe"]["iterations"] == 20
    assert doc["runs"]["mope"]["otep_layers_at_end"] > 0 and doc["runs"]["moe"]["otep_layers_at_end"] == 0
    assert doc["ratio_mope_over_topk"] > 0
