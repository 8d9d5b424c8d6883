"""Builds the data of the offline lm-eval tasks shipped in ``mpmoe/eval/tasks/``.

All four tasks are made from the same source: the documents of the embedded
corpus (:func:`mpmoe.data.embedded.embedded_documents`, prose from the CPython
docs) that the trainer's default data (:func:`mpmoe.data.prepare_embedded`,
split ``"98,1,1"``) puts in its *valid* or *test* split. The default models
never train on them: 32 documents, about 37 KB of text. Documents are numbered
as :func:`mpmoe.data.pipeline.prepare` numbers them (empty documents are
skipped and not counted), and :func:`mpmoe.data.pipeline.split_of` gives the
split of each number, so the held-out set here is exactly the trainer's.

The evaluated default model (``tiny-cpu``) sees only 128 tokens, so every
request of the three short tasks keeps context plus continuation within
:data:`MAX_REQUEST_CHARS` characters (about 90 tokens of this text).

Tasks (group ``mpmoe_local``):

``mpmoe_docs_mc`` (multiple_choice; acc, acc_norm)
    Does the model prefer the true next words of a passage? Context: 30-50
    words of held-out prose (whitespace collapsed to single spaces, cut at
    word boundaries), drawn round robin over documents. Four choices with the
    same number of words (6-10): the true continuation; the true
    continuation's words shuffled (word order); a span of another held-out
    document (topic); and another document's span, shuffled. The gold
    position is balanced over 0-3 and shuffled.

``mpmoe_docs_gen`` (generate_until ``"\\n"``; exact_match, word_prefix)
    Can the model write the next line of a wrapped docstring paragraph?
    Context: verbatim document text ending with a line break, inside a
    paragraph; target: the next line (4+ words). ``exact_match`` compares
    the generated line with the target ignoring case, punctuation and
    spacing; ``word_prefix`` is the fraction of the target's words the
    generation reproduces from the start, in order (partial credit).

``mpmoe_docs_ppl`` (loglikelihood_rolling; word_perplexity, byte_perplexity, bits_per_byte)
    Perplexity of every held-out document, verbatim, each capped at
    :data:`PPL_MAX_CHARS` characters (cut at a line break).

``mpmoe_docs_lastword`` (loglikelihood; perplexity, acc)
    Like LAMBADA: the last word (3+ letters, alphabetic) of a held-out prose
    sentence given the sentence and as many preceding sentences as fit;
    ``acc`` is whether greedy decoding reproduces the word exactly.

Prose is told from code, tables and lists by simple rules
(:func:`is_prose`): paragraphs with no indented line, no ``>>>`` prompts or
table borders, at least 5 words, mostly alphabetic words, ending in
punctuation. The MC and last-word tasks take their text from *runs* of
adjacent prose paragraphs of one document (paragraph breaks become spaces).

Everything is derived with seeded :class:`random.Random` from the corpus
snapshot alone, so the data is byte-identical on every machine.
``python -m mpmoe.eval.local_tasks`` rewrites ``mpmoe/eval/tasks/data/*.jsonl``;
``--check`` verifies the shipped files equal a fresh build (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpmoe.eval import TASKS_DIR

#: where the shipped task data lives
DATA_DIR = TASKS_DIR / "data"

#: the trainer's default train/valid/test split (``mpmoe.data.prepare_embedded``)
SPLIT = "98,1,1"
#: base seed; each task draws from its own ``random.Random(f"{SEED}:{task}")``
SEED = 20260

MC_TASK = "mpmoe_docs_mc"
GEN_TASK = "mpmoe_docs_gen"
PPL_TASK = "mpmoe_docs_ppl"
LASTWORD_TASK = "mpmoe_docs_lastword"
TASK_NAMES = (MC_TASK, GEN_TASK, PPL_TASK, LASTWORD_TASK)

#: context + continuation limit of the short tasks (the default model sees 128 tokens)
MAX_REQUEST_CHARS = 350

MC_DOCS = 200
MC_CONTEXT_WORDS = (30, 50)
MC_CHOICE_WORDS = (6, 10)
#: two MC items of one run must have their contexts end this many words apart
MC_MIN_GAP = 4

GEN_DOCS = 100
GEN_MAX_CONTEXT_CHARS = 260
GEN_TARGET_WORDS = 4
GEN_MAX_TARGET_CHARS = 80

LASTWORD_DOCS = 200
LASTWORD_MIN_CONTEXT_WORDS = 4
#: sentence-final "words" that are abbreviations, not words
LASTWORD_EXCLUDE = frozenset({"etc", "vs", "ie", "eg"})

PPL_MAX_CHARS = 4000

_EDGE_PUNCT = "\"'`()[]*,.;:!?"
_LIST_LINE = re.compile(r"^[\w.]+:\s")
_SENTENCE_END_WORD = re.compile(r"^[A-Za-z]{3,}\.$")


@dataclass(frozen=True)
class HeldOutDoc:
    """One document of the embedded corpus outside the default training split."""

    #: document number as the data pipeline counts them (0-based, non-empty documents)
    number: int
    #: the corpus id, e.g. ``"module:chunk:0"``
    source: str
    #: 1 (valid) or 2 (test)
    split: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    """A block of consecutive non-blank lines of a document."""

    #: character offset of each line's start in the document
    starts: tuple[int, ...]
    #: the lines, without their line breaks
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def held_out_documents(split: str = SPLIT) -> list[HeldOutDoc]:
    """The embedded corpus's documents in the valid and test splits of ``split``, in corpus order."""
    from mpmoe.data.embedded import embedded_documents
    from mpmoe.data.pipeline import parse_split, split_of, split_thresholds

    thresholds = split_thresholds(parse_split(split))
    docs = []
    number = 0
    for doc in embedded_documents():
        text = doc["text"]
        if not text or text.isspace():  # the pipeline skips these without numbering them
            continue
        s = split_of(number, thresholds)
        if s != 0:
            docs.append(HeldOutDoc(number=number, source=doc["id"], split=s, text=text))
        number += 1
    return docs


