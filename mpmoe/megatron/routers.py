"""The router registry: one notion of "which router", asked by every driver.

A :class:`RouterKind` names a router (``topk``, ``mope``, ``remoe``, ...), its class, its
label in reports, the tag of its statistics files, and the config values that select it
(``marks``: the Megatron-LM spellings, so ``--moe-router-load-balancing-type otep`` and
ReMoE's ``--moe-relu-routing`` keep working). Which settings apply to a kind is said by
the settings table (:mod:`mpmoe.megatron.settings`, ``Setting.routers``); the expert bias
is a setting there too (softmax top-k and MoPE), so "MoPE + bias" is MoPE with
``moe_router_enable_expert_bias``.

Which router a configuration uses is :func:`kind_of` (a config, a namespace or a dict).
Choosing one is :func:`select` (sets its marks and clears every other kind's). The
command line's rule is :func:`resolve` (docs/routing.md): ``--router`` wins; else a
command-line flag that names a router (a mark) wins over the preset's router; else the
preset's.

To add a router kind: :func:`register` a :class:`RouterKind` here (a class path, a label,
a statistics tag, and a ``marks`` entry: usually a new boolean setting in the settings
table, e.g. ``moe_hemoe_routing=True``), and list the kind in the ``routers`` of the
settings that apply to it. This module imports neither torch nor megatron.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from mpmoe.errors import UserError

__all__ = ["ConfigError", "DEFAULT", "KINDS", "MARKS", "RouterKind", "add_arguments", "kind_of", "label",
           "register", "resolve", "router_class", "select"]

class ConfigError(UserError, ValueError):
    """A routing setting or router choice that cannot be (one line: ``mpmoe <verb>: error:``)."""


#: Megatron-LM's default of ``moe_router_load_balancing_type`` (what a non-MoPE run keeps).
LBT_DEFAULT = "aux_loss"


@dataclass(frozen=True)
class RouterKind:
    name: str                     # "mope": the --router value and the recorded kind
    label: str                    # "MoPE": reports, plots, tables
    router: str                   # "module:Class" of the router (imported on demand)
    stats_tag: str                # statistics files layer{L}_seg{S}_{tag}.npz
    marks: Mapping = field(default_factory=dict)  # config values that select it
    help: str = ""
    variable_k: bool = False      # not exactly k experts per token


#: name -> kind, in registration order. The first kind (no marks) is the default.
KINDS: dict = {}

#: config field -> its value when no kind marks it (the field's default).
MARKS: dict = {}

#: the marks Megatron-LM's own parser declares (the patch set adds the others).
MEGATRON_MARKS = frozenset({"moe_router_load_balancing_type"})


def register(kind: RouterKind, **mark_defaults: Any) -> RouterKind:
    """Add a router kind. ``mark_defaults``: the default of each new mark field."""
    if kind.name in KINDS:
        raise ConfigError(f"router kind {kind.name!r} is registered twice")
    for name in kind.marks:
        if name not in MARKS:
            if name not in mark_defaults:
                raise ConfigError(f"router kind {kind.name!r}: give the default of mark {name!r}")
            MARKS[name] = mark_defaults[name]
    KINDS[kind.name] = kind
    return kind


register(RouterKind("topk", "top-k", "mpmoe.megatron.router:TopKStatsRouter", "moe",
                    help="megatron's top-k (softmax or sigmoid scores; aux loss by "
                         "--moe-router-load-balancing-type)"))
register(RouterKind("mope", "MoPE", "mpmoe.megatron.router:MoPERouter", "mope",
                    marks={"moe_router_load_balancing_type": "otep"},
                    help="OTEP over the softmax probabilities and the expert covariance Sigma"),
         moe_router_load_balancing_type=LBT_DEFAULT)
register(RouterKind("remoe", "ReMoE", "mpmoe.megatron.remoe:ReMoERouter", "remoe",
                    marks={"moe_relu_routing": True}, variable_k=True,
                    help="ReLU gates with the adaptive load-balanced L1 penalty"),
         moe_relu_routing=False)

DEFAULT = "topk"


def _get(values, name: str, default=None):
    if isinstance(values, Mapping):
        return values.get(name, default)
    return getattr(values, name, default)


def _experts(values) -> Optional[int]:
    n = _get(values, "num_moe_experts")
    return _get(values, "num_experts") if n is None else n


def named_kinds(values) -> list:
    """The kinds whose marks ``values`` carries (more than one: a conflict)."""
    lbt = _get(values, "moe_router_load_balancing_type")
    if isinstance(lbt, (list, tuple)) and KINDS["mope"].marks["moe_router_load_balancing_type"] in lbt:
        raise ConfigError("moe_router_load_balancing_type: 'otep' (MoPE) cannot be combined in a list")
    return [k.name for k in KINDS.values()
            if k.marks and all(_get(values, f) == v for f, v in k.marks.items())]


def kind_of(values, *, dense: Optional[str] = None) -> Optional[str]:
    """The router kind of a config / namespace / dict; ``dense`` for a model without experts.

    Two kinds marked at once is a one-line ``ValueError``."""
    if _experts(values) is None and dense is not None:
        return dense
    named = named_kinds(values)
    if len(named) > 1:
        raise ConfigError(" and ".join(_spelling(KINDS[n]) for n in named) + " exclude each other")
    return named[0] if named else DEFAULT


def _spelling(kind: RouterKind) -> str:
    marks = ", ".join(f"{f}={v!r}" for f, v in kind.marks.items())
    return f"{kind.label} ({marks})" if marks else kind.label


def label(values) -> str:
    """"MoPE", "top-k + bias", "ReMoE", "dense" (for tables and plots)."""
    kind = kind_of(values, dense="dense")
    if kind == "dense":
        return "dense"
    return KINDS[kind].label + (" + bias" if _get(values, "moe_router_enable_expert_bias") else "")


def label_of(name: str) -> str:
    """The label of a kind name or statistics tag ("mope" -> "MoPE", "moe" -> "top-k");
    anything else unchanged."""
    for k in KINDS.values():
        if name in (k.name, k.stats_tag):
            return k.label
    return name


def router_class(kind: str) -> type:
    module, _, name = KINDS[kind].router.partition(":")
    return getattr(importlib.import_module(module), name)


def select(values: dict, kind: str) -> dict:
    """Set ``kind``'s marks in ``values`` (a dict, updated and returned) and clear the others'."""
    if kind not in KINDS:
        raise ConfigError(f"unknown router {kind!r} (known: {', '.join(KINDS)})")
    for other in KINDS.values():
        for f, v in other.marks.items():
            if values.get(f) == v and KINDS[kind].marks.get(f) != v:
                values[f] = MARKS[f]
    values.update(KINDS[kind].marks)
    values["router"] = kind
    return values


# --------------------------------------------------------------------------- flags
def add_arguments(parser, *, megatron_lm: bool = False) -> None:
    """``--router`` and the marks' flags. Megatron-LM's parser has ``--moe-router-load-
    balancing-type`` (with ``otep`` patched in) and gets the other marks as ``store_true``."""
    if megatron_lm:
        g = parser.add_argument_group("mpmoe routers")
        for name, default in MARKS.items():
            if name not in MEGATRON_MARKS:
                g.add_argument("--" + name.replace("_", "-"), action="store_true", default=default,
                               help=f"select the {_owner(name).label} router ({_owner(name).help})")
        return
    g = parser.add_argument_group("router")
    g.add_argument("--router", choices=list(KINDS), default=None,
                   help="; ".join(f"{k.name}: {k.help}" for k in KINDS.values())
                   + ". A flag naming a router wins over the preset's (docs/routing.md)")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none", "otep"],
                   default=LBT_DEFAULT, help="megatron's top-k balancing loss; otep = --router mope")
    for name, default in MARKS.items():
        if name not in MEGATRON_MARKS:
            g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                           default=default, help=f"= --router {_owner(name).name}")


def _owner(mark: str) -> RouterKind:
    return next(k for k in KINDS.values() if mark in k.marks)


def resolve(values: dict, explicit: Mapping, preset: Mapping) -> str:
    """The command line's router (docs/routing.md), written into ``values`` by :func:`select`.

    ``explicit``: what the command line gave (dest -> value); ``preset``: the preset's values.
    1. ``--router`` wins (a mark on the command line that names another router: error);
    2. else mark flags on the command line choose, the preset's marks do not count;
    3. else the preset's router (``router`` key or its marks), else top-k.
    """
    given = {f: explicit[f] for f in MARKS if f in explicit}
    named = set(named_kinds(given))
    if explicit.get("router") is not None:
        kind = explicit["router"]
        others = named - {kind}
        if others:
            raise ConfigError(f"--router {kind} and {_flags_of(KINDS[others.pop()])} name different routers")
    elif given:
        kind = kind_of({**MARKS, **given, "num_experts": 0})
    elif preset.get("router") is not None:
        kind = preset["router"]
    else:
        kind = kind_of({**MARKS, **{f: preset[f] for f in MARKS if f in preset}, "num_experts": 0})
    select(values, kind)
    return kind


def _flags_of(kind: RouterKind) -> str:
    return " ".join(f"--{f.replace('_', '-')}" + ("" if v is True else f" {v}") for f, v in kind.marks.items())


def explicit_dests(parser: argparse.ArgumentParser, argv: Iterable[str]) -> dict:
    """dest -> value of the options given in ``argv`` (defaults left out)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(list(argv))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return vars(given)
