"""``python -m mpmoe <verb> ...``: the ``mpmoe`` command, e.g. under ``torchrun -m mpmoe eval``."""

import sys

from mpmoe.cli import main

sys.exit(main())
