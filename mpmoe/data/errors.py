"""The one exception type of :mod:`mpmoe.data`.

Every problem with user input (a missing file, a corrupt index, an unknown
tokenizer, a dataset that cannot be reached offline) is raised as
:class:`DataError` with a one-line message; ``mpmoe data`` prints it as
``mpmoe data: error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

from mpmoe.errors import UserError


class DataError(UserError):
    """Bad input to the data pipeline; ``str(err)`` is a one-line explanation."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (for wrapping library errors)."""
    for line in str(exc).splitlines():
        if line.strip():
            return f"{type(exc).__name__}: {line.strip()}"
    return type(exc).__name__
