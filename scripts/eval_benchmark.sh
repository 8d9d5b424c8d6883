#!/usr/bin/env bash
# Run the MP-MoE paper benchmark suite on one checkpoint with `mpmoe eval` (lm-eval).
#
#   scripts/eval_benchmark.sh CKPT OUT_DIR [extra mpmoe eval flags...]
#
#   CKPT     a save folder (its latest checkpoint) or one iter_XXXXXXX folder (--load)
#   OUT_DIR  results go to OUT_DIR/<group>/results.json, the table to OUT_DIR/summary.md
#   extra flags are passed to every `mpmoe eval` call (e.g. --dtype bf16 --ckpt-step 8800)
#
# One `mpmoe eval` call per few-shot group (SUITE, default: all five, in this order):
#   mmlu      mmlu                                         MMLU_SHOTS (5)     BATCH_SIZE
#   zeroshot  boolq,hellaswag,arc_easy,arc_challenge       0-shot             BATCH_SIZE
#   bbh       bbh_fewshot (direct answer, greedy, --gen-kwargs max_gen_toks=BBH_MAX_GEN_TOKS (64))
#                                                          BBH_SHOTS (3)      GEN_BATCH_SIZE
#   gsm8k     gsm8k (generation, greedy)                   GSM8K_SHOTS (3)    GEN_BATCH_SIZE
#   flame     piqa,winogrande,openbookqa,sciq,lambada_openai (FLAME-MoE's)  0-shot  BATCH_SIZE
# TASKS=T1,T2 runs only those tasks instead, CUSTOM_SHOTS-shot (0), into OUT_DIR/custom
# (e.g. TASKS=mpmoe_local: the offline tasks shipped with mpmoe).
#
# Environment:
#   SUITE="mmlu zeroshot bbh gsm8k flame"  groups to run     BATCH_SIZE (32), GEN_BATCH_SIZE (16)
#   ROUTING=auto|mope|topk (auto)          LIMIT (empty: all documents; N: the first N per task)
#   NPROC      processes (default: the GPUs listed by `nvidia-smi -L`, else 1); >1 runs
#              `torchrun --standalone --nproc-per-node NPROC -m mpmoe eval ...` (data parallel)
#   MPMOE      the mpmoe command (default: mpmoe on PATH, else .venv/bin/mpmoe, else PYTHON -m mpmoe)
#   PYTHON     python for the fallbacks (default: .venv/bin/python next to this script, else python)
#   TORCHRUN   the torchrun command (default: torchrun on PATH, else .venv/bin/torchrun,
#              else PYTHON -m torch.distributed.run)
#   FORCE=1    re-run groups whose OUT_DIR/<group>/results.json exists (default: skip them)
#   DRY_RUN=1  print the commands instead of running them
#
# A task whose hub dataset cannot be had stops the script at once with mpmoe eval's message.
# Results of different routings need different OUT_DIRs (a group is skipped by its folder).
#
# Examples:
#   scripts/eval_benchmark.sh ckpt/38m-mope eval/38m-mope
#   SUITE="zeroshot flame" LIMIT=100 scripts/eval_benchmark.sh ckpt/38m-mope/iter_0008800 /tmp/ev
#   TASKS=mpmoe_local scripts/eval_benchmark.sh runs/tiny/ckpt /tmp/ev --device cpu
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="eval_benchmark.sh"
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -lt 2 ]]; then
    echo "$ME: error: expected CKPT and OUT_DIR (see $ME --help)" >&2
    exit 2
fi
CKPT="$1"; OUT_DIR="$2"; shift 2
if [[ "${DRY_RUN:-0}" != 1 && ! -d "$CKPT" ]]; then  # a dry run only prints the commands
    echo "$ME: error: checkpoint $CKPT is not a folder" >&2
    exit 2
fi
EXTRA=("$@")

# --- commands
# shellcheck source=eval_commands.sh
source "$ROOT/scripts/eval_commands.sh"

# --- settings
SUITE="${SUITE:-mmlu zeroshot bbh gsm8k flame}"
MMLU_SHOTS="${MMLU_SHOTS:-5}"
BBH_SHOTS="${BBH_SHOTS:-3}"
GSM8K_SHOTS="${GSM8K_SHOTS:-3}"
CUSTOM_SHOTS="${CUSTOM_SHOTS:-0}"
BBH_MAX_GEN_TOKS="${BBH_MAX_GEN_TOKS:-64}"
BATCH_SIZE="${BATCH_SIZE:-32}"
GEN_BATCH_SIZE="${GEN_BATCH_SIZE:-16}"
ROUTING="${ROUTING:-auto}"
LIMIT="${LIMIT:-}"
FORCE="${FORCE:-0}"
DRY_RUN="${DRY_RUN:-0}"
TASKS="${TASKS:-}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ "${GPUS:-0}" -gt 0 ]]; then NPROC="$GPUS"; fi
    fi
