"""The calls a patched ``megatron.training`` makes into mpmoe.

Each is a no-op for a run without mpmoe's routers (no MoPE, ReMoE, statistics or masks),
so a top-k run of a patched tree does what an unpatched one does. Importing this module
imports neither torch nor megatron nor the rest of mpmoe (``megatron/training/training.py``
imports it at module level, for every script of the patched tree); each hook imports what
it needs when a run with mpmoe's routers first calls it.

* :func:`transformer_config_class` - ``core_transformer_config_from_args`` (every entry
  point that builds a model from Megatron-LM's arguments): the config class
  (:class:`MoPEConfig` when the run uses mpmoe's routers), and mpmoe's ``--spec`` for
  such a run, so no script builds megatron's ``TopKRouter`` for ``otep``.
* :func:`before_train_step` / :func:`after_train_step` - around ``train_step`` in
  ``train()``: the MoPE warm-up clock, ReMoE's L1 coefficient update, the
  routing-statistics windows and, every ``--log-interval`` iterations, one line of
  per-layer routing metrics (also to TensorBoard / W&B when Megatron-LM has a writer).
* :func:`before_save_checkpoint` / :func:`before_evaluate` - ``save_checkpoint_and_time``
  and ``evaluate``: fold every rank's pending Sigma counts in first (collective).
* :func:`moe_track_names` - ``training_log``: MoPE's aux loss is megatron's
  ``load_balancing_loss``, which megatron tracks only for types containing "aux_loss".
"""

from __future__ import annotations

import weakref
from typing import Optional

__all__ = [
    "after_train_step",
    "before_evaluate",
    "before_save_checkpoint",
    "before_train_step",
    "moe_track_names",
    "routing_metrics",
    "transformer_config_class",
]

# Per model (its first chunk): the routers found, the statistics tracker and load monitor.
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def transformer_config_class(args) -> Optional[type]:
    """:class:`MoPEConfig` for runs that use mpmoe's routers, else None (megatron's choice).

    Such a run without ``--spec`` gets mpmoe's (:data:`mpmoe.megatron_lm.args.SPEC`):
    ``pretrain_gpt.py`` sets it in ``check_args``; any other script of the patched tree
    (text generation, converters, ``--use-checkpoint-args``) gets it here, before its
    model builder reads ``args.spec``. A ``--spec`` outside mpmoe would build megatron's
    routers for mpmoe's settings: a one-line error (exit 2).
    """
    from mpmoe.megatron_lm.args import SPEC, fail, uses_mpmoe

    if not uses_mpmoe(args):
        return None
    spec = getattr(args, "spec", None)
    if spec is None:
        args.spec = list(SPEC)
    elif not str(spec[0]).startswith("mpmoe."):
        fail(f"--spec {' '.join(map(str, spec))} builds megatron's routers, not mpmoe's "
             f"(MoPE, ReMoE, statistics, masks): leave --spec out or give --spec {' '.join(SPEC)}")
    from mpmoe.megatron.config import MoPEConfig

    return MoPEConfig


def _state(model) -> dict:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    key = chunks[0]
    state = _STATE.get(key)
    if state is None:
        from mpmoe.megatron.router import iter_routers

        routers = list(iter_routers(chunks))
        tracker = load = None
        if routers and getattr(routers[0].config, "moe_stats_dir", None) is not None:
            from mpmoe.megatron.stats import RoutingStatsTracker

            tracker = RoutingStatsTracker(chunks)
        if routers:
            load = _LoadMonitor(routers)
        state = _STATE[key] = {"chunks": chunks, "routers": bool(routers), "tracker": tracker,
                               "load": load, "logged": None}
    return state


def before_train_step(model, iteration: int, train_iters: Optional[int]) -> None:
    """Tell the routers how many optimizer steps are done (MoPE's top-k warm-up)."""
    state = _state(model)
    if state["routers"]:
        from mpmoe.megatron.router import set_training_progress

        set_training_progress(state["chunks"], iteration, train_iters)


def after_train_step(model, iteration: int) -> None:
    """``iteration`` steps done: ReMoE's coefficient update, the routing-statistics window
    when one ends, and the routing metrics on ``--log-interval`` iterations."""
    state = _state(model)
    if not state["routers"]:
        return
    from mpmoe.megatron.remoe import update_balancing_state

    update_balancing_state(state["chunks"])  # collective; no-op without ReMoE layers
    if state["tracker"] is not None:
        state["tracker"].on_optimizer_step(iteration)
    interval = _arg("log_interval")
    if interval and iteration % interval == 0:
        _log_metrics(state, iteration)


def _arg(name):
    try:
        from megatron.training.global_vars import get_args

        return getattr(get_args(), name, None)
    except (ImportError, AssertionError):  # hooks called outside Megatron-LM (tests)
        return None


def routing_metrics(model) -> dict:
    """Per-layer routing metrics since the last call (collective over the token group):
    ``moe/load_{max_over_mean,min,std}/layer_L``, ``moe/experts_per_token/layer_L``,
    MoPE's ``mope/otep/layer_L`` (1 once the warm-up is over) and Sigma summary
    (``mope/sigma_{diag_mean,offdiag_abs_mean,max_corr}/layer_L``), ReMoE's
    ``remoe/{l1_coeff,sparsity,experts_per_token}/layer_L`` and the expert bias's
    ``moe/expert_bias_absmax/layer_L`` (the names ``mpmoe train`` logs)."""
    state = _state(model)
    return _collect(state) if state["routers"] else {}


