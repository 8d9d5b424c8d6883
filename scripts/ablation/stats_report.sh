#!/usr/bin/env bash
# Routing-statistics report (load heatmaps, imbalance curves, co-occurrence, Sigma) of a run,
# optionally next to a second run.
#
#   scripts/ablation/stats_report.sh RUN_OR_STATS_DIR OUT_DIR [OTHER_RUN_OR_STATS_DIR]
#
# = mpmoe analyze stats RUN --out OUT [--compare OTHER]; open OUT/index.html.
# The python used is $PYTHON (default: .venv/bin/python of this checkout, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -lt 2 ]]; then  # missing arguments: usage on stderr, exit 2
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"
RUN="$1"; OUT="$2"; shift 2
ARGS=(stats "$RUN" --out "$OUT")
if [[ $# -ge 1 ]]; then ARGS+=(--compare "$1"); shift; fi
exec "$PYTHON" -m mpmoe.cli analyze "${ARGS[@]}" "$@"
