"""The routing settings, declared once: name, type and range, default, help, and the
router kinds each applies to.

Everything that shows a routing setting is generated from :data:`SETTINGS`:

* ``mpmoe train``'s and ``mpmoe eval``'s flags (:func:`add_arguments`),
* the Megatron-LM patch set's argument provider (``add_arguments(megatron_lm=True)``:
  mpmoe's own settings; Megatron-LM's parser already has the ``megatron=True`` ones under
  the same name and default),
* preset validation (a preset key is a flag; its value goes through the same type),
* :class:`~mpmoe.megatron.config.MoPEConfig`'s field validation and the run's recorded
  config (:func:`check`, :func:`config_kwargs`).

:func:`check` is the one validation path: each value through its type (ranges reject
inf/nan), then the settings that cannot apply to the chosen router kind
(:mod:`mpmoe.megatron.routers`), then the few rules across settings. It raises
``ValueError`` with one line naming the setting as a flag (``--moe-sigma-shrinkage``) or
as a config field, as the caller asks.

To add a routing setting: add a ``MoPEConfig`` field with its default and append a
:class:`Setting` to its section of :data:`SETTINGS` (``routers=`` the kinds it applies to,
``state=True`` if it changes which tensors the model has). Nothing else declares it. This module imports neither torch nor megatron; it builds on :mod:`mpmoe.megatron.routers`.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Optional

from mpmoe.megatron import routers
from mpmoe.megatron.routers import ConfigError

__all__ = ["BY_NAME", "SETTINGS", "ConfigError", "Setting", "Range", "Choice", "Flag", "Path", "LayerList",
           "ExpertMask", "add_arguments", "applies", "check", "config_kwargs", "parse_layer_list"]


# --------------------------------------------------------------------------- value types
class Range:
    """A number in a range; the argparse ``type=`` and the check every other source uses
    (preset, config, a checkpoint's record). Floats must be finite::

        Range(int, 1)                       # >= 1
        Range(float, 0, 1, hi_open=True)    # [0, 1)
    """

    def __init__(self, kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                 none: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.none = none  # None allowed (an optional number)
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def problem(self, value) -> Optional[str]:
        """None if ``value`` is a number of this kind in range, else what is wrong."""
        if value is None and self.none:
            return None
        wanted = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            what = "an integer" if self.kind is int else "a number"
            return f"must be {what}, got {type(value).__name__} {value!r}"
        if self.kind is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.lo is None and self.hi is None:
            return None
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.describe()}, got {value}" if low or high else None


    def normalize(self, value):
        problem = self.problem(value)
        if problem:
            raise ConfigError(problem)
        return value if value is None else self.kind(value)

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


class Flag:
    """A boolean (``--name`` / ``--no-name``)."""

    def normalize(self, value):
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}")
        return value


class Choice:
    """One of ``choices`` (or None where ``none``)."""

    def __init__(self, *choices: str, none: bool = False):
        self.choices, self.none = choices, none

    def normalize(self, value):
        if value is None or value == "":
            if self.none:
                return None
        elif value in self.choices:
            return value
        raise ConfigError(f"must be one of {', '.join(self.choices)}, got {value!r}")


class Path:
    """A non-empty path, or None."""

    def normalize(self, value):
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
            raise ConfigError(f"must be a non-empty path, got {value!r}")
        return os.fspath(value)


def parse_layer_list(value: Any, field: str) -> Optional[tuple]:
    """``None`` / ``""`` -> None (all layers); ``"2,5,9"`` or an iterable of ints -> sorted
    tuple. Layer numbers are megatron's (1-based, global over pipeline stages)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        if not text:
            return None
        try:
            value = [int(p) for p in text.replace(" ", ",").split(",") if p]
        except ValueError:
            raise ConfigError(f"{field}: expected comma-separated layer numbers, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{field}: expected a list of layer numbers, got {value!r}") from None
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ConfigError(f"{field}: layer numbers are 1-based ints, got {layer!r}")
    return tuple(sorted(set(items))) or None


class LayerList:
    """MoE layers (1-based): ``"2,5"``, a list, or None (every layer)."""

    def normalize(self, value):
        try:
            return parse_layer_list(value, "layers")
        except ValueError as exc:
            raise ConfigError(str(exc).split(": ", 1)[-1]) from None


class Spec:
    """A text spec checked by ``parser`` (kept as text), or None."""

    def __init__(self, parser: str):
        self.parser = parser  # "module:function", imported on use

    def normalize(self, value):
        if value is None or value == "":
            return None
        module, _, name = self.parser.partition(":")
        getattr(__import__(module, fromlist=[name]), name)(value)
        return value


class ExpertMask:
    """Static knock-out: ``"LAYER:ID,ID;LAYER:ID"``, JSON text or file, or a dict."""

    def normalize(self, value):
        from mpmoe.routing.masks import parse_expert_mask

        mask = parse_expert_mask(value)
        for layer in mask:
            if layer < 1:
                raise ConfigError(f"layer {layer} (layers are 1-based)")
        return mask or None


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Setting:
    """One routing setting (a ``MoPEConfig`` field unless ``config=False``)."""

    name: str
    type: Any                                 # Range / Flag / Choice / Path / LayerList / ExpertMask
    default: Any
    help: str
    routers: Optional[frozenset] = None       # router kinds it applies to; None: every kind
    needs: tuple = ()                         # (name, value) that must hold besides the router
    megatron: bool = False                    # Megatron-LM's own flag (its parser declares it)
    eval: bool = False                        # also an `mpmoe eval` flag
    train: bool = True                        # an `mpmoe train` flag (False: evaluation only)
    env: Optional[str] = None                 # the reference demo's environment variable
    aliases: tuple = ()                       # further option strings
    config: bool = True                       # a MoPEConfig field
    state: bool = False                       # its value changes which tensors the model has
    group: str = "routing"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _section(group: str, settings: tuple, **shared) -> tuple:
    """``settings`` under the heading ``group``, each with the keywords in ``shared``."""
    return tuple(replace(s, group=group, **shared) for s in settings)


_MOPE, _REMOE, _NOT_REMOE = frozenset({"mope"}), frozenset({"remoe"}), frozenset({"topk", "mope"})

SETTINGS: tuple = (
    *_section("MoPE", routers=_MOPE, settings=(
        Setting("moe_otep_warmup_fraction", Range(float, 0, 1), 0.01,
                "MoPE: fraction of the training iterations routed with plain top-k before OTEP"),
        Setting("moe_sigma_update_every", Range(int, 1), 1,
                "MoPE: rebuild the expert covariance Sigma every this many training forwards"),
        Setting("moe_otep_eps", Range(float, 0, lo_open=True), 1e-12,
                "MoPE: floor for Sigma's diagonal and the Schur complements"),
        Setting("moe_otep_inference_topk", Flag(), False, "MoPE: route with plain top-k outside training"),
        Setting("moe_sigma_shrinkage", Range(float, 0, 1, hi_open=True), 0.0,
                "MoPE Sigma prior: shrink toward mean(diag) * I by this weight in [0, 1) (bounds the "
                "pull of experts never routed yet; 0 = the reference)"),
        Setting("moe_sigma_decay_rate", Range(float, 0, 1, hi_open=True), 0.0,
                "MoPE: multiply the co-occurrence counts by (1 - rate) before each training forward's "
                "update (0 = cumulative counts)"),
    )),
    *_section("ReMoE", routers=_REMOE, settings=(
        Setting("moe_relu_l1_reg_coeff_init", Range(float, 0, lo_open=True), 1e-8, "ReMoE: initial L1 coefficient"),
        Setting("moe_relu_l1_reg_coeff_multiplier", Range(float, 1), 1.2,
                "ReMoE: the coefficient is multiplied/divided by this every iteration"),
    )),
    # Megatron-LM's routing flags that mpmoe's routers interpret (same names and defaults), and the bias mode
    *_section("balancing", settings=(
        Setting("moe_router_score_function", Choice("softmax", "sigmoid"), "softmax",
                "router scores (MoPE and ReMoE route on softmax)", routers=frozenset({"topk"}), megatron=True),
        Setting("moe_router_pre_softmax", Flag(), False,
                "softmax over all experts before the top-k (gate weights sum to the top-k probability "
                "mass; megatron's semantics). Off: softmax over the k chosen logits (weights sum to 1). "
                "MoPE after warm-up is unaffected", routers=_NOT_REMOE, megatron=True,
                needs=(("moe_router_score_function", "softmax"),)),
        Setting("moe_router_enable_expert_bias", Flag(), False,
                "aux-loss-free balancing: per-expert bias on the scores for selection only",
                routers=_NOT_REMOE, megatron=True, state=True),
        Setting("moe_router_expert_bias_mode", Choice("prob", "logit", "prob-scaled"), "prob",
                "expert bias with softmax scores: added to the probabilities (prob), to the logits "
                "(logit; MoPE: p = softmax(logits + b)), or to the probabilities times 4/E (prob-scaled: "
                "the rate scaled by E); docs/routing.md", routers=_NOT_REMOE,
                needs=(("moe_router_enable_expert_bias", True),)),
        Setting("moe_router_bias_update_rate", Range(float, 0), 1e-3,
                "expert bias step per iteration (sign of the load offset times this)",
                routers=_NOT_REMOE, needs=(("moe_router_enable_expert_bias", True),), megatron=True),
        Setting("moe_expert_capacity_factor", Range(float, 0, lo_open=True, none=True), None,
                "expert capacity (tokens over capacity are dropped); ReMoE has no fixed k per token",
                routers=_NOT_REMOE, megatron=True),
    )),
    *_section("statistics", settings=(
        Setting("moe_stats_dir", Path(), None, "write layer{L}_seg{S}_{moe|mope|remoe}.npz routing statistics here"),
        Setting("moe_plot_every", Range(int, 1), 200, "routing-statistics window (iterations) for --moe-stats-dir"),
        Setting("moe_stats_layers", LayerList(), None,
                "MoE layers (1-based, comma separated) whose statistics are tracked (default: all)"),
        Setting("moe_eval_dump_dir", Path(), None,
                "outside training, dump each token's routed experts and weights here (the demo's "
                "EACT_SAVE; `mpmoe eval --routing-dump-dir`)"),
    )),
    *_section("ablations", eval=True, settings=(  # also flags of `mpmoe eval`
        Setting("moe_mask_experts", ExpertMask(), None,
                'knock experts out: "LAYER:ID,ID;LAYER:ID" (e.g. "2:3,17;5:0"), JSON {"2": [3, 17]} or a '
                "JSON file; layers 1-based, expert ids global", env="MOE_MASK_EXPERTS"),
        Setting("moe_mask_experts_semantics", Choice("mpmoe", "reference"), "mpmoe",
                "MoPE and knocked-out experts: mpmoe = never picked; reference = the authors' code: OTEP "
                "may still pick them through Sigma, with gate weight 0, so the token runs on fewer than "
                "k experts (docs/reference.md)", needs=(("moe_mask_experts", "*"),)),
        Setting("moe_dynamic_mask_mode", Choice("cooccurrence", "random", none=True), None,
                "drop one routed expert per token (k -> k-1): the most co-occurring one, or a random one",
                routers=_NOT_REMOE, env="MOE_DYNAMIC_MASK_MODE", aliases=("--moe-dynamic-mask",)),
        Setting("moe_dynamic_mask_layers", LayerList(), None,
                "layers (1-based, comma/space separated) the dynamic mask applies to (default: every "
                "MoE layer)", env="MOE_DYNAMIC_MASK_LAYERS", needs=(("moe_dynamic_mask_mode", "*"),)),
        Setting("moe_cooccurrence_stats_dir", Path(), None,
                "statistics folder (a run's --moe-stats-dir) the cooccurrence mask reads",
                env="MOE_COOCCURRENCE_STATS_DIR", needs=(("moe_dynamic_mask_mode", "cooccurrence"),)),
        Setting("moe_dynamic_mask_seed", Range(int, 0), 1234, "seed of the random dynamic mask",
                env="MOE_DYNAMIC_MASK_SEED"),
        Setting("moe_dynamic_mask_source", Choice("mpmoe", "reference"), "mpmoe",
                "mpmoe: all windows summed, kept weights keep their total; reference: the latest window "
                "of top-k ('moe') files, kept weights renormalised to 1 (docs/reference.md)"),
    )),
    *_section("experts", settings=(  # expert surgery (mpmoe experts; docs/experts.md)
        Setting("moe_expert_groups", Spec("mpmoe.surgery.merge:parse_expert_groups"), None,
                "merged experts (written by `mpmoe experts merge`): per MoE layer, the group of each "
                "router expert (-1: dropped); the router selects over them, then folds into --num-experts "
                "experts (docs/experts.md)", state=True),
        Setting("moe_expert_group_routing", Choice("select-fold", "fold-select"), "select-fold",
                "merged experts (collapsed layout), at evaluation: select over the router's E experts, then "
                "sum each group's gates (select-fold: the merged model's function); or fold the router's "
                "probabilities into the groups, then select top-k (MoPE: OTEP with the groups' Sigma) over "
                "the groups (fold-select; docs/experts.md)", routers=_NOT_REMOE, eval=True, train=False),
        Setting("moe_expert_compression", Spec("mpmoe.surgery.compress:parse_compression"), None,
                "compressed experts (written by `mpmoe experts compress`): every expert weight is low rank "
                "RANK + KEEP of its residual rows (docs/experts.md)", state=True),
        Setting("moe_expert_ffn_sizes", Spec("mpmoe.surgery.split:parse_expert_sizes"), None,
                "experts of different sizes (written by `mpmoe experts split`): per MoE layer, one FFN size "
                "per expert, 'LAYER:S,S,...;LAYER:...' (1-based layers; docs/experts.md)", state=True),
        Setting("moe_router_unit_gates", Flag(), False,
                "HEMoE's gates: weight 1 for every routed expert, straight-through gradient of the softmax "
                "probability (any selection rule but ReMoE's)", routers=_NOT_REMOE),
        Setting("moe_size_aux_loss_coeff", Range(float, 0), 0.0,
                "HEMoE's balance loss: megatron's aux loss with each expert's term weighted by its share of "
                "the layer's FFN neurons (0: off)", routers=_NOT_REMOE),
    )),
    *_section("training", config=False, settings=(  # run options beside the routing (no config field)
        Setting("last_trainable_layers", Range(int, -1, none=True), None,
                "train only the last N transformer layers (+ final norm and output layer); -1 or unset: "
                "everything (the demo's flag)"),
        Setting("trainable_params", Choice("all", "routers"), "all",
                "routers: train only the MoE routers (HEMoE trains its gates with the experts frozen, "
                "e.g. after `mpmoe experts split`)"),
    )),
)

BY_NAME = {s.name: s for s in SETTINGS}


# --------------------------------------------------------------------------- flags
def add_arguments(parser, *, megatron_lm: bool = False, evaluation: bool = False) -> None:
    """Declare the settings as flags of ``parser``.

    ``mpmoe train``: every setting with ``train=True`` (booleans as ``--x/--no-x``).
    ``evaluation``: the settings with ``eval=True``. ``megatron_lm``: mpmoe's own training
    settings (``megatron=False``) the way Megatron-LM declares flags (booleans ``store_true``).
    """
    groups: dict = {}
    for s in SETTINGS:
        if (megatron_lm and (s.megatron or not s.config or not s.train)) or (evaluation and not s.eval) \
                or (not evaluation and not s.train):
            continue
        g = groups.get(s.group)
        if g is None:
            g = groups[s.group] = parser.add_argument_group(f"mpmoe {s.group}" if megatron_lm else s.group)
        kw: dict = dict(dest=s.name, default=s.default, help=s.help)
        if isinstance(s.type, Flag):
            kw["action"] = "store_true" if megatron_lm else argparse.BooleanOptionalAction
        elif isinstance(s.type, Choice):
            kw["choices"] = list(s.type.choices)
        elif isinstance(s.type, Range):
            kw["type"] = s.type
        g.add_argument(s.flag, *s.aliases, **kw)


# --------------------------------------------------------------------------- validation
def _need_holds(values: Mapping, name: str, wanted) -> bool:
    value = values.get(name, BY_NAME[name].default if name in BY_NAME else None)
    return value is not None if wanted == "*" else value == wanted


def applies(setting: Setting, kind: Optional[str], values: Mapping) -> Optional[str]:
    """None if ``setting`` applies to router ``kind`` with these ``values``, else why not."""
    if kind is None:  # a dense model: routing settings have nothing to act on
        return "the model has no experts" if setting.config else None
    if setting.routers is not None and kind not in setting.routers:
        names = " / ".join(k.label for k in routers.KINDS.values() if k.name in setting.routers)
        return f"it is a {names} setting, the router is {routers.KINDS[kind].label}"
    for name, wanted in setting.needs:
        if name != setting.name and not _need_holds(values, name, wanted):
            flag = BY_NAME[name].flag if name in BY_NAME else name
            return f"it needs {flag}" + ("" if wanted is True else " set" if wanted == "*" else f" {wanted}")
    return None


def moe_layer_numbers(num_layers, moe_layer_freq, num_experts) -> Optional[list]:
    """The 1-based numbers of the expert layers (Megatron's ``moe_layer_freq``: an int N,
    every N-th layer from the first, or a 0/1 list); ``[]`` for a dense model, None when unknown."""
    if num_experts is None:
        return []
    if num_layers is None:
        return None
    freq = 1 if moe_layer_freq is None else moe_layer_freq
    if isinstance(freq, str):
        text = freq.strip().strip("[]")
        try:
            freq = int(text) if "," not in text else [int(x) for x in text.split(",")]
        except ValueError:
            return None
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        return [i + 1 for i in range(num_layers) if i % freq == 0]
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        return [i + 1 for i, x in enumerate(freq) if int(x) == 1]
    return None


def _check_layers(name: str, spell: Callable, layers, moe_layers: Optional[list]) -> None:
    """A mask naming a layer that does not exist or has no experts would silently do nothing."""
    if moe_layers is None:
        return
    wrong = sorted(int(layer) for layer in layers if int(layer) not in moe_layers)
    if wrong:
        env = BY_NAME[name].env
        var = env if env and os.environ.get(env, "").strip() else None
        source = f"{spell(name)} (from {var})" if var else spell(name)
        raise ConfigError(f"{source}: layer(s) {','.join(map(str, wrong))} have no experts (expert layers: "
                          f"{','.join(map(str, moe_layers)) or 'none'}; 1-based); the mask would do nothing there")


def check(values: Mapping, kind: Optional[str], *, explicit: Optional[Iterable[str]] = None,
          flags: bool = False, num_experts: Optional[int] = None, topk: Optional[int] = None,
          moe_layers: Optional[list] = None, dispatcher: Optional[str] = None) -> dict:
    """Validate the routing settings in ``values`` for router ``kind`` (None: dense model).

    Returns ``{name: normalised value}`` for the settings present. A setting that does not
    apply to the router and differs from its default is an error when it is in ``explicit``
    (``None``: every value counts as explicit, the config's view); otherwise it is reset to
    its default in the result. ``flags``: name settings as flags in messages.
    ``dispatcher``: the run's ``moe_token_dispatcher_type`` (variable experts per token are
    supported by the allgather and alltoall dispatchers only). Raises ``ValueError`` (one line).
    """
    spell = (lambda name: BY_NAME[name].flag) if flags else (lambda name: name)
    out: dict = {}
    for s in SETTINGS:
        if s.name not in values:
            continue
        try:
            out[s.name] = s.type.normalize(values[s.name])
        except ValueError as exc:
            raise ConfigError(f"{spell(s.name)} {exc}") from None
    merged = {**values, **out}
    for s in SETTINGS:
        if s.name not in out or out[s.name] == s.default:
            continue
        why = applies(s, kind, merged)
        if why is None:
            continue
        if explicit is None or s.name in explicit:
            raise ConfigError(f"{spell(s.name)} does not apply: {why}")
        out[s.name] = s.default
    _check_across(out, spell, num_experts, topk, moe_layers)
    _check_dispatcher(out, kind, dispatcher, spell, flags)
    return out


#: token dispatchers that carry a variable number of experts per token
#: (:func:`mpmoe.megatron.compat.allow_variable_experts_per_token` patches alltoall)
VARIABLE_K_DISPATCHERS = ("allgather", "alltoall")


def _check_dispatcher(v: Mapping, kind: Optional[str], dispatcher: Optional[str], spell: Callable,
                      flags: bool) -> None:
    """ReMoE's ReLU gates, the dynamic mask (k -> k-1) and merged-expert groups route a
    variable number of experts per token; the flex dispatcher (DeepEP / HybridEP) takes
    each token's top ``moe_router_topk`` scores and would route k experts regardless."""
    if dispatcher is None or dispatcher in VARIABLE_K_DISPATCHERS:
        return
    if kind is not None and routers.KINDS[kind].variable_k:
        what = f"{kind} routing"
    elif v.get("moe_dynamic_mask_mode") is not None:
        what = f"{spell('moe_dynamic_mask_mode')} {v['moe_dynamic_mask_mode']}"
    elif v.get("moe_expert_groups"):
        what = f"{spell('moe_expert_groups')} (merged experts)"
    else:
        return
    name = "--moe-token-dispatcher-type " if flags else "moe_token_dispatcher_type="
    raise ConfigError(f"{what} routes a variable number of experts per token, which mpmoe supports with "
                      f"the {' and '.join(VARIABLE_K_DISPATCHERS)} token dispatchers only: {name}{dispatcher} "
                      f"would route exactly k; use {name}alltoall")


def _check_across(v: Mapping, spell: Callable, num_experts, topk, moe_layers: Optional[list] = None) -> None:
    """The rules that involve the model's shape (``moe_layers``: its expert layers, 1-based)."""
    mask = v.get("moe_mask_experts") or {}
    _check_layers("moe_mask_experts", spell, list(mask), moe_layers)
    _check_layers("moe_dynamic_mask_layers", spell, list(v.get("moe_dynamic_mask_layers") or []), moe_layers)
    for layer, ids in mask.items():
        bad = [e for e in ids if num_experts is not None and e >= num_experts]
        if bad:
            experts = "--num-experts" if spell("moe_mask_experts").startswith("--") else "num_moe_experts"
            raise ConfigError(f"{spell('moe_mask_experts')}: layer {layer}: expert ids {bad} >= {experts} {num_experts}")
        if num_experts is not None and topk is not None and len(ids) > num_experts - topk:
            raise ConfigError(f"{spell('moe_mask_experts')}: layer {layer} keeps "
                             f"{num_experts - len(ids)} experts, fewer than the top-k {topk}")
    groups = v.get("moe_expert_groups")
    if groups and num_experts is not None:
        from mpmoe.surgery.merge import parse_expert_groups

        for layer, labels in parse_expert_groups(groups).items():
            if len(labels) < num_experts or max(labels) >= num_experts:
                raise ConfigError(f"{spell('moe_expert_groups')}: layer {layer} maps {len(labels)} "
                                  f"experts into groups up to {max(labels)}, the model has {num_experts} experts")
    if v.get("moe_expert_group_routing") == "fold-select" and "moe_expert_groups" in v and not groups:
        raise ConfigError(f"{spell('moe_expert_group_routing')} fold-select needs merged experts in the "
                          "collapsed layout (a checkpoint written by `mpmoe experts merge --layout collapsed`)")
    sizes = v.get("moe_expert_ffn_sizes")
    if sizes:
        from mpmoe.surgery.split import parse_expert_sizes

        if num_experts is not None:
            try:
                parse_expert_sizes(sizes, num_experts)
            except ValueError as exc:
                raise ConfigError(f"{spell('moe_expert_ffn_sizes')}: {str(exc).split(': ', 1)[-1]}") from None
        if groups or v.get("moe_expert_compression"):
            raise ConfigError(f"{spell('moe_expert_ffn_sizes')} (split experts) cannot be combined "
                              "with merged or compressed experts")
    if v.get("trainable_params", "all") == "routers" and num_experts is None:
        raise ConfigError(f"{spell('trainable_params')} routers needs a model with experts")
    mode = v.get("moe_dynamic_mask_mode")
    if mode is not None:
        if topk is not None and topk < 2:
            raise ConfigError(f"{spell('moe_dynamic_mask_mode')} needs a top-k >= 2 "
                             "(it drops one of k experts)")
        if mode == "cooccurrence" and v.get("moe_cooccurrence_stats_dir") is None:
            raise ConfigError(f"{spell('moe_dynamic_mask_mode')} cooccurrence needs "
                             f"{spell('moe_cooccurrence_stats_dir')}")


def check_files(values: Mapping, *, flags: bool = True) -> None:
    """The folder the cooccurrence mask reads exists and holds statistics files."""
    from pathlib import Path as _Path

    from mpmoe.megatron.statsfile import FILE_RE

    stats = values.get("moe_cooccurrence_stats_dir")
    if values.get("moe_dynamic_mask_mode") != "cooccurrence" or stats is None:
        return
    name = "--moe-cooccurrence-stats-dir" if flags else "moe_cooccurrence_stats_dir"
    if not _Path(stats).is_dir():
        raise ConfigError(f"{name}: {stats} is not a directory")
    if not any(FILE_RE.match(p.name) for p in _Path(stats).iterdir()):
        raise ConfigError(f"{name}: no layer*_seg*_*.npz statistics files in {stats}")


#: names older runs recorded -> the setting's name now
LEGACY = {"moe_dynamic_mask": "moe_dynamic_mask_mode"}

#: what a run recorded before the setting existed ran with (where the default may change)
BEFORE_RECORDED = {"moe_router_expert_bias_mode": "prob"}


def from_record(values: Mapping, *, old_run: bool = False) -> dict:
    """``values`` with the names older runs recorded renamed (a checkpoint's ``args``);
    ``old_run``: settings it lacks get :data:`BEFORE_RECORDED`'s value."""
    out = dict(values)
    for old, new in LEGACY.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    if old_run:
        for name, value in BEFORE_RECORDED.items():
            out.setdefault(name, value)
    return out


def recorded(value):
    """A normalised value as a run records it (JSON: lists, string keys)."""
    if isinstance(value, dict):
        return {str(k): list(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def apply_env(values: dict, explicit: Iterable[str], prog: str, environ: Mapping) -> list:
    """Fold the reference demo's environment variables (``Setting.env``) into ``values``
    where the flag was not given; a flag and a different variable is an error. ``EACT_SAVE``
    (the demo's routing dump) is read by ``mpmoe eval`` only. Returns notes for stderr."""
    if prog == "mpmoe train" and environ.get("EACT_SAVE", "").strip():
        raise ConfigError("environment variable EACT_SAVE (the demo's routing dump) is read by "
                         "`mpmoe eval --routing-dump-dir`, not by training; unset it")
    explicit, notes = set(explicit), []
    for s in SETTINGS:
        raw = environ.get(s.env, "").strip() if s.env else ""
        if not raw:
            continue
        text = raw.lower() if isinstance(s.type, Choice) else raw
        try:
            value = s.type(text) if isinstance(s.type, Range) else s.type.normalize(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"environment variable {s.env}={raw!r}: expected a {s.flag} value ({exc})") from None
        value = text if isinstance(s.type, (Choice, Path, ExpertMask, LayerList)) else value
        current = values.get(s.name, s.default)
        if s.name in explicit and current != value:
            raise ConfigError(f"{s.flag} {current!r} and environment variable {s.env}={raw!r} disagree; unset one")
        if current != value:
            notes.append(f"{prog}: note: {s.env}={raw!r} sets {s.flag}")
            values[s.name] = value
    return notes


def evaluation_values(given: Optional[Mapping], kind: Optional[str], *, num_experts=None, topk=None,
                      prog: str = "mpmoe eval", environ: Optional[Mapping] = None,
                      moe_layers: Optional[list] = None) -> dict:
    """The ``eval=True`` settings for evaluating a checkpoint (the training run's own are not
    carried over): ``given`` (dest -> value; defaults for the rest) with the demo's
    environment variables, checked for router ``kind``. Recorded form (JSON-friendly)."""
    values = {s.name: s.default for s in SETTINGS if s.eval}
    given = from_record(given or {})
    values.update({k: v for k, v in given.items() if k in values})
    explicit = {k for k in values if k in given and given[k] != BY_NAME[k].default}
    apply_env(values, explicit, prog, os.environ if environ is None else environ)
    checked = check(values, kind, explicit=explicit, flags=True, num_experts=num_experts, topk=topk,
                    moe_layers=moe_layers)
    check_files(checked)
    return {k: recorded(v) for k, v in checked.items()}


def config_kwargs(values: Mapping, kind: Optional[str]) -> dict:
    """``MoPEConfig`` keyword arguments of the routing settings in ``values`` (a namespace's
    ``vars`` or a checkpoint's record; missing ones keep their defaults). Settings that do not
    apply to ``kind`` are left at their defaults."""
    out = {}
    for s in SETTINGS:
        if not s.config or s.name not in values:
            continue
        value = values[s.name]
        if value != s.default and applies(s, kind, values) is not None:
            continue
        out[s.name] = value
    return out
