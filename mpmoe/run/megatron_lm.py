"""Reading checkpoints written by Megatron-LM's ``pretrain_gpt.py`` (patched or stock).

Megatron-LM 0.19 (``--ckpt-format torch_dist``, the default) writes no ``common.pt``: the
common state (``args``, ``iteration``, ...) is stored inside the ``.distcp`` files and
megatron's ``dist_checkpointing.load_common_state_dict`` reads it. :func:`run_info` turns
its ``args`` into the record :func:`mpmoe.run.args.args_from_saved` takes (the run's
``mpmoe train`` options) through an explicit table, and :func:`load_weights` loads the
model's tensors; :func:`mpmoe.store.load_model` calls both for such a checkpoint.

The table (:data:`RENAMED`, :data:`MPMOE_ONLY`, :data:`NOT_READ`, and every other
``mpmoe train`` option under its own name: Megatron-LM's names are mpmoe's) is tested
against Megatron-LM's parser. A Megatron-LM setting that shapes the model and has no
``mpmoe train`` counterpart (:data:`UNSUPPORTED`) must be at its default, else a one-line
error names it.

Tokenizer: Megatron-LM saves none. ``HuggingFaceTokenizer`` with a local
``--tokenizer-model`` folder is used from there; ``NullTokenizer`` (``--mock-data``) has
no text tokenizer (the vocabulary size comes from the args); anything else needs
``--tokenizer``.

A stock Megatron-LM top-k model (its local / Transformer Engine layer spec) names the
pre-MLP norm of MoE layers ``mlp.linear_fc1.layer_norm_weight``; mpmoe's spec names it
``pre_mlp_layernorm.weight``: :func:`load_weights` reads either.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from mpmoe.megatron import routers as _routers
from mpmoe.megatron import settings as _settings

__all__ = ["MPMOE_ONLY", "NOT_READ", "OPT_IN", "RENAMED", "UNSUPPORTED", "load_weights", "model_keys",
           "run_info", "train_record"]

#: ``mpmoe train`` option -> Megatron-LM argument of another name.
RENAMED = {"norm_epsilon": "layernorm_epsilon"}

#: ``mpmoe train`` options a Megatron-LM run may not record: mpmoe's own routing settings
#: (every setting of :data:`mpmoe.megatron.settings.SETTINGS` that is not one of Megatron-LM's
#: flags; the patch set adds them, a stock tree has none) and the router marks Megatron-LM
#: lacks: absent means the run did not use the feature, so mpmoe's default is what ran.
MPMOE_ONLY = (frozenset(s.name for s in _settings.SETTINGS if not s.megatron)
              | frozenset(_routers.MARKS) - _routers.MEGATRON_MARKS)

#: ``mpmoe train`` options that do not describe the model (this process, logging, data
#: location, training control, eval-time ablations): never read from a checkpoint. The
#: routing ones: ``--router`` (the marks say it), the run options of the settings table
#: (``config=False``), the names older runs recorded, and the dynamic mask's statistics source.
NOT_READ = frozenset({
    "preset", "moe_dynamic_mask_source",
    "lr_wsd_decay_fraction", "embedded_cache_dir", "no_save_on_signal", "on_nan", "run_dir",
    "no_tensorboard", "progress", "save", "load", "data_path", "split", "tokenizer_model",
    "distributed_backend", "use_distributed_optimizer", "no_load_optim", "no_load_rng", "allow_model_change",
}) | {"router"} | {s.name for s in _settings.SETTINGS if not s.config} | frozenset(_settings.LEGACY)

#: Megatron-LM arguments that shape the model but have no ``mpmoe train`` option: the value
#: mpmoe's model builder implies (a checkpoint with another value cannot be rebuilt).
UNSUPPORTED = {
    "multi_latent_attention": False, "heterogeneous_layers_config_path": None,
    "mtp_num_layers": None, "experimental_attention_variant": None, "hybrid_layer_pattern": None,
    "hybrid_override_pattern": None, "is_hybrid_model": False, "moe_shared_expert_gate": False,
    "moe_latent_size": None, "attention_output_gate": False, "softmax_type": "vanilla",
    "window_size": None, "moe_use_upcycling": False, "moe_router_num_groups": None,
    "moe_router_group_topk": None, "yaml_cfg": None, "linear_attention_freq": None,
    "add_qkv_bias": False, "apply_residual_connection_post_layernorm": False,
    "layernorm_zero_centered_gamma": False, "rotary_interleaved": False, "qk_l2_norm": False,
    "fp32_residual_connection": False, "use_rope_scaling": False,
}


def _train_defaults() -> dict:
    from mpmoe.run.args import parse_args

    return vars(parse_args(["--train-iters", "1"], check=False))


def train_record(margs, defaults: Optional[dict] = None) -> dict:
    """The ``mpmoe train`` options (``args_from_saved``'s record) of Megatron-LM's saved
    ``args``. ``ValueError`` (one line) naming a setting that cannot be mapped."""
    margs = vars(margs) if not isinstance(margs, dict) else margs
    defaults = _train_defaults() if defaults is None else defaults
    wrong = [f"--{k.replace('_', '-')} {margs[k]!r}" for k, v in UNSUPPORTED.items()
             if k in margs and margs[k] not in (v, None if v is False else v)]
    lbt = margs.get("moe_router_load_balancing_type")
    if isinstance(lbt, (list, tuple)):
        if len(lbt) != 1:
            wrong.append(f"--moe-router-load-balancing-type {' '.join(lbt)} (one type per model)")
        lbt = lbt[0] if lbt else None
    if wrong:
        raise ValueError(f"Megatron-LM setting(s) {', '.join(wrong)} have no mpmoe counterpart: "
                         "mpmoe cannot rebuild this model")
    out, missing = {}, []
    for dest in defaults:
        if dest in NOT_READ:
            continue
        src = RENAMED.get(dest, dest)
        if src in margs:
            out[dest] = margs[src]
        elif dest not in MPMOE_ONLY:
            missing.append(dest)
    if missing:
        raise ValueError("the checkpoint's Megatron-LM args lack " + ", ".join(
            "--" + m.replace("_", "-") for m in missing) + " (not a Megatron-LM 0.19 run?)")
    out["moe_router_load_balancing_type"] = lbt
    if not margs.get("group_query_attention"):  # Megatron-LM fills in the head count; mpmoe: None
        out["num_query_groups"] = None
    try:  # mpmoe's --router: the kind the recorded marks select
        out["router"] = _routers.kind_of({**{k: v for k, v in defaults.items() if k in _routers.MARKS}, **out})
    except ValueError as exc:
        raise ValueError(f"the checkpoint's routing flags: {exc}") from None
    for key in ("moe_aux_loss_coeff",):  # nargs='+' in Megatron-LM: one value per model here
        v = out.get(key)
        if isinstance(v, (list, tuple)):
            if len(set(v)) > 1:
                raise ValueError(f"--{key.replace('_', '-')} {v} (one per load-balancing type) has no "
                                 "mpmoe counterpart")
            out[key] = v[0] if v else defaults[key]
    return out


def read_common(it_dir) -> dict:
    """The common state of a ``torch_dist`` checkpoint folder (no tensors loaded)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(it_dir))


