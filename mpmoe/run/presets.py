"""Presets: model + training settings as data files (``configs/<name>.toml``).

A preset is a TOML file whose tables (``[model]``, ``[moe]``, ``[training]``, ...) hold
``mpmoe train`` options under their Megatron-LM names with underscores
(``num_layers = 9`` is ``--num-layers 9``). Tables only group the keys for the reader;
they are merged into one flat dict. Command-line flags override preset values.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from mpmoe.errors import UserError

__all__ = ["CONFIG_DIR", "PresetError", "fraction_of_iters", "list_presets", "load_preset", "preset_path"]

#: The presets ship inside the package (``mpmoe/configs``, package data) so that a
#: non-editable ``pip install`` has them; ``configs/`` at the repository root links here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class PresetError(UserError, ValueError):
    """Unknown preset or malformed preset file (one-line message)."""


def fraction_of_iters(fraction: float, iters: int) -> int:
    """Iterations of a fraction of a run (``lr_wsd_decay_fraction``), at least 1.

    Rounded down, as the launchers of FLAME-MoE and the MP-MoE authors compute the WSD
    decay (``$((TRAIN_ITERS / 10))``): 0.1 of 2121 is 212, of 5685 is 568. Both launchers
    (``mpmoe train`` and :mod:`mpmoe.megatron_lm.flags`) use this one function.
    """
    return max(1, math.floor(fraction * iters + 1e-9))


def list_presets() -> list[str]:
    """Names of the presets in :data:`CONFIG_DIR` (file names without ``.toml``)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """The file of a preset name (``flame-moe-38m``) or an explicit ``.toml`` path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(list_presets()) or f"none found in {CONFIG_DIR}"
        raise PresetError(f"unknown preset {name_or_path!r} (known: {known})")
    return path


def load_preset(name_or_path: str) -> dict:
    """Flat ``{option: value}`` of a preset; raises :class:`PresetError`."""
    path = preset_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: {exc}") from None
    flat: dict = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k in flat:
                raise PresetError(f"{path}: option {k!r} is set twice")
            flat[k] = v
    return flat
