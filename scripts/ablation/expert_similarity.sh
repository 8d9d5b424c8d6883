#!/usr/bin/env bash
# The checkpoint ablations: expert embeddings (every token through ALL experts), output and
# weight cosine similarity, co-occurrence (NPMI), Sigma, CKA heatmap, t-SNE, PCA, OT distances.
# With two checkpoints: the MoPE run and the MoE (top-k) run of one preset side by side.
#
#   scripts/ablation/expert_similarity.sh PRESET MOPE_CKPT OUT_DIR [MOE_CKPT] [-- mpmoe train flags...]
#
# The train flags must describe the model as trained (e.g. --data-path/--tokenizer-model for
# the sample text; sizes the preset does not have). Environment: LAYERS (e.g. "2,5,9"),
# NUM_TOKENS (2048), OT_SAMPLES (128), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -lt 3 ]]; then  # missing arguments: usage on stderr, exit 2
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"
PRESET="$1"; MOPE="$2"; OUT="$3"; shift 3
MOE=""
if [[ $# -ge 1 && "$1" != "--" ]]; then MOE="$1"; shift; fi
if [[ $# -ge 1 && "$1" == "--" ]]; then shift; fi
ARGS=(checkpoint --load "$MOPE" --name mope --out "$OUT"
      --num-tokens "${NUM_TOKENS:-2048}" --ot-samples "${OT_SAMPLES:-128}")
[[ -n "${LAYERS:-}" ]] && ARGS+=(--layers "$LAYERS")
if [[ -n "$MOE" ]]; then
    ARGS+=(--compare-load "$MOE" --compare-name moe
           --compare-args "--preset $PRESET --moe-router-load-balancing-type aux_loss $*")
fi
exec "$PYTHON" -m mpmoe.cli analyze "${ARGS[@]}" --preset "$PRESET" --moe-router-load-balancing-type otep "$@"
