"""``mpmoe eval table``: one results table from many ``mpmoe eval`` result folders.

``mpmoe eval`` writes ``DIR/results.json``: lm-eval's result dict (``results``, ``groups``,
``group_subtasks``, ``n-shot``, ...) plus an ``"mpmoe"`` block naming the checkpoint
(``checkpoint``: the iteration folder, ``iteration``, ``routing``, ...). The benchmark
suite (``scripts/eval_benchmark.sh``) runs one ``mpmoe eval`` per few-shot group, so one
checkpoint has several results files. This module merges them:

* **rows**: one per (checkpoint iteration folder, routing), merged over all results files
  naming that checkpoint; sorted by run folder (the checkpoint's parent), iteration,
  routing. A results.json without an ``"mpmoe"`` block (plain lm-eval output) is a row of
  its own, keyed by its folder. If two files report the same task and n-shot for one row,
  the one whose results.json was written last (mtime; on a tie the later path) wins.
* **columns**: one per (task, n-shot) for the *top-level* entries of each results file,
  i.e. tasks and groups that are not a member of another reported group; the members of a
  group are not shown. Headers read ``task (n-shot)``, e.g. ``mmlu (5)``. Order: the
  MP-MoE / FLAME-MoE suite's tasks in the paper's order, then the others in the order they
  were first met (files in path order, tasks in their ``mpmoe.tasks`` order).
* **a group's value**: lm-eval's aggregate from ``groups`` (or from ``results`` when it
  carries metrics), else the unweighted mean over its leaf tasks of the first metric of the
  rule below present in all of them; a group with neither (its members' metrics differ,
  e.g. ``mpmoe_local``) is shown as its members instead.
* **the metric** of a task (:func:`primary_metric`), first present of:

  1. ``acc_norm``, 2. ``acc``, 3. ``exact_match``, 4. ``bits_per_byte``,
  5. ``word_perplexity``, 6. ``byte_perplexity``, 7. ``perplexity``,
  8. any other metric, alphabetically;

  within a metric, by filter: ``strict-match``, then ``none``, then ``flexible-extract``,
  then the others alphabetically (so gsm8k reports ``exact_match,strict-match``).
* **cells**: ``acc``, ``acc_norm`` and ``exact_match`` (fractions in [0, 1]) as
  percentages with 2 decimals, ``bits_per_byte`` with 4 decimals, other values with 2
  (4 below 1); ``-`` where a row has no value. A legend under the Markdown table names the
  metric of every column and, for groups, whether the value is lm-eval's aggregate or a
  mean. The CSV holds the raw values (fractions, not percentages) and one
  ``<column> stderr`` column each.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from mpmoe.eval.errors import EvalError

__all__ = [
    "METRIC_ORDER",
    "FILTER_ORDER",
    "SUITE_ORDER",
    "collect",
    "columns",
    "format_markdown",
    "main",
    "primary_metric",
    "write_csv",
]

#: metric preference of :func:`primary_metric`
METRIC_ORDER = ("acc_norm", "acc", "exact_match", "bits_per_byte", "word_perplexity",
                "byte_perplexity", "perplexity")
#: filter preference within a metric
FILTER_ORDER = ("strict-match", "none", "flexible-extract")
#: column order of the paper suite's tasks (others follow in order of appearance)
SUITE_ORDER = ("mmlu", "boolq", "hellaswag", "arc_easy", "arc_challenge", "bbh_fewshot", "bbh",
               "gsm8k", "piqa", "winogrande", "openbookqa", "sciq", "lambada_openai")

_PERCENT_METRICS = frozenset({"acc", "acc_norm", "exact_match"})
_ITER_RE = re.compile(r"^iter_(\d+)$")


# --------------------------------------------------------------------------- metrics
def _split_key(key: str) -> tuple[str, str] | None:
    """``"acc_norm,none"`` -> ``("acc_norm", "none")``; None for stderr / non-metric keys."""
    if "," not in key:
        return None
    metric, _, filt = key.partition(",")
    if metric.endswith("_stderr") or metric in ("alias", "samples", "name", "sample_len"):
        return None
    return metric, filt


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _ranked_keys(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, filter, key)`` of the numeric metrics in ``metrics``, best first."""
    found = []
    for key, value in metrics.items():
        split = _split_key(key)
        if split is None or _numeric(value) is None:
            continue
        found.append((split[0], split[1], key))

    def rank(item: tuple[str, str, str]) -> tuple:
        metric, filt, _ = item
        m = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
        f = FILTER_ORDER.index(filt) if filt in FILTER_ORDER else len(FILTER_ORDER)
        return (m, metric, f, filt)

    return sorted(found, key=rank)


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The key (``"acc_norm,none"``) of the metric to report from one task's result dict,
    by the rule in the module docstring; None if it has no numeric metric."""
    ranked = _ranked_keys(metrics)
    return ranked[0][2] if ranked else None


def _stderr_key(key: str) -> str:
    metric, _, filt = key.partition(",")
    return f"{metric}_stderr,{filt}"


# --------------------------------------------------------------------------- one results file
def _members(group_subtasks: dict[str, list], name: str) -> list[str]:
    return [str(m) for m in group_subtasks.get(name) or []]


def _leaves(group_subtasks: dict[str, list], name: str, seen: frozenset = frozenset()) -> list[str]:
    if name in seen:
        return []
    members = _members(group_subtasks, name)
    if not members:
        return [name]
    return [leaf for m in members for leaf in _leaves(group_subtasks, m, seen | {name})]


def _group_score(data: dict, name: str) -> tuple[str, float, float | None, str] | None:
    """``(metric key, value, stderr, how)`` of a group: lm-eval's aggregate (how
    ``"aggregate"``), else the unweighted mean of its leaves' first common metric (how
    ``"mean of N subtasks"``)."""
    for source in (data.get("groups") or {}, data.get("results") or {}):
        metrics = source.get(name) or {}
        key = primary_metric(metrics)
        if key is not None:
            return key, float(metrics[key]), _numeric(metrics.get(_stderr_key(key))), "aggregate"
    results = data.get("results") or {}
    leaves = [leaf for leaf in _leaves(data.get("group_subtasks") or {}, name) if leaf in results]
    if not leaves:
        return None
    common = None
    for leaf in leaves:
        keys = {key for _, _, key in _ranked_keys(results[leaf])}
        common = keys if common is None else common & keys
    if not common:
        return None
    ranked = [key for _, _, key in _ranked_keys({k: 0.0 for k in common})]
    key = ranked[0]
    values = [float(results[leaf][key]) for leaf in leaves]
    return key, sum(values) / len(values), None, f"mean of {len(values)} subtasks"


def _task_score(data: dict, name: str) -> tuple[str, float, float | None, str] | None:
    metrics = (data.get("results") or {}).get(name) or {}
    key = primary_metric(metrics)
    if key is None:
        return None
    return key, float(metrics[key]), _numeric(metrics.get(_stderr_key(key))), "task"


def _shown(data: dict, name: str, seen: frozenset = frozenset()) -> list[tuple[str, tuple, bool]]:
    """``(name, score, is_group)`` to show for a top-level entry: a task's own score; a
    group's score (aggregate, or mean of its leaves' common metric); or, for a group with
    neither (its members' metrics differ), what its members show."""
    if name in seen:
        return []
    members = _members(data.get("group_subtasks") or {}, name)
    if not members:
        score = _task_score(data, name)
        return [] if score is None else [(name, score, False)]
    score = _group_score(data, name)
    if score is not None:
        return [(name, score, True)]
    return [item for m in members for item in _shown(data, m, seen | {name})]


def _top_level(data: dict) -> list[str]:
    """The reported tasks and groups that are not a member of another reported group, in the
    order of ``mpmoe.tasks`` when given, else of the results."""
    subtasks = data.get("group_subtasks") or {}
    members = {str(m) for ms in subtasks.values() for m in (ms or [])}
    names = list(dict.fromkeys([*(data.get("results") or {}), *(data.get("groups") or {}), *subtasks]))
    top = [n for n in names if n not in members]
    requested = [str(t) for t in ((data.get("mpmoe") or {}).get("tasks") or [])]
    order = {name: i for i, name in enumerate(requested)}
    return sorted(top, key=lambda n: (order.get(n, len(order)), names.index(n)))


def _n_shot(data: dict, name: str) -> int | None:
    shots = (data.get("n-shot") or {}).get(name)
    if isinstance(shots, bool):
        return None
    if isinstance(shots, (int, float)):
        return int(shots)
    if isinstance(shots, str) and shots.strip().isdigit():
        return int(shots)
    return None


def _row_identity(data: dict, file: Path) -> tuple[str, str, int | None, str | None]:
    """``(checkpoint, run folder, iteration, routing)`` of a results file."""
    meta = data.get("mpmoe") or {}
    checkpoint = meta.get("checkpoint")
    if not checkpoint:
        folder = str(file.parent.resolve())
        return folder, folder, None, None
    checkpoint = str(checkpoint).rstrip("/") or "/"
    iteration = meta.get("iteration")
    name = Path(checkpoint).name
    match = _ITER_RE.match(name)
    if iteration is None and match:
        iteration = int(match.group(1))
    run = str(Path(checkpoint).parent) if match else checkpoint
    routing = meta.get("routing")
    return checkpoint, run, (int(iteration) if iteration is not None else None), (str(routing) if routing else None)


# --------------------------------------------------------------------------- collect
def _results_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            direct = path / "results.json"
            if direct.is_file():
                files.append(direct)
            else:
                files.extend(sorted(p for p in path.rglob("results.json") if p.is_file()))
        else:
            raise EvalError(f"no such results file or folder: {path}")
    return list(dict.fromkeys(p.resolve() for p in files))


def collect(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows of the results table from results folders / ``results.json`` files / trees.

    Each path is a ``results.json`` (any JSON file in that format), a folder holding one,
    or a tree searched recursively for ``results.json`` files. Raises :class:`EvalError`
    for a missing path, an unreadable file, or when no results file is found.

    Each row: ``{"checkpoint": str, "run": str, "iteration": int | None, "routing":
    str | None, "scores": {(task, n_shot): {"task", "n_shot", "metric", "value",
    "stderr", "group": bool, "how", "source", "mtime", "order"}}, "sources": [str, ...]}``
    (``metric`` is the lm-eval key, e.g. ``"acc_norm,none"``; ``value`` the raw number;
    ``how``: ``"task"``, ``"aggregate"`` (lm-eval's group aggregate) or ``"mean of N
    subtasks"``; ``order`` the task's first-appearance rank), sorted by run folder, iteration and routing.
    """
    path_list = list(paths)
    files = _results_files(path_list)
    if not files:
        raise EvalError(f"no results.json found under {', '.join(str(p) for p in path_list)}")
    rows: dict[tuple, dict] = {}
    first_seen: dict[str, int] = {}
    for file in sorted(files):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EvalError(f"cannot read results file {file}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise EvalError(f"{file} is not an lm-eval results file (no 'results' dict)")
        checkpoint, run, iteration, routing = _row_identity(data, file)
        row = rows.setdefault((checkpoint, routing), {
            "checkpoint": checkpoint, "run": run, "iteration": iteration, "routing": routing,
            "scores": {}, "sources": [],
        })
        row["sources"].append(str(file))
        mtime = file.stat().st_mtime
        for name, score, is_group in (item for top in _top_level(data) for item in _shown(data, top)):
            key = (name, _n_shot(data, name))
            old = row["scores"].get(key)
            if old is not None and old["mtime"] > mtime:
                continue
            first_seen.setdefault(name, len(first_seen))
            row["scores"][key] = {
                "task": name, "n_shot": key[1], "metric": score[0], "value": score[1],
                "stderr": score[2], "group": is_group, "how": score[3], "source": str(file), "mtime": mtime,
                "order": first_seen[name],
            }
    out = sorted(rows.values(), key=lambda r: (r["run"], r["iteration"] if r["iteration"] is not None else -1,
                                               r["checkpoint"], r["routing"] or ""))
    return out


def columns(rows: list[dict]) -> list[tuple[str, int | None]]:
    """The (task, n-shot) columns of ``rows``, in table order (see the module docstring)."""
    seen: dict[tuple[str, int | None], int] = {}
    for row in rows:
        for key, score in row["scores"].items():
            seen[key] = min(seen.get(key, score["order"]), score["order"])

    def rank(key: tuple[str, int | None]) -> tuple:
        task, shots = key
        suite = SUITE_ORDER.index(task) if task in SUITE_ORDER else len(SUITE_ORDER)
        return (suite, seen[key], task, -1 if shots is None else shots)

    return sorted(seen, key=rank)


def _header(key: tuple[str, int | None]) -> str:
    task, shots = key
    return f"{task} ({shots})" if shots is not None else task


def _metric_name(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric} [{filt}]"


def _format_value(metric_key: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    metric = metric_key.partition(",")[0]
    if metric in _PERCENT_METRICS:
        return f"{100.0 * value:.2f}"
    if metric == "bits_per_byte":
        return f"{value:.4f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def _display_runs(rows: list[dict]) -> dict[str, str]:
    """Run folder -> its name in the table: relative to the common parent of all runs."""
    runs = sorted({row["run"] for row in rows})
    try:
        common = os.path.commonpath([os.path.dirname(r) or r for r in runs])
    except ValueError:
        return {r: r for r in runs}
    return {r: (os.path.relpath(r, common) if common else r) for r in runs}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (from :func:`collect`) with a metric legend below."""
    cols = columns(rows)
    names = _display_runs(rows)
    header = ["checkpoint", "iter", "routing", *[_header(c) for c in cols]]
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "| " + " | ".join(["---", "---:", "---"] + ["---:"] * len(cols)) + " |",
    ]
    for row in rows:
        cells = [names.get(row["run"], row["run"]),
                 "-" if row["iteration"] is None else str(row["iteration"]),
                 row["routing"] or "-"]
        for col in cols:
            score = row["scores"].get(col)
            cells.append("-" if score is None else _format_value(score["metric"], score["value"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    legend = []
    for col in cols:
        metrics = sorted({_metric_name(r["scores"][col]["metric"]) for r in rows if col in r["scores"]})
        hows = sorted({r["scores"][col]["how"] for r in rows if col in r["scores"]} - {"task"})
        kind = f" ({'; '.join('group ' + h if h == 'aggregate' else h for h in hows)})" if hows else ""
        legend.append(f"{_header(col)}: {' / '.join(metrics)}{kind}")
    text = "\n".join(lines) + "\n"
    if legend:
        text += ("\nMetrics (accuracies and exact match in %): " + "; ".join(legend) + ".\n")
    return text


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Write ``rows`` as CSV: checkpoint, run, iteration, routing, then per column its raw
    value (header ``task (n-shot) metric``) and ``... stderr``."""
    cols = columns(rows)
    metric_of: dict[tuple, str] = {}
    for col in cols:
        metrics = sorted({_metric_name(r["scores"][col]["metric"]) for r in rows if col in r["scores"]})
        metric_of[col] = "/".join(metrics)
    header = ["checkpoint", "run", "iteration", "routing"]
    for col in cols:
        name = f"{_header(col)} {metric_of[col]}"
        header += [name, f"{name} stderr"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            line = [row["checkpoint"], row["run"],
                    "" if row["iteration"] is None else row["iteration"], row["routing"] or ""]
            for col in cols:
                score = row["scores"].get(col)
                line += ["", ""] if score is None else [
                    repr(score["value"]), "" if score["stderr"] is None else repr(score["stderr"])]
            writer.writerow(line)


def main(argv: list[str] | None = None) -> int:
    """``mpmoe eval table DIR [DIR ...] [--out FILE.md] [--csv FILE.csv]`` (user errors: one
    line, exit 2)."""
    from mpmoe.errors import run_verb

    return run_verb("mpmoe eval table", _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list) -> int:
    from mpmoe.errors import ArgumentParser

    parser = ArgumentParser(
        prog="mpmoe eval table",
        description="One Markdown table (one row per checkpoint and routing, one column per "
                    "task and n-shot) from mpmoe eval results folders, searched recursively "
                    "for results.json.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR",
                        help="a results folder, a results.json, or a tree holding them")
    parser.add_argument("--out", metavar="FILE.md", help="write the Markdown table here (default: print it)")
    parser.add_argument("--csv", metavar="FILE.csv", help="also write the values as CSV")
    args = parser.parse_args(argv)
    rows = collect(args.paths)
    text = format_markdown(rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"mpmoe eval table: {len(rows)} row(s) -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.csv:
        write_csv(rows, args.csv)
        print(f"mpmoe eval table: CSV -> {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
