"""The one exception type of :mod:`mpmoe.eval`.

Problems with user input (a missing checkpoint, an unknown task, a dataset that cannot
be fetched, a model option the checkpoint does not support) are raised as
:class:`EvalError` with a one-line message; ``mpmoe eval`` prints it as
``mpmoe eval: error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

from mpmoe.errors import UserError


class EvalError(UserError):
    """Bad input to evaluation; ``str(err)`` is a one-line explanation."""
