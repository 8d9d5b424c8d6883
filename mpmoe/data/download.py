"""``mpmoe data download``: stream a Hugging Face dataset into local jsonl shards, resumably.

The text column is written to ``OUTPUT_DIR/shard-00000.jsonl.gz``, ... (one
``{"text": ...}`` object per line, ``shard_docs`` documents per shard). Each
shard is written under a temporary name and renamed when complete, then
``OUTPUT_DIR/download-state.json`` is updated; an interrupted download resumes
after the last complete shard: from the stream position saved with that shard
(``IterableDataset.state_dict``), or by skipping the documents already saved.
``mpmoe data prepare --input OUTPUT_DIR`` tokenizes the result.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

from mpmoe.data.errors import DataError
from mpmoe.data.sources import HFSource

STATE = "download-state.json"


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".incomplete")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / STATE)


def download_hf(
    dataset: str,
    output_dir: str | os.PathLike,
    *,
    name: str | None = None,
    split: str = "train",
    text_key: str = "text",
    revision: str | None = None,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    shard_docs: int = 50_000,
    progress: bool | None = None,
) -> dict:
    """Save up to ``max_docs`` documents / ``max_bytes`` bytes of text of a HF dataset as jsonl.gz shards.

    Resumes an earlier, interrupted call with the same dataset/config/split
    in the same ``output_dir``; a finished download returns its state at once.
    Returns the state dict (shards with their document and byte counts).
    """
    from tqdm.auto import tqdm

    if shard_docs < 1:
        raise DataError(f"shard size must be >= 1, got {shard_docs}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = {"dataset": dataset, "config": name, "split": split, "json_key": text_key, "revision": revision}
    state_path = out / STATE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{state_path} is corrupt; delete it (and the shards) to start over") from None
        if state.get("source") != ident:
            raise DataError(f"{out} holds a download of {state.get('source')}, not {ident}; use another --output-dir")
        present = [(out / s["file"]).is_file() for s in state["shards"]]
        if not all(present):  # keep the shards before the first missing one; re-download the rest
            state["shards"] = state["shards"][: present.index(False)]
            state["stream_state"] = None
            state["complete"] = False
    else:
        state = {"source": ident, "shards": [], "complete": False}
    done_docs = sum(s["documents"] for s in state["shards"])
    done_bytes = sum(s["text_bytes"] for s in state["shards"])
    budget_met = (max_docs is not None and done_docs >= max_docs) or (max_bytes is not None and done_bytes >= max_bytes)
    if state.get("complete") or budget_met:
        return state
    for stale in out.glob("*.incomplete"):
        stale.unlink()

    # resume from the saved stream position when there is one (no re-reading), else skip rows
    resume = state.get("stream_state") if state["shards"] else None
    source = HFSource(dataset, name, split=split, text_key=text_key, revision=revision,
                      skip=0 if resume is not None else done_docs, resume_state=resume)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=max_docs, initial=done_docs, unit=" docs", unit_scale=True, disable=not show,
               desc="download", dynamic_ncols=True)
    t0 = time.perf_counter()
    docs, nbytes = done_docs, done_bytes
    stop = False
    it = iter(source)
    try:
        while not stop:
            index = len(state["shards"])
            fname = f"shard-{index:05d}.jsonl.gz"
            tmp = out / (fname + ".incomplete")
            count = size = 0
            try:
                with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=3) as f:
                    for text in it:
                        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                        n = len(text.encode("utf-8"))
                        count, size = count + 1, size + n
                        docs, nbytes = docs + 1, nbytes + n
                        bar.update(1)
                        if (max_docs is not None and docs >= max_docs) or (max_bytes is not None and nbytes >= max_bytes):
                            stop = True
                            break
                        if count >= shard_docs:
                            break
                    else:
                        stop = True  # the stream ended
                        state["complete"] = True
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if count:
                os.replace(tmp, out / fname)
                state["shards"].append({"file": fname, "documents": count, "text_bytes": size})
                state["stream_state"] = source.state_dict()
                _write_state(out, state)
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"{(nbytes - done_bytes) / max(el, 1e-9) / 1e6:.1f} MB/s", refresh=False)
            else:
                tmp.unlink(missing_ok=True)
        if state["shards"] and not state.get("complete"):
            state["complete"] = False
        state["budget"] = {"max_docs": max_docs, "max_bytes": max_bytes}
        _write_state(out, state)
    finally:
        it.close()  # release the dataset stream now, not at interpreter exit
        bar.close()
    if not state["shards"]:
        raise DataError(f"HF dataset {dataset} gave no documents")
    return state
