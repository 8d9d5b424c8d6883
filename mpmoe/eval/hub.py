"""Fail fast, naming the dataset, when an lm-eval task needs a hub dataset we cannot get.

lm-evaluation-harness downloads a task's data with ``datasets.load_dataset`` when the task
is built. Without a network that means minutes of retries per dataset and then a
traceback that names neither the task nor a way out. :func:`check_datasets` runs before
any task is built and answers in seconds:

1. **Resolve** the requested names to their leaf task configs *without building the
   tasks*, from the TaskManager's index (``task_manager.task_index``: name -> entry with the
   yaml already merged with its ``include:`` files). Groups and tags expand to their
   members, recursively; dataset keys a group sets for its members (``dataset_path``,
   ``dataset_name``, ``dataset_kwargs``, ``custom_dataset``) are passed down the way
   lm-eval's factory does. Glob patterns (``mmlu_*``) and yaml file paths are accepted
   too. Unknown names raise :class:`~mpmoe.eval.errors.EvalError` listing them with up to
   5 close matches each.
2. **Classify** each leaf task's data source:

   * local, nothing to check: ``custom_dataset`` is set; ``dataset_path`` is an existing
     directory or file; or ``dataset_path`` is a packaged loader (``json``, ``csv``,
     ``text``, ``parquet``, ``arrow``, ...) whose ``data_files`` / ``data_dir`` are local
     (a local one that does not exist is reported as missing);
   * hub dataset: any other ``dataset_path`` (``aps/super_glue`` + config ``boolq``);
   * hub files: a packaged loader reading ``hf://datasets/...`` files;
   * remote URL: a packaged loader reading ``http(s)://...`` files (other schemes, such as
     ``s3://``, are not probed).

   A Python task (``class:``) without a ``dataset_path`` in its yaml is checked through the
   class's ``DATASET_PATH`` / ``DATASET_NAME`` attributes; if the class cannot be imported
   here, the task is not checked (lm-eval will report its own error).
3. **Reachability**, decided once per host and only if some task needs the network: the
   hub is *unreachable* without any request when ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``
   or ``TRANSFORMERS_OFFLINE`` is truthy (``1``/``true``/``yes``/``on``); otherwise the
   server at ``HF_ENDPOINT`` (default ``https://huggingface.co``) must answer one HTTP
   ``HEAD`` request (any status) within ``timeout`` seconds, through the environment's
   proxies. This is a connection to the endpoint's host:port plus, for https, a verified
   TLS handshake: a bare TCP connect is not trusted, since sandboxes and firewalls often
   accept every connection and then fail the handshake. Name resolution included, the
   probe runs in a daemon thread abandoned at the deadline.
4. **Cache**, only when unreachable: a hub dataset is available if the local ``datasets``
   cache holds a prepared copy of it, i.e. a
   ``<cache>/<namespace>___<snake_name>/<config>[-<hash>]/<version>/<hash>/dataset_info.json``
   file (the layout ``datasets`` falls back to offline). Plain file-system checks: no
   network, no ``datasets`` import. ``<cache>`` is read from the environment the way
   ``datasets`` reads it at import: ``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else
   ``$XDG_CACHE_HOME/huggingface/datasets`` (``~/.cache/huggingface/datasets``). Hub files
   and remote URLs cannot be verified offline and count as missing.

A reachable hub is trusted to serve every hub dataset (a gated or misspelt one is left to
lm-eval's own error). If anything is missing, one :class:`EvalError` names each missing dataset (path and
config), the tasks needing it, the endpoint tried and what to do. If the hub is
unreachable but everything needed is cached, :func:`enable_offline_mode` is called (unless
``set_offline=False``) so that the lm-eval run that follows reads the cache at once
instead of retrying the network.

Offline switches and already-imported modules: ``datasets`` copies ``HF_DATASETS_OFFLINE``
/ ``HF_HUB_OFFLINE`` into ``datasets.config.HF_HUB_OFFLINE`` and ``huggingface_hub`` copies
``HF_HUB_OFFLINE`` into ``huggingface_hub.constants.HF_HUB_OFFLINE`` *when they are
imported*; setting the environment variables later does not reach them. Importing lm-eval
imports both, so :func:`enable_offline_mode` sets the environment variables (for modules
imported later and for child processes) *and* those module attributes when the modules are
already loaded; both libraries read the attributes at call time. A third-party module
that copied the flag into its own namespace at import (``from ... import HF_HUB_OFFLINE``;
e.g. some ``transformers`` versions) keeps its copy; nothing on lm-eval's dataset path
does that in the versions pinned here. The same import-time rule applies to
``HF_DATASETS_CACHE`` / ``HF_HOME`` / ``HF_ENDPOINT``: set them before the process starts,
as the error message says.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

from mpmoe.data.hub import (  # noqa: F401 - reachability and cache checks live in mpmoe.data
    DEFAULT_ENDPOINT, _describe_target, _host_port, _probe, _snake, dataset_cached, datasets_cache_dir,
    enable_offline_mode, hub_endpoint, offline_env, url_reachable)
from mpmoe.eval.errors import EvalError

__all__ = [
    "DEFAULT_ENDPOINT",
    "PACKAGED_LOADERS",
    "Need",
    "check_datasets",
    "dataset_cached",
    "datasets_cache_dir",
    "enable_offline_mode",
    "hub_endpoint",
    "offline_env",
    "required_datasets",
    "resolve_task_configs",
    "url_reachable",
]

log = logging.getLogger(__name__)


#: ``dataset_path`` values that name a ``datasets`` packaged builder reading ``data_files``
PACKAGED_LOADERS = frozenset(
    {"json", "csv", "text", "parquet", "arrow", "pandas", "xml", "sql",
     "imagefolder", "audiofolder", "videofolder", "webdataset"}
)

# the keys of a task config that decide where its data comes from (and that a group may
# set for its members)
_DATASET_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "class")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_LISTED = 4


# --------------------------------------------------------------------------- resolution
def _lookup(task_manager, name: str) -> tuple[str, dict[str, Any], list[str]] | None:
    """``(kind, config, tag members)`` of an indexed name, or None if it is not indexed.

    ``kind`` is ``task``, ``py_task``, ``group`` or ``tag``. Supports the index of lm-eval
    0.4.10+ (``Entry`` objects whose ``cfg`` is the yaml merged with its includes) and the
    dict index of earlier 0.4 releases (``{"type", "yaml_path", "task"}`` + ``_get_config``).
    """
    index = getattr(task_manager, "task_index", None) or {}
    entry = index.get(name)
    if entry is None:
        return None
    kind = getattr(entry, "kind", None)
    if kind is not None:  # lm_eval.tasks._index.Entry
        kind_name = str(getattr(kind, "name", kind)).lower()
        if kind_name == "tag":
            return "tag", {}, sorted(getattr(entry, "tags", ()) or ())
        cfg = getattr(entry, "cfg", None)
        if cfg is None and getattr(entry, "yaml_path", None):
            cfg = _load_yaml_file(Path(entry.yaml_path))
        return kind_name, dict(cfg or {}), []
    if isinstance(entry, dict):  # lm-eval <= 0.4.9
        kind_name = {"python_task": "py_task"}.get(entry.get("type"), entry.get("type") or "task")
        if kind_name == "tag":
            return "tag", {}, list(entry.get("task") or [])
        cfg: dict[str, Any] = {}
        if entry.get("yaml_path", -1) not in (-1, None):
            cfg = dict(task_manager._get_config(name) or {})
        return kind_name, cfg, []
    return None


def _load_yaml_file(path: Path) -> dict[str, Any]:
    """A task/group yaml merged with its ``include:`` files, ``!function`` left unresolved."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.10+
    except ImportError:  # earlier 0.4 releases
        from lm_eval.utils import load_yaml_config

        return dict(load_yaml_config(str(path), mode="simple") or {})
    return dict(load_yaml(path, resolve_func=False, recursive=True) or {})


