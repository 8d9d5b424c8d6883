#!/usr/bin/env bash
# The MP-MoE paper's experiments at tiny scale, one command:
#
#   scripts/reproduce/paper_tiny.sh OUT            # CPU: 3 seeds x (MoPE, top-k, MoPE+prior), ablations, report
#   scripts/reproduce/paper_tiny.sh OUT --quick    # a few iterations of a smaller model (what the test runs)
#   scripts/reproduce/paper_tiny.sh OUT --shape paper  # 64 experts top-8 + shared: MoPE, top-k, +bias, ReMoE
#   scripts/reproduce/paper_tiny.sh OUT --preset flame-moe-38m --data-path PREFIX --tokenizer-model DIR \
#       --iters 2000                                # the same pipeline on a GPU
#
# Writes OUT/report.md, OUT/summary.json and PNGs; see scripts/reproduce/paper_tiny.py --help.
# The python used is $PYTHON (default: the repository's .venv/bin/python, else python3).
set -euo pipefail
HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$HERE/../.." && pwd -P)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT [--quick | --shape paper] [--seeds 1,2,3] [--iters N] [--preset P --data-path ...]" >&2
    exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$PYTHON" "$HERE/paper_tiny.py" "$@"
