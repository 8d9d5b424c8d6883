"""Parallel layout arithmetic shared by the launchers: pure functions, no torch import.

* :func:`visible_gpus` - the GPUs a process sees, as torch counts them
  (``CUDA_VISIBLE_DEVICES`` included);
* :func:`expert_parallel_size` - the expert-parallel size a launcher picks;
* :func:`fit_micro_batch` - the micro-batch that fits the global batch.

``scripts/train.sh`` / ``mpmoe train`` and ``scripts/megatron_lm/pretrain.sh``
(:mod:`mpmoe.megatron_lm.launch`) use the same functions.
"""

from __future__ import annotations

from typing import Mapping, Optional

__all__ = ["expert_parallel_size", "fit_micro_batch", "visible_gpus"]


def _leading_int(text: str) -> int:
    """The integer ``text`` starts with (``strtoul``-like, as CUDA parses it), else -1."""
    digits = ""
    for i, c in enumerate(text):
        if c.isdigit() or (i == 0 and c in "+-"):
            digits += c
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return -1


def visible_gpus(env: Mapping[str, str], physical: int) -> int:
    """How many of this node's ``physical`` GPUs a process sees, as torch counts them.

    ``CUDA_VISIBLE_DEVICES`` unset: all. Otherwise its comma-separated entries up to the
    first invalid one (negative, not a number, or an ordinal >= ``physical``); a repeated
    entry makes the list empty; ``GPU-``/``MIG-`` UUID lists count their entries (at
    most ``physical``). ``""`` or ``-1``: none.
    """
    var = env.get("CUDA_VISIBLE_DEVICES")
    if var is None:
        return physical
    for prefix in ("GPU-", "MIG-"):
        if var.startswith(prefix):
            seen = []
            for elem in var.split(","):
                if elem in seen:
                    return 0
                if not elem.startswith(prefix):
                    break
                seen.append(elem)
            return min(len(seen), physical)
    ordinals = []
    for elem in var.split(","):
        x = _leading_int(elem.strip())
        if x in ordinals:
            return 0
        if x < 0 or x >= physical:
            break
        ordinals.append(x)
    return len(ordinals)


def expert_parallel_size(num_experts: int, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                         etp: Optional[int] = None) -> int:
    """The largest expert-parallel size ``d`` that divides the expert count and the
    data-parallel size ``world / (TP x PP x CP)``, with ``d x ETP x PP`` dividing the world
    (megatron's expert groups; ETP defaults to TP, as in megatron). ``ValueError`` when the
    world is not a multiple of ``TP x PP x CP`` or of ``ETP x PP``."""
    etp = tp if etp is None else etp
    dense = tp * pp * cp
    if world_size < 1 or world_size % dense:
        raise ValueError(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    if world_size % (etp * pp):
        raise ValueError(f"world size {world_size} is not divisible by ETP x PP = {etp} x {pp}")
    dp = world_size // dense
    for d in range(dp, 0, -1):
        if num_experts % d == 0 and dp % d == 0 and world_size % (d * etp * pp) == 0:
            return d
    return 1


def fit_micro_batch(global_batch: int, micro_batch: int, dp: int) -> tuple[int, Optional[str]]:
    """``(micro batch, log line or None)``: ``micro_batch``, or the largest smaller one with
    ``global_batch`` divisible by ``micro x dp``. ``ValueError`` when even 1 does not fit
    (``global_batch`` not divisible by the data-parallel size)."""
    if global_batch % dp:
        raise ValueError(f"--global-batch-size {global_batch} is not divisible by the data-parallel size {dp}")
    if global_batch % (micro_batch * dp) == 0:
        return micro_batch, None
    m = max(m for m in range(1, micro_batch + 1) if global_batch % (m * dp) == 0)
    return m, (f"--micro-batch-size {micro_batch} -> {m}: --global-batch-size {global_batch} is not "
               f"divisible by {micro_batch} x data-parallel size {dp}")