def _dataset_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in _DATASET_KEYS if k in cfg and k != "class"}


class _Resolver:
    """Walks names -> leaf task configs the way lm-eval's TaskFactory builds them."""

    def __init__(self, task_manager) -> None:
        self.tm = task_manager
        self.leaves: dict[str, dict[str, Any]] = {}
        self.requested_by: dict[str, list[str]] = {}

    def add_leaf(self, name: str, cfg: dict[str, Any], top: str) -> None:
        self.leaves.setdefault(name, cfg)
        tops = self.requested_by.setdefault(name, [])
        if top not in tops:
            tops.append(top)

    def expand(self, name: str, overrides: dict[str, Any], top: str, stack: tuple[str, ...]) -> None:
        if name in stack:  # a cycle in group definitions: lm-eval fails on it itself
            return
        found = _lookup(self.tm, name)
        if found is None:  # an inline member lm-eval builds from the overrides alone
            self.add_leaf(name, dict(overrides), top)
            return
        kind, cfg, members = found
        stack = stack + (name,)
        if kind == "tag":
            for member in members:
                self.expand(member, overrides, top, stack)
        elif kind == "group":
            self.expand_group(name, cfg, overrides, top, stack)
        else:
            self.add_leaf(name, {**cfg, **overrides}, top)

    def expand_group(self, name: str, cfg: dict[str, Any], overrides: dict[str, Any],
                     top: str, stack: tuple[str, ...]) -> None:
        passed = {**_dataset_overrides(cfg), **overrides}
        members = cfg.get("task") or []
        if isinstance(members, (str, dict)):
            members = [members]
        for item in members:
            if isinstance(item, str):
                self.expand(item, passed, top, stack)
            elif isinstance(item, dict) and "group" in item:
                merged = {**passed, **_dataset_overrides(item)}
                if _lookup(self.tm, item["group"]) is not None:
                    self.expand(item["group"], merged, top, stack)
                else:  # an inline subgroup defined in place
                    self.expand_group(f"{name}::{item['group']}", item, merged, top, stack)
            elif isinstance(item, dict) and "task" in item:
                merged = {**passed, **_dataset_overrides(item)}
                if _lookup(self.tm, item["task"]) is not None:
                    self.expand(item["task"], merged, top, stack)
                else:  # an inline task defined in place
                    cfg_inline = {**passed, **item}
                    self.add_leaf(f"{name}::{item['task']}", cfg_inline, top)


