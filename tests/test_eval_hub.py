"""mpmoe.eval.hub: fail fast and clearly when a task's hub dataset cannot be had.

No network: the "hub" is a closed local port (connection refused at once), a local
listening socket (reachable), or switched off with HF_HUB_OFFLINE; the HF cache is an empty
(or hand-made) folder under tmp_path.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from mpmoe.eval import TASKS_DIR, hub  # noqa: E402
from mpmoe.eval.errors import EvalError  # noqa: E402
from mpmoe.eval.hub import (  # noqa: E402
    Need,
    check_datasets,
    dataset_cached,
    required_datasets,
    resolve_task_configs,
)

_FLAG_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(scope="module")
def tm():
    """lm-eval's default task index (built once: it parses ~15k yaml files)."""
    return TaskManager()


@pytest.fixture(autouse=True)
def _restore_offline_state():
    """check_datasets may switch datasets / huggingface_hub to offline mode: undo it."""
    env = {v: os.environ.get(v) for v in _FLAG_VARS}
    mods = []
    for mod_name, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                            ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE"))):
        mod = sys.modules.get(mod_name)
        if mod is not None:
            mods += [(mod, a, getattr(mod, a)) for a in attrs if hasattr(mod, a)]
    yield
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    for mod, attr, value in mods:
        setattr(mod, attr, value)


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """HF_ENDPOINT on a closed local port, an empty HF cache, no offline switch."""
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    for var in _FLAG_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return port


@pytest.fixture
def no_probe(monkeypatch):
    """Fail the test if anything tries to open a connection."""
    def forbidden(*args, **kwargs):
        raise AssertionError(f"unexpected network probe {args}")

    monkeypatch.setattr(hub, "_probe", forbidden)


def _yaml_of(tm, name: str) -> dict:
    return yaml.safe_load(Path(tm.task_index[name].yaml_path).read_text())


# --------------------------------------------------------------------------- failing fast
def test_unreachable_hub_fails_fast_naming_dataset_and_task(tm, no_hub):
    expected = _yaml_of(tm, "boolq")
    start = time.monotonic()
    with pytest.raises(EvalError) as info:
        check_datasets(["boolq"], tm)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < 5.0, f"the check took {elapsed:.1f}s"
    assert "\n" not in message
    assert f"'{expected['dataset_path']}'" in message           # aps/super_glue
    assert f"'{expected['dataset_name']}'" in message           # config boolq
    assert "task boolq" in message
    assert f"127.0.0.1:{no_hub}" in message                      # the endpoint tried
    assert "HF_DATASETS_CACHE" in message and "HF_HOME" in message
    assert "datasets.load_dataset(" in message
    assert os.environ.get("HF_HUB_OFFLINE") is None              # nothing switched on a failure


def test_groups_and_tags_expand_to_their_subtasks(tm, no_hub):
    configs = resolve_task_configs(["arc_easy", "bbh_fewshot", "ai2_arc"], tm)
    bbh = sorted(n for n in configs if n.startswith("bbh_fewshot_"))
    assert len(bbh) == len(_yaml_of(tm, "bbh_fewshot")["task"]) == 27
    assert {"arc_easy", "arc_challenge"} <= set(configs)
    # the subtasks' dataset comes from their `include:` template
    template = yaml.safe_load((Path(tm.task_index["bbh_fewshot"].yaml_path).parent
                               / "_fewshot_template_yaml").read_text())
    needs = required_datasets(configs)
    bbh_needs = [n for n in needs if n.path == template["dataset_path"]]
    assert {n.name for n in bbh_needs} == {configs[t]["dataset_name"] for t in bbh}
    assert configs["bbh_fewshot_navigate"]["_requested_as"] == ["bbh_fewshot"]
    assert set(configs["arc_easy"]["_requested_as"]) == {"arc_easy", "ai2_arc"}

    with pytest.raises(EvalError) as info:
        check_datasets(["arc_easy", "bbh_fewshot"], tm)
    message = str(info.value)
    assert "'allenai/ai2_arc' config 'ARC-Easy' for task arc_easy" in message
    assert f"'{template['dataset_path']}'" in message and "requested as bbh_fewshot" in message


