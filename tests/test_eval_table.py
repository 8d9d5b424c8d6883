"""mpmoe.eval.table: one table from several `mpmoe eval` results folders."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from mpmoe.eval.errors import EvalError
from mpmoe.eval.table import collect, columns, format_markdown, main, primary_metric, write_csv


def _mpmoe(checkpoint: Path, iteration: int, routing: str, tasks: list[str], shots) -> dict:
    return {"checkpoint": str(checkpoint), "iteration": iteration, "routing": routing,
            "dtype": "bf16", "tasks": tasks, "num_fewshot": shots, "limit": None,
            "elapsed_s": 12.5, "world_size": 1}


def _mmlu_file(checkpoint: Path, iteration: int, routing: str, acc: float) -> dict:
    """An `mpmoe eval --tasks mmlu --num-fewshot 5` result: nested groups with aggregates."""
    leaves = {"mmlu_anatomy": acc - 0.02, "mmlu_astronomy": acc + 0.02, "mmlu_marketing": acc}
    results = {name: {"alias": f"  - {name[5:]}", "acc,none": v, "acc_stderr,none": 0.01}
               for name, v in leaves.items()}
    groups = {
        "mmlu": {"alias": "mmlu", "acc,none": acc, "acc_stderr,none": 0.004},
        "mmlu_stem": {"alias": " - stem", "acc,none": acc, "acc_stderr,none": 0.008},
        "mmlu_other": {"alias": " - other", "acc,none": acc, "acc_stderr,none": 0.009},
    }
    results.update(groups)
    return {
        "results": results,
        "groups": groups,
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"],
                           "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"],
                           "mmlu_other": ["mmlu_marketing"]},
        "configs": {}, "versions": {},
        "n-shot": {**{n: 5 for n in leaves}, "mmlu": 5, "mmlu_stem": 5, "mmlu_other": 5},
        "higher_is_better": {}, "n-samples": {},
        "mpmoe": _mpmoe(checkpoint, iteration, routing, ["mmlu"], 5),
    }


def _mixed_file(checkpoint: Path, iteration: int, routing: str, base: float) -> dict:
    """Tasks of several metric kinds + a group without an aggregate (bbh-like)."""
    results = {
        "hellaswag": {"alias": "hellaswag", "acc,none": base, "acc_stderr,none": 0.01,
                      "acc_norm,none": base + 0.05, "acc_norm_stderr,none": 0.011},
        "boolq": {"alias": "boolq", "acc,none": base + 0.1, "acc_stderr,none": 0.02},
        "gsm8k": {"alias": "gsm8k", "exact_match,flexible-extract": base / 2,
                  "exact_match_stderr,flexible-extract": 0.01,
                  "exact_match,strict-match": base / 4, "exact_match_stderr,strict-match": 0.01},
        "lambada_openai": {"alias": "lambada_openai", "perplexity,none": 40.0,
                           "perplexity_stderr,none": 2.0, "acc,none": base, "acc_stderr,none": 0.01},
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 55.5, "byte_perplexity,none": 1.9,
                     "bits_per_byte,none": 0.9263, "word_perplexity_stderr,none": "N/A"},
        "bbh_fewshot": {"alias": "bbh_fewshot"},
        "bbh_fewshot_navigate": {"alias": " - navigate", "exact_match,none": 0.2},
        "bbh_fewshot_snarks": {"alias": " - snarks", "exact_match,none": 0.4},
    }
    return {
        "results": results,
        "group_subtasks": {"bbh_fewshot": ["bbh_fewshot_navigate", "bbh_fewshot_snarks"]},
        "configs": {}, "versions": {},
        "n-shot": {"hellaswag": 0, "boolq": 0, "gsm8k": 3, "lambada_openai": 0, "wikitext": 0,
                   "bbh_fewshot": 3, "bbh_fewshot_navigate": 3, "bbh_fewshot_snarks": 3},
        "higher_is_better": {}, "n-samples": {},
        "mpmoe": _mpmoe(checkpoint, iteration, routing,
                        ["hellaswag", "boolq", "gsm8k", "bbh_fewshot", "lambada_openai", "wikitext"], None),
    }


def _write(path: Path, data: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(data))
    return path / "results.json"


@pytest.fixture
def tree(tmp_path):
    """Two checkpoints of one run x two group files each, plus a top-k run of the first."""
    run = tmp_path / "ckpt" / "38m-mope"
    out = tmp_path / "eval"
    for it, acc in ((200, 0.31), (100, 0.27)):   # written out of order on purpose
        ck = run / f"iter_{it:07d}"
        _write(out / "mope" / ck.name / "mmlu", _mmlu_file(ck, it, "mope", acc))
        _write(out / "mope" / ck.name / "mixed", _mixed_file(ck, it, "mope", acc + 0.1))
    ck = run / "iter_0000100"
    _write(out / "topk" / ck.name / "mixed", _mixed_file(ck, 100, "topk", 0.3))
    return out


def test_primary_metric_rule():
    assert primary_metric({"acc,none": 0.1, "acc_norm,none": 0.2}) == "acc_norm,none"
    assert primary_metric({"acc,none": 0.1, "perplexity,none": 9.0}) == "acc,none"
    assert primary_metric({"exact_match,flexible-extract": 0.3, "exact_match,strict-match": 0.2,
                           "exact_match,none": 0.1}) == "exact_match,strict-match"
    assert primary_metric({"exact_match,custom": 0.3, "exact_match,none": 0.1}) == "exact_match,none"
    assert primary_metric({"word_perplexity,none": 9.0, "bits_per_byte,none": 1.0}) == "bits_per_byte,none"
    assert primary_metric({"word_perplexity,none": 9.0, "perplexity,none": 3.0}) == "word_perplexity,none"
    assert primary_metric({"f1,none": 0.5, "acc_stderr,none": 0.1, "alias": "x"}) == "f1,none"
    assert primary_metric({"alias": "x", "acc,none": "N/A"}) is None


def test_collect_merges_group_files_per_checkpoint(tree):
    rows = collect([tree])
    assert [(Path(r["checkpoint"]).name, r["iteration"], r["routing"]) for r in rows] == [
        ("iter_0000100", 100, "mope"), ("iter_0000100", 100, "topk"), ("iter_0000200", 200, "mope")]
    mope100 = rows[0]
    assert len(mope100["sources"]) == 2                       # mmlu + mixed files merged
    scores = mope100["scores"]
    assert scores[("mmlu", 5)]["value"] == pytest.approx(0.27)   # lm-eval's group aggregate
    assert scores[("mmlu", 5)]["group"] is True
    assert scores[("hellaswag", 0)]["metric"] == "acc_norm,none"
    assert scores[("boolq", 0)]["metric"] == "acc,none"
    assert scores[("gsm8k", 3)]["metric"] == "exact_match,strict-match"
    assert scores[("lambada_openai", 0)]["metric"] == "acc,none"
    assert scores[("wikitext", 0)]["metric"] == "bits_per_byte,none"
    bbh = scores[("bbh_fewshot", 3)]                           # no aggregate: mean of subtasks
    assert bbh["metric"] == "exact_match,none" and bbh["value"] == pytest.approx(0.3)
    assert bbh["how"] == "mean of 2 subtasks" and scores[("mmlu", 5)]["how"] == "aggregate"
    shown = {task for task, _ in scores}
    assert not shown & {"mmlu_stem", "mmlu_anatomy", "bbh_fewshot_navigate"}
    assert rows[1]["scores"].get(("mmlu", 5)) is None          # top-k: only the mixed file


def test_markdown_table(tree):
    text = format_markdown(collect([tree]))
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["checkpoint", "iter", "routing"]
    assert header[3:] == ["mmlu (5)", "boolq (0)", "hellaswag (0)", "bbh_fewshot (3)", "gsm8k (3)",
                          "lambada_openai (0)", "wikitext (0)"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]]
    assert [r[1:3] for r in body] == [["100", "mope"], ["100", "topk"], ["200", "mope"]]
    assert body[0][0] == "38m-mope"
    assert body[0][3] == "27.00"                   # mmlu acc in %
    assert body[0][5] == "42.00"                   # hellaswag acc_norm: 0.37 + 0.05
    assert body[0][9] == "0.9263"                  # bits_per_byte
    assert body[1][3] == "-"                       # top-k row has no mmlu
    assert body[2][3] == "31.00"
    assert "hellaswag (0): acc_norm" in text and "gsm8k (3): exact_match [strict-match]" in text
    assert "mmlu (5): acc (group aggregate)" in text
    assert "bbh_fewshot (3): exact_match (mean of 2 subtasks)" in text


def test_same_task_two_shots_gives_two_columns(tmp_path):
    ck = tmp_path / "run" / "iter_0000010"
    a = _mmlu_file(ck, 10, "mope", 0.3)
    b = _mmlu_file(ck, 10, "mope", 0.25)
    for name in b["n-shot"]:
        b["n-shot"][name] = 0
    _write(tmp_path / "out" / "five", a)
    _write(tmp_path / "out" / "zero", b)
    rows = collect([tmp_path / "out"])
    assert len(rows) == 1
    assert columns(rows) == [("mmlu", 0), ("mmlu", 5)] or columns(rows) == [("mmlu", 5), ("mmlu", 0)]


def test_group_without_common_metric_shows_its_members(tmp_path):
    ck = tmp_path / "run" / "iter_0000010"
    members = {"docs_mc": {"acc,none": 0.5, "acc_norm,none": 0.6},
               "docs_gen": {"exact_match,none": 0.1, "word_prefix,none": 0.3},
               "docs_ppl": {"word_perplexity,none": 80.0, "bits_per_byte,none": 1.5}}
    data = {"results": {"local": {"alias": "local"}, **{k: {"alias": k, **v} for k, v in members.items()}},
            "group_subtasks": {"local": list(members)},
            "n-shot": {"local": 0, **{k: 0 for k in members}},
            "mpmoe": _mpmoe(ck, 10, "mope", ["local"], 0)}
    _write(tmp_path / "out" / "custom", data)
    rows = collect([tmp_path / "out"])
    assert {k: v["metric"] for k, v in rows[0]["scores"].items()} == {
        ("docs_mc", 0): "acc_norm,none", ("docs_gen", 0): "exact_match,none",
        ("docs_ppl", 0): "bits_per_byte,none"}


def test_later_file_wins_for_the_same_task(tmp_path):
    ck = tmp_path / "run" / "iter_0000010"
    old = _write(tmp_path / "out" / "b_old", _mixed_file(ck, 10, "mope", 0.2))
    new = _write(tmp_path / "out" / "a_new", _mixed_file(ck, 10, "mope", 0.5))
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    rows = collect([tmp_path / "out"])
    assert rows[0]["scores"][("boolq", 0)]["value"] == pytest.approx(0.6)


def test_csv(tree, tmp_path):
    rows = collect([tree])
    path = tmp_path / "t" / "summary.csv"
    write_csv(rows, path)
    with path.open() as fh:
        table = list(csv.reader(fh))
    assert table[0][:4] == ["checkpoint", "run", "iteration", "routing"]
    assert "mmlu (5) acc" in table[0] and "mmlu (5) acc stderr" in table[0]
    assert "gsm8k (3) exact_match [strict-match]" in table[0]
    assert len(table) == 4
    col = table[0].index("mmlu (5) acc")
    assert float(table[1][col]) == pytest.approx(0.27)
    assert float(table[1][col + 1]) == pytest.approx(0.004)
    assert table[2][col] == ""                                  # top-k row: no mmlu


def test_plain_lm_eval_results_and_single_file(tmp_path):
    data = _mixed_file(Path("/x/iter_0000001"), 1, "mope", 0.3)
    del data["mpmoe"]
    file = _write(tmp_path / "plain", data)
    rows = collect([file])
    assert rows[0]["iteration"] is None and rows[0]["routing"] is None
    assert rows[0]["checkpoint"] == str(file.parent.resolve())


def test_main_prints_or_writes(tree, tmp_path, capsys):
    assert main([str(tree)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| checkpoint | iter | routing | mmlu (5) |")
    out = tmp_path / "s" / "summary.md"
    assert main([str(tree / "mope"), str(tree / "topk"), "--out", str(out), "--csv", str(tmp_path / "s.csv")]) == 0
    assert out.read_text() == printed
    assert (tmp_path / "s.csv").is_file()
    assert capsys.readouterr().out == ""


def test_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.json found" in capsys.readouterr().err
    with pytest.raises(EvalError, match="no such results file or folder"):
        collect([tmp_path / "missing"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(EvalError, match="cannot read results file"):
        collect([bad])


def test_flat_scores_keeps_every_metric_without_filters_stderr_or_lengths():
    from mpmoe.eval.scores import flat_scores

    res = {"results": {"t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
                       "t2": {"bits_per_byte,none": 2.4, "sample_len": 10, "word_perplexity,none": 30.0}}}
    assert flat_scores(res) == {"t1/acc": 0.5, "t1/acc_norm": 0.25, "t2/bits_per_byte": 2.4,
                                "t2/word_perplexity": 30.0}
    assert flat_scores({}) == {}
