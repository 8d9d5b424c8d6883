"""CPU shim for running a Megatron-LM tree's ``pretrain_gpt.py`` without CUDA (tests only).

Put this folder first on ``PYTHONPATH`` (after the tree itself) and set
``TORCHDYNAMO_DISABLE=1``. It acts only in a process whose ``sys.argv[0]`` ends in
``pretrain_gpt.py`` (torchrun's own process and every other Python are untouched), and it
is never part of the patch series or of mpmoe's runtime. What it replaces, in the order a
run meets it (megatron-core 0.19 / Megatron-LM core_r0.19.0):

* mpmoe's megatron-core CPU compatibility (``mpmoe.megatron.cpu_compat.enable``): model,
  DDP buffers, optimizer, checkpoint writer;
* ``initialize_megatron(allow_no_cuda=True)`` (else "Megatron requires CUDA.");
* ``torch.cuda.device_count() == 1`` (``_initialize_distributed`` builds the model-parallel
  groups only with a device), ``set_device``/``set_stream`` no-ops, ``current_device()``
  is the CPU, ``synchronize`` a no-op, ``Stream``/``current_stream`` streams with nothing
  to wait for, ``get_rng_state`` the CPU generator's;
* ``torch.tensor``/``torch.rand``/``torch.zeros``/... with ``device="cuda"`` allocate on
  the CPU; ``Tensor.cuda()`` is the identity (``get_batch``);
* ``megatron.core.datasets.utils.compile_helpers`` is a no-op (the wheel ships the
  compiled helpers, a tree assembled from it has no Makefile).

And one for speed only: the ``torch_dist`` writer's results queue lives in a
``multiprocessing`` manager started with ``fork`` instead of ``spawn`` (a spawned manager
re-imports ``pretrain_gpt.py`` and megatron: ~5 s per saving process on a CI CPU).
"""

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") == "pretrain_gpt.py":
    import functools
    import importlib.abc
    import importlib.machinery

    import torch

    def _cpu(device):
        text = str(device) if device is not None else ""
        return "cpu" if text == "cuda" or text.startswith("cuda:") or isinstance(device, int) else device

    def _on_cpu(factory):
        @functools.wraps(factory)
        def call(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return factory(*args, **kwargs)
        return call

    class _Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, stream):
            pass

        def wait_event(self, event):
            pass

        def synchronize(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    for _name in ("tensor", "rand", "randn", "zeros", "ones", "empty", "full", "arange"):
        setattr(torch, _name, _on_cpu(getattr(torch, _name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    torch.cuda.set_stream = lambda stream: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda device=None: _Stream()
    torch.cuda.stream = lambda stream: _Stream()
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()

    def _after_import(name, module):
        if name == "megatron.training.training":
            module.initialize_megatron = functools.partial(module.initialize_megatron, allow_no_cuda=True)
        elif name == "megatron.core.datasets.utils":
            module.compile_helpers = lambda: None
        elif name == _WRITER:
            queue = module.get_write_results_queue
            module.get_write_results_queue = lambda *args, **kwargs: queue("fork")
        elif name == "megatron.core":
            from mpmoe.megatron import cpu_compat

            cpu_compat.enable()

    _WRITER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
    _HOOKED = ("megatron.training.training", "megatron.core.datasets.utils", "megatron.core", _WRITER)

    class _Hook(importlib.abc.MetaPathFinder):
        """Runs ``_after_import`` once the named modules have executed."""

        def find_spec(self, name, path=None, target=None):
            if name not in _HOOKED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return None
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                _after_import(name, module)

            spec.loader.exec_module = run
            return spec

    sys.meta_path.insert(0, _Hook())