def _known_names(task_manager) -> list[str]:
    """Every task, group and tag name the task manager knows, sorted."""
    return sorted(getattr(task_manager, "task_index", None) or getattr(task_manager, "all_tasks", None) or [])


def resolve_task_configs(task_names: Iterable[str], task_manager) -> dict[str, dict[str, Any]]:
    """Leaf task name -> its config (the yaml with includes merged, group overrides applied).

    ``task_names`` may hold task, group and tag names, glob patterns (matched against the
    task manager's names) and paths of task/group yaml files. Nothing is built or
    downloaded. Raises :class:`EvalError` listing every unknown name with up to 5 close
    matches from the task manager's known names. Each returned config also carries the key
    ``"_requested_as"``: the requested names that led to the task.
    """
    resolver = _Resolver(task_manager)
    unknown: list[str] = []
    for raw in task_names:
        name = str(raw).strip()
        if not name:
            continue
        if _lookup(task_manager, name) is not None:
            resolver.expand(name, {}, name, ())
            continue
        path = Path(name).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            cfg = _load_yaml_file(path)
            if "group" in cfg:
                resolver.expand_group(str(cfg["group"]), cfg, {}, name, ())
            else:
                resolver.add_leaf(str(cfg.get("task") or path.stem), cfg, name)
            continue
        if _GLOB_CHARS.search(name):
            matches = fnmatch.filter(_known_names(task_manager), name)
            if matches:
                for match in matches:
                    resolver.expand(match, {}, name, ())
                continue
        unknown.append(name)
    if unknown:
        known = _known_names(task_manager)
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "no close match"
            parts.append(f"'{name}' ({hint})")
        raise EvalError(
            f"unknown task{'s' if len(unknown) > 1 else ''}: {'; '.join(parts)}; "
            "list the known ones with `lm-eval ls tasks`, and pass the folder of your own "
            "task yaml files with --include-path"
        )
    out = {}
    for name, cfg in resolver.leaves.items():
        out[name] = {**cfg, "_requested_as": list(resolver.requested_by.get(name, []))}
    return out


# --------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class Need:
    """One external thing a task's data needs.

    ``kind``: ``"hub"`` (a hub dataset ``path`` with config ``name``), ``"hub_files"``
    (``hf://`` data files of the hub dataset ``path``), ``"url"`` (a remote data file) or
    ``"local"`` (a local data file or folder that does not exist).
    """

    kind: str
    path: str
    name: str | None = None


def _flat_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _flat_strings(v)]
    if isinstance(value, (list, tuple, set)):
        return [s for v in value for s in _flat_strings(v)]
    return []


def _hf_repo_of(uri: str) -> str:
    """``hf://datasets/ns/name@rev/dir/f.json`` -> ``ns/name``."""
    parts = uri[len("hf://"):].split("/")
    if parts and parts[0] == "datasets":
        parts = parts[1:]
    repo = "/".join(parts[:2])
    return repo.split("@", 1)[0]


