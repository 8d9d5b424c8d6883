"""The offline lm-eval tasks shipped in ``mpmoe/eval/tasks`` (group ``mpmoe_local``).

Checks that the shipped data is a fresh, deterministic build from the embedded
corpus's held-out documents, that lm-eval loads the tasks offline with the
intended requests, and that the evaluator scores them as intended.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import re
import shutil
import warnings

import pytest

from mpmoe.data.pipeline import parse_split, split_of, split_thresholds
from mpmoe.eval import TASKS_DIR
from mpmoe.eval import local_tasks as lt

pytest.importorskip("lm_eval")

TASKS = {
    lt.MC_TASK: ("multiple_choice", 200),
    lt.GEN_TASK: ("generate_until", 100),
    lt.PPL_TASK: ("loglikelihood_rolling", 32),
    lt.LASTWORD_TASK: ("loglikelihood", 200),
}


def _rows(name: str) -> list[dict]:
    with (lt.DATA_DIR / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def held_out() -> dict[int, lt.HeldOutDoc]:
    return {d.number: d for d in lt.held_out_documents()}


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's hundreds of built-in tasks takes ~15 s here
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def _get_task_dict(names: list[str], task_manager) -> dict:
    """``lm_eval.tasks.get_task_dict`` (deprecated in 0.4.13 in favour of ``TaskManager.load``)."""
    from lm_eval.tasks import get_task_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return get_task_dict(names, task_manager)


@pytest.fixture(scope="module")
def tasks(task_manager) -> dict:
    return dict(_leaves(_get_task_dict(list(TASKS), task_manager)))


def _leaves(d: dict):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield (k if isinstance(k, str) else k.group_name), v


# --- the data is a deterministic build from held-out documents ----------------------------


def test_shipped_data_equals_fresh_build(tmp_path):
    counts = lt.build(tmp_path)
    assert counts == {name: n for name, (_, n) in TASKS.items()}
    for name in TASKS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (lt.DATA_DIR / f"{name}.jsonl").read_bytes(), name
    assert sorted(p.name for p in lt.DATA_DIR.iterdir()) == sorted(f"{n}.jsonl" for n in TASKS)
    total = sum(p.stat().st_size for p in lt.DATA_DIR.iterdir())
    assert total < 300 * 1024


def test_check_cli(tmp_path, capsys):
    assert lt.main(["--check"]) == 0
    stale = tmp_path / "data"
    shutil.copytree(lt.DATA_DIR, stale)
    with (stale / f"{lt.GEN_TASK}.jsonl").open("a", encoding="utf-8") as f:
        f.write("{}\n")
    (stale / f"{lt.PPL_TASK}.jsonl").unlink()
    assert lt.main(["--check", "--out-dir", str(stale)]) == 1
    err = capsys.readouterr().err
    assert f"{lt.GEN_TASK}.jsonl: differs" in err and f"{lt.PPL_TASK}.jsonl: missing" in err


def test_held_out_documents_are_the_trainers_valid_and_test_split(held_out):
    thresholds = split_thresholds(parse_split("98,1,1"))
    assert len(held_out) == 32
    assert all(split_of(n, thresholds) == d.split != 0 for n, d in held_out.items())
    assert sum(len(d.text) for d in held_out.values()) < 60_000


def test_every_text_comes_from_its_held_out_document(held_out):
    normalized = {n: lt.normalize_space(d.text) for n, d in held_out.items()}
    for name in TASKS:
        for row in _rows(name):
            doc = held_out[row["doc"]]  # KeyError: a training-split document
            assert row["source"] == doc.source
            if name == lt.MC_TASK:
                truth = row["choices"][row["gold"]]
                assert f"{row['context']} {truth}" in normalized[doc.number]
            elif name == lt.LASTWORD_TASK:
                assert f"{row['context']} {row['target']}." in normalized[doc.number]
            elif name == lt.GEN_TASK:
                assert row["context"] + row["target"] in doc.text
            else:
                assert doc.text.startswith(row["text"])


def test_mc_data():
    rows = _rows(lt.MC_TASK)
    golds = collections.Counter(r["gold"] for r in rows)
    assert set(golds) == {0, 1, 2, 3}
    assert all(0.10 <= golds[g] / len(rows) <= 0.40 for g in range(4))
    assert len({r["context"] for r in rows}) == len(rows)
    lo_k, hi_k = lt.MC_CHOICE_WORDS
    for r in rows:
        choices, truth = r["choices"], r["choices"][r["gold"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert all(c == lt.normalize_space(c) and lo_k <= len(c.split()) <= hi_k for c in choices)
        assert len({len(c.split()) for c in choices}) == 1
        # one distractor is the true continuation's words in another order
        assert sum(sorted(c.split()) == sorted(truth.split()) for c in choices) == 2
        assert lt.MC_CONTEXT_WORDS[0] <= len(r["context"].split()) <= lt.MC_CONTEXT_WORDS[1]
        assert len(r["context"]) + 1 + max(map(len, choices)) <= lt.MAX_REQUEST_CHARS


def test_gen_data():
    rows = _rows(lt.GEN_TASK)
    assert len({(r["doc"], r["context"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["context"].endswith("\n") and not r["context"].startswith("\n")
        assert "\n" not in r["target"] and r["target"] == r["target"].strip()
        assert len(r["target"].split()) >= lt.GEN_TARGET_WORDS
        assert len(r["context"]) + len(r["target"]) <= lt.MAX_REQUEST_CHARS


def test_lastword_data():
    rows = _rows(lt.LASTWORD_TASK)
    assert len({(r["context"], r["target"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["target"].isalpha() and len(r["target"]) >= 3 and r["target"].isascii()
        assert r["context"] == lt.normalize_space(r["context"])
        assert len(r["context"].split()) >= lt.LASTWORD_MIN_CONTEXT_WORDS
        assert len(r["context"]) + 1 + len(r["target"]) <= lt.MAX_REQUEST_CHARS


def test_ppl_data(held_out):
    rows = _rows(lt.PPL_TASK)
    assert [r["doc"] for r in rows] == sorted(held_out)
    assert all(0 < len(r["text"]) <= lt.PPL_MAX_CHARS for r in rows)


def test_prose_filter_rejects_code_and_tables():
    code = lt.Paragraph((0, 10), (">>> x = compute(1, 2)", ">>> print(x)"))
    indented = lt.Paragraph((0, 10), ("Usage is as follows, with", "    chunk = Chunk(file)"))
    table = lt.Paragraph((0,), ("+----------------+ | ID (4 bytes) | size |",))
    heading = lt.Paragraph((0,), ("CCompiler.set_executables",))
    prose = lt.Paragraph((0, 30), ("Return a list of strings.  The list will", "be empty if nothing is found."))
    assert not any(map(lt.is_prose, (code, indented, table, heading)))
    assert lt.is_prose(prose)
    text = "Title\n\nFirst para of\ntwo lines here.\n\n    code()\n\nSecond para has five words."
    assert lt.prose_runs(text) == [["First", "para", "of", "two", "lines", "here."],
                                   ["Second", "para", "has", "five", "words."]]


# --- lm-eval loads the tasks offline and builds the intended requests -----------------------


def test_task_manager_lists_tasks_and_group(task_manager):
    names = set(task_manager.all_tasks)
    assert set(TASKS) | {"mpmoe_local"} <= names


def test_tasks_load_offline(tasks):
    assert set(tasks) == set(TASKS)
    for name, (output_type, count) in TASKS.items():
        task = tasks[name]
        assert task.OUTPUT_TYPE == output_type
        assert len(task.eval_docs) == count
        # the data comes from the shipped file through custom_dataset, never from the hub
        assert callable(task.config.custom_dataset) and task.config.dataset_path == "json"
        assert task.config.test_split == "test" and task.config.metadata["version"] == 1.0


def test_yaml_has_no_absolute_paths():
    for path in TASKS_DIR.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert str(TASKS_DIR) not in text and not re.search(r":\s*['\"]?(/|[A-Za-z]:\\)", text), path.name


def test_group_lists_the_four_tasks(task_manager):
    nested = _get_task_dict(["mpmoe_local"], task_manager)
    (group,) = nested
    assert getattr(group, "group_name", group) == "mpmoe_local"
    assert set(dict(_leaves(nested))) == set(TASKS)


def _instances(task, limit=3):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def test_mc_requests(tasks):
    task = tasks[lt.MC_TASK]
    insts = _instances(task)
    assert len(insts) == 3 * 4
    for inst in insts:
        doc = inst.doc
        assert inst.request_type == "loglikelihood"
        context, continuation = inst.arguments
        assert context == doc["context"] and not context[-1].isspace()
        assert continuation == " " + doc["choices"][inst.idx]
        assert "  " not in context + continuation


def test_gen_requests(tasks):
    insts = _instances(tasks[lt.GEN_TASK])
    assert len(insts) == 3
    for inst in insts:
        context, kwargs = inst.arguments
        assert inst.request_type == "generate_until"
        assert context == inst.doc["context"] and context.endswith("\n")
        assert kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] == 32
        assert kwargs["do_sample"] is False and kwargs["temperature"] == 0.0


def test_ppl_requests(tasks):
    insts = _instances(tasks[lt.PPL_TASK])
    assert len(insts) == 3
    for inst in insts:
        assert inst.request_type == "loglikelihood_rolling"
        assert inst.arguments == (inst.doc["text"],)


def test_lastword_requests(tasks):
    insts = _instances(tasks[lt.LASTWORD_TASK])
    assert len(insts) == 3
    for inst in insts:
        context, continuation = inst.arguments
        assert inst.request_type == "loglikelihood"
        assert context == inst.doc["context"] and not context[-1].isspace()
        assert continuation == " " + inst.doc["target"] and len(continuation.split()) == 1


# --- the evaluator scores them as intended ------------------------------------------------


def _task_utils():
    spec = importlib.util.spec_from_file_location("mpmoe_tasks_utils", TASKS_DIR / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_process_gen_scores():
    utils = _task_utils()
    doc = {"target": "operators are evaluated from right to left (this does not constrain"}
    assert utils.process_gen(doc, [" Operators are evaluated from right to left (this does not constrain "]) == {
        "exact_match": 1.0, "word_prefix": 1.0}
    scores = utils.process_gen(doc, ["operators are evaluated in order"])
    assert scores["exact_match"] == 0.0 and scores["word_prefix"] == pytest.approx(3 / 11)
    assert utils.process_gen(doc, [""]) == {"exact_match": 0.0, "word_prefix": 0.0}


def test_oracle_scores_perfectly(task_manager):
    """An oracle model gets every metric's best value: the metric wiring is right end to end."""
    import lm_eval
    from lm_eval.api.model import LM

    class Oracle(LM):
        def loglikelihood(self, requests):
            out = []
            for r in requests:
                doc, (_, continuation) = r.doc, r.args
                right = " " + (doc["choices"][doc["gold"]] if "choices" in doc else doc["target"])
                out.append((0.0, True) if continuation == right else (-5.0, False))
            return out

        def loglikelihood_rolling(self, requests):
            return [-float(len(r.args[0].encode("utf-8"))) for r in requests]  # 1 nat per byte

        def generate_until(self, requests):
            return [r.doc["target"] for r in requests]

    out = lm_eval.simple_evaluate(model=Oracle(), tasks=["mpmoe_local"], task_manager=task_manager,
                                  bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert res[lt.MC_TASK]["acc,none"] == 1.0 and res[lt.MC_TASK]["acc_norm,none"] == 1.0
    assert res[lt.GEN_TASK]["exact_match,none"] == 1.0 and res[lt.GEN_TASK]["word_prefix,none"] == 1.0
    assert res[lt.LASTWORD_TASK]["acc,none"] == 1.0
    assert res[lt.LASTWORD_TASK]["perplexity,none"] == pytest.approx(1.0)
    assert res[lt.PPL_TASK]["byte_perplexity,none"] == pytest.approx(math.e)
    assert res[lt.PPL_TASK]["bits_per_byte,none"] == pytest.approx(1 / math.log(2))
    assert res[lt.PPL_TASK]["word_perplexity,none"] > math.e
    assert out["higher_is_better"][lt.GEN_TASK] == {"exact_match": True, "word_prefix": True}
