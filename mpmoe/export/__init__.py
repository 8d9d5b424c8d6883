"""Hugging Face interop: ``mpmoe export hf`` (:mod:`mpmoe.export.hf`) and ``mpmoe import hf``
(:mod:`mpmoe.export.hf_import`); the MoPE remote-code template lives in ``hf_code/``.
See docs/export.md."""
