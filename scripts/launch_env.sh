# Sourced by scripts/train.sh and scripts/megatron_lm/pretrain.sh (needs $PYTHON): the GPUs
# of this node and torchrun's rendezvous, with SLURM-friendly defaults.
#   PHYSICAL_GPUS  nvidia-smi's count of this node's GPUs (CUDA_VISIBLE_DEVICES not applied)
#   GPUS           the GPUs a process sees, as torch counts them (CUDA_VISIBLE_DEVICES applied)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   the environment's, else SLURM's, else one node
# Checked here (one line on stderr, exit 2, before torchrun's own usage text): NPROC_PER_NODE
# and NNODES positive integers, NODE_RANK in 0..NNODES-1, MASTER_PORT in 1..65535, MASTER_ADDR
# not empty, PYTHON a command.

_launch_prog="$(basename "${0:-launch_env.sh}")"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "$_launch_prog: error: PYTHON '$PYTHON' is not a command (set PYTHON to a python with mpmoe installed)" >&2
    exit 2
fi

PHYSICAL_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    PHYSICAL_GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l || echo 0)
fi
if [[ "$PHYSICAL_GPUS" -gt 0 ]]; then
    GPUS=$("$PYTHON" -c 'import os, sys; from mpmoe.layout import visible_gpus; print(visible_gpus(os.environ, int(sys.argv[1])))' "$PHYSICAL_GPUS" 2>/dev/null || echo "$PHYSICAL_GPUS")
else  # no nvidia-smi: torch's own count (honours CUDA_VISIBLE_DEVICES)
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    PHYSICAL_GPUS=$GPUS
fi

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
        MASTER_ADDR=127.0.0.1
    fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"

_launch_int() {  # NAME VALUE MIN [MAX]: an integer in range, else one line and exit 2
    local name=$1 value=$2 min=$3 max=${4:-}
    if ! [[ "$value" =~ ^[0-9]+$ ]] || (( 10#$value < min )) || [[ -n "$max" && $(( 10#$value )) -gt $max ]]; then
        echo "$_launch_prog: error: $name must be an integer $([[ -n "$max" ]] && echo "in $min..$max" || echo ">= $min"), got '$value'" >&2
        exit 2
    fi
}
if [[ -n "${NPROC_PER_NODE+x}" ]]; then _launch_int NPROC_PER_NODE "$NPROC_PER_NODE" 1; fi
_launch_int NNODES "$NNODES" 1
_launch_int NODE_RANK "$NODE_RANK" 0 $(( 10#$NNODES - 1 ))
_launch_int MASTER_PORT "$MASTER_PORT" 1 65535
if [[ -z "$MASTER_ADDR" ]]; then
    echo "$_launch_prog: error: MASTER_ADDR is empty" >&2
    exit 2
fi