def run_info(it_dir, common: Optional[dict] = None) -> Optional[dict]:
    """For a Megatron-LM checkpoint: ``{"args": mpmoe train record, "data": {vocab_size,
    padded_vocab, eod_id?}, "tokenizer": local folder or None, "tokenizer_type": ...}``;
    None for any other checkpoint. ``ValueError`` (one line) for a setting mpmoe cannot map."""
    common = read_common(it_dir) if common is None else common
    margs = common.get("args")
    if "train_state" in common or margs is None or not hasattr(margs, "padded_vocab_size"):
        return None
    record = train_record(margs)
    vocab = getattr(margs, "vocab_size", None)
    tok_type = getattr(margs, "tokenizer_type", None)
    tok_dir = None
    if tok_type == "HuggingFaceTokenizer" and getattr(margs, "tokenizer_model", None):
        candidate = Path(margs.tokenizer_model)
        if (candidate / "tokenizer.json").is_file():
            tok_dir = candidate
    data = {"padded_vocab": int(margs.padded_vocab_size)}
    if tok_type == "NullTokenizer" and vocab is not None:
        data["vocab_size"] = int(vocab)
        eod = getattr(margs, "null_tokenizer_eod_id", None)  # megatron's NullTokenizer: else the last id
        data["eod_id"] = int(eod) if eod is not None else int(vocab) - 1
    record["vocab_size"] = vocab
    return {"args": record, "data": data, "tokenizer": tok_dir, "tokenizer_type": tok_type,
            "iteration": common.get("iteration")}


