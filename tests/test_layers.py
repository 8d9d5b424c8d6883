"""The layering of docs/design.md, read from the import statements of every file in mpmoe/
(module-level and function-level imports alike, relative ones resolved)."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mpmoe"

# Modules every layer may use (they import nothing from mpmoe themselves).
BASE = {"errors", "deps", "layout", "supervise", "__version__"}
DRIVERS = {"train", "eval", "analysis", "export", "experts", "megatron_lm"}
SHARED = {"routing", "surgery", "megatron", "data", "run", "store"}
# package (or top-level module) -> the mpmoe packages it may import besides BASE and itself
ALLOWED = {
    "routing": set(),
    "surgery": set(),
    "megatron": {"routing", "surgery"},
    "data": set(),
    "run": {"routing", "surgery", "megatron", "data"},
    "store": {"routing", "surgery", "megatron", "data", "run"},
    **{d: SHARED for d in DRIVERS},
}


@functools.lru_cache(maxsize=None)
def _imports(path: Path) -> frozenset:
    """The mpmoe modules ``path`` imports, as dotted names."""
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts)[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "mpmoe":  # from mpmoe import store
                out.update(f"mpmoe.{a.name}" for a in node.names)
            else:
                out.add(module)
    return frozenset(m for m in out if m == "mpmoe" or m.startswith("mpmoe."))


def _owner(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


FILES = sorted(ROOT.rglob("*.py"))


def test_the_scan_sees_imports():
    """The scanner finds absolute, relative and function-level imports (no vacuous pass)."""
    store = _imports(ROOT / "store.py")
    assert "mpmoe.run.args" in store and "mpmoe.run.model" in store  # function-level imports
    assert "mpmoe.train.loop" in _imports(ROOT / "train" / "cli.py")
    assert any(_owner(f) == "train" for f in FILES) and len(FILES) > 50


def test_only_the_trainer_imports_the_trainer():
    """Drivers rebuild runs through mpmoe.run and mpmoe.store, never through mpmoe.train
    (only the CLI dispatch, mpmoe/cli.py, may import the trainer's entry point)."""
    offenders = [f"{f.relative_to(ROOT.parent)}: {m}" for f in FILES if _owner(f) not in ("train", "cli")
                 for m in sorted(_imports(f)) if m == "mpmoe.train" or m.startswith("mpmoe.train.")]
    assert not offenders, offenders


@pytest.mark.parametrize("owner", sorted(ALLOWED))
def test_layers_import_only_below(owner):
    allowed = ALLOWED[owner] | BASE | {owner}
    wrong = [f"{f.relative_to(ROOT.parent)}: {m}" for f in FILES if _owner(f) == owner
             for m in sorted(_imports(f)) if m != "mpmoe" and m.split(".")[1] not in allowed]
    assert not wrong, wrong


def test_every_package_has_a_rule():
    owners = {_owner(f) for f in FILES} - BASE - {"__init__", "__main__", "cli"}
    assert owners <= set(ALLOWED), owners - set(ALLOWED)