def _class_dataset(spec: Any) -> tuple[str | None, str | None] | None:
    """``(DATASET_PATH, DATASET_NAME)`` of a Python task class, or None if not importable."""
    try:
        cls = spec
        if isinstance(spec, str):
            module_path, _, attr = spec.rpartition(".")
            file = Path(module_path + ".py")
            if not file.is_file():
                return None
            module_name = f"_mpmoe_hubcheck_{file.stem}"
            mod_spec = importlib.util.spec_from_file_location(module_name, file)
            if mod_spec is None or mod_spec.loader is None:
                return None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[module_name] = module  # (dataclasses & co. look their module up)
            try:
                mod_spec.loader.exec_module(module)
                cls = getattr(module, attr)
            finally:
                sys.modules.pop(module_name, None)
        return getattr(cls, "DATASET_PATH", None), getattr(cls, "DATASET_NAME", None)
    except Exception:  # noqa: BLE001 - a task module we cannot import is left to lm-eval
        return None


def _task_needs(cfg: dict[str, Any]) -> list[Need]:
    """What the data of one leaf task config needs from outside this machine."""
    if cfg.get("custom_dataset"):
        return []
    path = cfg.get("dataset_path")
    name = cfg.get("dataset_name")
    if not path and cfg.get("class") is not None:
        found = _class_dataset(cfg["class"])
        if found is None:
            return []
        path, name = path or found[0], name or found[1]
    if not path or not isinstance(path, str):
        return []
    if os.path.exists(path):
        return []
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        kwargs = {}
    if path.lower() in PACKAGED_LOADERS:
        needs = []
        for item in _flat_strings(kwargs.get("data_files")) + _flat_strings(kwargs.get("data_dir")):
            if item.startswith("hf://"):
                needs.append(Need("hub_files", _hf_repo_of(item)))
            elif "://" in item:
                needs.append(Need("url", item))
            elif not glob.glob(os.path.expanduser(item), recursive=True):
                needs.append(Need("local", item))
        return needs
    return [Need("hub", path, str(name) if name not in (None, "") else None)]


def required_datasets(configs: dict[str, dict[str, Any]]) -> dict[Need, list[str]]:
    """Everything the given leaf task configs need from outside -> the task names needing it."""
    needs: dict[Need, list[str]] = {}
    for task, cfg in configs.items():
        for need in _task_needs(cfg):
            tasks = needs.setdefault(need, [])
            if task not in tasks:
                tasks.append(task)
    return needs


# --------------------------------------------------------------------------- network and cache
# --------------------------------------------------------------------------- the check
def _listing(items: list[str], more: str) -> str:
    shown = items[:_MAX_LISTED]
    text = ", ".join(shown)
    if len(items) > len(shown):
        text += f" and {len(items) - len(shown)} more {more}"
    return text


def _describe_missing(missing: dict[Need, list[str]], configs: dict[str, dict[str, Any]]) -> list[str]:
    """One phrase per missing dataset path, with its configs and tasks."""
    by_path: dict[tuple[str, str], list[tuple[str | None, list[str]]]] = {}
    for need, tasks in missing.items():
        by_path.setdefault((need.kind, need.path), []).append((need.name, tasks))
    phrases = []
    for (kind, path), entries in by_path.items():
        tasks = [t for _, ts in entries for t in ts]
        tasks = list(dict.fromkeys(tasks))
        requested = list(dict.fromkeys(r for t in tasks for r in configs.get(t, {}).get("_requested_as", [])))
        via = "" if requested == tasks else f" (requested as {_listing(requested, 'names')})"
        task_text = f"task{'s' if len(tasks) > 1 else ''} {_listing(tasks, 'tasks')}{via}"
        if kind == "hub":
            names = [n for n, _ in entries]
            configs_text = [n for n in names if n is not None]
            if not configs_text:
                what = f"hub dataset '{path}' (default config)"
            elif len(configs_text) == 1:
                what = f"hub dataset '{path}' config '{configs_text[0]}'"
            else:
                what = f"hub dataset '{path}' configs {_listing(configs_text, 'configs')}"
        elif kind == "hub_files":
            what = f"hf:// data files of hub dataset '{path}' (not checkable offline)"
        elif kind == "url":
            what = f"remote data file {path}"
        else:
            what = f"local data file {path} (not found)"
        phrases.append(f"{what} for {task_text}")
    return phrases


def _download_hint(missing: dict[Need, list[str]]) -> str:
    for need in missing:
        if need.kind == "hub":
            args = repr(need.path) + (f", {need.name!r}" if need.name else "")
            return f"python -c \"import datasets; datasets.load_dataset({args})\" (one call per dataset and config listed)"
    return ""