def paragraphs(text: str) -> list[Paragraph]:
    """``text``'s paragraphs (maximal runs of non-blank lines) with their line offsets."""
    out: list[Paragraph] = []
    starts: list[int] = []
    lines: list[str] = []
    offset = 0
    for line in text.split("\n"):
        if line.strip():
            starts.append(offset)
            lines.append(line)
        elif lines:
            out.append(Paragraph(tuple(starts), tuple(lines)))
            starts, lines = [], []
        offset += len(line) + 1
    if lines:
        out.append(Paragraph(tuple(starts), tuple(lines)))
    return out


def _core(word: str) -> str:
    return word.strip(_EDGE_PUNCT)


def is_prose(par: Paragraph) -> bool:
    """Whether a paragraph reads as English prose (not code, a table, a list or a heading)."""
    if any(line[:1].isspace() for line in par.lines):
        return False  # code block or indented list
    if any(line.startswith((">>>", "...", "+", "|", "*", "-")) for line in par.lines):
        return False  # doctest, table, bullet list
    text = par.text
    if "::=" in text or text.rstrip().endswith("::"):
        return False  # grammar rule, or the introduction of a code block
    if sum(1 for line in par.lines if _LIST_LINE.match(line)) >= 2:
        return False  # "name: description" list
    words = text.split()
    if len(words) < 5:
        return False
    alphabetic = sum(1 for w in words if _core(w).isalpha())
    return alphabetic >= 0.75 * len(words) and text.rstrip()[-1] in ".:;,)!?"


def prose_runs(text: str) -> list[list[str]]:
    """Words of each maximal run of adjacent prose paragraphs of ``text``."""
    runs: list[list[str]] = []
    current: list[str] = []
    for par in paragraphs(text):
        if is_prose(par):
            current.extend(par.text.split())
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def normalize_space(text: str) -> str:
    """``text`` with every run of whitespace made one space, stripped."""
    return " ".join(text.split())


def _rng(task: str) -> random.Random:
    return random.Random(f"{SEED}:{task}")


def _shuffled(words: Sequence[str], rng: random.Random) -> list[str] | None:
    """``words`` in a random different order, or None when no reordering changes the text."""
    if len(set(words)) < 2:
        return None
    out = list(words)
    while out == list(words):
        rng.shuffle(out)
    return out


def _mc_item(runs: Sequence[tuple[HeldOutDoc, list[str]]], r: int, end: int,
             rng: random.Random) -> tuple[str, list[str]] | None:
    """(context, [truth, 3 distractors]) for the passage of run ``r`` whose continuation starts
    at word ``end``, or None when no valid item fits there."""
    doc, words = runs[r]
    lo_ctx, hi_ctx = MC_CONTEXT_WORDS
    k = rng.randint(*MC_CHOICE_WORDS)
    truth = words[end:end + k]
    others = [i for i, (d, w) in enumerate(runs) if d.number != doc.number and len(w) >= k]
    if len(others) < 2:
        return None
    spans = []
    for i in rng.sample(others, 2):
        w = runs[i][1]
        s = rng.randrange(len(w) - k + 1)
        spans.append(w[s:s + k])
    shuffled_truth = _shuffled(truth, rng)
    shuffled_other = _shuffled(spans[1], rng)
    if shuffled_truth is None or shuffled_other is None:
        return None
    choices = [" ".join(c) for c in (truth, shuffled_truth, spans[0], shuffled_other)]
    if len(set(choices)) != 4:
        return None
    c = min(rng.randint(lo_ctx, hi_ctx), end)
    longest = max(len(x) for x in choices)
    while c > lo_ctx and len(" ".join(words[end - c:end])) + 1 + longest > MAX_REQUEST_CHARS:
        c -= 1
    context = " ".join(words[end - c:end])
    if len(context) + 1 + longest > MAX_REQUEST_CHARS:
        return None
    return context, choices


