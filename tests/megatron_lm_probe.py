"""Run inside a patched Megatron-LM tree (cwd, first on sys.path) by tests/test_megatron_lm_patches.py.

    python megatron_lm_probe.py OUT.json [pretrain_gpt.py flags...]

Parses the flags as ``pretrain_gpt.py`` does (with the patched tree's argument provider
and check; an unpatched tree has none), builds the model through Megatron-LM's
``GPTModelConfig`` builder on CPU (gloo, one process, mpmoe's CPU compatibility enabled
here, not by the patch) and writes what it found as JSON. In a patched tree it then runs
one training forward/backward between the hooks the patched training loop calls.
"""

import json
import os
import sys

import torch

from mpmoe.megatron import cpu_compat, init_distributed

cpu_compat.enable()

import pretrain_gpt  # noqa: E402  (the patched module; its __main__ block does not run)
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.training.argument_utils import gpt_config_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

out_path = sys.argv.pop(1)
patched = hasattr(pretrain_gpt, "mpmoe_megatron_lm")
args = parse_and_validate_args(
    extra_args_provider=pretrain_gpt.mpmoe_megatron_lm.args_provider(None) if patched else None,
    args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
)
if patched:
    pretrain_gpt.mpmoe_megatron_lm.check_args(args)
model_cfg = gpt_config_from_args(args)
cfg = model_cfg.transformer
init_distributed(expert_model_parallel_size=args.expert_model_parallel_size, backend="gloo", seed=args.seed)
model = model_cfg.get_builder_cls()(model_cfg).build_model(
    pg_collection=ProcessGroupCollection.use_mpu_process_groups()
)
layers = []
for layer in model.decoder.layers:
    router = getattr(layer.mlp, "router", None)
    layers.append({
        "mlp": type(layer.mlp).__name__,
        "router": type(router).__name__ if router is not None else None,
        "router_config_is_model_config": router is not None and router.config is cfg,
    })
fields = ["moe_router_load_balancing_type", "moe_otep_warmup_fraction", "moe_sigma_update_every",
          "moe_stats_dir", "moe_plot_every", "moe_dynamic_mask_mode", "moe_dynamic_mask_seed",
          "num_moe_experts", "moe_router_topk"]
result = {
    "config_class": type(cfg).__name__,
    "config": {k: getattr(cfg, k, None) for k in fields},
    "spec": args.spec,
    "layers": layers,
    "args": {k: repr(v) for k, v in sorted(vars(args).items())},
    "parameters": {n: list(p.shape) for n, p in model.named_parameters()},
}
if patched:
    from mpmoe.megatron.router import iter_routers
    from mpmoe.megatron_lm import hooks

    chunks = [model]
    hooks.before_train_step(chunks, 0, args.train_iters)
    if any(True for _ in iter_routers(chunks)):  # (megatron's own attention needs CUDA)
        torch.manual_seed(0)
        tokens = torch.randint(0, args.padded_vocab_size, (args.micro_batch_size, args.seq_length))
        positions = torch.arange(args.seq_length).expand_as(tokens)
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    hooks.after_train_step(chunks, 1)
    hooks.before_evaluate(chunks)
    hooks.after_train_step(chunks, args.moe_plot_every)
    hooks.before_save_checkpoint(chunks)
    stats_dir = args.moe_stats_dir
    result["routers"] = [[type(r).__name__, r._step, r._total_steps] for r in iter_routers(chunks)]
    result["stats_files"] = sorted(os.listdir(stats_dir)) if stats_dir and os.path.isdir(stats_dir) else []
    result["track_names"] = hooks.moe_track_names(args)
with open(out_path, "w") as f:
    json.dump(result, f)
