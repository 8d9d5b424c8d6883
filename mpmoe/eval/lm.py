"""The lm-evaluation-harness model for mpmoe checkpoints, registered as ``mpmoe``.

::

    lm_eval --model mpmoe --model_args load=runs/x/ckpt,routing=topk --tasks hellaswag
    mpmoe eval --load runs/x/ckpt --routing topk --tasks hellaswag     # the same, plus a table

One class, lm-eval's three request types:

``loglikelihood``
    Requests sorted longest first and run in right-padded batches of ``batch_size``; one
    forward per batch; the log-probabilities of the continuation tokens are summed, and
    ``is_greedy`` says whether each was the argmax. Padding is excluded from MoE routing
    (megatron's ``padding_mask``). Inputs longer than the model's context keep their last
    ``max_length`` tokens. The padded part of the vocabulary is cut off before the softmax.
``loglikelihood_rolling``
    A document's tokens in disjoint windows of ``max_length`` predictions (the first token
    predicted from the end-of-document token, as in training), scored as above and summed.
``generate_until``
    Greedy decoding, batched, with megatron's static KV cache (``StaticInferenceContext``):
    one forward over the shortest prompt of the batch, then one token per step; rows with
    longer prompts are fed their own prompt tokens until those run out (no padding inside
    the sequences, so no attention masks are needed). Stops at any of ``until``, the
    end-of-document token or ``max_gen_toks``; the text is cut before the first stop string.
    ``kv_cache=False`` recomputes the whole prefix every step (same tokens, slower; a check).
    Sampling (``do_sample=True``) is refused: the MP-MoE suite is greedy.

Data parallelism: under ``torchrun`` each rank loads the whole model and lm-eval gives each
rank its share of the documents; ``rank``/``world_size``/``all_gather``/``gather_object``/
``barrier`` are torch.distributed's.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mpmoe.eval.errors import EvalError
from mpmoe.eval.loader import EvalModel, load_eval_model

__all__ = ["MpmoeLM"]

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE


def _as_int(value, name: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise EvalError(f"{name} must be >= {minimum}, got {number}")
    return number


@register_model("mpmoe")
class MpmoeLM(TemplateLM):
    """An mpmoe checkpoint as an lm-eval language model.

    Args (all may come from ``--model_args key=value,...``):
        load: checkpoint (a ``--save`` folder or one ``iter_XXXXXXX`` folder).
        routing: ``auto`` | ``mope`` | ``topk`` (see :mod:`mpmoe.eval.loader`).
        dtype: ``auto`` | ``fp32`` | ``bf16``.
        device: ``cpu`` | ``cuda`` (default: CUDA when available).
        batch_size: requests per forward (loglikelihood) / sequences per decode batch.
        max_length: context in tokens (default: the run's ``--seq-length``).
        max_gen_toks: default cap on generated tokens when a task does not set one.
        ckpt_step: iteration to load from a save folder (default: the latest).
        tokenizer: tokenizer folder overriding the checkpoint's.
        model_flags: ``mpmoe train`` flags (one string) for checkpoints that do not store them.
        kv_cache: decode with the KV cache (default true).
        routing_dump_dir: write every forward's routing decisions there.
        progress: progress bars (default true; rank 0 only).
        eval_model: an already loaded :class:`~mpmoe.eval.loader.EvalModel` (Python use).
        max_batch_size: accepted for lm-eval's CLI, unused (no automatic batch size).

    Under lm-eval's own CLI (``mpmoe eval harness``), ``--batch_size`` and ``--device``
    apply unless ``--model_args`` sets them.
    """

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "MpmoeLM":
        # lm-eval passes its CLI's batch_size/device/max_batch_size on top of --model_args;
        # a value given in --model_args wins instead of clashing with them.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise
            log.warning("no CUDA device: evaluating on the CPU (lm-eval asked for %s)", extra.pop("device"))
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MpmoeLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(
        self,
        load: Optional[str] = None,
        routing: str = "auto",
        dtype: str = "auto",
        device: Optional[str] = None,
        batch_size=16,
        max_length=None,
        max_gen_toks=256,
        ckpt_step=None,
        tokenizer: Optional[str] = None,
        model_flags: Optional[str] = None,
        kv_cache=True,
        routing_dump_dir: Optional[str] = None,
        routing_ablation: Optional[dict] = None,
        progress=True,
        seed=1234,
        eval_model: Optional[EvalModel] = None,
        max_batch_size=None,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            raise EvalError(f"mpmoe model: unknown argument(s) {', '.join(sorted(unused))}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise EvalError("batch_size 'auto' is not supported by the mpmoe model; give a number")
        self.batch_size = _as_int(batch_size, "batch_size")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.kv_cache = _as_bool(kv_cache)
        self.progress = _as_bool(progress)
        self._owns_distributed = False
        if eval_model is None:
            if load is None:
                raise EvalError("mpmoe model: `load` (the checkpoint folder) is required")
            from megatron.core import parallel_state

            if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
                from mpmoe.megatron import init_distributed

                self._owns_distributed = not dist.is_initialized()
                init_distributed(seed=_as_int(seed, "seed", 0))
            elif max(parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_pipeline_model_parallel_world_size(),
                     parallel_state.get_expert_model_parallel_world_size()) > 1:
                raise EvalError("the mpmoe model evaluates with one whole model per process; megatron's "
                                "parallel state here has tensor/pipeline/expert parallelism > 1 "
                                "(call mpmoe.megatron.init_distributed() with the defaults first)")
            import shlex

            try:
                eval_model = load_eval_model(
                    load, routing=routing, dtype=dtype, device=device,
                    step=None if ckpt_step in (None, "") else _as_int(ckpt_step, "ckpt_step", 0),
                    tokenizer=tokenizer, model_flags=shlex.split(model_flags) if model_flags else None,
                    routing_dump_dir=routing_dump_dir, routing_ablation=routing_ablation,
                )
            except BaseException:
                self.close()
                raise
        self.em = eval_model
        self.max_length = self.em.max_length if max_length in (None, "") else _as_int(max_length, "max_length", 2)
        if self.em.args.position_embedding_type == "learned_absolute" and \
                self.max_length > self.em.args.max_position_embeddings:
            raise EvalError(f"max_length {self.max_length} exceeds the model's learned positions "
                            f"({self.em.args.max_position_embeddings})")
        self._device = self.em.device
        #: running totals (benchmarks, logs): generated tokens, model forwards
        self.counters = {"generated_tokens": 0, "forwards": 0}
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.em.eod_id

    @property
    def tokenizer_name(self) -> str:
        return f"mpmoe-{self.em.checkpoint}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return list(self.em.tokenizer.encode(string, add_special_tokens=False).ids)

    def tok_decode(self, tokens) -> str:
        return self.em.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group if this object created it."""
        if self._owns_distributed:
            from mpmoe.megatron import destroy_distributed

            destroy_distributed()
            self._owns_distributed = False

    def _bar(self, total: int, desc: str, disable_tqdm: bool):
        return tqdm(total=total, desc=desc, disable=disable_tqdm or not self.progress or self.rank != 0)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # Tokenized as lm-eval's TemplateLM does: an empty context becomes the prefix (end-of-
        # document) token; otherwise the context's trailing whitespace moves into the
        # continuation (_encode_pair). Edge cases lm-eval's HF model asserts on are scored in
        # _loglikelihood_tokens instead (see there).
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation)
                ctx = [self.prefix_token_id]
                if cont and cont[0] == self.prefix_token_id:
                    ctx, cont = cont[:1], cont[1:]
            else:
                ctx, cont = self._encode_pair(context, continuation)
            pairs.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[(cache key, context ids, continuation ids)]`` -> ``[(sum logprob, is_greedy)]``.

        Two requests lm-eval's HF model asserts on are scored: a continuation of no tokens
        (an empty string: log-probability 0, greedy) and a context of no tokens (a context that
        was only whitespace, moved into the continuation): the prefix token stands for it, as
        for an empty context."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        prepared = []  # (index, input ids, target ids)
        truncated = empty = 0
        for i, (key, ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
                empty += 1
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
                continue
            whole = (list(ctx) or [self.prefix_token_id]) + list(cont)
            targets = list(cont)
            if len(whole) - 1 > self.max_length:
                whole = whole[-(self.max_length + 1):]
                if len(targets) > self.max_length:
                    targets = targets[-self.max_length:]
                    truncated += 1
            prepared.append((i, whole[:-1], targets))
        if empty:
            log.info("%d loglikelihood request(s) with a continuation of no tokens: scored 0.0", empty)
        if truncated:
            log.warning("%d continuation(s) longer than the context (%d tokens): only their last "
                        "%d tokens are scored", truncated, self.max_length, self.max_length)
        prepared.sort(key=lambda r: (-len(r[1]), r[0]))
        bar = self._bar(len(prepared), "loglikelihood", disable_tqdm)
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start:start + self.batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            lengths = torch.tensor([len(inp) for _, inp, _ in chunk])
            for row, (_, inp, _) in enumerate(chunk):
                tokens[row, : len(inp)] = torch.tensor(inp)
            logits = self.em.forward(tokens, lengths=lengths)
            self.counters["forwards"] += 1
            for row, (i, inp, targets) in enumerate(chunk):
                n = len(targets)
                lp = torch.log_softmax(logits[row, len(inp) - n: len(inp)].float(), dim=-1)
                target = torch.tensor(targets, device=lp.device)
                score = float(lp.gather(1, target.unsqueeze(1)).sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (score, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = []  # (request index, (None, context ids, continuation ids))
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((i, (None, ctx, cont)))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (score, _) in zip(windows, scores):
            totals[i] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        kw = dict(gen_kwargs or {})
        if _as_bool(kw.pop("do_sample", False)) or float(kw.pop("temperature", 0.0) or 0.0) > 0.0:
            raise EvalError("the mpmoe model decodes greedily only (do_sample=False, temperature=0)")
        until = kw.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise EvalError(f"generation `until` must be a string or a list of strings, got {until!r}")
        max_gen = _as_int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        return [u for u in until if u], max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1] or {}, sort_keys=True, default=str), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        for indices in groups.values():
            until, max_gen = self._generation_settings(requests[indices[0]].args[1])
            encoded = {i: self._prompt(requests[i], max_gen) for i in indices}
            max_gen = min(max_gen, self.max_length - 1)
            order = sorted(indices, key=lambda i: (-len(encoded[i]), i))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts, _ = self._greedy([encoded[i] for i in chunk], until, max_gen)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _prompt(self, request, max_gen: int) -> list[int]:
        """The prompt's ids, left-truncated to ``max_length - max_gen_toks`` as lm-eval's models
        do (the first truncation is logged). A ``max_gen_toks`` that leaves the prompt no room
        (lm-eval's HF model refuses it) keeps the last ``max_length // 2`` prompt tokens."""
        ids = self.tok_encode(request.args[0]) or [self.prefix_token_id]
        room = self.max_length - max_gen
        if room < 1:
            room = self.max_length // 2
            if not getattr(self, "_warned_room", False):
                self._warned_room = True
                log.warning("max_gen_toks %d leaves no room for the prompt in a context of %d tokens: "
                            "prompts keep their last %d tokens", max_gen, self.max_length, room)
        if len(ids) > room:
            if not getattr(self, "_warned_truncation", False):
                self._warned_truncation = True
                log.warning("generate_until: the prompt of task %s, document %s has %d tokens, more than "
                            "max_length - max_gen_toks = %d: keeping its last %d (left truncation, as "
                            "lm-eval's models do; later truncations are not logged)",
                            getattr(request, "task_name", "?"), getattr(request, "doc_id", "?"),
                            len(ids), room, room)
            ids = ids[-room:]
        return ids

    def _cut(self, text: str, until: list[str]) -> tuple[str, bool]:
        cut, hit = text, False
        for stop in until:
            pos = cut.find(stop)
            if pos >= 0:
                cut, hit = cut[:pos], True
        return cut, hit

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], until: list[str], max_gen: int
                ) -> tuple[list[str], list[list[int]]]:
        """Greedy continuations of a batch of prompts: the texts (cut at ``until``) and the
        generated token ids (up to the stop, the end-of-document token excluded)."""
        b = len(prompts)
        lens = [len(p) for p in prompts]
        total = min(max(lens) + max_gen, self.max_length)
        tokens = torch.zeros(b, total, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, : len(p)] = torch.tensor(p)
        generated: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        texts = [""] * b
        context = None
        pos = min(lens)
        if self.kv_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            context = StaticInferenceContext(b, total)
            logits = self.em.forward(tokens[:, :pos], inference_context=context)
            context.sequence_len_offset = pos
        else:
            logits = self.em.forward(tokens[:, :pos])
        self.counters["forwards"] += 1
        while True:
            next_ids = logits[:, -1].float().argmax(dim=-1).cpu()
            for row in range(b):
                if pos < lens[row] or done[row]:
                    continue  # still inside its prompt, or finished (its tokens are ignored)
                tok = int(next_ids[row])
                tokens[row, pos] = tok
                if tok == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(tok)
                texts[row], hit = self._cut(self.tok_decode(generated[row]), until)
                if hit or len(generated[row]) >= max_gen:
                    done[row] = True
            pos += 1
            if all(done) or pos >= total:
                break
            if context is not None:
                logits = self.em.forward(tokens[:, pos - 1: pos], inference_context=context,
                                         position_offset=pos - 1)
                context.sequence_len_offset = pos
            else:
                logits = self.em.forward(tokens[:, :pos])
            self.counters["forwards"] += 1
        self.counters["generated_tokens"] += sum(len(g) for g in generated)
        return texts, generated