def build_mc(docs: Sequence[HeldOutDoc], n: int = MC_DOCS) -> list[dict]:
    """The ``mpmoe_docs_mc`` documents: passage, 4 continuations, index of the true one.

    Passages are drawn round robin over documents (each document's candidate
    positions in a seeded random order), so the few long documents do not make
    up most of the task; two passages of one run end at least
    :data:`MC_MIN_GAP` words apart.
    """
    rng = _rng(MC_TASK)
    runs = [(doc, words) for doc in docs for words in prose_runs(doc.text)]
    lo_ctx = MC_CONTEXT_WORDS[0]
    hi_k = MC_CHOICE_WORDS[1]
    by_doc: dict[int, list[tuple[int, int]]] = {}  # doc -> [(run, index of the first continuation word)]
    for r, (doc, words) in enumerate(runs):
        by_doc.setdefault(doc.number, []).extend((r, end) for end in range(lo_ctx, len(words) - hi_k + 1))
    queues = [by_doc[d] for d in sorted(by_doc)]
    for q in queues:
        rng.shuffle(q)
    ends_taken: dict[int, list[int]] = {}
    picked = []
    while len(picked) < n and any(queues):
        for q in queues:
            while q and len(picked) < n:
                r, end = q.pop()
                if any(abs(end - e) < MC_MIN_GAP for e in ends_taken.get(r, ())):
                    continue
                item = _mc_item(runs, r, end, rng)
                if item is not None:
                    ends_taken.setdefault(r, []).append(end)
                    picked.append((runs[r][0].number, r, end, runs[r][0], *item))
                    break  # next document
    picked.sort(key=lambda p: p[:3])
    golds = [i % 4 for i in range(len(picked))]
    rng.shuffle(golds)
    items = []
    for i, ((_, _, _, doc, context, choices), gold) in enumerate(zip(picked, golds)):
        wrong = choices[1:]
        rng.shuffle(wrong)
        ordered = wrong[:gold] + [choices[0]] + wrong[gold:]
        items.append({"id": f"mc-{i:04d}", "doc": doc.number, "source": doc.source,
                      "context": context, "choices": ordered, "gold": gold})
    return items


def _target_line_ok(line: str) -> bool:
    words = line.split()
    return (len(words) >= GEN_TARGET_WORDS and len(line) <= GEN_MAX_TARGET_CHARS
            and sum(1 for w in words if _core(w).isalpha()) >= 0.75 * len(words))


def build_gen(docs: Sequence[HeldOutDoc], n: int = GEN_DOCS) -> list[dict]:
    """The ``mpmoe_docs_gen`` documents: verbatim text up to a line break, and the next line."""
    rng = _rng(GEN_TASK)
    candidates = []
    for doc in docs:
        pars = paragraphs(doc.text)
        line_starts = [s for p in pars for s in p.starts]
        for par in pars:
            if not is_prose(par):
                continue
            for li in range(1, len(par.lines)):
                target = par.lines[li].strip()
                if not _target_line_ok(target):
                    continue
                end = par.starts[li]  # the context ends with the previous line's "\n"
                if end - par.starts[li - 1] > GEN_MAX_CONTEXT_CHARS:
                    continue
                start = min(s for s in line_starts if end - GEN_MAX_CONTEXT_CHARS <= s < end)
                candidates.append((doc.number, end, doc, doc.text[start:end], target))
    picked = sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda c: c[:2])
    return [{"id": f"gen-{i:04d}", "doc": doc.number, "source": doc.source, "context": context, "target": target}
            for i, (_, _, doc, context, target) in enumerate(picked)]


def _sentence_starts(words: Sequence[str]) -> list[int]:
    """Indices of the words that begin a sentence in a run of prose words."""
    starts = [0]
    for j in range(1, len(words)):
        if words[j - 1][-1:] in ".!?" and words[j].lstrip(_EDGE_PUNCT)[:1].isupper():
            starts.append(j)
    return starts


