"""``mpmoe train``: the training loop on megatron-core (see docs/train.md).

* :func:`mpmoe.train.cli.main` -- the command line (``mpmoe train ...``);
* :func:`mpmoe.train.loop.train` -- the loop (returns a summary dict);
* :mod:`mpmoe.train.optim`, :mod:`mpmoe.train.metrics`, :mod:`mpmoe.train.faults` -- its parts.

What a run is (flags, presets, the model, data, the checkpoint format) is :mod:`mpmoe.run`,
which every other driver uses too. Importing this package does not import megatron-core.
"""
