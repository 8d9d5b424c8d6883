#!/usr/bin/env bash
# Tokenize downloaded FineWeb-Edu shards (or any jsonl/parquet/txt folder) into Megatron
# indexed datasets: OUTPUT_PREFIX_{train,valid,test}_text_document.{bin,idx} + OUTPUT_PREFIX.manifest.json.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") INPUT OUTPUT_PREFIX [WORKERS]

  INPUT          folder (or file) of .jsonl[.gz] / .parquet / .txt documents, e.g. from download_fineweb.sh
  OUTPUT_PREFIX  e.g. data/fineweb-edu/fineweb
  WORKERS        tokenizer processes (default: number of CPUs)

environment:
  TOKENIZER   HF tokenizer id or local path (default EleutherAI/pythia-12b)
  SPLIT       train,valid,test document weights (default 98,1,1)
  MAX_TOKENS  stop once this many tokens are written (default: all)
  MPMOE       the mpmoe command (default: mpmoe; e.g. "python -m mpmoe.cli")
USAGE
}

if [[ $# -lt 2 || $# -gt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0
    exit 2
fi

INPUT=$1
OUTPUT_PREFIX=$2
WORKERS=${3:-$(nproc 2>/dev/null || echo 1)}
read -r -a MPMOE_CMD <<< "${MPMOE:-mpmoe}"

args=(data prepare
    --input "$INPUT"
    --json-keys text
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "${TOKENIZER:-EleutherAI/pythia-12b}"
    --output-prefix "$OUTPUT_PREFIX"
    --split "${SPLIT:-98,1,1}"
    --workers "$WORKERS"
    --append-eod)
if [[ -n "${MAX_TOKENS:-}" ]]; then
    args+=(--max-tokens "$MAX_TOKENS")
fi

"${MPMOE_CMD[@]}" "${args[@]}"
"${MPMOE_CMD[@]}" data inspect "$OUTPUT_PREFIX.manifest.json"
