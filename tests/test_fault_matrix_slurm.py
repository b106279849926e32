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
from checkpoint_jobs import committed_steps
from slurm_jobs import Run, submit, wait_for

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
RUN = ["exp=tiny_cpu", "nodes=2", "gpus_per_node=1", "train.max_steps=40", "train.log_every=5",
       "checkpoint.every_steps=5", "time=10"]
SLOW = "slow@step_end:ms=300"
CTLD_RUN = ("exp=tiny_cpu", "nodes=1", "gpus_per_node=1", "train.max_steps=90", "train.log_every=5")


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _committed(run: Run) -> list[int]:
    return committed_steps(run.dir)


@pytest.fixture(scope="module")
def uninterrupted(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """uninterrupted(*overrides) -> each step's loss of the same run with no fault (trained once per
    set of overrides; no slowed steps: the sleep does not touch the numbers)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    done: dict[tuple[str, ...], dict[int, float]] = {}

    def losses(*overrides: str) -> dict[int, float]:
        if overrides not in done:
            name = f"u{len(done)}"
            run = Run(cluster_env, root / name, submit(cluster_env, *overrides, "time=10", f"run.root={root}",
                                                       f"run.name={name}", "--no-wait"))
            assert run.wait(300) == "COMPLETED", run.explain()
            done[overrides] = _losses(run)
        return done[overrides]

    return losses


def _losses(run: Run) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert out.get(record["step"], record["loss"]) == record["loss"], \
            f"step {record['step']} logged twice, differently"
        out[record["step"]] = record["loss"]
    return out


def _assert_same_trajectory(run: Run, reference: dict[int, float]) -> None:
    ours = _losses(run)
    common = sorted(set(ours) & set(reference))
    assert len(common) >= 5 and all(ours[s] == reference[s] for s in common), \
        [(s, ours[s], reference[s]) for s in common if ours[s] != reference[s]][:5]


def _in_queue(run: Run, env: dict[str, str]) -> bool:
    """squeue still lists the job (running or COMPLETING: some of its processes live on)."""
    out = subprocess.run(["squeue", "-h", "-j", run.job_id, "-o", "%T"], capture_output=True, text=True, env=env)
    return bool(out.stdout.strip())


def _status(run: Run, env: dict[str, str]) -> str:
    proc = subprocess.run([os.sys.executable, "-m", "hpc.status", str(run.dir)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_srun_killed_requeues_the_job_and_it_resumes_from_the_committed_step(
        cluster_env: dict[str, str], tmp_path: Path, uninterrupted) -> None:
    run = Run(cluster_env, tmp_path / "srun", submit(cluster_env, *RUN, f"run.root={tmp_path}", "run.name=srun",
                                                     "--no-wait", faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 12 and _committed(run), 240)
    # The same command again while the job runs: refused, and the folder is left as it was.
    config, pickles = (run.dir / "config.yaml").read_bytes(), sorted((run.dir / "submitit").glob("*_submitted.pkl"))
    again = submit(cluster_env, *RUN, f"run.root={tmp_path}", "run.name=srun", "--no-wait", faults=SLOW)
    assert again.returncode == 1 and f"job {run.job_id}, which is still RUNNING" in again.stderr, again.stderr
    assert (run.dir / "config.yaml").read_bytes() == config
    assert sorted((run.dir / "submitit").glob("*_submitted.pkl")) == pickles
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
    _assert_same_trajectory(run, uninterrupted(*RUN[:-1]))


def test_the_batch_shell_killed_ends_the_job_and_status_says_so_with_the_committed_step(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """SIGKILL the batch shell. SLURM then ends the job's steps with SIGTERM, which the ranks take
    for a preemption: they save and ask for a requeue. Whether that requeue is taken depends on
    how far SLURM's clean-up has got (a COMPLETING job cannot be requeued), so either the run
    completes from a committed step, or it ends and `hpc.status` says why (the requeue refused, or
    no verdict at all) and where to resume."""
    run = Run(cluster_env, tmp_path / "shell", submit(cluster_env, *RUN, f"run.root={tmp_path}", "run.name=shell",
                                                      "--no-wait", faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 12 and _committed(run), 240)
    committed = _committed(run)[-1]
    shells = _pids(f"job{run.job_id}/slurm_script")
    assert shells, "the batch shell's process was not found"
    for pid in shells:
        os.kill(pid, signal.SIGKILL)
    # sacct can say the job ended while its ranks still save (COMPLETING) or before their requeue
    # shows: the outcome is known once the job has left the queue and no process names the run.
    wait_for("the job to leave the queue", lambda: not _in_queue(run, cluster_env) and not _pids(str(run.dir)), 300)
    state = run.wait(30)
    newest = _committed(run)[-1]
    assert newest >= committed, (committed, _committed(run))
    assert json.loads((run.dir / "checkpoints" / f"step-{newest}" / MANIFEST).read_text())["step"] == newest
    status = _status(run, cluster_env)
    print(status)
    if state == "COMPLETED":
        requeued = run.events("requeued")
        assert [e["reason"] for e in requeued] == ["preemption"], requeued
        assert run.events("started")[1]["step"] == requeued[0]["step"] >= committed
        assert run.events("finished")[-1]["step"] == 40 and "step 40 of 40" in status, status
    elif "scontrol requeue failed" in status:  # the ranks lived to ask for the requeue, too late
        assert re.search(r"stopped\s+scontrol requeue failed", status), status
        assert f"last committed checkpoint is step {newest}; submit the same command" in status, status
    else:  # the ranks were gone before they could ask
        assert state in ("FAILED", "CANCELLED") or state.startswith("CANCELLED"), (state, run.explain())
        assert re.search(r"ended\s+without the batch shell's verdict \([A-Z_]+\)", status), status
        assert f"last committed step {newest}" in status, status
        assert "submit the same command again to resume" in status, status


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
        cluster_env: dict[str, str], tmp_path: Path, uninterrupted) -> None:
    """slurmctld stopped and started while the job trains: the ranks train on (a job step needs no
    slurmctld), and the time-limit warning that comes after it (late by about the downtime: SLURM
    checks limits when it is back) still saves, requeues and resumes."""
    run = Run(cluster_env, tmp_path / "ctld",
              submit(cluster_env, *CTLD_RUN, "time=1", "requeue.lead_s=20", f"run.root={tmp_path}", "run.name=ctld",
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
    _assert_same_trajectory(run, uninterrupted(*CTLD_RUN))


def test_a_hung_rank_is_found_within_the_collective_timeout_and_its_node_left_out(
        cluster_env: dict[str, str], tmp_path: Path, uninterrupted) -> None:
    """SIGSTOP one rank mid-run: the other rank's collective times out after
    cluster.nccl.timeout_s (the process group's timeout, gloo's as well as NCCL's), the job ends
    naming the silent rank and its node, the batch shell requeues it without that node, and the
    rerun completes from the committed step."""
    timeout_s = 15
    # Saves at 7, 14, ...: the rank stops between two saves, in training's collectives. (A rank that
    # hangs while a save uploads in the background is found after checkpoint.timeout_s instead:
    # the checkpoint group's collectives wait for whole uploads.)
    run = Run(cluster_env, tmp_path / "hung", submit(cluster_env, *RUN, f"cluster.nccl.timeout_s={timeout_s}",
                                                     "checkpoint.every_steps=7", f"run.root={tmp_path}",
                                                     "run.name=hung", "--no-wait", faults=SLOW))
    wait_for("the run to train past a commit", lambda: run.step() >= 10 and _committed(run), 240)
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
    _assert_same_trajectory(run, uninterrupted(*RUN[:-1]))


def test_a_store_that_never_comes_back_stops_the_job_at_its_time_limit_and_says_so(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """The checkpoint store turns read-only for good (a tmpfs mounted in node n3's own mount
    namespace, where the cluster's slurmd runs the job): the save at the time limit cannot commit,
    so the job is not requeued to train the same steps again; it stops, naming the save that failed
    and the newest committed step, which stays intact."""
    state = Path(cluster_env.get("HPC_SLURM_STATE", "/var/tmp/hpc-slurm"))
    slurmd = (state / "pids" / "slurmd-n3.pid").read_text().strip()
    store = tmp_path / "store"
    store.mkdir()

    def in_n3(*argv: str) -> None:
        subprocess.run(["nsenter", "-t", slurmd, "-m", *argv], check=True)

    in_n3("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(store))
    try:
        run = Run(cluster_env, tmp_path / "store-gone",
                  submit(cluster_env, "exp=tiny_cpu", "nodes=1", "gpus_per_node=1", "slurm.exclude=n1,n2,n4",
                         "train.max_steps=300", "train.log_every=5", "checkpoint.every_steps=5", "checkpoint.retries=1",
                         "checkpoint.backoff_s=0.2", f"checkpoint.dir={store}", "time=1", "requeue.lead_s=20",
                         f"run.root={tmp_path}", "run.name=store-gone", "--no-wait", faults="slow@step_end:ms=600"))
        wait_for("a commit", lambda: "checkpoint step 5 committed" in run.log(), 240)
        in_n3("mount", "-o", "remount,ro", str(store))
        state_now = run.wait(300)
    finally:
        subprocess.run(["nsenter", "-t", slurmd, "-m", "umount", "-l", str(store)], check=False)
    assert state_now != "COMPLETED", run.explain()
    assert not run.events("requeued"), run.events("requeued")
    (gave_up,) = run.events("gave_up")
    committed = [int(s) for s in re.findall(r"checkpoint step (\d+) committed", run.log())]
    assert gave_up["step"] == max(committed) and gave_up["reason"] == "timeout", gave_up
    assert "did not commit" in gave_up["detail"] and "Read-only file system" in gave_up["detail"], gave_up
    assert f"last committed checkpoint (step {max(committed)}, intact)" in gave_up["detail"], gave_up
    assert gave_up["detail"] in run.log()