_STOCK_NORM = re.compile(r"^(.*decoder\.layers\.\d+\.)pre_mlp_layernorm\.(weight|bias)$")
#: a Megatron-LM checkpoint's entries that are no model state (besides optimizer, RNG and
#: common state, which mpmoe's checkpoints have too): the rerun state machine's, Transformer
#: Engine's per-module metadata
_NOT_MODEL = re.compile(r"^rerun_state|_extra_state")

#: what ``mpmoe eval`` / ``analyze`` / export say when a checkpoint holds another model
OPT_IN = "the model flags must describe it"


def _stock_name(key: str) -> Optional[str]:
    m = _STOCK_NORM.match(key)
    return f"{m[1]}mlp.linear_fc1.layer_norm_{m[2]}" if m else None


def model_keys(it_dir, model) -> tuple[dict, dict]:
    """``({tensor: global shape}`` of the checkpoint's model state, the same of ``model})``,
    the checkpoint's stock-spec names read as mpmoe's (what :func:`load_weights` loads)."""
    from mpmoe.run.checkpoint import _model_keys_of, _model_keys_of_checkpoint

    saved = {k: v for k, v in _model_keys_of_checkpoint(it_dir).items() if not _NOT_MODEL.search(k)}
    wanted = {k: v for k, v in _model_keys_of(model).items() if not _NOT_MODEL.search(k)}
    for key in wanted:
        stock = _stock_name(key)
        if key not in saved and stock in saved:
            saved[key] = saved.pop(stock)
    return saved, wanted


def load_weights(it_dir, model, saved_args: Optional[dict] = None, run_args: Optional[dict] = None) -> None:
    """Load a Megatron-LM checkpoint's model tensors into ``model`` (strict: every tensor
    of the model must be there, and every tensor of the checkpoint must be the model's:
    :func:`mpmoe.run.checkpoint.check_model_matches` refuses, in one line naming the
    flags that differ between ``saved_args`` (the run's, :func:`train_record`) and
    ``run_args`` (the model's), a checkpoint whose state the model would drop or lack).
    Raises megatron's / torch's errors for a mismatch they find."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    from mpmoe.run.checkpoint import _fresh_sigma_keys, check_model_matches

    check_model_matches(it_dir, model, saved_args, run_args, opt_in=OPT_IN, keys=model_keys(it_dir, model))
    saved = set(FileSystemReader(str(it_dir)).read_metadata().state_dict_metadata)
    sharded = model.sharded_state_dict()
    for value in sharded.values():
        if isinstance(value, ShardedTensor) and value.key not in saved:
            stock = _stock_name(value.key)
            if stock in saved:
                value.key = stock  # stock-spec naming
    fresh = _fresh_sigma_keys(it_dir, sharded)  # a top-k run read as MoPE: Sigma from the identity
    for key in fresh:
        del sharded[key]
    if fresh:
        print(f"mpmoe: {it_dir} holds no routing statistics (a top-k run): they start fresh (MoPE's "
              "Sigma from the identity)", file=sys.stderr, flush=True)
    state = dist_checkpointing.load({"model": sharded}, str(it_dir))
    if fresh:
        own = model.state_dict()
        state["model"].update({k: own[k] for k in fresh})
    model.load_state_dict(state["model"], strict=True)
