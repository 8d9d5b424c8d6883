"""Workers that cannot outlive their launcher.

``torchrun`` starts each worker in a session of its own (``start_new_session=True``), so
when the agent itself is SIGKILLed (an OOM killer, ``kill -9``, a lost node shell) nothing
tells the workers: they are reparented to init and keep training and writing checkpoints
nobody asked for. :func:`die_with_launcher` makes a worker end at once instead:

1. Linux: ``PR_SET_PDEATHSIG = SIGKILL``: the kernel kills the worker when the process
   that started it exits (checked against the parent recorded at start, in case it already
   has);
2. everywhere: a daemon thread that polls ``os.getppid()`` twice a second and SIGKILLs the
   worker when it changes (the parent-death signal is tied to the launching *thread*; the
   watchdog covers platforms without it).

SIGKILL, not SIGTERM: a SIGTERM would make the trainer save one more checkpoint (its stop
signal), which is exactly the work nobody asked for. Checkpoints are written to
``iter_X.tmp`` and renamed, and the tracker file is replaced atomically, so the last
complete checkpoint stays intact whenever the kill lands.

Only workers started by torchrun (``TORCHELASTIC_RUN_ID`` in the environment) are
supervised; a plain ``mpmoe train`` in a shell is left alone. This module imports nothing
from mpmoe, so every layer may use it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["die_with_launcher", "under_torchrun"]

_PR_SET_PDEATHSIG = 1
_state = {"parent": None}


def under_torchrun() -> bool:
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int, period: float) -> None:
    while True:
        if os.getppid() != parent:
            _kill_self()
        time.sleep(period)


def die_with_launcher(*, force: bool = False, period: float = 0.5) -> bool:
    """Make this process die (SIGKILL) when its parent, the torchrun agent, dies.

    Does nothing outside torchrun unless ``force``; idempotent. Returns whether the
    supervision is on."""
    if not (force or under_torchrun()):
        return False
    if _state["parent"] is not None:
        return True
    parent = os.getppid()
    if parent == 1:  # already orphaned before we could ask
        _kill_self()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        _kill_self()
    _state["parent"] = parent
    threading.Thread(target=_watch, args=(parent, period), name="mpmoe-launcher-watchdog", daemon=True).start()
    return True
