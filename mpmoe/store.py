"""The model store: rebuild a model from a run's checkpoint, write a model-only checkpoint,
sample calibration tokens from the run's own data, and score held-out tokens.

Every tool that reads or writes a trained model goes through this module (``mpmoe eval``,
``mpmoe analyze checkpoint``, export / import, expert surgery), so a checkpoint written by
one of them is read by all the others. See docs/checkpoints.md for the on-disk format.

::

    from mpmoe.megatron import init_distributed
    from mpmoe import store

    init_distributed()                                   # one process (TP = EP = PP = 1)
    m = store.load_model("runs/x/ckpt")                  # LoadedModel: model, tokenizer, args, ...
    logits = m.forward(tokens)                           # [B, S, vocab], padded vocabulary cut
    calib = store.calibration_tokens(m, num_tokens=32768)          # [N, S] from the train split
    print(store.heldout_loss(m, num_tokens=8192)["loss"])          # valid split, mean token NLL
    args = copy.copy(m.args); args.num_experts = 4                  # describe the NEW model
    store.save_model("runs/x-merged", new_model, args=args, tokenizer_dir=m.tokenizer_dir,
                     extra_files={"surgery.json": {...}})

:func:`load_model` rebuilds the model only through :mod:`mpmoe.run`, the code the trainer
builds with (``args_from_saved`` -> ``build_model`` -> ``load_checkpoint``), with tensor, pipeline and
expert parallelism 1: every process holds the whole model (a checkpoint written with expert
parallelism loads into it).

What describes the model:

* checkpoints written by ``mpmoe train`` (or by :func:`save_model`) store the run's flags
  (``train_state["args"]``) and its vocabulary (``train_state["data"]``), and the save
  folder holds the run's tokenizer (``tokenizer/``): nothing else is needed;
* older or foreign checkpoints: pass the ``mpmoe train`` flags that built the model as
  ``model_flags`` (e.g. ``["--preset", "tiny-cpu"]``), and a tokenizer where the model has
  none (a ``--data-path`` run without ``--tokenizer-model`` has none: ``tokenizer`` is None).

Routing modes (``routing``):

* ``"auto"``: as trained (MoPE layers route with OTEP and the checkpoint's Sigma; ReMoE
  with its ReLU gates, reported as ``"remoe"``);
* ``"mope"``: the same, but an error for a checkpoint not trained with MoPE (no Sigma);
* ``"topk"``: plain top-k by router probability in every MoE layer, MoPE layers included
  (their Sigma is loaded and ignored); an error for ReMoE (no top-k rule).

:func:`save_model` is single-process only (TP = EP = PP = 1: the model a :func:`load_model`
holds); errors a user can cause are :class:`StoreError` (one line).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from mpmoe.errors import UserError, folder_problem

__all__ = ["StoreError", "LoadedModel", "load_model", "save_model", "calibration_tokens",
           "heldout_loss", "ROUTING_MODES", "DTYPES", "SPLITS"]

ROUTING_MODES = ("auto", "mope", "topk")
DTYPES = ("auto", "fp32", "bf16", "checkpoint")
SPLITS = ("train", "valid", "test")

# Options that only concern training or this process's parallel layout: reset when loading.
_LAYOUT = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
    recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
    recompute_modules=None, moe_stats_dir=None, load=None, save=None,
)
# ... and for the model built here only (it runs in eval mode): no dropout; the alltoall token
# dispatcher (one process, EP 1: the dispatcher moves no tokens between ranks, so the result is
# the same; flex needs CUDA and DeepEP, and routes exactly k experts, which a dynamic mask breaks).
_BUILD_ONLY = dict(hidden_dropout=0.0, attention_dropout=0.0, moe_token_dispatcher_type="alltoall")


class StoreError(UserError, ValueError):
    """A checkpoint, flag or data problem when loading / saving a model (one line)."""


@dataclasses.dataclass
class LoadedModel:
    """A loaded checkpoint: the model, its tokenizer and what was loaded."""

    model: torch.nn.Module          # megatron GPTModel (eval mode)
    module: torch.nn.Module         # what runs forward: the model, or Float16Module(model) for bf16
    tokenizer: object               # tokenizers.Tokenizer, or None (a model without a tokenizer)
    eod_id: int
    vocab_size: int                 # the tokenizer's vocabulary (logits beyond it are padding)
    max_length: int                 # the model's context (its training sequence length)
    checkpoint: Path                # the iteration folder loaded
    iteration: int
    routing: str                    # "mope", "topk" or "remoe": what the MoE layers do now
    trained_routing: str            # "mope", "topk", "remoe" or "dense"
    dtype: torch.dtype
    device: torch.device
    args: argparse.Namespace        # the trainer flags the model was built from (layout: 1 process)
    tokenizer_dir: Optional[Path] = None  # the tokenizer folder used (None: no tokenizer)
    root: Optional[Path] = None     # the save folder (parent of ``checkpoint``)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, *, lengths: Optional[torch.Tensor] = None,
                inference_context=None, position_offset: int = 0) -> torch.Tensor:
        """Logits ``[B, S, vocab_size]`` (in the model's dtype) for token ids ``[B, S]``.

        ``lengths``: valid tokens per row of a right-padded batch; padding positions are
        excluded from MoE routing (megatron's ``padding_mask``) and their logits are
        meaningless. ``inference_context``: a megatron ``StaticInferenceContext`` (KV
        cache); then only the last position's logits come back (``[B, 1, vocab]``) and
        ``position_offset`` is the position of ``tokens[:, 0]``.
        """
        tokens = tokens.to(self.device)
        b, s = tokens.shape
        positions = torch.arange(position_offset, position_offset + s, device=self.device)
        positions = positions.unsqueeze(0).expand(b, s)
        kwargs = {}
        if lengths is not None and inference_context is None:
            pad = torch.arange(s, device=self.device).unsqueeze(0) >= lengths.to(self.device).unsqueeze(1)
            if bool(pad.any()):
                kwargs["padding_mask"] = pad
        if inference_context is not None:
            kwargs.update(inference_context=inference_context, runtime_gather_output=True)
        logits = self.module(tokens, positions, None, **kwargs)
        # not cast to float32 here: at batch 32 x 2048 tokens x 50k vocabulary that copy alone
        # would take 13 GB; callers upcast the rows they read
        return logits[..., : self.vocab_size]


# --------------------------------------------------------------------------- load
def _flags_namespace(saved: Optional[dict], model_flags: Optional[Sequence[str]]) -> argparse.Namespace:
    from mpmoe.run.args import ConfigError, args_from_saved

    try:
        return args_from_saved(saved, model_flags)
    except ConfigError as exc:
        raise StoreError(f"model flags: {exc}") from None
    except SystemExit:
        raise StoreError(f"model flags: cannot parse {' '.join(model_flags or [])!r} "
                         "(see `mpmoe train --help`)") from None


def _find_tokenizer(tokenizer, root: Path, it_dir: Path, args) -> Optional[Path]:
    from mpmoe.run.checkpoint import TOKENIZER_DIR

    if tokenizer is not None:
        return Path(tokenizer)
    for candidate in (root / TOKENIZER_DIR, it_dir / TOKENIZER_DIR):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    if getattr(args, "tokenizer_model", None):
        return Path(args.tokenizer_model)
    if not args.data_path:  # the embedded corpus: its tokenizer is rebuilt deterministically
        from mpmoe.data import prepare_embedded

        return Path(prepare_embedded(args.embedded_cache_dir, progress=False).tokenizer_dir)
    return None  # a --data-path run with a bare --vocab-size: no tokenizer


def trained_routing(args) -> str:
    """``"dense"`` or the router kind a run's flags train (:mod:`mpmoe.megatron.routers`)."""
    from mpmoe.megatron import routers

    return routers.kind_of(args, dense="dense")


def _resolve_device(device, dtype: str) -> tuple[str, str]:
    cuda = torch.cuda.is_available()
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is None:
        device = "cuda" if cuda else "cpu"
    device = str(device)
    if device.startswith("cuda:") and device[5:].isdigit():
        device = "cuda"  # each process uses the GPU of its LOCAL_RANK (init_distributed)
    if device not in ("cpu", "cuda"):
        raise StoreError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda:
        raise StoreError("device 'cuda' asked for, but torch sees no CUDA device")
    if device == "cpu" and cuda:
        raise StoreError("device 'cpu' on a machine with CUDA: megatron builds on the GPU there; "
                         "hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return device, dtype  # "checkpoint" is resolved once the flags are read


def load_model(
    load,
    *,
    routing: str = "auto",
    model_flags: Optional[Sequence[str]] = None,
    tokenizer=None,
    dtype: str = "fp32",
    device: Optional[str] = None,
    step: Optional[int] = None,
    routing_dump_dir: Optional[str] = None,
    routing_ablation: Optional[dict] = None,
) -> LoadedModel:
    """Load a checkpoint for inference (needs :func:`mpmoe.megatron.init_distributed`).

    Args:
        load: a save folder (its latest iteration, or ``step``) or an ``iter_XXXXXXX`` folder.
        routing: ``"auto"`` | ``"mope"`` | ``"topk"`` (module docstring).
        model_flags: ``mpmoe train`` flags describing the model, for checkpoints that do not
            record them (they replace the recorded ones otherwise).
        tokenizer: a tokenizer folder / ``tokenizer.json`` overriding the checkpoint's (it
            must be the one the model was trained with).
        dtype: ``"fp32"`` (default), ``"bf16"``, ``"auto"`` (bf16 on CUDA, fp32 on CPU) or
            ``"checkpoint"``: the dtype the run trained its weights in (its ``--bf16``), so
            no converted copy of the weights is made (export reads the weights this way).
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available). The model is built
            where megatron builds it (CUDA when available); ``"cpu"`` on a CUDA machine is
            refused rather than silently ignored.
        routing_dump_dir: write each forward's routing (experts and weights per token) there.
        routing_ablation: static knock-out / dynamic mask options (``mpmoe.megatron.settings``
            dests, e.g. ``{"moe_mask_experts": "2:3"}``); the training run's own are not
            carried over.

    Raises :class:`StoreError` (one line) for a missing or damaged checkpoint, flags that
    do not describe it, a tokenizer that does not match, a routing mode it cannot use.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from mpmoe.data import load_tokenizer
    from mpmoe.data.errors import DataError
    from mpmoe.megatron.router import MoPERouter, iter_routers
    from mpmoe.megatron import settings
    from mpmoe.run.megatron_lm import OPT_IN
    from mpmoe.run.checkpoint import TOKENIZER_DIR, load_checkpoint, resolve_checkpoint, saved_run_info
    from mpmoe.run.model import build_model, padded_vocab_size

    if routing not in ROUTING_MODES:
        raise StoreError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {routing!r}")
    device, dtype = _resolve_device(device, dtype)
    try:
        root, it_dir, iteration = resolve_checkpoint(load, step)
        info = saved_run_info(it_dir)
    except CheckpointingException as exc:
        raise StoreError(str(exc)) from None
    megatron_lm = None
    if not info.get("args"):  # a Megatron-LM pretrain_gpt.py checkpoint? (its args, mapped)
        from mpmoe.run.megatron_lm import run_info

        try:
            megatron_lm = run_info(it_dir)
        except ValueError as exc:
            raise StoreError(f"{it_dir}: {exc}") from None
        if megatron_lm is not None:
            info = megatron_lm
    args = _flags_namespace(info.get("args"), model_flags)
    for key, value in _LAYOUT.items():
        setattr(args, key, value)
    args.bf16 = bool(getattr(args, "bf16", False)) if dtype == "checkpoint" else dtype == "bf16"
    trained = trained_routing(args)
    if routing == "mope" and trained != "mope":
        raise StoreError(f"{it_dir} was trained with {trained} routing: it has no Sigma to route "
                         f"with; use --routing {'auto' if trained == 'remoe' else 'topk (or auto)'}")
    if routing == "topk" and trained == "remoe":
        raise StoreError(f"{it_dir} was trained with ReMoE (ReLU) routing, which has no top-k rule; "
                         "use --routing auto")
    if trained == "mope" and routing != "topk":  # a bad MPMOE_OTEP_BACKEND: now, not at the first forward
        from mpmoe.run.args import ConfigError, check_otep_backend

        try:
            check_otep_backend(args)
        except ConfigError as exc:
            raise StoreError(str(exc)) from None

    data = info.get("data") or {}
    if megatron_lm is not None:  # Megatron-LM saves no tokenizer: --tokenizer, or its local folder
        tok_path = Path(tokenizer) if tokenizer is not None else megatron_lm["tokenizer"]
        if tok_path is None and megatron_lm["tokenizer_type"] != "NullTokenizer":
            raise StoreError(f"{it_dir}: a Megatron-LM checkpoint ({megatron_lm['tokenizer_type']}) "
                             "holds no tokenizer; pass --tokenizer (a folder with tokenizer.json)")
        if tok_path is not None:
            data.pop("eod_id", None)  # the tokenizer's own
    else:
        tok_path = _find_tokenizer(tokenizer, root, it_dir, args)
    tok_info = None
    if tok_path is not None:
        try:
            tok_info = load_tokenizer(tok_path)
        except DataError as exc:
            raise StoreError(f"tokenizer: {exc}") from None
    vocab = data.get("vocab_size", tok_info.vocab_size if tok_info is not None else args.vocab_size)
    if vocab is None:
        raise StoreError(f"{root}: neither the checkpoint nor its flags give the vocabulary size; "
                         "pass a tokenizer or --vocab-size in the model flags")
    vocab = int(vocab)
    if tok_info is not None and tok_info.vocab_size != vocab:  # a different tokenizer
        raise StoreError(f"tokenizer {tok_path} has {tok_info.vocab_size} tokens, the model was "
                         f"trained with {vocab}{' (--tokenizer)' if tokenizer is not None else ''}")
    recorded_sha = data.get("tokenizer_sha256")  # the checkpoint's own record (lone iter_ folders too)
    if tok_info is not None and recorded_sha and recorded_sha != tok_info.sha256:
        raise StoreError(f"tokenizer {tok_path} (sha256 {tok_info.sha256[:12]}) is not the one {it_dir} was "
                         f"trained with (sha256 {str(recorded_sha)[:12]})"
                         f"{' (--tokenizer)' if tokenizer is not None else ''}")
    own = root / TOKENIZER_DIR
    if tokenizer is not None and (own / "tokenizer.json").is_file():
        try:
            same = load_tokenizer(own).sha256 == tok_info.sha256
        except DataError:
            same = True  # the checkpoint's copy is unreadable: the user's choice stands
        if not same:
            raise StoreError(f"--tokenizer {tokenizer} differs from the tokenizer the model was trained "
                             f"with ({own}); leave --tokenizer out to use that one")
    padded = int(data.get("padded_vocab") or padded_vocab_size(vocab, args.make_vocab_size_divisible_by))

    try:
        resolved = settings.evaluation_values(routing_ablation, None if trained == "dense" else trained,
                                              num_experts=args.num_experts, topk=args.moe_router_topk,
                                              moe_layers=settings.moe_layer_numbers(
                                                  args.num_layers, getattr(args, "moe_layer_freq", 1),
                                                  args.num_experts))
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    if trained == "remoe" and resolved.get("moe_dynamic_mask_mode"):
        raise StoreError(f"--moe-dynamic-mask drops one of the k experts a top-k router picked; {it_dir} "
                         "routes with ReMoE (ReLU gates, no k): leave the dynamic mask out")
    if resolved.get("moe_expert_group_routing") == "fold-select" and not getattr(args, "moe_expert_groups", None):
        raise StoreError(f"--moe-expert-group-routing fold-select routes over merged experts; {it_dir} has none "
                         "(a checkpoint written by `mpmoe experts merge --layout collapsed`)")
    for key, value in resolved.items():
        setattr(args, key, value)
    if routing_dump_dir is not None:
        args.moe_eval_dump_dir = str(routing_dump_dir)
    build_args = copy.copy(args)
    for key, value in _BUILD_ONLY.items():
        setattr(build_args, key, value)
    try:
        _, model, module = build_model(build_args, padded, initialize=False)  # every tensor is loaded below
    except ValueError as exc:  # megatron's / mpmoe's config checks: the flags describe no model
        raise StoreError(f"model flags: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    try:
        if megatron_lm is not None:
            from mpmoe.run.megatron_lm import load_weights

            load_weights(it_dir, model, info.get("args"), vars(build_args))
        else:
            load_checkpoint(root, model, None, None, load_optim=False, load_rng=False, iteration=iteration,
                            run_args=vars(build_args), opt_in=OPT_IN)
    except Exception as exc:  # noqa: BLE001 - one line for a model/checkpoint mismatch
        from mpmoe.run.checkpoint import ModelMismatch

        if isinstance(exc, ModelMismatch):  # names the changed flags already
            raise StoreError(str(exc)) from None
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{it_dir}: cannot load into the model its flags describe "
                         f"({type(exc).__name__}: {msg[:300]})") from None
    now = "topk" if routing == "topk" or trained == "topk" else trained
    for router in iter_routers(model):
        if isinstance(router, MoPERouter):
            router.config.moe_otep_inference_topk = now == "topk"
        if routing_dump_dir is not None:
            router.config.moe_eval_dump_dir = str(routing_dump_dir)
    module.eval()
    eod = data.get("eod_id", tok_info.eod_id if tok_info is not None else 0)
    return LoadedModel(
        model=model, module=module, tokenizer=tok_info.build() if tok_info is not None else None,
        eod_id=int(eod), vocab_size=vocab, max_length=int(args.seq_length), checkpoint=it_dir,
        iteration=iteration, routing=now, trained_routing=trained,
        dtype=torch.bfloat16 if args.bf16 else torch.float32, device=torch.device(device), args=args,
        tokenizer_dir=_tokenizer_folder(tok_path), root=root,
    )


def _tokenizer_folder(path: Optional[Path]) -> Optional[Path]:
    if path is None:
        return None
    path = Path(path)
    return path.parent if path.is_file() else path


# --------------------------------------------------------------------------- save
_RESERVED = ("tokenizer",)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _check_out(out: Path) -> Path:
    """``out``'s parent folder (created if missing), or a one-line error before any work."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not empty: choose a new folder "
                         "(nothing is overwritten)")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{out}: cannot create its parent folder ({exc.strerror or exc})") from None
    problem = folder_problem(parent)
    if problem:
        raise StoreError(f"{out}: its parent folder {problem}")
    return parent


def _encode_extra(name: str, value) -> bytes:
    if not name or "/" in name or os.sep in name or name in (".", "..") or name.startswith("iter_") \
            or name.startswith("latest_") or name in _RESERVED:
        raise StoreError(f"extra file name {name!r}: a plain file name that is not iter_*, latest_* "
                         f"or {', '.join(_RESERVED)}")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        try:
            return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise StoreError(f"extra file {name}: not JSON-serialisable ({exc})") from None
    raise StoreError(f"extra file {name}: bytes, str or a JSON dict/list, got {type(value).__name__}")


def _write_extra(folder: Path, files: dict) -> None:
    for name, blob in files.items():
        (folder / name).write_bytes(blob)


def save_model(
    out,
    loaded_or_model,
    *,
    args: argparse.Namespace,
    tokenizer_dir=None,
    iteration: int = 0,
    extra_files: Optional[dict] = None,
    extra_state: Optional[dict] = None,
) -> Path:
    """Write a model-only checkpoint to ``out`` (a new folder); returns ``out``.

    The folder is what ``mpmoe train --save`` writes (``latest_checkpointed_iteration.txt``,
    ``iter_XXXXXXX/`` as a megatron dist checkpoint, ``tokenizer/``), without optimizer,
    scheduler or RNG state: ``mpmoe eval``, ``mpmoe analyze checkpoint``, :func:`load_model`
    and ``mpmoe train --load OUT --no-load-optim`` read it.

    Args:
        loaded_or_model: a :class:`LoadedModel` or a megatron ``GPTModel`` (or its
            ``Float16Module``) on this process, built with TP = EP = PP = 1.
        args: the ``mpmoe train`` flags that describe the model being saved (e.g. a
            :class:`LoadedModel`'s ``args`` with ``num_experts`` changed); recorded as
            ``mpmoe train`` records its flags, so readers rebuild the model from them.
        tokenizer_dir: the tokenizer folder to copy to ``out/tokenizer`` (default: the
            :class:`LoadedModel`'s).
        iteration: the iteration number written (0: training continued from it starts at 0).
        extra_files: ``{name: bytes | str | dict/list (written as JSON)}`` written beside the
            checkpoint (e.g. ``surgery.json``, ``provenance.json``).
        extra_state: JSON-serialisable values added to the checkpoint's ``train_state``.

    Atomic: everything is written to a temporary folder next to ``out`` and renamed at the
    end; an existing non-empty ``out`` or an unwritable parent is a :class:`StoreError`
    before any work, and a failure leaves nothing behind. Needs
    :func:`mpmoe.megatron.init_distributed` (one process).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mpmoe.megatron.router import iter_routers, sync_routing_state
    from mpmoe.run.checkpoint import TRACKER, iteration_dir, save_tokenizer
    from mpmoe.run.model import padded_vocab_size

    out = Path(out)
    parent = _check_out(out)
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise StoreError(f"iteration must be an integer >= 0, got {iteration!r}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise StoreError("save_model writes from one process (TP = EP = PP = 1); "
                         f"this run has {dist.get_world_size()}")
    if not dist.is_initialized():
        raise StoreError("save_model needs mpmoe.megatron.init_distributed() first")
    files = {name: _encode_extra(name, value) for name, value in (extra_files or {}).items()}
    extra_state = dict(extra_state or {})
    if not _jsonable(extra_state):
        raise StoreError("extra_state must be JSON-serialisable")
    loaded = loaded_or_model if isinstance(loaded_or_model, LoadedModel) else None
    model = loaded.model if loaded is not None else loaded_or_model
    model = getattr(model, "module", model) if type(model).__name__ == "Float16Module" else model
    if tokenizer_dir is None and loaded is not None:
        tokenizer_dir = loaded.tokenizer_dir
    vocab, eod = _vocabulary(loaded, tokenizer_dir, args)
    padded = int(model.embedding.word_embeddings.weight.shape[0]) if hasattr(model, "embedding") \
        else padded_vocab_size(vocab, args.make_vocab_size_divisible_by)
    recorded = {k: v for k, v in vars(args).items() if _jsonable(v)}
    for key, value in _LAYOUT.items():  # the layout this checkpoint was written with
        recorded[key] = value
    run_info = {
        "args": recorded,
        "data": {"source": "data-path" if getattr(args, "data_path", None) else "embedded",
                 "vocab_size": vocab, "padded_vocab": padded, "eod_id": eod,
                 "tokenizer_sha256": _tokenizer_sha256(loaded, tokenizer_dir)},
    }

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        sync_routing_state(model)  # fold pending Sigma counts, as the trainer does before a save
        state = {
            "model": model.sharded_state_dict(),
            "train_state": {
                **extra_state,
                **run_info,
                "iteration": iteration,
                "consumed_samples": 0,
                "router_counters": {str(r.layer_number): int(getattr(r, "_counted_forwards", 0))
                                    for r in iter_routers(model)},
                "world_size": 1,
                "model_only": True,
            },
        }
        it_dir = iteration_dir(tmp, iteration)
        it_dir.mkdir()
        dist_checkpointing.save(state, str(it_dir))
        (tmp / TRACKER).write_text(f"{iteration}\n")
        if tokenizer_dir is not None:
            save_tokenizer(tmp, tokenizer_dir)
        _write_extra(tmp, files)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint is shared like any folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tokenizer_sha256(loaded: Optional[LoadedModel], tokenizer_dir) -> Optional[str]:
    """The identity of the tokenizer a saved model goes with (recorded in the checkpoint)."""
    if tokenizer_dir is not None:
        from mpmoe.data import load_tokenizer
        from mpmoe.data.errors import DataError

        try:
            return load_tokenizer(tokenizer_dir).sha256
        except DataError:
            return None
    return None


def _vocabulary(loaded: Optional[LoadedModel], tokenizer_dir, args) -> tuple[int, int]:
    if loaded is not None:
        return int(loaded.vocab_size), int(loaded.eod_id)
    if tokenizer_dir is not None:
        from mpmoe.data import load_tokenizer
        from mpmoe.data.errors import DataError

        try:
            info = load_tokenizer(tokenizer_dir)
        except DataError as exc:
            raise StoreError(f"tokenizer: {exc}") from None
        return int(info.vocab_size), int(info.eod_id)
    if getattr(args, "vocab_size", None):
        return int(args.vocab_size), 0
    raise StoreError("save_model: give a tokenizer_dir (or --vocab-size in args) for a bare model")


# --------------------------------------------------------------------------- data
def _windows(loaded: LoadedModel, num_seqs: int, split: str, seed: int, seq_length: Optional[int],
             data_path=None, tokenizer=None) -> torch.Tensor:
    """``[num_seqs, seq_length + 1]`` token windows of ``split`` of the run's data (megatron's
    GPTDataset, shuffled with ``seed``): inputs are ``[:, :-1]``, next-token labels ``[:, 1:]``."""
    import numpy as np

    from mpmoe.data.errors import DataError
    from mpmoe.run.data import build_datasets, resolve_data

    if split not in SPLITS:
        raise StoreError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num_seqs < 1:
        raise StoreError(f"num_tokens must be >= 1, got {num_seqs}")
    args = copy.copy(loaded.args)
    if data_path is not None:
        args.data_path = [str(data_path)] if isinstance(data_path, (str, os.PathLike)) else [str(p) for p in data_path]
    if tokenizer is not None:
        args.tokenizer_model = str(tokenizer)
    if seq_length is not None:
        if seq_length < 1:
            raise StoreError(f"seq_length must be >= 1, got {seq_length}")
        args.seq_length = int(seq_length)
    where = ("--data-path " + " ".join(args.data_path)) if args.data_path else "the embedded corpus"
    try:
        spec = resolve_data(args)
    except (DataError, OSError) as exc:
        raise StoreError(f"the run's data ({where}) cannot be read: {exc}; if it moved, pass "
                         "--data-path (data_path=) and, if needed, --tokenizer") from None
    if spec.vocab_size != loaded.vocab_size:
        raise StoreError(f"the data's vocabulary ({spec.vocab_size} tokens, {where}) is not the "
                         f"model's ({loaded.vocab_size}); pass the run's own --data-path / --tokenizer")
    args.train_iters, args.global_batch_size = num_seqs, 1
    args.eval_iters, args.eval_interval = num_seqs, 10**9
    try:
        datasets = build_datasets(spec, args, seed=seed)
    except Exception as exc:  # noqa: BLE001 - megatron's dataset builder: one line
        raise StoreError(f"the run's data ({where}): cannot build its splits "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    ds = datasets[SPLITS.index(split)]
    if ds is None or len(ds) == 0:
        raise StoreError(f"the run's data ({where}) has no {split} split (--split "
                         f"{getattr(args, 'split', None)}); choose another split or --data-path")
    rows = []
    for i in range(num_seqs):
        s = ds[i % len(ds)]
        tok = np.asarray(s["tokens"]).astype(np.int64)
        lab = np.asarray(s["labels"]).astype(np.int64)
        rows.append(np.concatenate([tok, lab[-1:]]))
    return torch.from_numpy(np.stack(rows))


def calibration_tokens(loaded: LoadedModel, *, num_tokens: int, split: str = "train", seed: int = 0,
                       seq_length: Optional[int] = None, data_path=None, tokenizer=None) -> torch.Tensor:
    """``[ceil(num_tokens / seq_length), seq_length]`` token ids (LongTensor, CPU) from the run's
    own data as its flags record it (the embedded corpus, or ``--data-path``), taken from
    ``split`` ("train" | "valid" | "test") of megatron's GPTDataset split, shuffled with
    ``seed`` (the same seed gives the same tokens).

    ``seq_length``: default the model's. ``data_path`` / ``tokenizer``: override the recorded
    ones for a run whose data moved. A missing data file is a :class:`StoreError` naming the
    flag to pass.
    """
    seq = int(seq_length or loaded.args.seq_length)
    seqs = max(1, math.ceil(int(num_tokens) / seq)) if num_tokens and num_tokens > 0 else 0
    return _windows(loaded, seqs, split, seed, seq, data_path, tokenizer)[:, :-1].contiguous()


@torch.no_grad()
def heldout_loss(loaded: LoadedModel, *, split: str = "valid", num_tokens: int = 8192,
                 batch_size: int = 8, tokens: Optional[torch.Tensor] = None, seed: int = 0,
                 data_path=None, tokenizer=None) -> dict:
    """Mean next-token negative log-likelihood (nats) of held-out tokens.

    ``tokens`` (``[N, L]`` ids; each row scored as next-token prediction, L - 1 predictions)
    or, by default, ``ceil(num_tokens / seq_length)`` windows of ``split`` sampled as
    :func:`calibration_tokens` does (``seq_length`` predictions each). The loss uses the
    logits of the real vocabulary (megatron's padding rows cut off), computed in float32.
    Returns ``{"loss", "tokens" (predictions scored), "sequences", "split"}``.
    """
    if batch_size < 1:
        raise StoreError(f"batch_size must be >= 1, got {batch_size}")
    if tokens is None:
        seq = int(loaded.args.seq_length)
        windows = _windows(loaded, max(1, math.ceil(int(num_tokens) / seq)), split, seed, seq,
                           data_path, tokenizer)
        what = split
    else:
        windows = torch.as_tensor(tokens).long()
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise StoreError(f"tokens must be [N, L] with L >= 2, got shape {tuple(windows.shape)}")
        if int(windows.min()) < 0 or int(windows.max()) >= loaded.vocab_size:
            raise StoreError(f"tokens must be ids in [0, {loaded.vocab_size})")
        what = "given"
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size]
        logits = loaded.forward(chunk[:, :-1]).float()
        labels = chunk[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                reduction="sum")
        total += float(nll.double())
        count += int(labels.numel())
    return {"loss": total / count, "tokens": count, "sequences": int(windows.shape[0]), "split": what}
