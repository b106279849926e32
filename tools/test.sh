#!/usr/bin/env bash
# The README's test command (and all that .ci/run does): set up .venv, bring up the project's local
# SLURM cluster when running as root (apt packages + daemons, see tools/slurm_cluster.py), run pytest.
# Tests that need the cluster fail, not skip, when HPC_REQUIRE_SLURM=1 (set here as root) or CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ "$(id -u)" = 0 ]; then
    # The cluster (apt packages on a fresh machine, then the daemons; system python) comes up while
    # pip fills .venv: on a fresh machine the two take about as long as the longer one.
    cluster_log=$(mktemp)
    python3 tools/slurm_cluster.py up > "$cluster_log" 2>&1 &
    cluster_pid=$!
    bash tools/bootstrap.sh
    cluster_rc=0
    wait "$cluster_pid" || cluster_rc=$?
    cat "$cluster_log"
    rm -f "$cluster_log"
    [ "$cluster_rc" = 0 ] || exit "$cluster_rc"
    export HPC_REQUIRE_SLURM=1
else
    bash tools/bootstrap.sh
fi
# Bytecode for our own modules, written once: with PYTHONDONTWRITEBYTECODE set (as on some
# machines) every one of the suite's hundreds of rank processes would compile them again.
.venv/bin/python -m compileall -q hpc tests tools > /dev/null || true
# Two pytest processes side by side: the SLURM tests (-m slurm: mostly waiting on time limits, grace
# times and slowed steps; one after another, they fill the cluster's 4 nodes) and the rest. The rest
# run at the lowest priority, in a session of their own whose autogroup is niced to 19 (with the
# kernel's autogroups, process nice values only count within a session): the jobs on the cluster
# keep their timing while the other tests take the CPU the jobs leave idle. Arguments go to both
# (e.g. a test file: the half without any of its tests collects nothing, exit 5, which is fine as
# long as the other half ran something).
run_half() {  # NAME MARK ARGS...: one half, its lines prefixed with its name
    local name=$1 mark=$2
    shift 2
    if [ "$name" = slurm ]; then
        .venv/bin/python -m pytest -m "$mark" "$@"
    else
        setsid --wait sh -c 'echo 19 > /proc/$$/autogroup 2>/dev/null; exec nice -n 19 "$@"' sh \
            .venv/bin/python -m pytest -m "$mark" "$@"
    fi 2>&1 | sed -u "s/^/[$name] /"
    return "${PIPESTATUS[0]}"
}
set +e
run_half slurm "slurm" "$@" &
slurm_pid=$!
run_half other "not slurm" "$@" &
other_pid=$!
trap 'pkill -TERM -f "^.venv/bin/python -m pytest -m" 2>/dev/null; exit 130' INT TERM
wait "$other_pid"
rc_other=$?
wait "$slurm_pid"
rc_slurm=$?
trap - INT TERM
set -e
echo "SLURM tests exit $rc_slurm, other tests exit $rc_other"
if [ "$rc_slurm" = 5 ] && [ "$rc_other" = 5 ]; then
    echo "pytest collected no tests (exit 5): nothing ran" >&2
    rc=1
elif [ "$rc_slurm" != 0 ] && [ "$rc_slurm" != 5 ]; then
    rc=$rc_slurm
elif [ "$rc_other" != 0 ] && [ "$rc_other" != 5 ]; then
    rc=$rc_other
else
    rc=0
fi
echo "test suite wall time: $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"