def _missing_message(missing: dict[Need, list[str]], configs: dict[str, dict[str, Any]],
                     states: list[str]) -> str:
    """The one-line error for :func:`check_datasets`."""
    what = "; ".join(_describe_missing(missing, configs))
    fixes = []
    if any(n.kind != "local" for n in missing):
        why = "; ".join(s for s in states if s)
        fixes.append(f"Why: {why}, and the local datasets cache {datasets_cache_dir()} does not have them.")
        fix = ("Fix: connect this machine to the network (or set HF_ENDPOINT to a reachable hub "
               "mirror); or set HF_HOME / HF_DATASETS_CACHE to a cache that has them (e.g. one "
               "filled on a connected machine by the same `mpmoe eval` command with --limit 1)")
        hint = _download_hint(missing)
        if hint:
            fix += f"; or pre-download them on a connected machine with {hint}"
        fixes.append(fix + ".")
    if any(n.kind == "local" for n in missing):
        fixes.append("Local data files are read relative to the current directory: check the "
                     "paths in the task yaml (dataset_kwargs data_files / data_dir).")
    return f"cannot get the data of the requested tasks: {what}. " + " ".join(fixes)


def check_datasets(task_names: list[str], task_manager, *, timeout: float = 3.0,
                   set_offline: bool = True) -> None:
    """Raise :class:`EvalError` at once if a requested task's data cannot be had.

    Args:
        task_names: names as given to ``--tasks`` (tasks, groups, tags, globs, yaml paths).
        task_manager: the ``lm_eval.tasks.TaskManager`` the run will use (its
            ``include_path`` decides which local tasks are known).
        timeout: seconds allowed for the one connection probe per host.
        set_offline: when the hub is unreachable but every needed hub dataset is in the
            local cache, call :func:`enable_offline_mode` so that the lm-eval run reads the
            cache without retrying the network.

    Unknown names raise with close matches. Local data needs no probe; the network is
    probed only when some task needs it (never when an offline switch is on). See the
    module docstring for the rules.
    """
    configs = resolve_task_configs(task_names, task_manager)
    needs = required_datasets(configs)
    missing: dict[Need, list[str]] = {n: t for n, t in needs.items() if n.kind == "local"}
    remote = {n: t for n, t in needs.items() if n.kind != "local"}

    endpoint = hub_endpoint()
    switch = offline_env()
    hub_state = ""
    unreachable_hub = False
    if any(n.kind in ("hub", "hub_files") for n in remote):
        if switch:
            unreachable_hub = True
            hub_state = f"offline mode is on ({switch}={os.environ[switch]}), so the hub at {endpoint} is not contacted"
        else:
            failure = _probe(endpoint, timeout)
            if failure is not None:
                unreachable_hub = True
                hub_state = f"the hub at {_describe_target(endpoint)} is unreachable ({failure})"

    hosts: dict[str, bool] = {}
    url_states = []
    for need, tasks in remote.items():
        if need.kind in ("hub", "hub_files"):
            if not unreachable_hub:
                continue
            if need.kind == "hub" and dataset_cached(need.path, need.name):
                continue
            missing[need] = tasks
        else:  # a remote data file: its own host
            host = _host_port(need.path)[0]
            if host not in hosts:
                if switch:
                    failure = f"offline mode is on ({switch}={os.environ[switch]}), so {host} is not contacted"
                elif urlsplit(need.path).scheme not in ("http", "https"):
                    failure = None  # s3://, gs://, ...: not probed
                else:
                    failure = _probe(need.path, timeout)
                    if failure is not None:
                        failure = f"{_describe_target(need.path)} is unreachable ({failure})"
                hosts[host] = failure is None
                if failure is not None:
                    url_states.append(failure)
            if not hosts[host]:
                missing[need] = tasks

    if missing:
        raise EvalError(_missing_message(missing, configs, [hub_state, *url_states]))

    # (not when some task reads remote files from another, reachable host: offline mode
    # would cut those off too)
    if (unreachable_hub and set_offline and any(n.kind == "hub" for n in remote)
            and not any(n.kind == "url" for n in remote)):
        log.warning("hub %s unreachable; all %d needed hub datasets are in the local cache %s: "
                    "running offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1)",
                    endpoint, sum(1 for n in remote if n.kind == "hub"), datasets_cache_dir())
        enable_offline_mode()
