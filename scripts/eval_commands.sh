# Sourced by eval_benchmark.sh and run_all_evals.sh (needs ROOT, the repository folder):
# resolves the commands they run, each overridable from the environment.
#   PYTHON    default: .venv/bin/python of this checkout, else python
#   MPMOE     default: mpmoe on PATH, else .venv/bin/mpmoe, else "$PYTHON -m mpmoe"
#   TORCHRUN  default: torchrun on PATH, else .venv/bin/torchrun, else "$PYTHON -m torch.distributed.run"
# and splits MPMOE / TORCHRUN into the arrays MPMOE_CMD / TORCHRUN_CMD.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
if [[ -z "${MPMOE:-}" ]]; then
    if command -v mpmoe >/dev/null 2>&1; then MPMOE=mpmoe
    elif [[ -x "$ROOT/.venv/bin/mpmoe" ]]; then MPMOE="$ROOT/.venv/bin/mpmoe"
    else MPMOE="$PYTHON -m mpmoe"; fi
fi
if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun >/dev/null 2>&1; then TORCHRUN=torchrun
    elif [[ -x "$ROOT/.venv/bin/torchrun" ]]; then TORCHRUN="$ROOT/.venv/bin/torchrun"
    else TORCHRUN="$PYTHON -m torch.distributed.run"; fi
fi
export PYTHON MPMOE TORCHRUN
read -r -a MPMOE_CMD <<< "$MPMOE"
read -r -a TORCHRUN_CMD <<< "$TORCHRUN"