def build_lastword(docs: Sequence[HeldOutDoc], n: int = LASTWORD_DOCS) -> list[dict]:
    """The ``mpmoe_docs_lastword`` documents: text up to a sentence's last word, and that word."""
    rng = _rng(LASTWORD_TASK)
    candidates = []
    seen = set()
    for doc in docs:
        for r, words in enumerate(prose_runs(doc.text)):
            starts = _sentence_starts(words)
            for j, w in enumerate(words):
                if not _SENTENCE_END_WORD.match(w) or w[:-1].lower() in LASTWORD_EXCLUDE:
                    continue
                if j + 1 < len(words) and j + 1 not in starts:
                    continue  # a period inside a sentence ("e.g. Unix")
                target = w[:-1]
                own = max(s for s in starts if s <= j)
                # the earliest sentence start whose text still fits; else cut this sentence's front
                fitting = [s for s in starts if s <= own and len(" ".join(words[s:j])) + 1 + len(target)
                           <= MAX_REQUEST_CHARS]
                first = min(fitting) if fitting else own
                while len(" ".join(words[first:j])) + 1 + len(target) > MAX_REQUEST_CHARS:
                    first += 1
                if j - first < LASTWORD_MIN_CONTEXT_WORDS:
                    continue
                context = " ".join(words[first:j])
                if (context, target) in seen:
                    continue
                seen.add((context, target))
                candidates.append((doc.number, r, j, doc, context, target))
    picked = sorted(rng.sample(candidates, min(n, len(candidates))), key=lambda c: c[:3])
    return [{"id": f"lastword-{i:04d}", "doc": doc.number, "source": doc.source, "context": context,
             "target": target}
            for i, (_, _, _, doc, context, target) in enumerate(picked)]


def build_ppl(docs: Sequence[HeldOutDoc]) -> list[dict]:
    """The ``mpmoe_docs_ppl`` documents: each held-out document, capped at a line break."""
    items = []
    for i, doc in enumerate(docs):
        text = doc.text
        if len(text) > PPL_MAX_CHARS:
            cut = text.rfind("\n", 0, PPL_MAX_CHARS + 1)
            text = text[:cut if cut > 0 else PPL_MAX_CHARS]
        items.append({"id": f"ppl-{i:04d}", "doc": doc.number, "source": doc.source, "text": text.rstrip()})
    return items


def build_all(docs: Sequence[HeldOutDoc] | None = None) -> dict[str, list[dict]]:
    """Every task's documents, by task name."""
    docs = held_out_documents() if docs is None else docs
    return {MC_TASK: build_mc(docs), GEN_TASK: build_gen(docs), PPL_TASK: build_ppl(docs),
            LASTWORD_TASK: build_lastword(docs)}


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """``rows`` as JSON lines: sorted keys, UTF-8 text kept as is, ``"\\n"`` line endings."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def build(out_dir: str | Path = DATA_DIR) -> dict[str, int]:
    """Write ``<out_dir>/<task>.jsonl`` for every task; returns the document count per task."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in build_all().items():
        (out / f"{name}.jsonl").write_bytes(jsonl_bytes(rows))
        counts[name] = len(rows)
    return counts


def check(data_dir: str | Path = DATA_DIR) -> list[str]:
    """Differences between the task data in ``data_dir`` and a fresh build (empty when equal)."""
    data = Path(data_dir)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        for name in TASK_NAMES:
            fresh = (Path(tmp) / f"{name}.jsonl").read_bytes()
            shipped = data / f"{name}.jsonl"
            if not shipped.is_file():
                problems.append(f"{shipped}: missing")
            elif shipped.read_bytes() != fresh:
                problems.append(f"{shipped}: differs from a fresh build")
    return problems


def _iter_summary(counts: dict[str, int], out_dir: Path) -> Iterator[str]:
    total = 0
    for name, count in counts.items():
        size = (out_dir / f"{name}.jsonl").stat().st_size
        total += size
        yield f"{name}: {count} docs, {size / 1024:.1f} KiB"
    yield f"total: {total / 1024:.1f} KiB in {out_dir}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mpmoe.eval.local_tasks [--check] [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m mpmoe.eval.local_tasks",
                                     description="Rebuild (or --check) the data of the offline lm-eval tasks "
                                                 "in mpmoe/eval/tasks/ from the embedded corpus's held-out documents.")
    parser.add_argument("--check", action="store_true",
                        help="verify the files equal a fresh build instead of writing them (exit 1 if not)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help=f"data folder (default: {DATA_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out_dir)
        if problems:
            for p in problems:
                print(p, file=sys.stderr)
            print("the task data is stale: rebuild it with python -m mpmoe.eval.local_tasks", file=sys.stderr)
            return 1
        print(f"task data in {args.out_dir} is up to date")
        return 0
    counts = build(args.out_dir)
    for line in _iter_summary(counts, args.out_dir):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
