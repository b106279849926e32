"""Faults of the fault matrix that need a job of their own on the real local SLURM cluster: the
scheduler restarting, the batch step's own processes killed (srun, the batch shell). Each asserts
that the newest committed step before the fault stays intact and what the run and `hpc.status` say
afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpc.checkpoint.manifest import MANIFEST
from slurm_jobs import Run, submit, wait_for

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
RUN = ["exp=tiny_cpu", "nodes=2", "gpus_per_node=1", "train.max_steps=40", "train.log_every=5",
       "checkpoint.every_steps=5", "time=10"]
SLOW = "slow@step_end:ms=300"


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _committed(run: Run) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run.dir / "checkpoints").glob(f"step-*/{MANIFEST}"))


def _status(run: Run, env: dict[str, str]) -> str:
    proc = subprocess.run([os.sys.executable, "-m", "hpc.status", str(run.dir)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_srun_killed_requeues_the_job_and_it_resumes_from_the_committed_step(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    run = Run(cluster_env, tmp_path / "srun", submit(cluster_env, *RUN, f"run.root={tmp_path}", "run.name=srun",
                                                     "--no-wait", faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 12 and _committed(run), 240)
    sruns = _pids(f"srun .*{run.dir}/submitit")  # srun and the helper it forks
    assert sruns, "the batch step's srun was not found"
    for pid in sruns:
        os.kill(pid, signal.SIGKILL)
    wait_for("a requeue", lambda: run.events("requeued"), 180)
    assert run.wait(300) == "COMPLETED", run.explain()
    requeued = run.events("requeued")
    assert [e["reason"] for e in requeued] == ["failure"], requeued
    started = run.events("started")
    assert started[1]["step"] == requeued[0]["step"] and requeued[0]["step"] in _committed(run)
    assert run.events("finished")[-1]["step"] == 40
    status = _status(run, cluster_env)
    assert "failure 1" in status and "step 40 of 40" in status, status


def test_the_batch_shell_killed_ends_the_job_and_status_says_so_with_the_committed_step(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    run = Run(cluster_env, tmp_path / "shell", submit(cluster_env, *RUN, f"run.root={tmp_path}", "run.name=shell",
                                                      "--no-wait", faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 12 and _committed(run), 240)
    committed = _committed(run)[-1]
    shells = _pids(f"job{run.job_id}/slurm_script")
    assert shells, "the batch shell's process was not found"
    for pid in shells:
        os.kill(pid, signal.SIGKILL)
    state = run.wait(180)
    assert state in ("FAILED", "COMPLETED", "CANCELLED") or state.startswith("CANCELLED"), run.explain()
    assert committed in _committed(run)
    status = _status(run, cluster_env)
    print(status)
    if state != "COMPLETED":
        assert re.search(r"ended\s+without the batch shell's verdict \([A-Z_]+\)", status), status
        assert f"last committed step {_committed(run)[-1]}" in status, status
        assert "submit the same command again to resume" in status, status
    assert json.loads((run.dir / "checkpoints" / f"step-{committed}" / MANIFEST).read_text())["step"] == committed


def _restart_slurmctld(cluster_env: dict[str, str], down_s: float) -> None:
    """Stop the cluster's slurmctld (SIGTERM, as an admin's restart does), leave it down for
    `down_s` seconds, and start it again with the project's script (it starts what is missing)."""
    state = Path(cluster_env.get("HPC_SLURM_STATE", "/var/tmp/hpc-slurm"))
    pid = int((state / "pids" / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for("slurmctld to stop", lambda: not Path(f"/proc/{pid}").exists(), 60)
    time.sleep(down_s)
    up = subprocess.run(["python3", str(ROOT / "tools" / "slurm_cluster.py"), "up"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr


def test_the_scheduler_restarting_mid_run_leaves_the_job_training_and_requeueable(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """slurmctld stopped and started while the job trains: the ranks train on (a job step needs no
    slurmctld), and the time-limit warning that comes after it (late by about the downtime: SLURM
    checks limits when it is back) still saves, requeues and resumes."""
    run = Run(cluster_env, tmp_path / "ctld",
              submit(cluster_env, "exp=tiny_cpu", "nodes=1", "gpus_per_node=1", "train.max_steps=90",
                     "train.log_every=5", "time=1", "requeue.lead_s=20", f"run.root={tmp_path}", "run.name=ctld",
                     "--no-wait", faults="slow@step_end:ms=600"))
    wait_for("the run to train", lambda: run.step() >= 5, 240)
    before = run.step()
    _restart_slurmctld(cluster_env, down_s=5)
    assert run.step() > before, "training stopped while slurmctld was down"
    assert run.wait(400) == "COMPLETED", run.explain()
    requeued = run.events("requeued")
    assert requeued and {e["reason"] for e in requeued} == {"timeout"}, requeued
    assert [e["step"] for e in run.events("started")[1:]] == [e["step"] for e in requeued]
    assert run.events("finished")[-1]["step"] == 90


def test_a_hung_rank_is_found_within_the_collective_timeout_and_its_node_left_out(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """SIGSTOP one rank mid-run: the other rank's collective times out after
    cluster.nccl.timeout_s (the process group's timeout, gloo's as well as NCCL's), the job ends
    naming the silent rank and its node, the batch shell requeues it without that node, and the
    rerun completes from the committed step."""
    timeout_s = 15
    run = Run(cluster_env, tmp_path / "hung", submit(cluster_env, *RUN, f"cluster.nccl.timeout_s={timeout_s}",
                                                     f"run.root={tmp_path}", "run.name=hung", "--no-wait",
                                                     faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 8 and _committed(run), 240)
    record = run.ranks(0)[1]
    os.kill(record["pid"], signal.SIGSTOP)
    stopped_at = time.time()
    requeued = wait_for("a requeue", lambda: run.events("requeued"), timeout_s + 120)
    took = requeued[0]["at"] - stopped_at
    print(f"hung rank -> requeued in {took:.1f} s (collective timeout {timeout_s} s)")
    assert took < timeout_s + 45, took
    assert requeued[0]["reason"] == "failure" and requeued[0]["excluded"] == [record["node"]], requeued
    assert f"rank(s) 1 on {record['node']}" in requeued[0]["detail"], requeued[0]
    assert run.wait(300) == "COMPLETED", run.explain()
    started = run.events("started")
    assert record["node"] not in started[1]["nodes"] and started[1]["step"] in _committed(run)
    assert run.events("finished")[-1]["step"] == 40
