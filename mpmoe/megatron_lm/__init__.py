"""What a patched Megatron-LM checkout calls: MoPE in ``pretrain_gpt.py``.

The patch series in ``patches/megatron-lm/<branch>/`` only imports this package and
calls it at a few points of Megatron-LM's own code; every decision lives here:

* :mod:`~mpmoe.megatron_lm.args` - the MoPE flags (``--moe-otep-warmup-fraction``, ...)
  and the post-parse check that picks mpmoe's layer spec for MoPE runs (``otep`` itself
  is a choice patched into Megatron-LM's parser);
* :mod:`~mpmoe.megatron_lm.spec` - the ``--spec`` function (MoPE / top-k-with-statistics
  routers on megatron's MoE layer);
* :mod:`~mpmoe.megatron_lm.hooks` - config class, training-step, checkpoint, evaluation
  and logging hooks of ``megatron.training``;
* :mod:`~mpmoe.megatron_lm.flags` - mpmoe's presets as Megatron-LM flags (the launch
  script ``scripts/megatron_lm/pretrain.sh`` uses it).

No module here imports ``megatron.training`` at import time (``check_args`` does when
called); Megatron-LM imports this package.
"""

__all__ = ["add_mpmoe_args", "args_provider", "check_args", "uses_mpmoe"]


def __getattr__(name):  # lazy: ``python -m mpmoe.megatron_lm.flags`` must not import megatron
    if name in __all__:
        from mpmoe.megatron_lm import args

        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