fi
for var in MMLU_SHOTS BBH_SHOTS GSM8K_SHOTS CUSTOM_SHOTS BBH_MAX_GEN_TOKS BATCH_SIZE GEN_BATCH_SIZE NPROC; do
    if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
        echo "$ME: error: $var must be a non-negative integer, got '${!var}'" >&2
        exit 2
    fi
done
if [[ "$NPROC" -lt 1 ]]; then echo "$ME: error: NPROC must be >= 1" >&2; exit 2; fi
if [[ -n "$LIMIT" && ! "$LIMIT" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "$ME: error: LIMIT must be a number (documents per task, or a fraction < 1), got '$LIMIT'" >&2
    exit 2
fi

# print a command (shell-quoted), then run it unless DRY_RUN=1; a failure stops the script
# with the command's own exit status (its message is already on stderr)
run() {
    local what="$1"; shift
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "
        else out+="'${arg//\'/\'\\\'\'}' "; fi
    done
    echo "+ ${out% }"
    if [[ "$DRY_RUN" == 1 ]]; then return 0; fi
    local rc=0
    "$@" || rc=$?
    if [[ "$rc" -ne 0 ]]; then
        echo "$ME: error: $what failed (exit $rc); stopping" >&2
        exit "$rc"
    fi
}

# run_group NAME TASKS SHOTS BATCH [more mpmoe eval flags...]
run_group() {
    local name="$1" tasks="$2" shots="$3" batch="$4"; shift 4
    local dir="$OUT_DIR/$name"
    if [[ -f "$dir/results.json" && "$FORCE" != 1 ]]; then
        echo "$ME: skip $name: $dir/results.json exists (FORCE=1 re-runs it)" >&2
        return 0
    fi
    local launcher=("${MPMOE_CMD[@]}")
    if [[ "$NPROC" -gt 1 ]]; then
        launcher=("${TORCHRUN_CMD[@]}" --standalone --nproc-per-node "$NPROC" -m mpmoe)
    fi
    local args=(eval --load "$CKPT" --tasks "$tasks" --num-fewshot "$shots"
                --batch-size "$batch" --routing "$ROUTING" --output-path "$dir")
    if [[ -n "$LIMIT" ]]; then args+=(--limit "$LIMIT"); fi
    echo "$ME: $name: $tasks, $shots-shot" >&2
    run "mpmoe eval of group $name" "${launcher[@]}" "${args[@]}" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
}

if [[ -z "$TASKS" ]]; then
    for group in $SUITE; do
        case "$group" in
            mmlu|zeroshot|bbh|gsm8k|flame) ;;
            *) echo "$ME: error: unknown SUITE group '$group' (mmlu zeroshot bbh gsm8k flame; or TASKS=...)" >&2
               exit 2 ;;
        esac
    done
    if [[ -z "${SUITE// /}" ]]; then echo "$ME: error: SUITE is empty" >&2; exit 2; fi
fi

if [[ "$DRY_RUN" != 1 ]]; then mkdir -p "$OUT_DIR"; fi

if [[ -n "$TASKS" ]]; then
    run_group custom "$TASKS" "$CUSTOM_SHOTS" "$BATCH_SIZE"
else
    for group in $SUITE; do
        case "$group" in
            mmlu)     run_group mmlu mmlu "$MMLU_SHOTS" "$BATCH_SIZE" ;;
            zeroshot) run_group zeroshot boolq,hellaswag,arc_easy,arc_challenge 0 "$BATCH_SIZE" ;;
            bbh)      run_group bbh bbh_fewshot "$BBH_SHOTS" "$GEN_BATCH_SIZE" \
                          --gen-kwargs "max_gen_toks=$BBH_MAX_GEN_TOKS" ;;
            gsm8k)    run_group gsm8k gsm8k "$GSM8K_SHOTS" "$GEN_BATCH_SIZE" ;;
            flame)    run_group flame piqa,winogrande,openbookqa,sciq,lambada_openai 0 "$BATCH_SIZE" ;;
        esac
    done
fi

run "the results table" "${MPMOE_CMD[@]}" eval table "$OUT_DIR" --out "$OUT_DIR/summary.md"
