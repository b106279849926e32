#!/usr/bin/env bash
# The GPU smoke test: one table (check, ok/FAILED/skipped, measured value, seconds) and JSON
# ($OUT/gpu_check.json when $OUT is set, else ./gpu_check.json). One rank per visible GPU; with no
# GPU (or --cpu) the same checks on CPU/gloo. Needs no network, SLURM or sudo; ~4-5 min on one H200,
# at most --budget-s (450) for all checks. Arguments pass on (--help lists them), e.g.
#     tools/gpu_check.sh --checks devices,nccl_gloo,parity
# Python: $PYTHON, else .venv/bin/python, else python3. The logic is hpc/bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
exec "$py" -m hpc.bench.gpu_check "$@"
