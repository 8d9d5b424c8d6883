#!/usr/bin/env bash
# FineWeb-Edu end to end: download (resumable) -> tokenize -> inspect.
#   WORKDIR/raw/               jsonl.gz shards of text
#   WORKDIR/tokenized/fineweb_{train,valid,test}_text_document.{bin,idx}, fineweb.manifest.json
set -euo pipefail

usage() {
    cat <<USAGE
usage: $(basename "$0") WORKDIR [MAX_BYTES] [WORKERS]

  WORKDIR    where raw/ and tokenized/ go
  MAX_BYTES  bytes of text to download (e.g. 5e9; default: the whole config)
  WORKERS    tokenizer processes (default: number of CPUs)

environment: HF_DATASET, HF_CONFIG, HF_SPLIT, SHARD_DOCS (see download_fineweb.sh),
             TOKENIZER, SPLIT, MAX_TOKENS (see tokenize_fineweb.sh), MPMOE.
USAGE
}

if [[ $# -lt 1 || $# -gt 3 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]] && exit 0
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKDIR=$1
MAX_BYTES=${2:-}
WORKERS=${3:-$(nproc 2>/dev/null || echo 1)}

"$HERE/download_fineweb.sh" "$WORKDIR/raw" ${MAX_BYTES:+"$MAX_BYTES"}
"$HERE/tokenize_fineweb.sh" "$WORKDIR/raw" "$WORKDIR/tokenized/fineweb" "$WORKERS"
echo "done: data prefixes and counts are in $WORKDIR/tokenized/fineweb.manifest.json"
