#!/usr/bin/env bash
# gpu_check.sh: every GPU check of mpmoe in one call, for a session that is lent a GPU
# machine (one NVIDIA GPU, Python 3.12 with torch and Triton, nothing else installed,
# no network). It prints as it goes and writes its figures to $OUT/gpu_check.json (and a
# log, $OUT/gpu_check.log), re-written after every step so a timeout loses nothing done.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (OUT set there)
#   bash benchmarks/gpu_check.sh --out DIR        # anywhere else
#   bash benchmarks/gpu_check.sh --dry-run --out DIR   # no GPU work: checks what is present,
#                                                 # prints each step's command, writes the JSON
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with network: the cp312 wheels the GPU
#                                                 # machine lacks, into .whl/ (carried there)
#
# Steps (each under its own time limit, all within --budget seconds, default 530):
#   1. cuda_tests   pytest -m cuda (OTEP on CUDA: fused kernel vs PyTorch path)
#   2. bench_otep   fused kernel vs PyTorch OTEP vs torch.topk at (16384,64,8), (4096,128,8)
#                   and decode T in {1, 8, 64} (E=64, k=8)
#   3. bench_train  flame-moe-38m step time, MoPE vs top-k, bf16, one GPU, alltoall
#                   dispatcher, TE layer spec when Transformer Engine imports, else local
#   4. bench_eval   MoPE vs top-k generated tokens/s at batch 1 and 32 (needs lm-eval)
#   5. megatron_lm  Megatron-LM's pretrain_gpt.py on the patched tree: flame-moe-38m MoPE vs
#                   top-k, 20 iterations each, bf16, --mock-data (needs the upstream scripts:
#                   ../shared/upstream or shared/upstream; git)
# A step whose requirement is missing is recorded as skipped with the reason.
# Wheels in .whl/ (megatron-core 0.19.x for cp312, lm-eval and the few of its needs the
# image lacks) are installed first into /tmp/mpmoe-site, nothing else is installed.
set -u -o pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
FETCH=0
OUTDIR="${OUT:-}"
BUDGET=530
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --out)
      [[ $# -ge 2 ]] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }
      OUTDIR="$2"; shift ;;
    --budget)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget needs a number of seconds" >&2; exit 2; }
      BUDGET="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"

if [[ $FETCH == 1 ]]; then
  # cp312 manylinux wheels; pure-Python sdists are built into wheels here.
  mkdir -p .whl
  PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "megatron-core>=0.19,<0.20" "lm-eval>=0.4.9,<0.5" "datasets>=4,<6" \
    "dill>=0.3.8" "multiprocess>=0.70.16" || exit 1
  echo "gpu_check.sh: wheels in .whl/ ($(du -sh .whl | cut -f1)); carry '.whl' in the device call"
  exit 0
fi

[[ -n "$OUTDIR" ]] || { echo "gpu_check.sh: no output folder: set OUT or pass --out DIR" >&2; exit 2; }
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create $OUTDIR" >&2; exit 2; }
JSON="$OUTDIR/gpu_check.json"
LOG="$OUTDIR/gpu_check.log"
PARTS="$(mktemp -d /tmp/gpu_check.XXXXXX)"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

if compgen -G ".whl/*.whl" > /dev/null; then
  if [[ $DRY == 1 ]]; then
    say "dry run: would install $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/mpmoe-site"
  else
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/mpmoe-site .whl/*.whl || say "wheel install failed (steps needing them will fail)"
    export PYTHONPATH="/tmp/mpmoe-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What is present: one JSON object, also the basis of the skip decisions.
"$PY" - "$PARTS/env.json" <<'EOF'
import importlib.metadata as md, importlib.util, json, platform, sys
def version(module, dist):  # present (findable) and its installed version, without importing it
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ImportError:
        return None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "present"
env = {"python": platform.python_version(), "torch": version("torch", "torch"),
       "triton": version("triton", "triton"), "megatron_core": version("megatron.core", "megatron-core"),
       "transformer_engine": version("transformer_engine", "transformer-engine"),
       "lm_eval": version("lm_eval", "lm-eval"), "cuda": False, "gpu": None}
try:
    import torch
    env["cuda"] = torch.cuda.is_available()
    env["gpu"] = torch.cuda.get_device_name() if env["cuda"] else None
except Exception:
    pass
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("environment:", json.dumps(env))
EOF
[[ -s "$PARTS/env.json" ]] || { echo "gpu_check.sh: $PY cannot run (is torch installed?)" >&2; exit 2; }
has() { "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$PARTS/env.json'))['$1'] else 1)"; }
if ! has cuda && [[ $DRY == 0 ]]; then
  echo "gpu_check.sh: no CUDA device here (use --dry-run to check the script without one)" >&2
  exit 2
fi

# merge: the JSON file from env.json and the steps recorded so far
merge() {
  "$PY" - "$PARTS" "$JSON" "$DRY" <<'EOF'
import glob, json, os, sys, time
parts, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
doc = {"script": "benchmarks/gpu_check.sh", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
       "dry_run": dry, "environment": json.load(open(os.path.join(parts, "env.json"))), "steps": {}}
for path in sorted(glob.glob(os.path.join(parts, "step-*.json"))):
    step = json.load(open(path))
    figures = step.pop("figures_file", None)
    if figures and os.path.exists(figures):
        try:
            step["figures"] = json.load(open(figures))
        except ValueError:
            step["figures"] = None
    doc["steps"][step.pop("name")] = step
tmp = out + ".tmp"
json.dump(doc, open(tmp, "w"), indent=1)
os.replace(tmp, out)
EOF
}

N=0
# step NAME LIMIT_S REQUIREMENTS(comma list: cuda,triton,megatron_core,lm_eval or -) CMD...
# The command may write figures to $FIG (a JSON file).
step() {
  local name="$1" limit="$2" needs="$3"; shift 3
  N=$((N + 1))
  local rec="$PARTS/step-$(printf %02d $N)-$name.json" fig="$PARTS/fig-$name.json" reason="" status rc=0
  local t0=$(date +%s)
  local left=$(( BUDGET - (t0 - START) - 15 ))
  (( limit > left )) && limit=$left
  for need in ${needs//,/ }; do
    [[ "$need" == "-" ]] && continue
    [[ "$need" == cuda && $DRY == 1 ]] && continue
    has "$need" || { reason="$need is not available"; break; }
  done
  local cmd="$*"
  cmd="${cmd//\$FIG/$fig}"
  if [[ -n "$reason" ]]; then
    status="skipped"; say "$name: skipped ($reason)"
  elif (( limit < 20 )); then
    status="skipped"; reason="out of time budget"; say "$name: skipped ($reason)"
  elif [[ $DRY == 1 ]]; then
    status="dry-run"; say "$name: would run (limit ${limit}s): $cmd"
  else
    say "$name: running (limit ${limit}s): $cmd"
    FIG="$fig" timeout --kill-after=10 "$limit" bash -c "$cmd"
    rc=$?
    if (( rc == 0 )); then status="ok"; elif (( rc == 124 || rc == 137 )); then status="timeout"; else status="failed"; fi
    say "$name: $status (rc $rc, $(( $(date +%s) - t0 ))s)"
  fi
  "$PY" -c "import json,sys; json.dump(dict(name=sys.argv[1], status=sys.argv[2], reason=sys.argv[3] or None,
    rc=int(sys.argv[4]), seconds=int(sys.argv[5]), limit_s=int(sys.argv[6]), command=sys.argv[7],
    figures_file=sys.argv[8]), open(sys.argv[9], 'w'))" \
    "$name" "$status" "$reason" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$cmd" "$fig" "$rec"
  merge
}

say "mpmoe gpu_check: output $JSON (budget ${BUDGET}s$([[ $DRY == 1 ]] && echo ', dry run'))"
merge

step cuda_tests 120 cuda,triton \
  "$PY -m pytest -p no:cacheprovider -m cuda -q -rs tests/test_routing_otep.py tests/test_routing_otep_paths.py --junitxml=\$FIG.xml && $PY -c \"import json,sys,xml.etree.ElementTree as E; s=E.parse(sys.argv[1]).getroot(); s=s if s.tag=='testsuite' else s[0]; json.dump({k:int(s.get(k,0)) for k in ('tests','failures','errors','skipped')}, open(sys.argv[2],'w'))\" \$FIG.xml \$FIG"

step bench_otep 90 cuda \
  "$PY benchmarks/bench_otep.py --device cuda --repeats 7 --burst 20 --shapes 16384x64x8,4096x128x8,1x64x8,8x64x8,64x64x8 --json \$FIG"

step bench_train 180 cuda,megatron_core \
  "$PY benchmarks/bench_train.py --preset flame-moe-38m --steps 10 --warmup 2 --json \$FIG -- --bf16 --moe-token-dispatcher-type alltoall --global-batch-size 16 --micro-batch-size 4"

step bench_eval 150 cuda,megatron_core,lm_eval \
  "$PY benchmarks/bench_eval.py --batch-size 32 --rounds 2 --gen-docs 32 --ll-docs 16 --max-gen-toks 24 --json \$FIG"

step megatron_lm 200 cuda,megatron_core \
  "$PY benchmarks/bench_megatron_lm.py --preset flame-moe-38m --iters 20 --json \$FIG"

say "done in $(( $(date +%s) - START ))s: $JSON"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(*(f'  {k}: {v[\"status\"]}' + (f' ({v[\"reason\"]})' if v['reason'] else '') for k, v in d['steps'].items()), sep='\n')" "$JSON"
rm -rf "$PARTS"
