"""``python -m mpmoe <verb> ...``: the ``mpmoe`` command, e.g. under ``torchrun -m mpmoe eval``."""

import sys

from mpmoe.cli import main

if __name__ == "__main__":  # not when a spawned child re-imports the main module
    sys.exit(main())
