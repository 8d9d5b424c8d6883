"""Fault matrix: bad inputs and process faults against `mpmoe train|data|eval|analyze` and the
scripts, each in its own subprocess and folder; prints case, expected, observed, verdict, totals.

    python benchmarks/fault_matrix.py                 # all cases, 3 at a time
    python benchmarks/fault_matrix.py -k train -j 2   # cases whose name contains "train"

Offline (HF_HUB_OFFLINE=1; the hub cases use a closed local port), tiny model (2 layers,
hidden 64, 4 experts, sequence 32, a 300-token BPE trained here), a few iterations per run.
Expectations are what docs/errors.md and issue 14 promise: a user error is one line of at most 300
characters on stderr, exit status 2, no traceback, naming the flag or file; signals stop
training with a checkpoint and exit 130 (SIGINT) / 143 (SIGTERM); after any kill no process
the trainer started survives it. Exit status: 0 when every case passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MPMOE = [PY, "-m", "mpmoe"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "MPMOE": f"{PY} -m mpmoe", "PYTHON": PY}
ENV.pop("MPMOE_DEBUG", None)
ONLINE = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}  # + a closed port
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32", "--num-experts", "4", "--moe-ffn-hidden-size",
         "64", "--moe-shared-expert-intermediate-size", "64", "--moe-layer-freq", "1",
         "--global-batch-size", "4", "--micro-batch-size", "4", "--eval-iters", "1", "--eval-interval", "1000",
         "--log-interval", "1", "--no-tensorboard", "--no-progress", "--make-vocab-size-divisible-by", "64"]


@dataclasses.dataclass
class Result:
    rc: Optional[int]
    out: str
    err: str
    seconds: float
    note: str = ""


@dataclasses.dataclass
class Case:
    name: str
    expected: str
    run: Callable[[Path], Result]
    judge: Callable[[Result], tuple[bool, str]]


# ------------------------------------------------------------------------------ running
def sh(argv, cwd: Path, env=None, timeout=240, stdin=None) -> Result:
    start = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout, stdin=stdin or subprocess.DEVNULL, start_new_session=True)
        return Result(p.returncode, p.stdout, p.stderr, time.perf_counter() - start)
    except subprocess.TimeoutExpired as exc:
        return Result(None, str(exc.stdout or ""), str(exc.stderr or ""), time.perf_counter() - start, "timeout")


def mpmoe(*argv, env=None, timeout=240):
    return lambda d: sh([*MPMOE, *map(str, argv)], d, env, timeout)


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the trainer started its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def signal_run(argv, d: Path, sig: int, *, after: str, second: Optional[int] = None, timeout=240) -> Result:
    """Start ``argv`` in its own session, send ``sig`` once ``after`` appears on its output
    (a second signal ``second`` 0.3 s later), wait; the note lists surviving session members."""
    start = time.perf_counter()
    log = d / "out.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(argv, cwd=d, env=ENV, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    sent = False
    while time.perf_counter() - start < timeout and p.poll() is None:
        if not sent and re.search(after, log.read_text(errors="replace")):
            os.kill(p.pid, sig)
            sent = True
            if second is not None:
                time.sleep(0.3)
                if p.poll() is None:
                    os.kill(p.pid, second)
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    rc = p.wait()
    time.sleep(3)  # children get a moment to notice their parent died
    survivors = session_members(p.pid)
    for pid in survivors:  # leave nothing behind on this machine
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    text = log.read_text(errors="replace")
    note = f"signal {'sent' if sent else 'NOT sent'}; {len(survivors)} orphan(s)"
    return Result(rc, "", text, time.perf_counter() - start, note)


# ------------------------------------------------------------------------------ judging
_WARNING = re.compile(r"Warning: |^\s+warnings\.warn\(|^\s+warn\(")


def one_line_error(*needles: str, max_s: Optional[float] = None):
    def judge(r: Result) -> tuple[bool, str]:
        lines = [ln for ln in r.err.strip().splitlines() if ln.strip() and not _WARNING.search(ln)]
        error_lines = lines if len(lines) == 1 else []  # one line (Python warnings aside), nothing else
        last = lines[-1] if lines else ""
        seen = f"rc={r.rc} {len(lines)} line(s): {last[:110]}"
        if r.note == "timeout":
            return False, f"timeout after {r.seconds:.0f}s"
        ok = (r.rc == 2 and "Traceback" not in r.err and len(error_lines) == 1 and len(error_lines[0]) <= 300
              and all(n.lower() in error_lines[0].lower() for n in needles))
        if max_s is not None and r.seconds > max_s:
            ok, seen = False, seen + f" ({r.seconds:.0f}s > {max_s:g}s)"
        return ok, seen
    return judge


def exit_ok(*needles: str, rc: int = 0):
    def judge(r: Result) -> tuple[bool, str]:
        text = r.out + r.err
        ok = r.rc == rc and "Traceback" not in r.err and all(n.lower() in text.lower() for n in needles)
        tail = (r.err.strip().splitlines() or r.out.strip().splitlines() or [""])[-1]
        return ok, f"rc={r.rc} {r.note} {tail[:100]}".strip()
    return judge


def err(*needles, max_s=None) -> tuple[str, Callable]:
    what = "1-line error, exit 2" + (f", naming {', '.join(needles)}" if needles else "")
    return what, one_line_error(*needles, max_s=max_s)


# ------------------------------------------------------------------------------ shared inputs
class Fixture:
    """Tokenizers, data and a trained checkpoint, built once (sequentially) in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        text = root / "text"
        text.mkdir()
        for i, f in enumerate(sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]):
            shutil.copy(f, text / f"{i}.md")
        self.text = text
        self.tok = root / "tok"
        self.tok2 = root / "tok2"
        self.data = root / "data" / "d"
        self.prefix = str(self.data) + "_text_document"  # --split 1: one output
        self.ckpt = root / "ckpt"
        steps = [
            [*MPMOE, "data", "tokenizer", "--input", text, "--vocab-size", "300", "--output-dir", self.tok, "--no-progress"],
            [*MPMOE, "data", "tokenizer", "--input", text, "--vocab-size", "280", "--output-dir", self.tok2, "--no-progress"],
            [*MPMOE, "data", "prepare", "--input", text, "--tokenizer-model", self.tok, "--output-prefix", self.data,
             "--split", "1", "--no-progress", "--txt-mode", "paragraph"],
            [*MPMOE, "train", *self.train_flags(), "--train-iters", "4", "--save", self.ckpt, "--save-interval", "2",
             "--run-dir", root / "run0", "--moe-stats-dir", root / "stats", "--moe-plot-every", "2"],
        ]
        for argv in steps:
            r = sh([str(a) for a in argv], root, timeout=600)
            if r.rc != 0:
                sys.exit(f"fault_matrix: fixture step failed: {' '.join(map(str, argv))}\n{r.err[-3000:]}")

    def train_flags(self, data=None, tok=None):
        return [*MODEL, "--data-path", str(data or self.prefix), "--tokenizer-model", str(tok or self.tok), "--split", "1,0,0"]


def copy_data(fx: Fixture, d: Path) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(fx.prefix + ext, d / ("d" + ext))
    return str(d / "d")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the cases
