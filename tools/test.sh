#!/usr/bin/env bash
# The README's test command (and all that .ci/run does): set up .venv, bring up the project's local
# SLURM cluster when running as root (apt packages + daemons, see tools/slurm_cluster.py), run pytest.
# Tests that need the cluster fail, not skip, when HPC_REQUIRE_SLURM=1 (set here as root) or CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash tools/bootstrap.sh
if [ "$(id -u)" = 0 ]; then
    python3 tools/slurm_cluster.py up
    export HPC_REQUIRE_SLURM=1
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests (exit 5): nothing ran" >&2
    rc=1
fi
echo "test suite wall time: $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"