class _LoadMonitor:
    """Routed (token, expert) pairs per expert and tokens per MoE layer, counted by forward
    hooks on the routers in training forwards only (not evaluation, not recomputation)."""

    def __init__(self, routers):
        self.routers = routers
        self.counts = {}
        for r in routers:
            r.register_forward_hook(self._hook)

    def _hook(self, router, inputs, output):
        import torch

        from mpmoe.megatron.router import is_counted_forward

        if not is_counted_forward(router):
            return
        rmap = output[1].reshape(-1, output[1].shape[-1])
        c = torch.cat([rmap.sum(dim=0, dtype=torch.float32), rmap.new_full((1,), rmap.shape[0], dtype=torch.float32)])
        key = router.layer_number
        self.counts[key] = self.counts[key] + c if key in self.counts else c

    def collect(self) -> dict:
        """{layer: (pairs per expert, tokens)} summed over the token group; then reset."""
        import torch
        import torch.distributed as dist

        out = {}
        for r in self.routers:
            c = self.counts.get(r.layer_number)
            c = torch.zeros(r.num_experts + 1, device=r.weight.device) if c is None else c.clone()
            if r.token_group is not None and dist.get_world_size(r.token_group) > 1:
                dist.all_reduce(c, group=r.token_group)
            out[r.layer_number] = (c[:-1], float(c[-1]))
        self.counts = {}
        return out


def _collect(state) -> dict:
    from mpmoe.megatron.remoe import balancing_scalars
    from mpmoe.megatron.router import MoPERouter, iter_routers
    from mpmoe.routing.cooccurrence import sigma_summary

    out = {}
    for layer, (c, tokens) in state["load"].collect().items():
        mean = c.mean().clamp_min(1e-9)
        out[f"moe/load_max_over_mean/layer_{layer}"] = float(c.max() / mean)
        out[f"moe/load_min/layer_{layer}"] = float(c.min())
        out[f"moe/load_std/layer_{layer}"] = float(c.std(unbiased=False))
        if tokens:
            out[f"moe/experts_per_token/layer_{layer}"] = float(c.sum()) / tokens
    for router in iter_routers(state["chunks"]):
        if isinstance(router, MoPERouter):
            layer = router.layer_number
            out[f"mope/otep/layer_{layer}"] = float(router.otep_active())
            for k, v in sigma_summary(router.current_sigma()).items():
                out[f"mope/{k}/layer_{layer}"] = v
    out.update(balancing_scalars(state["chunks"]))
    return out


def _log_metrics(state, iteration: int) -> None:
    metrics = _collect(state)
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        writers = [w for w in (get_tensorboard_writer(), get_wandb_writer()) if w is not None]
    except ImportError:
        writers = []
    for writer in writers:
        if hasattr(writer, "add_scalar"):
            for k, v in metrics.items():
                writer.add_scalar(k, v, iteration)
        else:
            writer.log(metrics, iteration)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != dist.get_world_size() - 1:
        return  # Megatron-LM logs on the last rank
    layers = sorted({int(k.rsplit("_", 1)[1]) for k in metrics})
    parts = []
    for layer in layers:
        get = lambda name: metrics.get(f"{name}/layer_{layer}")  # noqa: E731
        words = [f"layer {layer}:"]
        if get("mope/otep") is not None:
            words.append("otep" if get("mope/otep") else "top-k warm-up")
        for label, name, fmt in (("experts/token", "moe/experts_per_token", "{:.3f}"),
                                 ("load max/mean", "moe/load_max_over_mean", "{:.3f}"),
                                 ("sigma offdiag", "mope/sigma_offdiag_abs_mean", "{:.4e}"),
                                 ("sigma max corr", "mope/sigma_max_corr", "{:.4f}"),
                                 ("sparsity", "remoe/sparsity", "{:.4f}"),
                                 ("l1 coeff", "remoe/l1_coeff", "{:.4e}"),
                                 ("bias absmax", "moe/expert_bias_absmax", "{:.4e}")):
            if get(name) is not None:
                words.append(f"{label} {fmt.format(get(name))}")
        parts.append(" ".join(words))
    print(f" mpmoe routing | iteration {iteration:8d} | " + " | ".join(parts), flush=True)


def before_save_checkpoint(model) -> None:
    """Sync routing state so that the checkpoint holds every rank's counts."""
    state = _state(model)
    if state["routers"]:
        from mpmoe.megatron.router import sync_routing_state

        sync_routing_state(state["chunks"])


def before_evaluate(model) -> None:
    """Sync routing state so that evaluation routes with the current Sigma."""
    before_save_checkpoint(model)


def moe_track_names(args) -> list:
    """Extra MoE metrics for ``training_log``: MoPE's aux loss (``load_balancing_loss``)."""
    from mpmoe.megatron import routers

    if getattr(args, "num_experts", None) is not None and routers.kind_of(args) == "mope":
        return ["load_balancing_loss"]
    return []

