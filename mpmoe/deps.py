"""Optional dependencies, checked before a verb starts work: one line naming what to install.

``mpmoe.cli`` checks each verb's :data:`VERB_NEEDS` before importing the verb; a driver
checks the needs that depend on its flags (e.g. ``mpmoe train`` needs ``tokenizers`` only
for the embedded corpus or ``--tokenizer-model``) with :func:`missing`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Iterable, Optional

__all__ = ["VERB_NEEDS", "missing"]

# import name -> how to get it ("mpmoe[extra]", or a base dependency's own package)
INSTALL = {
    "psutil": "psutil (a dependency of mpmoe: pip install psutil)",
    "tokenizers": "the data extra: pip install 'mpmoe[data]'",
    "datasets": "the data extra: pip install 'mpmoe[data]'",
    "lm_eval": "the eval extra: pip install 'mpmoe[eval]'",
    "matplotlib": "the analysis extra: pip install 'mpmoe[analysis]'",
    "sklearn": "the analysis extra: pip install 'mpmoe[analysis]'",
    "ot": "the analysis extra: pip install 'mpmoe[analysis]'",
    "wandb": "wandb (pip install wandb)",
    "scipy": "the experts extra: pip install 'mpmoe[experts]'",
    "transformers": "the export extra: pip install 'mpmoe[export]'",
    "safetensors": "the export extra: pip install 'mpmoe[export]'",
}

# What each verb always needs beyond torch / megatron-core / numpy / tqdm.
VERB_NEEDS = {
    "train": ("psutil",),  # megatron's torch_dist checkpoint writer (it hangs without it)
    "data": ("tokenizers",),
    "eval": ("lm_eval", "tokenizers"),
    "analyze": ("matplotlib", "sklearn", "ot"),
    "experts": ("scipy", "tokenizers"),
    "export": ("transformers", "safetensors", "tokenizers"),
    "import": ("transformers", "safetensors", "tokenizers"),
}


# Imported, not only looked up: megatron's checkpoint writer hangs when psutil is present
# but broken, and the import is cheap (the big extras are only looked up).
IMPORTED = ("psutil",)


def _installed(name: str) -> bool:
    try:
        if name in IMPORTED:
            importlib.import_module(name)
            return True
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(modules: Iterable[str], purpose: str) -> Optional[str]:
    """None when every module imports, else one line: ``"<purpose> needs X, missing: install ..."``."""
    absent = [m for m in modules if not _installed(m)]
    if not absent:
        return None
    how = sorted({INSTALL.get(m, f"{m} (pip install {m})") for m in absent})
    verb = "is" if len(absent) == 1 else "are"
    return f"{purpose} needs {', '.join(absent)}, which {verb} not installed; install {'; '.join(how)}"
