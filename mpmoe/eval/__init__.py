"""Evaluation of mpmoe checkpoints with EleutherAI lm-evaluation-harness (``mpmoe eval``).

* :mod:`mpmoe.eval.loader`: a checkpoint (+ its tokenizer) -> a model ready for inference,
  with the routing mode chosen (MoPE with the trained Sigma, or plain top-k).
* :mod:`mpmoe.eval.lm`: :class:`~mpmoe.eval.lm.MpmoeLM`, the lm-eval model registered as
  ``mpmoe`` (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``).
* :mod:`mpmoe.eval.cli`: ``mpmoe eval --load CKPT --tasks ...`` and ``mpmoe eval table``.
* :mod:`mpmoe.eval.hub`: fail fast, naming the dataset, when a task needs the unreachable hub.
* ``mpmoe/eval/tasks/``: offline tasks built from the embedded corpus's held-out documents
  (group ``mpmoe_local``; :mod:`mpmoe.eval.local_tasks` rebuilds their data).
"""

from pathlib import Path

from mpmoe.eval.errors import EvalError

#: the offline lm-eval tasks shipped with mpmoe (pass to lm-eval as ``include_path``)
TASKS_DIR = Path(__file__).with_name("tasks")

__all__ = ["EvalError", "TASKS_DIR"]
