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
# PRESET prints them); extra flags come after them and win. Without --data-path the run
# uses --mock-data with a NullTokenizer of the preset's vocabulary. Give --train-iters
# (the WSD decay length is a fraction of it) and, for real data, --data-path,
# --tokenizer-type/--tokenizer-model, --save, --load as usual.
#
# GPUs: counted with nvidia-smi (or torch). Expert parallelism: the largest divisor of
# the preset's expert count that divides the number of processes (as scripts/train.sh),
# unless --expert-model-parallel-size is given. No GPU: one CPU process with gloo.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (SLURM defaults as train.sh).
# The python used is $PYTHON (default: .venv312/bin/python or .venv/bin/python beside
# this repository, else python3); it must have mpmoe and megatron-core installed.
#
# Example:
#   scripts/megatron_lm/pretrain.sh flame-moe-38m mope ~/Megatron-LM --train-iters 20 \
#       --log-interval 1 --eval-iters 0
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
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

# --- GPUs on this node, nodes (torchrun rendezvous)
. "$ROOT/scripts/launch_env.sh"

EXTRA=()
if [[ "$GPUS" -gt 0 ]]; then
    NPROC="${NPROC_PER_NODE:-$GPUS}"
else
    NPROC="${NPROC_PER_NODE:-1}"
    EXTRA+=(--distributed-backend gloo)
fi
WORLD=$(( NPROC * NNODES ))

# --- the preset's flags (mpmoe.megatron_lm.flags: one source of truth for the shapes)
FLAG_ARGS=("$PRESET" --router "$ROUTER")
case " $* " in *" --expert-model-parallel-size "*) ;; *) FLAG_ARGS+=(--world-size "$WORLD") ;; esac
case " $* " in *" --data-path "*|*" --mock-data "*) ;; *) FLAG_ARGS+=(--mock-data) ;; esac
ARGS=("$@")
for (( i=0; i<${#ARGS[@]}; i++ )); do
    if [[ "${ARGS[$i]}" == --train-iters ]]; then FLAG_ARGS+=(--train-iters "${ARGS[$((i+1))]:-}"); fi
done
OUT=$(cd "$ROOT" && "$PYTHON" -m mpmoe.megatron_lm.flags "${FLAG_ARGS[@]}") || exit 2
mapfile -t PRESET_FLAGS <<< "$OUT"

echo "pretrain.sh: preset $PRESET ($ROUTER), $NNODES node(s) x $NPROC process(es) ($([[ $GPUS -gt 0 ]] && echo "$GPUS GPU(s)" || echo CPU/gloo))" >&2
cd "$MEGATRON_LM_DIR"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_gpt.py "${PRESET_FLAGS[@]}" "${EXTRA[@]}" "$@"
