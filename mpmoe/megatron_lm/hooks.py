"""The calls a patched ``megatron.training`` makes into mpmoe.

Each is a no-op for a run without mpmoe's routers (no MoPE, statistics or masks), so a
top-k run of a patched tree does what an unpatched one does.

* :func:`transformer_config_class` - ``core_transformer_config_from_args``: the config
  class (:class:`MoPEConfig` when the run uses mpmoe's routers).
* :func:`before_train_step` / :func:`after_train_step` - around ``train_step`` in
  ``train()``: the MoPE warm-up clock and the routing-statistics windows.
* :func:`before_save_checkpoint` / :func:`before_evaluate` - ``save_checkpoint_and_time``
  and ``evaluate``: fold every rank's pending Sigma counts in first (collective).
* :func:`moe_track_names` - ``training_log``: MoPE's aux loss is megatron's
  ``load_balancing_loss``, which megatron tracks only for types containing "aux_loss".
"""

from __future__ import annotations

import weakref
from typing import Optional

from mpmoe.megatron import routers
from mpmoe.megatron.config import MoPEConfig
from mpmoe.megatron.router import iter_routers, set_training_progress, sync_routing_state
from mpmoe.megatron_lm.args import uses_mpmoe

__all__ = [
    "after_train_step",
    "before_evaluate",
    "before_save_checkpoint",
    "before_train_step",
    "moe_track_names",
    "transformer_config_class",
]

# Per model (its first chunk): the routers found, and the statistics tracker if any.
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def transformer_config_class(args) -> Optional[type]:
    """:class:`MoPEConfig` for runs that use mpmoe's routers, else None (megatron's choice)."""
    return MoPEConfig if uses_mpmoe(args) else None


def _state(model) -> dict:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    key = chunks[0]
    state = _STATE.get(key)
    if state is None:
        found = list(iter_routers(chunks))
        tracker = None
        if found and getattr(found[0].config, "moe_stats_dir", None) is not None:
            from mpmoe.megatron.stats import RoutingStatsTracker

            tracker = RoutingStatsTracker(chunks)
        state = _STATE[key] = {"chunks": chunks, "routers": bool(found), "tracker": tracker}
    return state


def before_train_step(model, iteration: int, train_iters: Optional[int]) -> None:
    """Tell the routers how many optimizer steps are done (MoPE's top-k warm-up)."""
    state = _state(model)
    if state["routers"]:
        set_training_progress(state["chunks"], iteration, train_iters)


def after_train_step(model, iteration: int) -> None:
    """``iteration`` steps done: ReMoE's coefficient update (collective; a no-op without
    ReMoE layers), and close a routing-statistics window when one ends."""
    state = _state(model)
    if state["routers"]:
        from mpmoe.megatron.remoe import update_balancing_state

        update_balancing_state(state["chunks"])
    tracker = state["tracker"]
    if tracker is not None:
        tracker.on_optimizer_step(iteration)


def before_save_checkpoint(model) -> None:
    """Sync routing state so that the checkpoint holds every rank's counts."""
    state = _state(model)
    if state["routers"]:
        sync_routing_state(state["chunks"])


def before_evaluate(model) -> None:
    """Sync routing state so that evaluation routes with the current Sigma."""
    before_save_checkpoint(model)


def moe_track_names(args) -> list:
    """Extra MoE metrics for ``training_log``: MoPE's aux loss (``load_balancing_loss``)."""
    if getattr(args, "num_experts", None) is not None and routers.kind_of(args) == "mope":
        return ["load_balancing_loss"]
    return []
