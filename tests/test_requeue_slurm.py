"""Requeue end to end on the real local SLURM cluster, nodes=2 (4 ranks): time limits, preemption
by signal, a killed rank, a node that fails its preflight, and a spent budget.

The runs are tiny_cpu with a `slow@step_end` fault (each step sleeps): long enough to outlast a
one-minute limit several times without keeping the 2 cores busy. The sleep does not touch the
numbers, so an interrupted run must end bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from checkpoint_jobs import assert_bitwise_equal, saved_state
from dashboards import tensorboard_scalars, wandb_starts
from hpc import slurm
from slurm_jobs import SCRATCH, Run, submit, wait_for

pytestmark = pytest.mark.slurm

# SLURM sends the warning up to ~30 s earlier than asked, so a one-minute run trains only from the
# end of its start-up to 20-50 s before its limit. One rank per node keeps start-up short on a 2-core
# machine (every rank imports torch: ~9 s with 2 ranks per job, ~17 s with 4), and the step's sleep
# keeps what two runs can do below STEPS, so that finishing takes at least two time limits.
STEPS = 80
LIMITED = ["exp=tiny_cpu", "nodes=2", "gpus_per_node=1", f"train.max_steps={STEPS}", "train.log_every=10",
           "time=1", "requeue.lead_s=20"]
SLOW = "slow@step_end:ms=600"
DASHBOARDS = ["train.loggers=[jsonl,tensorboard,wandb]"]
"""The `budget` run (a requeue, then a resubmission) also logs to TensorBoard and W&B (offline)."""


@pytest.fixture(scope="module")
def limited_runs(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Two runs that need ~3x their one-minute limit, submitted together (they fill the 4 nodes):
    one with the default budget, one with requeue.max_requeues=1."""
    root = tmp_path_factory.mktemp("limited")
    return {name: Run(cluster_env, root / name,
                      submit(cluster_env, *LIMITED, f"run.root={root}", f"run.name={name}", *extra,
                             "--no-wait", faults=SLOW))
            for name, extra in (("timeout", []), ("budget", ["requeue.max_requeues=1", *DASHBOARDS]))}


def _timeline(run: Run) -> list[dict[str, Any]]:
    return [e["timeline"] for e in run.events("started") if e["timeline"].get("total") is not None]


def test_a_run_needing_several_time_limits_completes_bitwise_equal_to_an_uninterrupted_one(
        limited_runs: dict[str, Run], cluster_env: dict[str, str], tmp_path: Path) -> None:
    run = limited_runs["timeout"]
    assert run.wait(600) == "COMPLETED", run.explain()
    requeued = run.events("requeued")
    assert len(requeued) >= 2 and {e["reason"] for e in requeued} == {"timeout"}, requeued
    assert not run.events("gave_up"), run.events("gave_up")
    assert [e["restart"] for e in run.events("started")] == list(range(len(requeued) + 1))
    runs = run.runs()
    assert [r.split()[0] for r in runs] == ["REQUEUED"] * len(requeued) + ["COMPLETED"], runs
    # One log for all runs (appended, not truncated), each run saying why it started.
    log = run.log()
    for k, event in enumerate(requeued, start=1):
        assert f"resumed from step {event['step']}, restart {k}, reason: timeout" in log, run.explain()
    assert "started at step 0, restart 0, reason: submitted" in log
    assert run.events("finished")[-1]["step"] == STEPS
    for timeline in _timeline(run):
        print("signal -> training again:", json.dumps(timeline))

    straight = Run(cluster_env, tmp_path / "straight",
                   submit(cluster_env, *LIMITED, "time=5", f"run.root={tmp_path}", "run.name=straight", "--no-wait"))
    assert straight.wait(300) == "COMPLETED", straight.explain()
    assert not straight.events("requeued")
    final = [saved_state(r.dir / "checkpoints" / f"step-{STEPS}", tmp_path) for r in (run, straight)]
    assert_bitwise_equal(final[0], final[1], f"step-{STEPS}")
    losses = [{m["step"]: m["loss"] for m in map(json.loads, (r.dir / "metrics.jsonl").read_text().splitlines())}
              for r in (run, straight)]
    assert all(losses[0][s] == losses[1][s] for s in losses[1]), "per-step losses differ"


