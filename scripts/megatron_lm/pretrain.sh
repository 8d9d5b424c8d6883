#!/usr/bin/env bash
# Train a FLAME-MoE-shaped model with Megatron-LM's own pretrain_gpt.py on a checkout
# patched with patches/megatron-lm/<branch>/ (see patches/README.md).
#
#   scripts/megatron_lm/pretrain.sh PRESET {mope,moe} MEGATRON_LM_DIR [extra pretrain_gpt.py flags...]
#
#   PRESET           a configs/*.toml name: flame-moe-38m ... flame-moe-1.7b, tiny-cpu
#   mope | moe       MoPE (--moe-router-load-balancing-type otep) or megatron's top-k (aux_loss)
#   MEGATRON_LM_DIR  the patched Megatron-LM checkout (holds pretrain_gpt.py)
#
# The model and optimizer flags come from the preset (python -m mpmoe.megatron_lm.flags
# PRESET prints them); extra flags come after them and win. Without a data source
# (--data-path, --train-data-path, ..., --mock-data) the run uses --mock-data with a
# NullTokenizer of the preset's vocabulary. Give --train-iters
# (the WSD decay length is a fraction of it) and, for real data, --data-path,
# --tokenizer-type/--tokenizer-model, --save, --load as usual.
#
# GPUs: nvidia-smi's count as torch sees it (CUDA_VISIBLE_DEVICES). Expert parallelism:
# the largest divisor of the expert count and of world/(TP x PP x CP) with EP x ETP x PP
# dividing the world, unless --expert-model-parallel-size is given. The micro-batch is
# lowered (log line) when micro x data-parallel size does not divide the global batch.
# No GPU: one CPU process with gloo (NPROC_PER_NODE overrides the process count).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (SLURM defaults as train.sh).
# The python used is $PYTHON (default: .venv312/bin/python or .venv/bin/python beside
# this repository, else python3); it must have mpmoe and megatron-core installed.
#
# Example:
#   scripts/megatron_lm/pretrain.sh flame-moe-38m mope ~/Megatron-LM --train-iters 20 \
#       --log-interval 1 --eval-iters 0
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -lt 3 ]]; then  # missing arguments: usage on stderr, exit 2
    usage >&2
    exit 2
fi
PRESET="$1"; ROUTER="$2"; MEGATRON_LM_DIR="$3"; shift 3
case "$ROUTER" in
    mope|moe) ;;
    *) echo "pretrain.sh: error: unknown router '$ROUTER' (mope, moe)" >&2; exit 2 ;;
esac
if [[ ! -f "$MEGATRON_LM_DIR/pretrain_gpt.py" ]]; then
    echo "pretrain.sh: error: $MEGATRON_LM_DIR/pretrain_gpt.py not found (MEGATRON_LM_DIR: a Megatron-LM checkout)" >&2
    exit 2
fi
MEGATRON_LM_DIR="$(cd "$MEGATRON_LM_DIR" && pwd)"
if ! grep -q mpmoe_megatron_lm "$MEGATRON_LM_DIR/pretrain_gpt.py"; then
    echo "pretrain.sh: error: $MEGATRON_LM_DIR is not patched (apply patches/megatron-lm/*/, see patches/README.md)" >&2
    exit 2
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    for p in "$ROOT/.venv312/bin/python" "$ROOT/.venv/bin/python"; do
        if [[ -x "$p" ]]; then PYTHON="$p"; break; fi
    done
    PYTHON="${PYTHON:-python3}"
fi

# --- GPUs, processes, expert parallelism, micro-batch, data: mpmoe.megatron_lm.launch
# decides (a pure function of these flags and the environment, unit-tested)
. "$ROOT/scripts/launch_env.sh"
OUT=$(cd "$ROOT" && "$PYTHON" -m mpmoe.megatron_lm.launch "$PRESET" "$ROUTER" \
      --physical-gpus "$PHYSICAL_GPUS" --nnodes "$NNODES" -- "$@") || exit 2
mapfile -t PLAN <<< "$OUT"
NPROC="${PLAN[0]}"; GPUS="${PLAN[1]}"; ARGS=("${PLAN[@]:2}")

echo "pretrain.sh: preset $PRESET ($ROUTER), $NNODES node(s) x $NPROC process(es) ($([[ $GPUS -gt 0 ]] && echo "$GPUS GPU(s)" || echo CPU/gloo))" >&2
cd "$MEGATRON_LM_DIR"
# The patched tree first on the path: a sitecustomize or anything else importing
# megatron before pretrain_gpt.py must get the patched megatron.training, not the wheel's.
export PYTHONPATH="$MEGATRON_LM_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_gpt.py "${ARGS[@]}"