def test_glob_patterns_expand(tm):
    configs = resolve_task_configs(["arc_e*"], tm)
    assert "arc_easy" in configs and "arc_challenge" not in configs
    assert configs["arc_easy"]["_requested_as"] == ["arc_e*"]


def test_nested_group_mmlu_resolves_every_subject(tm):
    configs = resolve_task_configs(["mmlu"], tm)
    assert len(configs) == 57
    assert {c["dataset_path"] for c in configs.values()} == {"cais/mmlu"}
    assert configs["mmlu_anatomy"]["dataset_name"] == "anatomy"


def test_python_class_task_uses_its_class_dataset(tm):
    needs = required_datasets(resolve_task_configs(["squadv2"], tm))
    assert [n.kind for n in needs] == ["hub"] and list(needs.values()) == [["squadv2"]]


def test_unknown_task_names_get_close_matches(tm, no_hub, no_probe):
    with pytest.raises(EvalError) as info:
        check_datasets(["hellaswg", "arc_easy", "zzqx_no_such_task"], tm)
    message = str(info.value)
    assert "'hellaswg' (did you mean hellaswag" in message
    assert "'zzqx_no_such_task' (no close match)" in message
    assert "arc_easy" not in message.split("did you mean")[0]   # known names are not listed
    close = message.split("'hellaswg' (did you mean ", 1)[1].split("?", 1)[0].split(", ")
    assert 1 <= len(close) <= 5


# --------------------------------------------------------------------------- local tasks
def _write_local_task(folder: Path, data: Path, name: str = "tiny_local", **extra) -> None:
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{q}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": ["no", "yes"],
        "metric_list": [{"metric": "acc"}],
        **extra,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))


def test_local_json_task_passes_without_any_probe(tmp_path, no_hub, no_probe):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "label": i % 2}) + "\n" for i in range(4)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_local_task(tasks, data)
    _write_local_task(tasks, data, name="tiny_custom", dataset_path="",
                      custom_dataset="whatever.fn")   # custom_dataset: never the hub
    local_tm = TaskManager(include_path=str(tasks), include_defaults=False)
    check_datasets(["tiny_local", "tiny_custom"], local_tm)
    assert os.environ.get("HF_HUB_OFFLINE") is None
    # and lm-eval indeed builds it with no network
    built = local_tm.load(["tiny_local"])["tasks"]["tiny_local"]
    assert len(built.dataset["test"]) == 4


@pytest.mark.skipif(not any(TASKS_DIR.glob("*.yaml")), reason="mpmoe's offline tasks are not there")
def test_mpmoe_offline_tasks_need_no_network(no_hub, no_probe):
    local_tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert "mpmoe_local" in local_tm.task_index
    check_datasets(["mpmoe_local"], local_tm)
    assert os.environ.get("HF_HUB_OFFLINE") is None


def test_missing_local_data_file_is_reported(tmp_path, no_hub, no_probe):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_local_task(tasks, tmp_path / "nope.jsonl")
    local_tm = TaskManager(include_path=str(tasks), include_defaults=False)
    with pytest.raises(EvalError, match=r"local data file .*nope\.jsonl \(not found\) for task tiny_local"):
        check_datasets(["tiny_local"], local_tm)


