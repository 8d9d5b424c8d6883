#!/usr/bin/env bash
# Evaluate every checkpoint of a run (or of a tree of runs) with the benchmark suite.
#
#   scripts/run_all_evals.sh RUN_DIR [OUT_DIR] [extra mpmoe eval flags...]
#
#   RUN_DIR  searched recursively for checkpoints: iter_XXXXXXX folders holding a
#            metadata.json (unfinished iter_XXXXXXX.tmp folders, and OUT_DIR, are skipped)
#   OUT_DIR  default RUN_DIR/eval; checkpoint RUN_DIR/P/iter_N is evaluated into
#            OUT_DIR/P/iter_N/<group>/ by scripts/eval_benchmark.sh
#
# Checkpoints run one after the other, oldest path first (sorted by path). Groups already
# evaluated (their results.json exists) are skipped, so re-running after new checkpoints
# appeared, or after an interruption, only does what is missing (FORCE=1 redoes everything).
# At the end: ONE table over everything, OUT_DIR/summary.md, and its values as OUT_DIR/summary.csv.
#
# Environment: as scripts/eval_benchmark.sh (SUITE, TASKS, MMLU_SHOTS, BBH_SHOTS, GSM8K_SHOTS,
# CUSTOM_SHOTS, BATCH_SIZE, GEN_BATCH_SIZE, ROUTING, LIMIT, NPROC, MPMOE, PYTHON, TORCHRUN,
# FORCE, DRY_RUN=1 to print the commands instead of running them); all are passed through.
# Evaluate another routing of the same checkpoints into another OUT_DIR (ROUTING=topk ... RUN_DIR RUN_DIR/eval-topk).
#
# Examples:
#   scripts/run_all_evals.sh ckpt/38m-mope
#   DRY_RUN=1 scripts/run_all_evals.sh ckpt /data/eval --dtype bf16
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="run_all_evals.sh"
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -lt 1 ]]; then
    echo "$ME: error: expected RUN_DIR (see $ME --help)" >&2
    exit 2
fi
if [[ ! -d "$1" ]]; then
    echo "$ME: error: RUN_DIR $1 is not a folder" >&2
    exit 2
fi
RUN_DIR="$(cd "$1" && pwd)"; shift
OUT_DIR="$RUN_DIR/eval"
if [[ $# -gt 0 && "$1" != -* ]]; then OUT_DIR="$1"; shift; fi
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac
OUT_DIR="${OUT_DIR%/}"
EXTRA=("$@")

BENCH="${EVAL_BENCHMARK:-$ROOT/scripts/eval_benchmark.sh}"
DRY_RUN="${DRY_RUN:-0}"
export DRY_RUN

# shellcheck source=eval_commands.sh
source "$ROOT/scripts/eval_commands.sh"

# --- the checkpoints: iter_* folders with a metadata.json, not *.tmp, not inside OUT_DIR
#     (symbolic links to checkpoint folders are followed)
CKPTS=()
while IFS= read -r -d '' dir; do
    if [[ -f "$dir/metadata.json" ]]; then CKPTS+=("$dir"); fi
done < <(find -L "$RUN_DIR" \( -path "$OUT_DIR" -o -name '*.tmp' \) -prune \
              -o -type d -name 'iter_[0-9]*' -print0 | sort -z)
if [[ ${#CKPTS[@]} -eq 0 ]]; then
    echo "$ME: error: no checkpoint (iter_XXXXXXX folder with a metadata.json) under $RUN_DIR" >&2
    exit 2
fi
echo "$ME: ${#CKPTS[@]} checkpoint(s) under $RUN_DIR -> $OUT_DIR" >&2

for ckpt in "${CKPTS[@]}"; do
    if [[ "$ckpt" == "$RUN_DIR" ]]; then rel="$(basename "$ckpt")"; else rel="${ckpt#"$RUN_DIR"/}"; fi
    echo "$ME: checkpoint $rel" >&2
    "$BENCH" "$ckpt" "$OUT_DIR/$rel" ${EXTRA[@]+"${EXTRA[@]}"}
done

TABLE=("${MPMOE_CMD[@]}" eval table "$OUT_DIR" --out "$OUT_DIR/summary.md" --csv "$OUT_DIR/summary.csv")
out=""
for arg in "${TABLE[@]}"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
done
echo "+ ${out% }"
if [[ "$DRY_RUN" != 1 ]]; then
    "${TABLE[@]}"
    echo "$ME: results table: $OUT_DIR/summary.md ($OUT_DIR/summary.csv)" >&2
fi
