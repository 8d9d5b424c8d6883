"""User errors: one base type and the one place that prints them.

Every problem a user can cause (a bad flag, a missing or corrupt file, a tokenizer that does
not match the data) ends as one line ``mpmoe <verb>: error: <message>`` on stderr, at most
:data:`MAX_CHARS` characters, exit status 2, no traceback. The drivers raise their own
subclasses of :class:`UserError` (``DataError``, ``EvalError``, ``ConfigError``, ...);
:func:`run_verb`, called by :mod:`mpmoe.cli` around every verb, turns those and a few library
errors that are the user's doing (file-system errors naming a path, megatron's and torch's
checkpoint errors) into that line. ``MPMOE_DEBUG=1`` shows the traceback instead.

This module imports nothing from mpmoe, so every layer may use it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, Optional

__all__ = ["MAX_CHARS", "STOP_GRACE_S", "ArgumentParser", "Terminated", "UserError", "debug_enabled",
           "exit_on_stop_signals", "folder_problem", "innermost_error", "install_stop_handlers", "one_line",
           "restore_stop_handlers", "run_verb", "stop_signals_received", "user_message"]

#: Longest error line printed (longer messages are cut with "...").
MAX_CHARS = 300


class UserError(Exception):
    """Bad input from the user; ``str(err)`` is a one-line explanation."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split()))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors raised as :class:`UserError` (printed by :func:`run_verb`
    as one line, exit 2); ``--help`` still prints and exits 0."""

    def error(self, message):
        raise UserError(message)


def debug_enabled() -> bool:
    """``MPMOE_DEBUG=1`` (or true/yes/on): show tracebacks instead of one-line errors."""
    return os.environ.get("MPMOE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def one_line(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def innermost_error(exc: BaseException) -> BaseException:
    """torch's ``CheckpointException`` wraps each rank's failure as ``(exception, [FrameSummary
    ...])``: the first rank's exception (recursively), else ``exc`` itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
                failure = failure[0]
            if isinstance(failure, BaseException):
                return innermost_error(failure)
    return exc


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message of an error the user caused, or None for anything else (a bug,
    which keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    name = type(exc).__name__
    if name == "CheckpointException" and type(exc).__module__.startswith("torch.distributed"):
        inner = innermost_error(exc)
        return f"checkpoint: {type(inner).__name__}: {_last_line(inner)}"
    if name == "CheckpointingException" and type(exc).__module__.startswith("megatron"):
        return _last_line(exc) if len(str(exc).splitlines()) > 3 else str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        # a file the user named (or an output folder): "PATH: No such file or directory"
        what = exc.strerror or type(exc).__name__
        return f"{exc.filename}: {what}"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:  # e.g. ENOSPC
        return f"{type(exc).__name__}: {exc.strerror}"
    return None


def folder_problem(path) -> Optional[str]:
    """Why ``path`` cannot be (or become) a folder this process writes in, else None; for
    output flags, checked before any work. Writability is tried (a temporary file in the
    nearest existing folder, removed at once): ``os.access`` says yes to root everywhere,
    also under ``/proc`` or on a read-only file system. Creates nothing."""
    import tempfile

    p = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(p) and not os.path.isdir(p):
        return "exists and is not a folder"
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mpmoe-write-check-", dir=probe)
    except OSError as exc:
        return f"{probe} is not writable ({exc.strerror or type(exc).__name__})"
    os.close(fd)
    os.unlink(tmp)
    return None


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


#: Stop signals received by this process (by :func:`install_stop_handlers`' handler), and
#: the verb to name when a swallowed one has to end the process.
_STOP = {"received": [], "prog": "mpmoe", "timer": None}
#: Seconds a verb has, after a stop signal, to end by itself (a library may swallow Ctrl-C)
#: before the process ends with the one line anyway.
STOP_GRACE_S = 15.0


def _force_exit(signum: int) -> None:
    sys.stderr.write(f"{_STOP['prog']}: stopped by {signal.Signals(signum).name}\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _stop_handler(signum, frame):
    _STOP["received"].append(signum)
    if _STOP["timer"] is None:  # the first signal of this verb (run_verb cancels the timer)
        timer = threading.Timer(STOP_GRACE_S, _force_exit, args=(signum,))
        timer.daemon = True
        timer.start()
        _STOP["timer"] = timer
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


def stop_signals_received() -> list:
    """The stop signals this process has received so far (numbers, in order)."""
    return [int(x) for x in _STOP["received"]]


def install_stop_handlers(prog: Optional[str] = None) -> dict:
    """SIGINT / SIGTERM raise ``KeyboardInterrupt`` / :class:`Terminated` in the main thread,
    are remembered (a library that swallows them does not hide them from the exit status), and
    end the process within :data:`STOP_GRACE_S` seconds whatever the verb does. Main thread only;
    handlers a verb installs itself (``mpmoe train``'s step-boundary stop) take over."""
    if prog:
        _STOP["prog"] = prog
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            previous[sig] = signal.signal(sig, _stop_handler)
    return previous


def run_verb(prog: str, main: Callable[[list], Optional[int]], argv: list) -> int:
    """``main(argv)`` with every user error printed as one line (exit 2).

    Ctrl-C (SIGINT) and SIGTERM end the verb with one line, ``<prog>: stopped by SIGINT``,
    exit 130 / 143, no traceback (a verb may handle them itself, as ``mpmoe train`` does);
    a signal that a library swallowed still sets the exit status (:func:`install_stop_handlers`)."""
    before = len(_STOP["received"])
    previous = install_stop_handlers(prog)
    received = _STOP["received"]
    try:
        code = int(main(argv) or 0)
        return 128 + int(received[before]) if len(received) > before and code == 0 else code
    except (KeyboardInterrupt, Terminated) as exc:
        if debug_enabled():
            raise
        signum = (int(received[before]) if len(received) > before
                  else signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
        sys.stderr.write(f"{prog}: stopped by {signal.Signals(signum).name}\n")
        sys.stderr.flush()
        return 128 + signum
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if isinstance(exc, SystemExit) or debug_enabled():
            raise
        message = user_message(exc)
        if message is None:
            raise
        # one write per line: under torchrun every rank reports, and lines must not interleave
        sys.stderr.write(f"{prog}: error: {one_line(message, MAX_CHARS - len(prog) - 9)}\n")
        sys.stderr.flush()
        return 2
    finally:  # the verb has ended: no forced exit for it; handlers run_verb installed go back
        restore_stop_handlers(previous)


def exit_on_stop_signals() -> None:
    """From now on SIGINT / SIGTERM end the process at once, with the one line and 130 / 143:
    for a command whose verb has finished and which is only exiting (nothing left to stop)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: _force_exit(signum))


def restore_stop_handlers(previous: dict) -> None:
    """Undo :func:`install_stop_handlers` (its return value), and cancel a pending forced exit."""
    if _STOP["timer"] is not None:
        _STOP["timer"].cancel()
        _STOP["timer"] = None
    for sig, handler in previous.items():
        signal.signal(sig, handler)

