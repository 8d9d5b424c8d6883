#!/usr/bin/env bash
# Download (stream) FineWeb-Edu text from the Hugging Face hub into local jsonl.gz shards.
# Resumable: rerun the same command after an interruption and it continues after the last
# complete shard. Tokenize the result with tokenize_fineweb.sh.
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") OUTPUT_DIR [MAX_BYTES]

  OUTPUT_DIR  folder for shard-NNNNN.jsonl.gz and download-state.json
  MAX_BYTES   stop after this many bytes of text (e.g. 5e9; default: the whole split)

environment:
  HF_DATASET  dataset id      (default HuggingFaceFW/fineweb-edu)
  HF_CONFIG   dataset config  (default sample-10BT; set it empty for none)
  HF_SPLIT    split           (default train)
  SHARD_DOCS  documents/shard (default 50000)
  MPMOE       the mpmoe command (default: mpmoe; e.g. "python -m mpmoe.cli")
  HF_TOKEN    optional, for gated datasets (read by huggingface_hub)
USAGE
}

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0
    exit 2
fi

OUTPUT_DIR=$1
MAX_BYTES=${2:-}
read -r -a MPMOE_CMD <<< "${MPMOE:-mpmoe}"

args=(data download
    --hf-dataset "${HF_DATASET:-HuggingFaceFW/fineweb-edu}"
    --hf-config "${HF_CONFIG-sample-10BT}"
    --hf-split "${HF_SPLIT:-train}"
    --shard-docs "${SHARD_DOCS:-50000}"
    --output-dir "$OUTPUT_DIR")
if [[ -n "$MAX_BYTES" ]]; then
    args+=(--max-bytes "$MAX_BYTES")
fi

exec "${MPMOE_CMD[@]}" "${args[@]}"
