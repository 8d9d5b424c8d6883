#!/usr/bin/env bash
# Launch `mpmoe train` with torchrun over the GPUs of this machine (or nodes of a job).
#
#   scripts/train.sh PRESET [ROUTER] [extra mpmoe train flags...]
#
#   PRESET  a configs/*.toml name: tiny-cpu, flame-moe-38m ... flame-moe-1.7b
#   ROUTER  mope (OTEP routing, --moe-router-load-balancing-type otep), moe / topk
#           (megatron's top-k with aux loss), remoe (ReLU routing + adaptive L1,
#           --moe-relu-routing), topk-bias / mope-bias (aux-loss-free expert bias instead of
#           the aux loss, docs/routing.md); default: the preset's own choice
#
# GPUs: nvidia-smi's count as torch sees it (CUDA_VISIBLE_DEVICES). Expert parallelism:
# the largest divisor of the expert count and of world/(TP x PP x CP), EP x ETP x PP
# dividing the world (mpmoe.layout). mpmoe train lowers the micro-batch (log line) when
# micro x data-parallel size does not divide the global batch.
# No GPU: one CPU process with gloo (NPROC_PER_NODE=N to run N CPU processes).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous);
# under SLURM they default to SLURM_NNODES, SLURM_NODEID and the first host of the job.
# The python used is $PYTHON (default: .venv/bin/python next to this script, else python3).
#
# Examples:
#   scripts/train.sh tiny-cpu                       # embedded corpus, MoPE, CPU
#   scripts/train.sh flame-moe-38m mope --data-path /data/dolma_text_document \
#       --tokenizer-model /data/tokenizer --train-iters 8800 --save ckpt/38m-mope
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -lt 1 ]]; then  # missing arguments: usage on stderr, exit 2
    sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PRESET="$1"; shift
if [[ ! -f "$ROOT/configs/$PRESET.toml" ]]; then
    echo "train.sh: error: unknown preset '$PRESET' (configs: $(cd "$ROOT/configs" && ls *.toml | sed 's/.toml//' | tr '\n' ' '))" >&2
    exit 2
fi
ROUTER_FLAGS=()
if [[ $# -gt 0 && "$1" != --* ]]; then
    case "$1" in
        mope|otep) ROUTER_FLAGS=(--moe-router-load-balancing-type otep) ;;
        moe|topk|aux_loss) ROUTER_FLAGS=(--moe-router-load-balancing-type aux_loss) ;;
        remoe) ROUTER_FLAGS=(--moe-router-load-balancing-type none --moe-relu-routing) ;;
        topk-bias) ROUTER_FLAGS=(--moe-router-load-balancing-type none --moe-router-enable-expert-bias) ;;
        mope-bias) ROUTER_FLAGS=(--moe-router-load-balancing-type otep --moe-aux-loss-coeff 0
                                 --moe-router-enable-expert-bias) ;;
        *) echo "train.sh: error: unknown router '$1' (mope, moe, remoe, topk-bias, mope-bias)" >&2; exit 2 ;;
    esac
    shift
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# --- GPUs on this node, nodes (torchrun rendezvous)
. "$ROOT/scripts/launch_env.sh"

EXTRA=()
if [[ "$GPUS" -gt 0 ]]; then
    NPROC="${NPROC_PER_NODE:-$GPUS}"
else
    NPROC="${NPROC_PER_NODE:-1}"
    EXTRA+=(--distributed-backend gloo)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
WORLD=$(( NPROC * NNODES ))

# --- expert parallelism: the largest size dividing the expert count and world/(TP x PP x CP)
# with EP x ETP x PP dividing the world (mpmoe.layout.expert_parallel_size)
EP=$("$PYTHON" - "$PRESET" "$WORLD" "$@" <<'PY'
import sys
from mpmoe.layout import expert_parallel_size
from mpmoe.megatron_lm.launch import _int, check_values
from mpmoe.run.presets import load_preset
preset, world, argv = load_preset(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
get = lambda flag, key, default: _int(argv, flag, preset.get(key, default))
try:
    check_values(argv)  # a valued flag without its value: one line here, not once per rank
    experts = get("--num-experts", "num_experts", 0) or 0
    if "--expert-model-parallel-size" in argv or not experts:
        print(0)
    else:
        print(expert_parallel_size(experts, world, get("--tensor-model-parallel-size", "tensor_model_parallel_size", 1),
                                   get("--pipeline-model-parallel-size", "pipeline_model_parallel_size", 1),
                                   get("--context-parallel-size", "context_parallel_size", 1),
                                   get("--expert-tensor-parallel-size", "expert_tensor_parallel_size", None)))
except ValueError as exc:
    sys.exit(f"train.sh: error: {exc}")
PY
) || exit 2
if [[ "$EP" -gt 0 ]]; then EXTRA+=(--expert-model-parallel-size "$EP"); fi

echo "train.sh: preset $PRESET, $NNODES node(s) x $NPROC process(es) ($([[ $GPUS -gt 0 ]] && echo "$GPUS GPU(s)" || echo CPU/gloo)), EP=${EP/#0/given}" >&2
cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m mpmoe.train.cli --preset "$PRESET" "${ROUTER_FLAGS[@]}" "${EXTRA[@]}" "$@"