def test_a_spent_timeout_budget_stops_with_a_message_and_a_checkpoint_to_resubmit_from(
        limited_runs: dict[str, Run], cluster_env: dict[str, str]) -> None:
    run = limited_runs["budget"]
    assert run.wait(600) == "FAILED", run.explain()
    requeued, gave_up = run.events("requeued"), run.events("gave_up")
    assert [e["reason"] for e in requeued] == ["timeout"] and len(gave_up) == 1, run.events()
    message = gave_up[0]["detail"]
    step = gave_up[0]["step"]
    assert "timeout budget is spent (1 of requeue.max_requeues=1" in message, message
    assert f"last committed checkpoint is step {step}" in message and "submit the same command again" in message
    assert message in run.log(), run.explain()
    assert (run.dir / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    assert 0 < step < STEPS

    # The next submission's warning follows the saves measured so far (requeue.auto_lead).
    measured = json.loads((run.dir / "requeue" / "lead.json").read_text())
    dry = submit(cluster_env, *LIMITED, "time=5", "requeue.lead_s=10", f"run.root={run.dir.parent}",
                 "run.name=budget", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert measured["needed_s"] > 10 and f"#SBATCH --signal=USR2@{measured['needed_s']}" in dry.stdout, dry.stdout[:1500]
    assert "raised from requeue.lead_s=10" in dry.stdout
    print("measured lead:", measured)

    again = Run(cluster_env, run.dir, submit(cluster_env, *LIMITED, "time=5", f"run.root={run.dir.parent}",
                                             "run.name=budget", *DASHBOARDS, "--no-wait"))
    assert again.job_id != run.job_id
    assert again.wait(300) == "COMPLETED", again.explain()
    assert f"resumed from step {step}, restart 0, reason: resubmitted" in again.log(), again.explain()
    assert again.events("finished")[-1]["step"] == STEPS

    # Three starts (submitted, requeued, resubmitted), one W&B run and one TensorBoard curve.
    metrics = {m["step"]: m for m in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())}
    starts = wandb_starts(run.dir)
    assert len(starts) == 3 and len({s.run_id for s in starts}) == 1, [(s.folder, s.run_id) for s in starts]
    logged = {h["_step"]: h["train/loss"] for s in starts for h in s.history}
    assert logged == {k: m["loss"] for k, m in metrics.items()}
    board = tensorboard_scalars(run.dir / "tensorboard")
    assert board["train/loss"] == pytest.approx({k: m["loss"] for k, m in metrics.items()}, rel=1e-6)
    assert max(board["train/loss"]) == STEPS
    # The picture of it: three segments, the restarts marked by reason.
    png = run.dir / "run.png"
    plotted = subprocess.run([os.sys.executable, "-m", "hpc.status", str(run.dir), "--plot", str(png)],
                             capture_output=True, text=True, timeout=120, env=cluster_env)
    assert plotted.returncode == 0, plotted.stderr
    assert "in 3 segment(s), restarts: resubmitted 1, timeout 1" in plotted.stderr, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_signals_that_pile_up_give_one_save_and_one_requeue_each_and_a_drained_node_is_left(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """Fault matrix, signals that pile up: the warning twice, then SIGTERM, all while a periodic save
    is in flight (uploads slowed); then in the rerun a warning during its restore (slowed). Each
    pile is one save and one requeue, nothing deadlocks, no step is lost. And a node drained while
    the first run trains: the run goes on, the requeues land elsewhere, status shows the drain."""
    faults = "slow@step_end:ms=300,slow@upload:ms=400,slow@restore:ms=4000"
    config = ("exp=tiny_cpu", "nodes=2", "train.max_steps=60", "train.log_every=5", "checkpoint.every_steps=10",
              "time=10", f"run.root={tmp_path}")
    # A ten-minute limit: a signal this early is a preemption, not the time limit's warning.
    run = Run(cluster_env, tmp_path / "pre", submit(cluster_env, *config, "run.name=pre", "--no-wait", faults=faults))
    # The same run, uninterrupted (no slowed steps: the sleeps do not touch the numbers).
    straight = Run(cluster_env, tmp_path / "straight", submit(cluster_env, *config, "run.name=straight", "--no-wait"))
    wait_for("run 1 to train", lambda: run.step() >= 12, 240)
    first_nodes = run.events("started")[0]["nodes"]
    drained = first_nodes[1]
    slurm.run(["scontrol", "update", f"nodename={drained}", "state=drain", "reason=fault-matrix"], env=cluster_env)
    try:
        during = subprocess.run([os.sys.executable, "-m", "hpc.status", str(run.dir)], capture_output=True,
                                text=True, env=cluster_env, cwd=Path(__file__).resolve().parents[1])
        assert re.search(rf"nodes .*{drained} drain\w* \(reason: fault-matrix\)", during.stdout), during.stdout
        # Step 20's periodic save starts at step 20; its upload takes seconds. Signals in the middle.
        wait_for("step 20", lambda: run.step() >= 20, 120, every_s=0.1)
        for sig in ("USR2", "USR2", "TERM"):
            slurm.run(["scancel", f"--signal={sig}", run.job_id], env=cluster_env)
            time.sleep(0.3)
        wait_for("requeue 1", lambda: len(run.events("requeued")) == 1, 120)
        # The rerun: a warning while it restores (the restore sleeps 4 s first).
        # After its preflight the rerun builds the engine (about a second), then restores.
        wait_for("the rerun's preflight", lambda: run.log().count("preflight ok") >= 2, 240, every_s=0.1)
        time.sleep(1.5)
        slurm.run(["scancel", "--signal=USR2", run.job_id], env=cluster_env)
        wait_for("requeue 2", lambda: len(run.events("requeued")) == 2, 180)
        assert run.wait(300) == "COMPLETED", run.explain()
        status = subprocess.run([os.sys.executable, "-m", "hpc.status", run.job_id], capture_output=True,
                                text=True, env=cluster_env, cwd=Path(__file__).resolve().parents[1])
        print(status.stdout)
    finally:
        slurm.run(["scontrol", "update", f"nodename={drained}", "state=resume"], env=cluster_env, check=False)

    requeued = run.events("requeued")
    assert [e["reason"] for e in requeued] == ["preemption", "preemption"], requeued
    # The pile: the first warning stopped the run (at step 20 or just after, the periodic save of
    # step 20 still uploading); the second and SIGTERM added nothing but their record.
    assert requeued[0]["stop"]["signals"].startswith("warning signal"), requeued[0]["stop"]
    assert 20 <= requeued[0]["step"] <= 23, requeued[0]
    started = run.events("started")
    assert [(e["restart"], e["step"]) for e in started[1:]] == [(1, requeued[0]["step"]), (2, requeued[1]["step"])]
    # The second stop came during the restore: the rerun stopped at its first step boundary.
    assert requeued[1]["step"] == requeued[0]["step"] + 1, requeued
    # No step lost: every step's record is there once per run that reached it, the last is step 60.
    steps = [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and sorted(set(steps)) == sorted(set(steps) & set(range(1, 61)))
    # The drained node ran no later start.
    assert all(drained not in e["nodes"] for e in started[1:]), [e["nodes"] for e in started]
    assert "reason: preemption" in run.log()
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "preemption 2" in status.stdout and "step 60 of 60" in status.stdout
    for timeline in _timeline(run):
        print("signal -> training again:", json.dumps(timeline))
    assert straight.wait(300) == "COMPLETED", straight.explain()
    losses = [{m["step"]: m["loss"] for m in map(json.loads, (r.dir / "metrics.jsonl").read_text().splitlines())}
              for r in (run, straight)]
    assert all(losses[0][s] == losses[1][s] for s in losses[0] if s in losses[1]) and len(losses[0]) >= 12


def test_a_killed_rank_requeues_the_job_without_its_node_and_it_resumes_from_the_last_commit(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    run = Run(cluster_env, tmp_path / "kill",
              submit(cluster_env, "exp=tiny_cpu", "nodes=2", "train.max_steps=60", "train.log_every=1",
                     "checkpoint.every_steps=5", "time=10", f"run.root={tmp_path}", "run.name=kill", "--no-wait",
                     faults="slow@step_end:ms=300"))
    wait_for("step 12", lambda: run.step() >= 12, 240)
    victim = run.ranks(0)[3]
    os.kill(victim["pid"], signal.SIGKILL)  # the processes of the "nodes" all live on this machine
    assert run.wait(300) == "COMPLETED", run.explain()
    requeued = run.events("requeued")
    assert len(requeued) == 1 and requeued[0]["reason"] == "failure" and requeued[0]["kind"] == "crash", requeued
    assert requeued[0]["excluded"] == [victim["node"]]
    assert requeued[0]["step"] >= 10 and requeued[0]["step"] % 5 == 0
    rerun = run.events("started")[-1]
    assert rerun["restart"] == 1 and rerun["step"] == requeued[0]["step"]
    assert victim["node"] not in rerun["nodes"], rerun
    assert f"resumed from step {requeued[0]['step']}, restart 1, reason: failure" in run.log()
    assert slurm.job_info(run.job_id, env=cluster_env).get("ExcNodeList") == victim["node"]
    assert run.events("finished")[-1]["step"] == 60


def test_a_node_failing_its_preflight_is_left_out_of_the_rerun(cluster_env: dict[str, str], tmp_path: Path) -> None:
    broken = SCRATCH / "n2"
    saved = tmp_path / "n2-scratch"
    if broken.exists():
        broken.rename(saved)
    broken.write_text("not a folder: this node's scratch cannot be written\n")
    try:
        # n4 left out from the start: SLURM places the job on the lowest free nodes, n1 and n2.
        run = Run(cluster_env, tmp_path / "pf",
                  submit(cluster_env, "exp=tiny_cpu", "nodes=2", "slurm.exclude=n4", f"run.root={tmp_path}",
                         "run.name=pf", "--no-wait"))
        assert run.wait(300) == "COMPLETED", run.explain()
    finally:
        broken.unlink()
        if saved.exists():
            saved.rename(broken)
    requeued = run.events("requeued")
    assert len(requeued) == 1 and requeued[0]["kind"] == "preflight", requeued
    assert requeued[0]["excluded"] == ["n2"]
    assert re.search(r"rank \d on n2 \(\w+\): scratch .* is not writable", run.err()), run.explain()
    runs = run.runs()
    assert "n2" not in slurm.expand_nodelist(runs[-1].split()[1]), runs
    assert run.events("started")[-1]["nodes"] == slurm.expand_nodelist(runs[-1].split()[1])
    assert set(slurm.expand_nodelist(slurm.job_info(run.job_id, env=cluster_env)["ExcNodeList"])) == {"n2", "n4"}


def test_a_cancelled_job_saves_and_stays_cancelled(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """scancel sends SIGTERM too; the user asked the job to end, so it is not requeued."""
    run = Run(cluster_env, tmp_path / "cancel",
              submit(cluster_env, "exp=tiny_cpu", "nodes=2", "train.max_steps=200", "train.log_every=5",
                     "time=10", f"run.root={tmp_path}", "run.name=cancel", "--no-wait", faults="slow@step_end:ms=300"))
    wait_for("step 10", lambda: run.step() >= 10, 240)
    slurm.run(["scancel", run.job_id], env=cluster_env)
    assert run.wait(120) == "CANCELLED", run.explain()
    wait_for("the run's last word", lambda: run.events("gave_up"), 30)
    assert not run.events("requeued"), run.events()
    assert "cancelled" in run.events("gave_up")[-1]["detail"]
    assert [r.split()[0] for r in run.runs()] == ["CANCELLED"]
