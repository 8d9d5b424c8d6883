"""``mpmoe train``: the training loop on megatron-core (see docs/train.md).

* :func:`mpmoe.train.cli.main` -- the command line (``mpmoe train ...``);
* :func:`mpmoe.train.args.parse_args` -- Megatron-LM-style flags over a ``configs/*.toml`` preset;
* :func:`mpmoe.train.loop.train` -- the loop (returns a summary dict);
* :mod:`mpmoe.train.checkpoint`, :mod:`mpmoe.train.optim`, :mod:`mpmoe.train.metrics`,
  :mod:`mpmoe.train.data`, :mod:`mpmoe.train.presets` -- its parts.

Importing this package does not import megatron-core.
"""