def cases(fx: Fixture) -> list[Case]:
    C: list[Case] = []

    def add(name, expect, run):
        what, judge = expect
        C.append(Case(name, what, run, judge))

    T = lambda *a, **kw: mpmoe("train", *fx.train_flags(), "--train-iters", "2", *a, **kw)  # noqa: E731

    # -- train: flags ------------------------------------------------------------------
    for flag, value in [("--num-layers", "0"), ("--hidden-size", "-1"), ("--lr", "-0.1"), ("--lr", "nan"),
                        ("--adam-beta1", "1.0"), ("--adam-beta2", "2"), ("--hidden-dropout", "1.5"),
                        ("--moe-router-topk", "0"), ("--moe-router-topk", "9"), ("--num-experts", "8.5"),
                        ("--micro-batch-size", "0"), ("--global-batch-size", "0"), ("--train-iters", "-5"),
                        ("--clip-grad", "-1"), ("--seed", "-1"), ("--seq-length", "x"), ("--save-interval", "0"),
                        ("--expert-model-parallel-size", "3"), ("--moe-otep-warmup-fraction", "2"),
                        ("--lr-warmup-fraction", "1"), ("--weight-decay", "inf")]:
        add(f"train {flag} {value}", err(flag.lstrip("-").split("-")[0]), T(flag, value))
    add("train unknown flag", err("--no-such-flag"), T("--no-such-flag", "1"))
    add("train --bf16 on CPU", err("--bf16"), T("--bf16"))
    add("train --pipeline-model-parallel-size 2", err("--pipeline-model-parallel-size"), T("--pipeline-model-parallel-size", "2"))
    # -- train: presets ----------------------------------------------------------------
    presets = {"string bool": 'swiglu = "false"\n', "float int": "num_experts = 8.5\n",
               "unknown key": "num_expert = 8\n", "out of range": "hidden_dropout = -0.5\n",
               "bad choice": 'normalization = "BatchNorm"\n', "int as string": 'num_layers = "2"\n',
               "list for int": "hidden_size = [64]\n", "bad toml": "num_layers = \n",
               "duplicate key": "[a]\nlr = 0.1\n[b]\nlr = 0.2\n"}
    for label, body in presets.items():
        def run(d, body=body):
            (d / "p.toml").write_text(body)
            return sh([*MPMOE, "train", "--preset", str(d / "p.toml"), "--train-iters", "1"], d)
        add(f"train preset {label}", err("p.toml"), run)
    add("train unknown preset", err("no-such-preset"), mpmoe("train", "--preset", "no-such-preset"))
    # -- train: files and folders -----------------------------------------------------
    def with_file(flag, sub=""):
        def run(d):
            (d / "f").write_text("x")
            return sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "1", flag, str(d / "f") + sub], d)
        return run
    add("train --save is a file", err("--save"), with_file("--save"))
    add("train --save under a file", err("--save"), with_file("--save", "/ck"))
    add("train --run-dir is a file", err("--run-dir"), with_file("--run-dir"))
    add("train --moe-stats-dir under a file", err("--moe-stats-dir"), with_file("--moe-stats-dir", "/s"))
    add("train --save in /proc", err("/proc"), T("--save", "/proc/mpmoe-fault/ck"))
    add("train --data-path missing", err("--data-path"), T("--data-path", "/nonexistent/x"))
    add("train --tokenizer-model missing", err("--tokenizer-model"), T("--tokenizer-model", "/nonexistent/tok"))
    add("train --load missing", err("--load"), T("--load", "/nonexistent/ck"))

    def truncated_bin(d):
        p = copy_data(fx, d)
        with open(p + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(p + ".bin") // 2)
        return sh([*MPMOE, "train", *fx.train_flags(data=p), "--train-iters", "1"], d)
    add("train truncated .bin", err("d.bin"), truncated_bin)

    def garbage_idx(d):
        p = copy_data(fx, d)
        Path(p + ".idx").write_bytes(os.urandom(200))
        return sh([*MPMOE, "train", *fx.train_flags(data=p), "--train-iters", "1"], d)
    add("train garbage .idx", err("d.idx"), garbage_idx)
    add("train --vocab-size below the data's ids", err("vocabulary"),
        lambda d: sh([*MPMOE, "train", *MODEL, "--data-path", copy_data(fx, d), "--vocab-size", "100",
                      "--split", "1,0,0", "--train-iters", "1"], d))
    add("train manifest tokenizer != --tokenizer-model", err("--tokenizer-model", "tok2"),
        mpmoe("train", *fx.train_flags(tok=fx.tok2), "--train-iters", "1"))
    add("train --vocab-size < tokenizer", err("--vocab-size"),
        T("--vocab-size", "100"))
    add("train tiny run", ("exit 0", exit_ok("done at iteration 2")), T())
    # -- train: process faults (resume, signals, kills) ---------------------------------
    def resume_from(form):
        def run(d):
            src = fx.ckpt if form == "save" else fx.ckpt / "iter_0000004"
            return sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "6", "--load", str(src),
                       "--run-dir", str(d / "run")], d)
        return run
    add("train --load save folder", ("exit 0, says it resumed from iteration 4",
                                     exit_ok("resum", "iteration 4")), resume_from("save"))
    add("train --load iter_ folder", ("exit 0, says it resumed from iteration 4, or 1-line refusal",
                                      lambda r: exit_ok("resum", "iteration 4")(r) if r.rc == 0
                                      else one_line_error("iter_")(r)), resume_from("iter"))

    def empty_load(d):
        (d / "empty").mkdir()
        return sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "1", "--load", str(d / "empty")], d)
    add("train --load empty folder", ("says it starts fresh (or refuses in 1 line)",
                                      lambda r: exit_ok("fresh")(r) if r.rc == 0 else one_line_error("--load")(r)),
        empty_load)

    def metrics_resume(d):
        ck = d / "ck"
        r = sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "4", "--save", str(ck), "--save-interval", "2",
                "--run-dir", str(d / "run")], d)
        if r.rc != 0:
            return r
        shutil.rmtree(ck / "iter_0000004")  # as if killed after logging 3, 4 but before saving 4
        (ck / "latest_checkpointed_iteration.txt").write_text("2\n")
        r = sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "6", "--load", str(ck),
                "--run-dir", str(d / "run")], d)
        its = [json.loads(ln).get("iteration") for ln in (d / "run" / "metrics.jsonl").read_text().splitlines()
               if ln.strip() and '"loss"' in ln]
        r.note = f"iterations logged {its}"
        r.rc = r.rc if sorted(set(its)) == sorted(its) else 99
        return r
    add("train resume: metrics.jsonl has each iteration once", ("exit 0, no duplicate iterations",
                                                                 exit_ok()), metrics_resume)

    def nan_run(d):
        return sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "3", "--lr", "1e30",
                   "--init-method-std", "1e15", "--clip-grad", "0"], d)
    add("train NaN/inf loss", ("named (nan/inf), no traceback",
                               lambda r: ("Traceback" not in r.err and re.search(r"\b(nan|inf)\b", r.err.lower()) is not None,
                                          f"rc={r.rc} {(r.err.strip().splitlines() or [''])[-1][:100]}")), nan_run)

    def long_train(d, save=True):
        argv = [*MPMOE, "train", *fx.train_flags(), "--train-iters", "400", "--run-dir", str(d / "run")]
        return [*map(str, argv), *(["--save", str(d / "ck"), "--save-interval", "1"] if save else [])]

    def sig_case(sig, rc, second=None):
        def run(d):
            r = signal_run(long_train(d), d, sig, after=r"iter 3\b", second=second)
            saved = (d / "ck" / "latest_checkpointed_iteration.txt").is_file()
            r.note += f"; checkpoint {'yes' if saved else 'no'}"
            return r

        def judge(r):
            lines = [ln for ln in r.err.strip().splitlines() if ln.strip()]
            ok = (r.rc == rc and "Traceback" not in r.err and "0 orphan" in r.note and "checkpoint yes" in r.note)
            return ok, f"rc={r.rc}; {r.note}; {lines[-1][:80] if lines else ''}"
        return run, judge
    for label, sig, rc in (("SIGTERM", signal.SIGTERM, 143), ("SIGINT", signal.SIGINT, 130)):
        run, judge = sig_case(sig, rc)
        C.append(Case(f"train {label} mid-run", f"exit {rc}, checkpoint, no traceback, no orphans", run, judge))
    run, judge = sig_case(signal.SIGINT, 130, second=signal.SIGINT)
    C.append(Case("train double Ctrl-C", "exit 130 at once, no traceback, no orphans",
                  run, lambda r: (r.rc == 130 and "Traceback" not in r.err and "0 orphan" in r.note,
                                  f"rc={r.rc}; {r.note}")))
    for label, pattern in (("during the first save", r"iter 1\b"), ("later save", r"iter 5\b")):
        C.append(Case(f"train SIGKILL {label}", "no process of the trainer survives",
                      lambda d, p=pattern: signal_run(long_train(d), d, signal.SIGKILL, after=p),
                      lambda r: ("0 orphan" in r.note and "signal sent" in r.note, f"rc={r.rc}; {r.note}")))

    def no_psutil(d):
        stub = d / "stub" / "psutil"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("raise ImportError('No module named psutil (fault_matrix stub)')\n")
        return sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "2", "--save", str(d / "ck")], d,
                  env={"PYTHONPATH": str(d / "stub")}, timeout=120)
    add("train --save without psutil", ("works, or 1-line error naming the extra; never hangs",
                                        lambda r: exit_ok()(r) if r.rc == 0 else one_line_error("psutil")(r)), no_psutil)

    def reshard(d):
        return sh([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mpmoe", "train",
                   *fx.train_flags(), "--train-iters", "6", "--load", str(fx.ckpt), "--expert-model-parallel-size", "2",
                   "--global-batch-size", "8", "--run-dir", str(d / "run")], d, env={"OMP_NUM_THREADS": "1"}, timeout=400)

    def mpmoe_lines_under_torchrun(r: Result) -> tuple[bool, str]:
        # torchrun reports a failed worker with its own traceback and table, which the workers
        # cannot suppress: judged here is what mpmoe printed (one distinct line, every rank)
        mine = sorted({ln for ln in r.err.splitlines() if ln.startswith("mpmoe train:")})
        ok = r.rc != 0 and len(mine) == 1 and "--no-load-optim" in mine[0] and len(mine[0]) <= 300
        return ok, f"rc={r.rc} mpmoe printed {len(mine)} distinct line(s): {(mine or [''])[0][:110]}"
    add("train 1-process checkpoint -> EP=2 (optimizer)", ("exit 0, or 1 mpmoe line naming --no-load-optim",
                                                           lambda r: exit_ok()(r) if r.rc == 0
                                                           else mpmoe_lines_under_torchrun(r)), reshard)

    # -- data ------------------------------------------------------------------------------
    D = lambda *a, **kw: mpmoe("data", *a, **kw)  # noqa: E731
    add("data prepare missing input", err("/nonexistent/in"),
        D("prepare", "--input", "/nonexistent/in", "--tokenizer-model", fx.tok, "--output-prefix", "o"))
    add("data prepare empty folder", err(), lambda d: (d / "e").mkdir() or sh(
        [*MPMOE, "data", "prepare", "--input", str(d / "e"), "--tokenizer-model", str(fx.tok), "--output-prefix", "o"], d))
    add("data prepare tokenizer path missing", err("/nonexistent/tok"),
        D("prepare", "--input", fx.text, "--tokenizer-model", "/nonexistent/tok", "--output-prefix", "o"))
    add("data prepare default hub tokenizer offline", err("EleutherAI/pythia-12b", max_s=20),
        D("prepare", "--input", fx.text, "--output-prefix", "o"))
    add("data prepare hub tokenizer, hub unreachable", err("someone/tok", max_s=20),
        D("prepare", "--input", fx.text, "--output-prefix", "o", "--tokenizer-model", "someone/tok",
          env={**ONLINE, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": "hf"}))
    add("data prepare --split bad", err("split"),
        D("prepare", "--input", fx.text, "--tokenizer-model", fx.tok, "--output-prefix", "o", "--split", "a,b"))
    add("data prepare --workers 0", err("--workers"),
        D("prepare", "--input", fx.text, "--tokenizer-model", fx.tok, "--output-prefix", "o", "--workers", "0"))
    add("data prepare --eod-token unknown", err("<nope>"),
        D("prepare", "--input", fx.text, "--tokenizer-model", fx.tok, "--output-prefix", "o", "--eod-token", "<nope>"))
    add("data prepare jsonl without the key", err("text"), lambda d: (d / "a.jsonl").write_text('{"body": "x"}\n') and sh(
        [*MPMOE, "data", "prepare", "--input", str(d / "a.jsonl"), "--tokenizer-model", str(fx.tok), "--output-prefix", "o"], d))
    add("data prepare garbage .jsonl", err("a.jsonl"), lambda d: (d / "a.jsonl").write_bytes(b"\x00\xff{not json\n") and sh(
        [*MPMOE, "data", "prepare", "--input", str(d / "a.jsonl"), "--tokenizer-model", str(fx.tok), "--output-prefix", "o"], d))
    add("data prepare output under a file", err("f"), lambda d: (d / "f").write_text("x") and sh(
        [*MPMOE, "data", "prepare", "--input", str(fx.text), "--tokenizer-model", str(fx.tok), "--output-prefix",
         str(d / "f" / "o")], d))
    add("data prepare two sources", err("exactly one"),
        D("prepare", "--input", fx.text, "--embedded", "--tokenizer-model", fx.tok, "--output-prefix", "o"))
    add("data tokenizer --vocab-size 10", err("--vocab-size"),
        D("tokenizer", "--input", fx.text, "--vocab-size", "10", "--output-dir", "t"))
    add("data tokenizer empty input", err(), lambda d: (d / "e.txt").write_text("") or sh(
        [*MPMOE, "data", "tokenizer", "--input", str(d / "e.txt"), "--output-dir", "t"], d))
    add("data download, hub unreachable", err("someone/data", max_s=20),
        D("download", "--hf-dataset", "someone/data", "--output-dir", "dl",
          env={**ONLINE, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": "hf"}))
    add("data download offline", err("HF_HUB_OFFLINE", max_s=20), D("download", "--output-dir", "dl", "--max-docs", "2"))
    add("data download --max-docs 0", err("--max-docs"), D("download", "--output-dir", "dl", "--max-docs", "0"))
    add("data inspect missing", err("/nonexistent/p"), D("inspect", "/nonexistent/p"))

    def inspect_broken(kind):
        def run(d):
            p = copy_data(fx, d)
            if kind == "bin":
                with open(p + ".bin", "r+b") as f:
                    f.truncate(10)
            elif kind == "idx":
                Path(p + ".idx").write_bytes(b"MMIDIDX\x00\x00" + os.urandom(40))
            else:
                os.remove(p + ".bin")
            return sh([*MPMOE, "data", "inspect", p], d)
        return run
    add("data inspect truncated .bin", err("d.bin"), inspect_broken("bin"))
    add("data inspect garbage .idx", err("d.idx"), inspect_broken("idx"))
    add("data inspect .idx without .bin", err("d.bin"), inspect_broken("nobin"))
    add("data inspect wrong tokenizer", err("tok2"),
        D("inspect", fx.prefix, "--tokenizer-model", fx.tok2))
    add("data inspect bad manifest", err("manifest"), lambda d: (d / "x.manifest.json").write_text("{") and sh(
        [*MPMOE, "data", "inspect", str(d / "x.manifest.json")], d))

    def inspect_after_train(d):
        p = copy_data(fx, d)
        (Path(p) / "cache" / "GPTDataset_indices").mkdir(parents=True)
        return sh([*MPMOE, "data", "inspect", p], d)
    add("data inspect PREFIX beside PREFIX/cache/", ("exit 0", exit_ok("documents")), inspect_after_train)
    add("data inspect ok", ("exit 0", exit_ok("documents")), D("inspect", fx.prefix))
    add("data no subcommand", ("usage, exit 0", exit_ok("prepare")), D())
    add("data unknown subcommand", ("exit 2", exit_ok(rc=2)), D("frobnicate"))

    # -- eval ------------------------------------------------------------------------------
    E = lambda *a, **kw: mpmoe("eval", "--load", fx.ckpt, "--no-progress", "--output-path", "out", *a, **kw)  # noqa: E731
    task = ("--tasks", "mpmoe_docs_lastword", "--limit", "4", "--bootstrap-iters", "0")
    add("eval --load missing", err("/nonexistent/ck"), mpmoe("eval", "--load", "/nonexistent/ck", "--tasks", "x"))
    add("eval --load a file", err("f"), lambda d: (d / "f").write_text("x") and sh(
        [*MPMOE, "eval", "--load", str(d / "f"), "--tasks", "mpmoe_local"], d))
    add("eval --load empty folder", err("latest_checkpointed_iteration"), lambda d: (d / "e").mkdir() or sh(
        [*MPMOE, "eval", "--load", str(d / "e"), "--tasks", "mpmoe_local"], d))
    add("eval unknown task", err("no_such_task"), E("--tasks", "no_such_task"))
    add("eval --ckpt-step missing", err("999"), E(*task, "--ckpt-step", "999"))
    add("eval --batch-size 0", err("--batch-size"), E(*task, "--batch-size", "0"))
    add("eval --max-gen-toks 0", err("--max-gen-toks"), E(*task, "--max-gen-toks", "0"))
    add("eval --limit -1", err("--limit"), E(*task[:2], "--limit", "-1"))
    add("eval --include-path missing", err("/nonexistent/tasks"), E(*task, "--include-path", "/nonexistent/tasks"))
    add("eval --tokenizer smaller vocabulary", err("tok2"), E(*task, "--tokenizer", str(fx.tok2)))
    add("eval --tokenizer missing", err("/nonexistent/tok"), E(*task, "--tokenizer", "/nonexistent/tok"))
    add("eval --routing mope on a top-k model?", ("exit 0 (the fixture is MoPE) or 1-line error",
                                                  lambda r: exit_ok()(r) if r.rc == 0 else one_line_error("routing")(r)),
        E(*task, "--routing", "mope"))
    add("eval hub task offline", err("hellaswag", max_s=90), E("--tasks", "hellaswag", "--limit", "2",
                                                             env={"HF_HOME": "hf"}))
    add("eval damaged checkpoint", err("iter_0000004"), lambda d: (shutil.copytree(fx.ckpt, d / "ck"), [
        p.write_bytes(b"garbage") for p in (d / "ck" / "iter_0000004").glob("*.distcp")]) and sh(
        [*MPMOE, "eval", "--load", str(d / "ck"), *task, "--output-path", "out", "--no-progress"], d))
    add("eval ok", ("exit 0", exit_ok("results.json")), E(*task))

    def edge_task(d):
        rows = [{"ctx": "   ", "cont": "word"}, {"ctx": "Hello there", "cont": ""}, {"ctx": "\n\n", "cont": ""},
                {"ctx": "A normal", "cont": " sentence."}]
        (d / "edge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "tasks").mkdir()
        (d / "tasks" / "edge.yaml").write_text(
            f"task: fault_edge\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'edge.jsonl'}\n"
            "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{ctx}}'\ndoc_to_target: '{{cont}}'\n"
            "target_delimiter: ''\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
        return sh([*MPMOE, "eval", "--load", str(fx.ckpt), "--tasks", "fault_edge", "--include-path", str(d / "tasks"),
                   "--output-path", "out", "--no-progress", "--bootstrap-iters", "0"], d)
    add("eval whitespace context / empty continuation", ("exit 0 (scored, not fatal)", exit_ok("fault_edge")),
        edge_task)
    add("eval long generation prompt", ("exit 0, truncation logged", exit_ok("left truncation")),
        E("--tasks", "mpmoe_docs_gen", "--limit", "2", "--bootstrap-iters", "0", "--gen-kwargs", "max_gen_toks=24"))
    add("eval table empty folder", err(), lambda d: (d / "e").mkdir() or sh([*MPMOE, "eval", "table", str(d / "e")], d))

    # -- analyze ---------------------------------------------------------------------------
    A = lambda *a, **kw: mpmoe("analyze", *a, **kw)  # noqa: E731
    add("analyze stats missing", err("/nonexistent/s"), A("stats", "/nonexistent/s", "--out", "o"))
    add("analyze stats empty folder", err(), lambda d: (d / "e").mkdir() or sh(
        [*MPMOE, "analyze", "stats", str(d / "e"), "--out", "o"], d))
    add("analyze stats garbage .npz", err(), lambda d: (d / "s").mkdir() or (d / "s" / "layer1_seg0_mope.npz").write_bytes(
        b"garbage") and sh([*MPMOE, "analyze", "stats", str(d / "s"), "--out", "o"], d))
    add("analyze no subcommand", ("exit 2", exit_ok(rc=2)), A())
    add("analyze stats without --out", err("--out"), A("stats", "x"))
    add("analyze checkpoint --load missing", err("/nonexistent/ck"),
        A("checkpoint", "--load", "/nonexistent/ck", "--out", "o"))
    add("analyze checkpoint --layers bad", err("--layers"),
        A("checkpoint", "--load", fx.ckpt, "--out", "o", "--layers", "x,y", "--no-progress"))
    add("analyze stats --evolution-windows 0", err("--evolution-windows"),
        A("stats", str(fx.root / "stats"), "--out", "o", "--evolution-windows", "0"))
    add("analyze stats ok", ("exit 0", exit_ok("summary.json")), A("stats", str(fx.root / "stats"), "--out", "o",
                                                                   "--no-progress"))

    # -- top level and scripts --------------------------------------------------------------
    add("mpmoe unknown verb", ("exit 2", exit_ok(rc=2)), mpmoe("frobnicate"))
    add("mpmoe --version", ("exit 0", exit_ok("mpmoe")), mpmoe("--version"))
    scripts = sorted(p for p in list((ROOT / "scripts").glob("*.sh")) + list((ROOT / "scripts").glob("*/*.sh"))
                     if p.name not in ("eval_commands.sh", "launch_env.sh"))  # sourced
    for s in scripts:
        rel = s.relative_to(ROOT)
        add(f"script {rel} no arguments", ("usage, exit 2", exit_ok(rc=2)), lambda d, s=s: sh(["bash", str(s)], d))
        add(f"script {rel} --help", ("usage, exit 0", exit_ok()), lambda d, s=s: sh(["bash", str(s), "--help"], d))
    add("script train.sh unknown preset", err("no-such"), lambda d: sh(["bash", str(ROOT / "scripts/train.sh"),
                                                                       "no-such"], d))
    add("script download_fineweb.sh offline", err(max_s=30),
        lambda d: sh(["bash", str(ROOT / "scripts/dataset/download_fineweb.sh"), str(d / "o"), "1e6"], d))
    add("script tokenize_fineweb.sh missing input", err(),
        lambda d: sh(["bash", str(ROOT / "scripts/dataset/tokenize_fineweb.sh"), "/nonexistent/in", str(d / "o")], d,
                     env={"TOKENIZER": str(fx.tok)}))
    add("script eval_benchmark.sh missing checkpoint", err(),
        lambda d: sh(["bash", str(ROOT / "scripts/eval_benchmark.sh"), "/nonexistent/ck", str(d / "o")], d))

    # -- issue 24: knock-out semantics, expert-bias modes, paper shape ---------------------
    add("train --moe-mask-experts-semantics without a mask", err("--moe-mask-experts"),
        mpmoe("train", "--train-iters", "1", "--moe-mask-experts-semantics", "reference"))
    add("train --moe-mask-experts-semantics bogus", err("--moe-mask-experts-semantics"),
        mpmoe("train", "--train-iters", "1", "--moe-mask-experts-semantics", "bogus"))
    add("train --moe-router-expert-bias-mode bogus", err("--moe-router-expert-bias-mode"),
        mpmoe("train", "--train-iters", "1", "--moe-router-expert-bias-mode", "bogus"))
    add("eval --moe-mask-experts-semantics without a mask", err("--moe-mask-experts"),
        mpmoe("eval", "--load", fx.ckpt, "--tasks", "mpmoe_local", "--moe-mask-experts-semantics", "reference"))
    add("script paper_tiny.sh --quick --shape paper", ("exit 2", exit_ok(rc=2)),
        lambda d: sh(["bash", str(ROOT / "scripts/reproduce/paper_tiny.sh"), str(d / "o"), "--quick", "--shape",
                      "paper"], d))

    # -- model store (mpmoe.store): model-only checkpoints ----------------------------------
    def model_only(d):  # the fixture's checkpoint rewritten by store.save_model into d/mo
        code = ("from mpmoe.megatron import init_distributed; from mpmoe import store; init_distributed(); "
                f"m = store.load_model({str(fx.ckpt)!r}); store.save_model({str(d / 'mo')!r}, m, args=m.args)")
        r = sh([PY, "-c", code], d)
        return r if r.rc else None
    add("train --load model-only checkpoint without --no-load-optim", err("--no-load-optim"),
        lambda d: model_only(d) or T("--load", d / "mo", "--save", d / "s")(d))
    add("train --load model-only checkpoint --no-load-optim", ("exit 0, trains from it", exit_ok()),
        lambda d: model_only(d) or T("--load", d / "mo", "--save", d / "s", "--no-load-optim")(d))
    # -- export hf / import hf (docs/export.md) -----------------------------------------
    X = lambda *a, **kw: mpmoe("export", "hf", *a, **kw)  # noqa: E731
    add("export hf works", ("exit 0", exit_ok("wrote")), X("--load", fx.ckpt, "--out", "hf"))
    add("export hf missing checkpoint", err("/nonexistent/ck"), X("--load", "/nonexistent/ck", "--out", "hf"))
    add("export hf --out not empty", err("not an empty folder"), lambda d: (d / "hf").mkdir() or (
        d / "hf" / "x").write_text("x") and sh([*MPMOE, "export", "hf", "--load", str(fx.ckpt), "--out", "hf"], d))
    add("export hf --routing bogus", err("--routing"), X("--load", fx.ckpt, "--out", "hf", "--routing", "bogus"))
    add("export unknown format", err("onnx"), mpmoe("export", "onnx", "--load", fx.ckpt))
    add("import hf missing folder", err("/nonexistent/hf"), mpmoe("import", "hf", "--model", "/nonexistent/hf", "--save", "ck"))
    add("import hf unsupported model_type", err("model_type"), lambda d: (d / "m").mkdir() or (
        d / "m" / "config.json").write_text('{"model_type": "olmoe"}') and sh(
        [*MPMOE, "import", "hf", "--model", "m", "--save", "ck"], d))
    add("import hf folder without config", err("config.json"), lambda d: (d / "m").mkdir() or sh(
        [*MPMOE, "import", "hf", "--model", "m", "--save", "ck"], d))
    # -- router registry and routing settings table (issue 22, docs/routing.md) -------------
    R = lambda *a: mpmoe("train", "--train-iters", "1", *a)  # noqa: E731
    add("train --router mope --moe-relu-routing", err("name different routers"), R("--router", "mope", "--moe-relu-routing"))
    add("train --router topk --moe-sigma-shrinkage 0.1", err("--moe-sigma-shrinkage", "MoPE setting"),
        R("--router", "topk", "--moe-sigma-shrinkage", "0.1"))
    add("train ReMoE coefficient without ReMoE", err("--moe-relu-l1-reg-coeff-init", "ReMoE setting"),
        R("--router", "topk", "--moe-relu-l1-reg-coeff-init", "0.1"))
    add("train --moe-router-bias-update-rate without expert bias", err("--moe-router-enable-expert-bias"),
        R("--moe-router-bias-update-rate", "0.01"))
    add("train --moe-router-pre-softmax with ReMoE", err("--moe-router-pre-softmax", "ReMoE"),
        R("--router", "remoe", "--moe-router-pre-softmax"))
    add("train --moe-otep-eps=nan", err("--moe-otep-eps", "finite"), R("--moe-otep-eps=nan"))
    add("train --moe-relu-routing on a MoPE preset", ("exit 0, trains ReMoE", exit_ok()), R("--moe-relu-routing"))
    add("flags --router bogus", err("--router"), lambda d: sh([PY, "-m", "mpmoe.megatron_lm.flags", "tiny-cpu",
                                                            "--router", "bogus"], d))

    # == round 3 (issue 28): the features added since, configuration changes, supervision ==
    R3 = "r3 "  # -k r3 runs this family

    # -- ReMoE, expert bias, the paper's knobs, --on-nan, MPMOE_OTEP_BACKEND, --split ---------
    remoe = ("--moe-relu-routing", "--moe-router-load-balancing-type", "none")
    bias = ("--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "none",
            "--moe-router-score-function", "sigmoid")
    for label, flags, needle in [
            ("ReMoE L1 init inf", (*remoe, "--moe-relu-l1-reg-coeff-init", "inf"), "--moe-relu-l1-reg-coeff-init"),
            ("ReMoE L1 multiplier nan", (*remoe, "--moe-relu-l1-reg-coeff-multiplier", "nan"),
             "--moe-relu-l1-reg-coeff-multiplier"),
            ("ReMoE L1 init -1", (*remoe, "--moe-relu-l1-reg-coeff-init", "-1"), "--moe-relu-l1-reg-coeff-init"),
            ("bias update rate inf", (*bias, "--moe-router-bias-update-rate", "inf"), "--moe-router-bias-update-rate"),
            ("bias update rate nan", (*bias, "--moe-router-bias-update-rate", "nan"), "--moe-router-bias-update-rate"),
            ("Sigma shrinkage 1.5", ("--moe-sigma-shrinkage", "1.5"), "--moe-sigma-shrinkage"),
            ("Sigma decay nan", ("--moe-sigma-decay-rate", "nan"), "--moe-sigma-decay-rate"),
            ("OTEP warm-up nan", ("--moe-otep-warmup-fraction", "nan"), "--moe-otep-warmup-fraction"),
            ("--on-nan bogus", ("--on-nan", "bogus"), "--on-nan"),
            ("--split 0,0,0", ("--split", "0,0,0"), "--split"),
            ("--split a,b", ("--split", "a,b"), "--split"),
            ("--allow-model-change without --no-load-optim", ("--load", str(fx.ckpt), "--allow-model-change"),
             "--no-load-optim")]:
        add(f"{R3}train {label}", err(needle), T(*flags))
    add(f"{R3}train --split on the embedded corpus", err("--split"),
        mpmoe("train", *MODEL, "--train-iters", "1", "--split", "1,0,0"))
    add(f"{R3}train bad MPMOE_OTEP_BACKEND at start", err("MPMOE_OTEP_BACKEND", max_s=60),
        T(env={"MPMOE_OTEP_BACKEND": "bogus"}))
    add(f"{R3}train ReMoE tiny run", ("exit 0", exit_ok("done at iteration 2")), T(*remoe))
    add(f"{R3}train expert bias tiny run", ("exit 0", exit_ok("done at iteration 2")), T(*bias))

    # -- masks naming layers without experts (train: flags and variables) -----------------
    for label, flags, env, needle in [
            ("--moe-mask-experts on a missing layer", ("--moe-mask-experts", "9:0"), None, "--moe-mask-experts"),
            ("--moe-mask-experts on a dense layer", ("--moe-layer-freq", "[0,1]", "--moe-mask-experts", "1:0"), None,
             "--moe-mask-experts"),
            ("MOE_MASK_EXPERTS on a missing layer", (), {"MOE_MASK_EXPERTS": "9:0"}, "MOE_MASK_EXPERTS"),
            ("--moe-dynamic-mask-layers on a missing layer", ("--moe-dynamic-mask", "random",
                                                             "--moe-dynamic-mask-layers", "5"), None,
             "--moe-dynamic-mask-layers"),
            ("MOE_DYNAMIC_MASK_LAYERS on a dense layer", ("--moe-layer-freq", "[0,1]", "--moe-dynamic-mask", "random"),
             {"MOE_DYNAMIC_MASK_LAYERS": "1"}, "MOE_DYNAMIC_MASK_LAYERS")]:
        add(f"{R3}train {label}", err(needle), T(*flags, env=env))

    # -- resume with a changed configuration, in each direction ---------------------------
    def resume_changed(*flags):
        return lambda d: sh([*MPMOE, "train", *fx.train_flags(), "--train-iters", "6", "--load", str(fx.ckpt),
                             "--run-dir", str(d / "run"), *flags], d)
    for label, flags, needles in [  # the fixture's layers are alike: megatron stacks them (one shape)
            ("fewer layers", ("--num-layers", "1"), ("--num-layers 2 -> 1", "shapes")),
            ("more layers", ("--num-layers", "3"), ("--num-layers 2 -> 3", "shapes")),
            ("more layers, not alike", ("--num-layers", "3", "--moe-layer-freq", "[1,1,0]"), ("--num-layers 2 -> 3",)),
            ("MoPE -> top-k", ("--moe-router-load-balancing-type", "aux_loss"),
             ("--moe-router-load-balancing-type", "--allow-model-change")),
            ("MoPE -> ReMoE", remoe, ("--moe-relu-routing", "--allow-model-change")),
            ("MoPE -> top-k + expert bias", bias, ("--moe-router-enable-expert-bias", "--allow-model-change")),
            ("MoPE -> MoPE + expert bias", ("--moe-router-enable-expert-bias", "--moe-aux-loss-coeff", "0"),
             ("--moe-router-enable-expert-bias", "--allow-model-change"))]:
        add(f"{R3}train resume {label}", err(*needles), resume_changed(*flags))
    add(f"{R3}train resume MoPE -> top-k, explicit", ("exit 0, resumes, names what is dropped",
                                                     exit_ok("resum", "--allow-model-change")),
        resume_changed("--moe-router-load-balancing-type", "aux_loss", "--no-load-optim", "--allow-model-change"))

    def other_tokenizer(d):  # same vocabulary size, other merges
        (d / "text").mkdir()
        for f in sorted(fx.text.iterdir())[::2]:
            shutil.copy(f, d / "text" / f.name)
        r = sh([*MPMOE, "data", "tokenizer", "--input", str(d / "text"), "--vocab-size", "300", "--output-dir",
                str(d / "tok3"), "--no-progress"], d)
        if r.rc != 0:
            raise RuntimeError(f"tokenizer: {r.err[-300:]}")
        return d / "tok3"

    def resume_new_save_other_tokenizer(d):
        tok3 = other_tokenizer(d)
        data = copy_data(fx, d)  # no manifest
        r = sh([*MPMOE, "train", *fx.train_flags(data=data, tok=tok3), "--train-iters", "6", "--load", str(fx.ckpt),
                "--save", str(d / "new"), "--run-dir", str(d / "run")], d)
        r.note = f"new save has a tokenizer: {(d / 'new' / 'tokenizer').exists()}"
        return r
    add(f"{R3}train resume into a new --save, other same-size tokenizer, no manifest", err("tokenizer"),
        resume_new_save_other_tokenizer)

    def damaged_manifest(d):
        data = copy_data(fx, d)
        (d / "d.manifest.json").write_text('{"outputs": {"train": {"prefix": "d"}}, "tokenizer": []}')
        return sh([*MPMOE, "train", *fx.train_flags(data=data), "--train-iters", "1"], d)
    add(f"{R3}train damaged manifest beside the data", err("manifest"), damaged_manifest)

    # -- eval: masks, tokenizers, routing of other routers, damaged checkpoints, outputs ----
    add(f"{R3}eval --moe-mask-experts on a missing layer", err("--moe-mask-experts"), E(*task, "--moe-mask-experts", "9:0"))
    add(f"{R3}eval MOE_MASK_EXPERTS on a missing layer", err("MOE_MASK_EXPERTS"),
        E(*task, env={"MOE_MASK_EXPERTS": "9:0"}))
    add(f"{R3}eval --moe-dynamic-mask-layers on a missing layer", err("--moe-dynamic-mask-layers"),
        E(*task, "--moe-dynamic-mask", "random", "--moe-dynamic-mask-layers", "7"))

    def eval_mask_recorded(d):
        r = sh([*MPMOE, "eval", "--load", str(fx.ckpt), "--no-progress", "--output-path", "out", *task,
                "--moe-mask-experts", "1:0"], d)
        try:
            meta = json.loads((d / "out" / "results.json").read_text())["mpmoe"]
            r.note = f"recorded {meta.get('routing_ablation', {}).get('moe_mask_experts')}"
        except (OSError, ValueError, KeyError) as exc:
            r.note = f"no record ({type(exc).__name__})"
        return r
    add(f"{R3}eval results.json records the masks", ("exit 0, mask in results.json",
                                                     lambda r: (r.rc == 0 and "recorded {'1': [0]}" in r.note,
                                                                f"rc={r.rc} {r.note}")), eval_mask_recorded)
    add(f"{R3}eval --output-path is a file (before the work)", err("--output-path", max_s=60),
        lambda d: (d / "f").write_text("x") and sh([*MPMOE, "eval", "--load", str(fx.ckpt), *task,
                                                    "--output-path", str(d / "f"), "--no-progress"], d))
    add(f"{R3}eval bad MPMOE_OTEP_BACKEND at start", err("MPMOE_OTEP_BACKEND", max_s=150),
        E(*task, env={"MPMOE_OTEP_BACKEND": "bogus"}))

    def lone_iter_other_tokenizer(d):
        tok3 = other_tokenizer(d)
        shutil.copytree(fx.ckpt / "iter_0000004", d / "iter_0000004")
        return sh([*MPMOE, "eval", "--load", str(d / "iter_0000004"), *task, "--tokenizer", str(tok3),
                   "--output-path", "out", "--no-progress"], d)
    add(f"{R3}eval lone iter_ folder, other same-size tokenizer", err("tokenizer"), lone_iter_other_tokenizer)

    def truncated_common(d):
        shutil.copytree(fx.ckpt, d / "ck")
        common = d / "ck" / "iter_0000004" / "common.pt"
        common.write_bytes(common.read_bytes()[:40])
        return sh([*MPMOE, "eval", "--load", str(d / "ck"), *task, "--output-path", "out", "--no-progress"], d)
    add(f"{R3}eval truncated common.pt", err("iter_0000004"), truncated_common)

    def truncated_distcp(d):
        shutil.copytree(fx.ckpt, d / "ck")
        for f in (d / "ck" / "iter_0000004").glob("*.distcp"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        return sh([*MPMOE, "eval", "--load", str(d / "ck"), *task, "--output-path", "out", "--no-progress"], d)
    add(f"{R3}eval truncated .distcp", err("iter_0000004"), truncated_distcp)

    def remoe_eval(*flags):
        def run(d):
            r = sh([*MPMOE, "train", *fx.train_flags(), *remoe, "--train-iters", "2", "--save", str(d / "ck")], d)
            if r.rc != 0:
                return r
            return sh([*MPMOE, "eval", "--load", str(d / "ck"), *task, "--output-path", "out", "--no-progress",
                       *flags], d)
        return run
    add(f"{R3}eval ReMoE checkpoint --routing mope", err("--routing auto"), remoe_eval("--routing", "mope"))
    add(f"{R3}eval ReMoE checkpoint with a dynamic mask", err("--moe-dynamic-mask"),
        remoe_eval("--moe-dynamic-mask", "random"))
    add(f"{R3}eval --model-flags that build no model", err("moe_layer_freq"),
        E(*task, "--model-flags", "--num-layers 1"))
    add(f"{R3}eval --model-flags with fewer layers", err("--num-layers"),
        E(*task, "--model-flags", " ".join([*MODEL[:MODEL.index("--global-batch-size")], "--num-layers", "1"])))
    add(f"{R3}analyze checkpoint with fewer layers", err("--num-layers"),
        A("checkpoint", "--load", fx.ckpt, "--out", "o", "--no-progress", *fx.train_flags(), "--num-layers", "1"))

    # -- damaged data outside train ---------------------------------------------------------
    for label, body in (("[]", "[]"), ("wrong fields", '{"outputs": {"train": {"name": "d"}}}')):
        add(f"{R3}data inspect manifest {label}", err("manifest"), lambda d, body=body: (
            d / "x.manifest.json").write_text(body) and sh([*MPMOE, "data", "inspect", str(d / "x.manifest.json")], d))

    def corrupt_ids(d):
        p = copy_data(fx, d)
        with open(p + ".bin", "r+b") as f:
            f.seek(10)
            f.write(b"\xff\xfe" * 4)  # token ids ~65000 in a 300-token vocabulary
        return sh([*MPMOE, "data", "inspect", p, "--tokenizer-model", str(fx.tok)], d)
    add(f"{R3}data inspect corrupt token ids", err("outside"), corrupt_ids)

    # -- signals outside train: one line, 130/143, no traceback, no orphans ----------------
    def timed_signal(argv_of, sig, after_s):
        def run(d):
            argv = argv_of(d)
            start = time.perf_counter()
            log = d / "out.log"
            with open(log, "w") as fh:
                # as from a terminal: a matrix started in the background (`&`) passes SIGINT ignored
                p = subprocess.Popen([*map(str, argv)], cwd=d, env=ENV, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            time.sleep(after_s)
            sent = p.poll() is None
            if sent:
                os.kill(p.pid, sig)
            try:
                rc = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            time.sleep(2)
            survivors = session_members(p.pid)
            for pid in survivors:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return Result(rc, "", log.read_text(errors="replace"), time.perf_counter() - start,
                          f"signal {'sent' if sent else 'NOT sent (finished first)'}; {len(survivors)} orphan(s)")
        return run

    def stopped(rc):
        def judge(r):
            lines = [ln for ln in r.err.strip().splitlines() if ln.strip() and not _WARNING.search(ln)]
            ok = (r.rc == rc and "Traceback" not in r.err and "0 orphan" in r.note and "signal sent" in r.note
                  and lines and re.search(r"stopped by|interrupted", lines[-1]) is not None)
            return ok, f"rc={r.rc}; {r.note}; {lines[-1][:80] if lines else ''}"
        return f"exit {rc}, one line, no traceback, no orphans", judge

    def big_text(d):
        (d / "big").mkdir()
        words = (fx.text / sorted(p.name for p in fx.text.iterdir())[0]).read_text()
        for i in range(6):
            (d / "big" / f"{i}.txt").write_text(words * 200)
        return d / "big"
    for sig, rc in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = signal.Signals(sig).name
        # the whole offline suite (about 20 s): the signal lands mid-evaluation, not after it
        add(f"{R3}eval {name}", stopped(rc), timed_signal(lambda d: [*MPMOE, "eval", "--load", fx.ckpt, "--tasks",
                                                                     "mpmoe_local", "--no-progress",
                                                                     "--output-path", "out"], sig, 10))
        add(f"{R3}data prepare {name} (2 workers)", stopped(rc), timed_signal(lambda d: [
            *MPMOE, "data", "prepare", "--input", big_text(d), "--tokenizer-model", fx.tok, "--output-prefix", "o",
            "--workers", "2", "--no-progress"], sig, 6))
    add(f"{R3}analyze checkpoint SIGINT", stopped(130), timed_signal(lambda d: [
        *MPMOE, "analyze", "checkpoint", "--load", fx.ckpt, "--out", "o", "--no-progress"], signal.SIGINT, 8))

    # -- torchrun: the agent or one rank killed; two runs in the same second ----------------
    def descendants(pid: int) -> list[int]:
        kids, todo = [], [pid]
        while todo:
            parent = todo.pop()
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        stat = (entry / "stat").read_text()
                        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
                            kids.append(int(entry.name))
                            todo.append(int(entry.name))
                    except (OSError, ValueError, IndexError):
                        continue
        return kids

    def alive(pid: int) -> bool:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
            return stat[stat.rindex(")") + 2:].split()[0] != "Z"
        except OSError:
            return False

    def cmdline(pid: int) -> str:
        try:
            return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def torchrun_kill(target: str):
        def run(d):
            argv = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(closed_port()), "-m", "mpmoe", "train", *fx.train_flags(),
                    "--global-batch-size", "8", "--train-iters", "400", "--save", str(d / "ck"), "--save-interval", "2",
                    "--run-dir", str(d / "run")]
            start = time.perf_counter()
            log = d / "out.log"
            with open(log, "w") as fh:
                p = subprocess.Popen(argv, cwd=d, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            tracker = d / "ck" / "latest_checkpointed_iteration.txt"
            while time.perf_counter() - start < 300 and p.poll() is None and not tracker.is_file():
                time.sleep(0.1)
            workers = [c for c in descendants(p.pid) if "mpmoe" in cmdline(c)] if p.poll() is None else []
            try:
                if target == "agent" and workers:
                    os.kill(p.pid, signal.SIGKILL)
                elif workers:
                    os.kill(workers[-1], signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                rc = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            complete = sorted(x.name for x in (d / "ck").glob("iter_*") if not x.name.endswith(".tmp"))
            time.sleep(5)
            later = sorted(x.name for x in (d / "ck").glob("iter_*") if not x.name.endswith(".tmp"))
            survivors = [w for w in workers if alive(w)]
            for w in survivors:
                os.kill(w, signal.SIGKILL)
            return Result(rc, "", log.read_text(errors="replace"), time.perf_counter() - start,
                          f"{len(workers)} worker(s), {len(survivors)} survived; checkpoints after the kill: "
                          f"{'none new' if later == complete else 'NEW ' + str(sorted(set(later) - set(complete)))}")
        return run
    ok_kill = ("no worker survives, no checkpoint after the kill",
               lambda r: (r.note.startswith("2 worker") and "0 survived" in r.note and "none new" in r.note,
                          f"rc={r.rc}; {r.note}"))
    add(f"{R3}torchrun agent SIGKILL", ok_kill, torchrun_kill("agent"))
    add(f"{R3}torchrun one rank SIGKILL", ok_kill, torchrun_kill("rank"))

    def two_runs_same_second(d):
        argv = [*MPMOE, "train", *fx.train_flags(), "--train-iters", "2"]
        procs = [subprocess.Popen([*map(str, argv)], cwd=d, env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
        errs = [p.communicate(timeout=400)[1] for p in procs]
        runs = sorted(x.name for x in (d / "runs").iterdir()) if (d / "runs").is_dir() else []
        configs = sum((d / "runs" / x / "config.json").is_file() for x in runs)
        return Result(max(p.returncode for p in procs), "", "\n".join(errs), 0.0,
                      f"{len(runs)} run folder(s), {configs} config.json")
    add(f"{R3}two trains at once without --run-dir", ("two run folders, each with its config",
                                                     lambda r: (r.rc == 0 and r.note.startswith("2 run folder(s), 2 "),
                                                                f"rc={r.rc}; {r.note}")), two_runs_same_second)

    # -- scripts: arguments and environment ----------------------------------------------
    train_sh = str(ROOT / "scripts/train.sh")
    for var, value in (("NPROC_PER_NODE", "0"), ("NPROC_PER_NODE", "abc"), ("NPROC_PER_NODE", "-1"),
                       ("NNODES", "0"), ("NNODES", "x"), ("NODE_RANK", "5"), ("MASTER_PORT", "99999"),
                       ("MASTER_PORT", "0")):
        add(f"{R3}script train.sh {var}={value!r}", err(var),
            lambda d, var=var, value=value: sh(["bash", train_sh, "tiny-cpu"], d, env={var: value}))
    paper = str(ROOT / "scripts/reproduce/paper_tiny.sh")
    for label, argv, needle in (("OUT is a file", ["f", "--quick"], "f"), ("--seeds abc", ["o", "--seeds", "abc"], "--seeds"),
                                ("--iters 0", ["o", "--iters", "0"], "--iters"),
                                ("--iters -5", ["o", "--iters", "-5"], "--iters"),
                                ("unknown preset", ["o", "--preset", "no-such"], "no-such")):
        add(f"{R3}script paper_tiny.sh {label}", err(needle),
            lambda d, argv=argv: (d / "f").write_text("x") and sh(["bash", paper, *argv], d))

    def pretrain(*argv, env=None):
        def run(d):
            (d / "mlm").mkdir()
            (d / "mlm" / "pretrain_gpt.py").write_text("# mpmoe_megatron_lm (fault_matrix stub)\n")
            return sh(["bash", str(ROOT / "scripts/megatron_lm/pretrain.sh"), "tiny-cpu", "mope", str(d / "mlm"),
                       *argv], d, env=env)
        return run
    add(f"{R3}script pretrain.sh --train-iters abc", err("--train-iters"), pretrain("--train-iters", "abc"))
    add(f"{R3}script pretrain.sh --train-iters (no value)", err("--train-iters"), pretrain("--train-iters"))
    add(f"{R3}script pretrain.sh NPROC_PER_NODE=0", err("NPROC_PER_NODE"), pretrain(env={"NPROC_PER_NODE": "0"}))
    add(f"{R3}script pretrain.sh usage on stderr", ("usage on stderr, nothing on stdout, exit 2",
                                                   lambda r: (r.rc == 2 and not r.out.strip() and "set -e" not in r.err,
                                                              f"rc={r.rc} stdout {len(r.out)} chars")),
        lambda d: sh(["bash", str(ROOT / "scripts/megatron_lm/pretrain.sh")], d))

    # -- the benchmarks' own arguments: exit 2, no traceback --------------------------------
    bench = lambda name, *a: lambda d: sh([PY, str(ROOT / "benchmarks" / name), *a], d)  # noqa: E731
    for label, run, needle in (("bench_layer k > E", bench("bench_layer.py", "--topk", "9", "--experts", "4"), "--topk"),
                               ("bench_otep K > E", bench("bench_otep.py", "--shapes", "8x4x9"), "--shapes"),
                               ("bench_eval missing --load", bench("bench_eval.py", "--load", "/nonexistent/ck"),
                                "/nonexistent/ck"),
                               ("bench_train --steps 0", bench("bench_train.py", "--steps", "0"), "--steps")):
        add(f"{R3}{label}", ("exit 2, no traceback", exit_ok(needle, rc=2)), run)

    # -- experts (issue 26): bad inputs leave nothing behind -------------------------------
    X = lambda *a, **kw: mpmoe("experts", *a, **kw)  # noqa: E731
    add("experts no subcommand", ("exit 2", exit_ok(rc=2)), X())
    add("experts merge --num-experts 0", err("--num-experts"),
        X("merge", "--load", fx.ckpt, "--save", "o", "--num-experts", "0"))
    add("experts merge --num-experts > E", err("--num-experts", "5"),
        X("merge", "--load", fx.ckpt, "--save", "o", "--num-experts", "5", "--calibration-tokens", "64"))
    add("experts merge --load missing", err("/nonexistent/ck"),
        X("merge", "--load", "/nonexistent/ck", "--save", "o", "--num-experts", "2"))
    add("experts merge --groups names a missing expert", err("expert 7"), lambda d: (d / "g.json").write_text(
        '{"1": [[0, 7], [1, 2, 3]], "2": [[0, 1, 2, 3]]}') and sh(
        [*MPMOE, "experts", "merge", "--load", str(fx.ckpt), "--save", "o", "--groups", str(d / "g.json")], d))
    add("experts merge --save not empty", err("--save"), lambda d: (d / "o").mkdir() or (d / "o" / "x").write_text(
        "x") and sh([*MPMOE, "experts", "merge", "--load", str(fx.ckpt), "--save", "o", "--num-experts", "2"], d))
    add("experts compress --rank 0", err("--rank"), X("compress", "--load", fx.ckpt, "--save", "o", "--rank", "0"))
    add("experts compress --sparse-keep 2", err("--sparse-keep"),
        X("compress", "--load", fx.ckpt, "--save", "o", "--sparse-keep", "2"))

    # -- experts split (HEMoE) ----------------------------------------------------------------
    S = lambda *a, **kw: mpmoe("experts", "split", "--save", "o", *a, **kw)  # noqa: E731
    add("experts split an MoE checkpoint", err("already has experts"), S("--load", fx.ckpt))
    add("experts split k > E", err("--moe-router-topk"), S("--load", fx.ckpt, "--num-experts", "4",
                                                          "--moe-router-topk", "5"))
    add("experts split E > modules", err("--num-modules"), S("--load", fx.ckpt, "--num-experts", "16",
                                                            "--num-modules", "8"))
    add("experts split size ratio < 1", err("--size-ratio"), S("--load", fx.ckpt, "--size-ratio", "0.5"))
    add("experts split --domain-data missing", err("/nonexistent/dom"),
        S("--load", fx.ckpt, "--domain-data", "/nonexistent/dom"))
    add("experts split --domain-data empty file", err("is empty"), lambda d: (d / "dom").mkdir() or (
        d / "dom" / "a.txt").write_text(" ") and sh([*MPMOE, "experts", "split", "--load", str(fx.ckpt), "--save",
                                                     "o", "--domain-data", str(d / "dom")], d))

    # == round 3, leftovers (issues 23, 28): valued flags of the scripts, ... ==
    R3X = "r3x "  # -k r3x runs this family (-k r3 both)
    for label, argv in (("--micro-batch-size (no value)", ("--lr", "1e-3", "--micro-batch-size")),
                        ("--data-path (no value)", ("--data-path",)),
                        ("--expert-model-parallel-size then a flag", ("--expert-model-parallel-size", "--lr", "1")),
                        ("--moe-sigma-shrinkage (no value)", ("--moe-sigma-shrinkage",))):
        add(f"{R3X}script pretrain.sh {label}", err(argv[-1] if argv[-1].startswith("--") else argv[0]),
            pretrain(*argv))
    add(f"{R3X}script pretrain.sh PYTHON not a command", err("PYTHON"),
        pretrain(env={"PYTHON": "/nonexistent/python"}))
    add(f"{R3X}script train.sh --train-iters (no value)", err("--train-iters"),
        lambda d: sh(["bash", train_sh, "tiny-cpu", "--train-iters"], d))
    add(f"{R3X}script train.sh --num-experts abc", err("--num-experts"),
        lambda d: sh(["bash", train_sh, "tiny-cpu", "--num-experts", "abc"], d))
    add(f"{R3X}script train.sh PYTHON not a command", err("PYTHON"),
        lambda d: sh(["bash", train_sh, "tiny-cpu"], d, env={"PYTHON": "/nonexistent/python"}))

    # -- variable experts per token with the flex dispatcher (DeepEP routes exactly k) -------
    for label, flags in (("dynamic mask", ("--moe-dynamic-mask", "random")), ("ReMoE", remoe)):
        add(f"{R3X}train {label} with --moe-token-dispatcher-type flex",
            err("--moe-token-dispatcher-type flex", "variable number of experts"),
            T(*flags, "--moe-token-dispatcher-type", "flex"))
    add(f"{R3X}eval dynamic mask of a flex-trained model (evaluated with alltoall)", ("exit 0", exit_ok()),
        lambda d: sh([*MPMOE, "eval", "--load", str(fx.ckpt), "--model-flags", " ".join(
            [*fx.train_flags(), "--moe-token-dispatcher-type", "flex"]), "--moe-dynamic-mask", "random",
            "--tasks", "mpmoe_docs_mc", "--limit", "2", "--no-progress", "--output-path", "out"], d))

    # -- output paths checked before the work (root writes anywhere os.access says yes) ----
    for label, argv, needle in (
            ("train --moe-stats-dir in /proc", ["train", *fx.train_flags(), "--train-iters", "2",
                                                "--moe-stats-dir", "/proc/mpmoe-x/s"], "--moe-stats-dir"),
            ("train --tensorboard-dir in /sys", ["train", *fx.train_flags(), "--train-iters", "2",
                                                 "--tensorboard-dir", "/sys/mpmoe-x"], "--tensorboard-dir"),
            ("eval --routing-dump-dir in /proc", ["eval", "--load", fx.ckpt, "--tasks", "mpmoe_docs_mc",
                                                  "--routing-dump-dir", "/proc/mpmoe-x"], "--routing-dump-dir"),
            ("analyze checkpoint --out in /proc", ["analyze", "checkpoint", "--load", fx.ckpt, "--out",
                                                   "/proc/mpmoe-x"], "--out"),
            ("analyze stats --out in /sys", ["analyze", "stats", fx.root, "--out", "/sys/mpmoe-x"], "--out"),
            ("export hf --out in /proc", ["export", "hf", "--load", fx.ckpt, "--out", "/proc/mpmoe-x"], "--out"),
            ("experts compress --save in /proc", ["experts", "compress", "--load", fx.ckpt, "--save",
                                                  "/proc/mpmoe-x"], "--save"),
            ("data tokenizer --output-dir in /proc", ["data", "tokenizer", "--input", fx.text, "--vocab-size", "300",
                                                      "--output-dir", "/proc/mpmoe-x"], "--output-dir"),
            ("data prepare --output-prefix in /sys", ["data", "prepare", "--input", fx.text, "--tokenizer-model",
                                                      fx.tok, "--output-prefix", "/sys/mpmoe-x/p"], "--output-prefix")):
        add(f"{R3X}{label}", err(needle, max_s=60), mpmoe(*argv))

    # -- a stop signal in train's set-up: its own line, no run folder left ------------------
    def setup_signal(sig):
        inner = timed_signal(lambda d: [*MPMOE, "train", *fx.train_flags(), "--train-iters", "50"], sig, 1.5)

        def run(d):
            r = inner(d)
            left = sorted(str(p.relative_to(d)) for p in (d / "runs").rglob("*")) if (d / "runs").is_dir() else []
            r.note += f"; left under runs/: {left or 'nothing'}"
            return r
        return run

    for sig, rc in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = signal.Signals(sig).name
        add(f"{R3X}train {name} in set-up", (f"exit {rc}, 'before training started', no run folder left",
                                            lambda r, rc=rc: (r.rc == rc and "Traceback" not in r.err
                                                              and "before training started" in r.err
                                                              and "signal sent" in r.note
                                                              and "left under runs/: nothing" in r.note,
                                                              f"rc={r.rc}; {r.note}")), setup_signal(sig))

    # -- experts: fold-then-select over merged experts (issue 26), an evaluation option ----------
    R3F = "r3f "  # -k r3f runs this family (-k r3 with the others)
    add(f"{R3F}eval fold-select on an unmerged checkpoint", err("--moe-expert-group-routing", "has none"),
        mpmoe("eval", "--load", fx.ckpt, "--tasks", "mpmoe_local", "--moe-expert-group-routing", "fold-select"))
    add(f"{R3F}eval --moe-expert-group-routing bogus", err("--moe-expert-group-routing"),
        mpmoe("eval", "--load", fx.ckpt, "--tasks", "mpmoe_local", "--moe-expert-group-routing", "bogus"))
    add(f"{R3F}train --moe-expert-group-routing (evaluation only)", err("--moe-expert-group-routing"),
        mpmoe("train", "--train-iters", "1", "--moe-expert-group-routing", "fold-select"))
    return C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="run only cases whose name contains one of these (comma-separated)")
    ap.add_argument("-j", "--jobs", type=int, default=3, help="cases run at once (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mpmoe-faults-"))
    start = time.perf_counter()
    try:
        (work / "fx").mkdir()
        print(f"building the fixture (tokenizers, data, a 4-iteration checkpoint) in {work} ...", flush=True)
        fx = Fixture(work / "fx")
        todo = [c for c in cases(fx) if any(k in c.name for k in args.k.split(","))]

        def one(i_case):
            i, case = i_case
            d = work / f"case{i:03d}"
            d.mkdir()
            try:
                r = case.run(d)
                ok, seen = case.judge(r)
            except Exception as exc:  # noqa: BLE001 - a broken case is a failed case
                ok, seen, r = False, f"harness error: {type(exc).__name__}: {exc}", Result(None, "", "", 0.0)
            return case, ok, seen, r.seconds

        rows = []
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for case, ok, seen, secs in pool.map(one, enumerate(todo)):
                rows.append((case, ok, seen, secs))
                print(f"{'PASS' if ok else 'FAIL'}  {case.name}  ({secs:.1f}s)", file=sys.stderr, flush=True)
        w1 = max(len(c.name) for c, *_ in rows)
        w2 = max(len(c.expected) for c, *_ in rows)
        print(f"\n{'case':<{w1}}  {'expected':<{w2}}  verdict  observed")
        for case, ok, seen, _ in rows:
            print(f"{case.name:<{w1}}  {case.expected:<{w2}}  {'pass' if ok else 'FAIL':<7}  {seen}")
        passed = sum(ok for _, ok, *_ in rows)
        print(f"\ntotal {len(rows)}: {passed} pass, {len(rows) - passed} fail "
              f"({time.perf_counter() - start:.0f} s, {args.jobs} at a time)")
        return 0 if passed == len(rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