# --------------------------------------------------------------------------- offline switches
@pytest.mark.parametrize("var,value", [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "true")])
def test_offline_switch_means_unreachable_without_probing(tm, no_hub, no_probe, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(EvalError) as info:
        check_datasets(["boolq"], tm)
    assert f"offline mode is on ({var}={value})" in str(info.value)
    assert "'aps/super_glue' config 'boolq'" in str(info.value)


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.send_response(404)   # any HTTP answer means "reachable"
        self.end_headers()

    def log_message(self, *args):
        pass


def test_reachable_hub_passes(tm, no_hub, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        check_datasets(["boolq", "arc_easy"], tm)
    finally:
        server.shutdown()
        server.server_close()
    assert os.environ.get("HF_HUB_OFFLINE") is None


def test_silent_server_is_unreachable_within_timeout(tm, no_hub, monkeypatch):
    """A port that accepts the connection but never answers HTTP is not a hub."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(EvalError, match=r"unreachable \(no answer within 0.5s\)"):
            check_datasets(["boolq"], tm, timeout=0.5)
        assert time.monotonic() - start < 3.0
    finally:
        server.close()


def _fake_prepared(cache: Path, repo: str, config: str) -> Path:
    parts = repo.split("/")
    folder = cache / "___".join(parts[:-1] + [hub._snake(parts[-1])]) / config / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"config_name": config}))
    return folder


def test_dataset_cached_layout(tmp_path):
    cache = tmp_path / "cache"
    _fake_prepared(cache, "allenai/ai2_arc", "ARC-Easy")
    _fake_prepared(cache, "allenai/c4", "en-5ab6c7d8")     # a config with data_files: id + hash
    _fake_prepared(cache, "someone/CamelCase", "default")
    assert dataset_cached("allenai/ai2_arc", "ARC-Easy", cache)
    assert not dataset_cached("allenai/ai2_arc", "ARC-Challenge", cache)
    assert dataset_cached("allenai/ai2_arc", None, cache)
    assert dataset_cached("allenai/c4", "en", cache)
    assert dataset_cached("someone/CamelCase", None, cache)
    assert not dataset_cached("allenai/sciq", None, cache)


def test_unreachable_but_cached_switches_to_offline(tm, no_hub, tmp_path):
    _fake_prepared(Path(os.environ["HF_DATASETS_CACHE"]), "aps/super_glue", "boolq")
    check_datasets(["boolq"], tm)                   # no error: the cache has it
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    import datasets.config
    import huggingface_hub.constants

    assert datasets.config.HF_HUB_OFFLINE is True       # already imported: patched too
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_unreachable_but_cached_then_lm_eval_loads_from_cache(tmp_path, no_hub, monkeypatch):
    """End to end: a real prepared dataset in the hub cache layout, hub down -> the check
    passes, switches offline, and lm-eval builds the task from the cache at once."""
    import datasets
    import datasets.config

    cache = Path(os.environ["HF_DATASETS_CACHE"])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # imported before the env change
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "label": i % 2}) + "\n" for i in range(3)))
    datasets.load_dataset("json", data_files={"test": str(data)}, cache_dir=str(tmp_path / "build"))
    prepared = next(p for p in (tmp_path / "build" / "json").glob("*/*/*") if p.is_dir())
    target = cache / "mpmoe-test___tiny_hub" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, target)
    for file in list(target.iterdir()):
        if file.name.startswith("json-"):
            file.rename(target / file.name.replace("json-", "tiny_hub-", 1))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name="tiny_hub")
    (target / "dataset_info.json").write_text(json.dumps(info))

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_local_task(tasks, data, name="tiny_hub_task", dataset_path="mpmoe-test/tiny_hub",
                      dataset_kwargs=None)
    local_tm = TaskManager(include_path=str(tasks), include_defaults=False)
    check_datasets(["tiny_hub_task"], local_tm)
    assert datasets.config.HF_HUB_OFFLINE is True
    start = time.monotonic()
    built = local_tm.load(["tiny_hub_task"])["tasks"]["tiny_hub_task"]
    assert len(built.dataset["test"]) == 3
    assert time.monotonic() - start < 30


def test_need_is_hashable_and_grouped():
    needs = required_datasets({
        "a": {"dataset_path": "x/y", "dataset_name": "c1"},
        "b": {"dataset_path": "x/y", "dataset_name": "c1"},
        "c": {"dataset_path": "json", "dataset_kwargs": {"data_files": "hf://datasets/o/r/f.jsonl"}},
        "d": {"dataset_path": "csv", "dataset_kwargs": {"data_files": ["https://example.org/f.csv"]}},
    })
    assert needs == {
        Need("hub", "x/y", "c1"): ["a", "b"],
        Need("hub_files", "o/r"): ["c"],
        Need("url", "https://example.org/f.csv"): ["d"],
    }
