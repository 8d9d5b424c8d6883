"""mpmoe: MoPE routing (MP-MoE, ICML 2026) and MoE research tooling on megatron-core.

Layers, lowest first (a layer imports only layers below it):

* :mod:`mpmoe.routing`  - pure-PyTorch routing math (OTEP, Sigma, masks); no megatron.
* :mod:`mpmoe.megatron` - the megatron-core plugin (config, routers, specs, model).
* :mod:`mpmoe.data`, ``mpmoe.train``, ``mpmoe.eval``, ``mpmoe.analysis`` - drivers.
* :mod:`mpmoe.cli`      - the ``mpmoe`` command.
"""

__version__ = "0.1.0.dev0"
