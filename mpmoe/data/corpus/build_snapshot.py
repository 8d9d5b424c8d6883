"""Regenerate the embedded corpus snapshot (``pydocs.jsonl.xz``).

Maintainer tool, not imported at run time. The embedded corpus is English text
that exists on every machine with Python: the interactive-help topics in
``pydoc_data.topics`` and the docstrings of the standard library's modules,
classes and functions. Both vary between Python patch releases, so the package
ships a snapshot and :mod:`mpmoe.data.embedded` only ever reads the snapshot;
this script is how the snapshot was made (``python -m
mpmoe.data.corpus.build_snapshot``). Docstrings are read with :mod:`ast` from
the library's source files (nothing is imported, so no module side effects).

Python's documentation is distributed under the PSF license.
"""

from __future__ import annotations

import ast
import inspect
import json
import lzma
import os
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).with_name("pydocs.jsonl.xz")
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "lib2to3",
             "ensurepip", "config-3", "turtledemo"}
MIN_CHARS = 200


def _topic_docs() -> list[dict]:
    import pydoc_data.topics as topics

    return [{"id": f"topic:{k}", "text": topics.topics[k].strip()} for k in sorted(topics.topics)]


def _item_docs(node: ast.AST, prefix: str) -> list[str]:
    """Docstrings of the public classes/functions under ``node`` (methods nested)."""
    parts: list[str] = []
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if child.name.startswith("_") and child.name != "__init__":
                continue
            name = prefix + child.name
            doc = ast.get_docstring(child)
            if doc and len(doc) >= 40:
                parts.append(f"{name}\n\n{inspect.cleandoc(doc)}")
            if isinstance(child, ast.ClassDef):
                parts.extend(_item_docs(child, name + "."))
    return parts


def _docstrings(tree: ast.Module) -> list[str]:
    """One document per module docstring and per public top-level class or
    function; pieces shorter than MIN_CHARS are appended to the module document."""
    head = inspect.cleandoc(ast.get_docstring(tree) or "")
    docs: list[str] = []
    small: list[str] = []
    for child in tree.body:
        if not isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        text = "\n\n".join(_item_docs(ast.Module(body=[child], type_ignores=[]), "")).strip()
        if len(text) >= MIN_CHARS:
            docs.append(text)
        elif text:
            small.append(text)
    first = "\n\n".join([head] + small if head else small).strip()
    return ([first] if first else []) + docs


def _module_docs() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for i, text in enumerate(_docstrings(tree)):
            if len(text) >= MIN_CHARS:
                docs.append({"id": f"module:{module}:{i}", "text": text})
    return docs


def main() -> int:
    docs = _topic_docs() + _module_docs()
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    header = json.dumps({"python": sys.version.split()[0], "documents": len(docs)})
    with lzma.open(OUT, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    print(f"{OUT}: {len(docs)} documents, {len(payload) / 1e6:.2f} MB text, "
          f"{os.path.getsize(OUT) / 1e6:.2f} MB compressed ({header})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
