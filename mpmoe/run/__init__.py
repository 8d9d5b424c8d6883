"""What a run is, shared by the trainer and every driver that reads its output.

* :mod:`mpmoe.run.args` -- ``mpmoe train``'s flags (Megatron-LM names) over a preset,
  validation, ``MoPEConfig`` keyword arguments, and a run rebuilt from a checkpoint's
  record of its flags (:func:`~mpmoe.run.args.args_from_saved`);
* :mod:`mpmoe.run.presets` -- ``configs/*.toml``;
* :mod:`mpmoe.run.model` -- :func:`~mpmoe.run.model.build_model` from those flags;
* :mod:`mpmoe.run.data` -- the run's data (embedded corpus or ``--data-path``) and datasets;
* :mod:`mpmoe.run.checkpoint` -- the checkpoint format: save, load, find, the recorded run;
* :mod:`mpmoe.run.megatron_lm` -- reading checkpoints written by Megatron-LM.

The trainer (:mod:`mpmoe.train`) and :mod:`mpmoe.store` build on it; it imports no driver.
Importing this package does not import megatron-core.
"""
