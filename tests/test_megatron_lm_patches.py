"""The Megatron-LM patch series (patches/megatron-lm/core_r0.19.0) on a stock tree.

The tree is assembled in a temporary git repository from the installed megatron-core
wheel's ``megatron/`` (0.19.2 ships ``megatron.training`` identical to Megatron-LM's
``core_r0.19.0``) and the pristine top-level scripts in
``../shared/upstream/megatron-lm-core_r0.19.0/``. Needs the Python 3.12 +
megatron-core 0.19 environment; skipped elsewhere.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lm_testing import CPU_FLAGS, SERIES, assemble_trees, git, skip_reason, tree_env
from mpmoe.megatron_lm.flags import preset_flags

PROBE = Path(__file__).with_name("megatron_lm_probe.py")

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """``{"base": unpatched tree, "patched": tree with the series applied by git am}``."""
    return assemble_trees(tmp_path_factory.mktemp("megatron-lm"))


def _tiny_flags(router, tmp_path, **extra):
    flags = preset_flags("tiny-cpu", router, train_iters=4, mock_data=True) + CPU_FLAGS
    flags += ["--micro-batch-size", "2", "--global-batch-size", "2", "--seed", "1234"]
    for key, value in extra.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def _env(tree, site=None):
    return tree_env(tree, site)


def _probe(tree, flags, tmp_path, name):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(PROBE), str(out), *flags], cwd=tree, env=_env(tree),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_series_is_small_and_applies_in_order(trees):
    assert [p.name[:4] for p in SERIES] == [f"{i:04d}" for i in range(1, len(SERIES) + 1)]
    log = git(trees["patched"], "log", "--format=%s", f"-{len(SERIES)}").splitlines()
    assert len(log) == len(SERIES)
    stat = git(trees["patched"], "diff", "--numstat", "HEAD~%d" % len(SERIES))
    files = {line.split("\t")[2] for line in stat.splitlines()}
    assert files == {"pretrain_gpt.py", "megatron/training/arguments.py",
                     "megatron/training/argument_utils.py", "megatron/training/training.py"}
    added = sum(int(line.split("\t")[0]) for line in stat.splitlines())
    assert added < 40, f"the series adds {added} lines: logic belongs in mpmoe/megatron_lm/"


def test_mope_command_line_builds_mope_routers_and_runs_the_hooks(trees, tmp_path):
    stats = tmp_path / "stats"
    flags = _tiny_flags("mope", tmp_path, moe_otep_warmup_fraction=0.25, moe_sigma_update_every=3,
                        moe_stats_dir=stats, moe_plot_every=2)
    got = _probe(trees["patched"], flags, tmp_path, "mope")
    assert got["config_class"] == "MoPEConfig"
    assert got["config"] == {
        "moe_router_load_balancing_type": "otep", "moe_otep_warmup_fraction": 0.25,
        "moe_sigma_update_every": 3, "moe_stats_dir": str(stats), "moe_plot_every": 2,
        "moe_dynamic_mask_mode": None, "moe_dynamic_mask_seed": 1234,
        "num_moe_experts": 8, "moe_router_topk": 2,
    }
    assert got["spec"] == ["mpmoe.megatron_lm.spec", "gpt_block_spec"]  # set by check_args
    # tiny-cpu: dense first layer, then MoE layers, each with a MoPE router on the model's config
    assert [layer["router"] for layer in got["layers"]] == [None, "MoPERouter", "MoPERouter", "MoPERouter"]
    assert all(layer["router_config_is_model_config"] for layer in got["layers"][1:])
    # the hooks: warm-up clock set, a statistics window written, aux loss tracked
    assert got["routers"] == [["MoPERouter", 0, 4]] * 3
    assert got["stats_files"] == [f"layer{n}_seg0_mope.npz" for n in (2, 3, 4)]
    assert got["track_names"] == ["load_balancing_loss"]


def test_topk_run_of_a_patched_tree_is_the_unpatched_run(trees, tmp_path):
    flags = _tiny_flags("moe", tmp_path)
    patched = _probe(trees["patched"], flags, tmp_path, "patched")
    base = _probe(trees["base"], flags, tmp_path, "base")
    assert patched["config_class"] == base["config_class"] == "TransformerConfig"
    assert patched["spec"] is None and base["spec"] is None
    assert patched["layers"] == base["layers"]
    assert [layer["router"] for layer in base["layers"]] == [None, "TopKRouter", "TopKRouter", "TopKRouter"]
    assert patched["parameters"] == base["parameters"]
    added = set(patched["args"]) - set(base["args"])
    assert all(name.startswith("moe_") for name in added)  # mpmoe's flags, at their defaults
    assert {k: v for k, v in patched["args"].items() if k not in added} == base["args"]
    assert patched["track_names"] == []
    assert patched["routers"] == [] and patched["stats_files"] == []


def test_invalid_mope_flags_are_one_line_errors(trees, tmp_path):
    flags = _tiny_flags("mope", tmp_path, moe_otep_warmup_fraction=2)
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "x.json"), *flags],
                          cwd=trees["patched"], env=_env(trees["patched"]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "error: argument --moe-otep-warmup-fraction: must be in [0, 1], got 2.0" in proc.stderr
    assert "Traceback" not in proc.stderr


# Run in a patched tree with mpmoe made unimportable (as if it were not installed).
_WITHOUT_MPMOE = """
import sys
sys.modules["mpmoe"] = None  # import mpmoe -> ModuleNotFoundError
import pretrain_gpt
from megatron.training import training, argument_utils
from megatron.training.arguments import parse_and_validate_args
assert pretrain_gpt.mpmoe_megatron_lm is None and training.mpmoe_hooks is None
args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
config = argument_utils.core_transformer_config_from_args(args)
print("CONFIG", type(config).__name__, args.spec)
"""


def test_a_patched_tree_without_mpmoe_runs_topk_and_refuses_otep_in_one_line(trees, tmp_path):
    """Top-k needs no mpmoe (the patches' imports are optional); otep says what is missing."""
    def run(*extra):  # (mpmoe's own flags do not exist without it: otep alone)
        flags = preset_flags("tiny-cpu", "moe", train_iters=4, mock_data=True) + CPU_FLAGS + list(extra)
        return subprocess.run([sys.executable, "-c", _WITHOUT_MPMOE, *flags], cwd=trees["patched"],
                              env=_env(trees["patched"]), capture_output=True, text=True, timeout=600)

    topk = run()
    assert topk.returncode == 0, topk.stderr[-3000:]
    assert "CONFIG TransformerConfig None" in topk.stdout
    mope = run("--moe-router-load-balancing-type", "otep")
    assert mope.returncode != 0
    last = mope.stderr.strip().splitlines()[-1]
    assert last == "error: --moe-router-load-balancing-type otep (MoPE) needs mpmoe: pip install mpmoe"
    assert "Traceback" not in mope.stderr
