#!/usr/bin/env bash
# Create .venv with torch (installed first, pinned) and the hpc package; quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    # First, alone: pip then takes the torch 2.13.0 wheel the machine has (CPU build here).
    .venv/bin/pip install --quiet torch==2.13.0
fi
stamp=.venv/.hpc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/constraints.txt -nt "$stamp" ]; then
    .venv/bin/pip install --quiet -c tools/constraints.txt -e ".[test]"
    touch "$stamp"
fi
