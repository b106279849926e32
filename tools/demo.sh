#!/usr/bin/env bash
# The README's demo: set up .venv, then run the tiny_cpu experiment on this machine (2 ranks, CPU,
# gloo) through submitit's local executor; prints the preflight table. Extra key=value args pass on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/python -m hpc.submit exp=tiny_cpu cluster=local "$@"
