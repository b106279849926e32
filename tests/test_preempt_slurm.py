"""Real preemption on the local SLURM cluster: a `high`-partition job takes the nodes of a `low`-partition
run (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime on `low`, tools/localslurm).

What SLURM 22.05 does, as measured on this cluster (the README's notes for cluster admins say the same):

- When the preemptor is scheduled, slurmctld sets the run's EndTime to now + GraceTime (PreemptTime
  shows in `scontrol show job`) and signals the job *steps* at once, within a second of the preemptor's
  sbatch: SIGCONT + SIGTERM, or the job's own warning signal (--signal, USR2) when
  SlurmctldParameters=preempt_send_user_signal is set and it was not sent yet. The batch shell and
  srun get nothing then.
- At the new EndTime (30-60 s after the signal with GraceTime=30: limits are checked every ~30 s) the
  run ends like one at its time limit: SIGCONT + SIGTERM to every process, the batch shell and srun
  included (srun answers SIGTERM by SIGKILLing its tasks), SIGKILL after KillWait, and SLURM requeues
  the job itself; sacct says PREEMPTED for that run.

Each test preempts once: a save that takes most of the grace time commits and the rerun resumes from it
(SIGTERM); the warning signal starts the save when send_user_signal is on; a save longer than the grace
time leaves the previous checkpoint as the one to resume from. Every run is the same tiny_cpu
trajectory, so its losses must equal, step for step, those of one uninterrupted reference run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpc import slurm
from slurm_jobs import ROOT, Run, submit, wait_for

TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:  # the cluster's own package (tools/localslurm) is not installed
    sys.path.insert(0, str(TOOLS))

from localslurm.conf import preempt_conf_text  # noqa: E402
from localslurm.paths import GRACE_TIME_S, Paths  # noqa: E402

pytestmark = pytest.mark.slurm

STEPS = 20
# One rank per node (a short start-up on 2 cores); a ten-minute limit, so that no stop here is near
# the time limit; no saves on the clock, only those a test asks for. The preempted runs stay off n3/n4,
# where the reference run trains meanwhile (a `high` job asking for the run's nodes must not hit it).
BASE = ["exp=tiny_cpu", "nodes=2", "gpus_per_node=1", f"train.max_steps={STEPS}", "train.log_every=1",
        "time=10", "requeue.lead_s=20", "checkpoint.interval=never"]
LOW = [*BASE, "partition=low", "slurm.exclude=n3,n4"]
SAVE_S = 17
"""A slow save in the first test: most of the grace time."""
assert SAVE_S + 5 < GRACE_TIME_S


def _slow_saves(ms: int, steps: range) -> str:
    """The commit of a save at any of `steps` waits `ms` first (rank 0, before the manifest's rename)."""
    return ",".join(f"slow@manifest_write:ms={ms}:step={s}" for s in steps)


@pytest.fixture(scope="module")
def reference(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The same run, uninterrupted, in the `debug` partition on n3/n4 (training while the first test starts)."""
    root = tmp_path_factory.mktemp("reference")
    return Run(cluster_env, root / "ref", submit(cluster_env, *BASE, "slurm.exclude=n1,n2", f"run.root={root}",
                                                 "run.name=ref", "--no-wait"))


def _losses(run: Run) -> dict[int, list[float]]:
    """Every loss logged per step (a step trained twice, before and after a restart, has two)."""
    out: dict[int, list[float]] = {}
    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["loss"])
    return out


def _assert_same_trajectory(run: Run, reference: Run) -> None:
    assert reference.wait(300) == "COMPLETED", reference.explain()
    expected = {step: losses[0] for step, losses in _losses(reference).items()}
    assert sorted(expected) == list(range(1, STEPS + 1))
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    differ = {step: (losses, expected[step]) for step, losses in got.items() if set(losses) != {expected[step]}}
    assert not differ, f"losses differ from the uninterrupted run's (step: got, expected): {differ}"


def _slurmctld_parameters(env: dict[str, str]) -> str:
    out = slurm.run(["scontrol", "show", "config"], env=env)
    return next((line.split("=", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("SlurmctldParameters")), "")


@contextmanager
def _preemption_signal(env: dict[str, str], *, user_signal: bool) -> Iterator[None]:
    """Preemption sends the job's warning signal (user_signal) or SIGTERM, for the duration. The setting
    is slurmctld's, global: the cluster's slurm.conf includes etc/preempt.conf, rewritten here and
    re-read by `scontrol reconfigure` (also set explicitly when off, so a test killed while it was on
    cannot leave the next one with the wrong signal), and always switched off again."""
    path = Paths(Path(env["SLURM_CONF"]).parents[1]).preempt_conf
    if f"Include {path}" not in Path(env["SLURM_CONF"]).read_text():
        pytest.fail(f"{env['SLURM_CONF']} does not include {path}: the cluster was started by an older "
                    "tools/localslurm. HINT: tools/slurm-cluster down && tools/slurm-cluster up")

    def switch(on: bool) -> None:
        path.write_text(preempt_conf_text(user_signal=on))
        slurm.run(["scontrol", "reconfigure"], env=env)
        wait_for(f"slurmctld to {'set' if on else 'clear'} preempt_send_user_signal",
                 lambda: ("preempt_send_user_signal" in _slurmctld_parameters(env)) == on, 20)

    switch(user_signal)
    try:
        yield
    finally:
        if user_signal:
            switch(False)


def _preempt(run: Run, env: dict[str, str]) -> float:
    """Submit a `high` job that needs every CPU of the run's nodes; the time it was submitted."""
    nodes = slurm.job_info(run.job_id, env=env)["NodeList"]
    at = time.time()
    slurm.run(["sbatch", "--parsable", "-p", "high", "-N", str(len(slurm.expand_nodelist(nodes))), "-w", nodes,
               "--exclusive", "-J", "preemptor", "-o", "/dev/null", "--wrap", "true"], env=env)
    return at


def _preempted_while_training(env: dict[str, str], tmp_path: Path, name: str, faults: str, *,
                              user_signal: bool) -> tuple[Run, float, dict]:
    """A `low` run preempted once it trains, left to save, requeue itself and complete: the run,
    when the preemptor was submitted, and the run's one `requeued` event."""
    # The signal set first: `scontrol reconfigure` while slurmctld launches the batch script can
    # fail the launch (NODE_FAIL, and SLURM requeues the job: a second `requeued` event).
    with _preemption_signal(env, user_signal=user_signal):
        run = Run(env, tmp_path / name,
                  submit(env, *LOW, f"run.root={tmp_path}", f"run.name={name}", "--no-wait", faults=faults))
        wait_for("the run to train", lambda: run.step() >= 4, 240, 0.2)
        preempted_at = _preempt(run, env)
        wait_for("the run to commit and requeue itself", lambda: run.events("requeued"), GRACE_TIME_S + 60)
    assert run.wait(300) == "COMPLETED", run.explain()
    [requeued] = run.events("requeued")
    return run, preempted_at, requeued


def _status(run: Run) -> str:
    proc = subprocess.run([sys.executable, "-m", "hpc.status", run.job_id], capture_output=True, text=True,
                          env=run.env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    return proc.stdout


def test_a_preempted_run_commits_a_save_that_takes_most_of_the_grace_time_and_resumes_from_it(
        cluster_env: dict[str, str], reference: Run, tmp_path: Path) -> None:
    faults = f"slow@step_end:ms=300,{_slow_saves(SAVE_S * 1000, range(1, STEPS))}"
    run, preempted_at, requeued = _preempted_while_training(cluster_env, tmp_path, "term", faults, user_signal=False)
    stop, step = requeued["stop"], requeued["step"]
    print(f"preempted: signal {stop['signal_at'] - preempted_at:.1f} s after the sbatch, committed "
          f"{stop['committed_at'] - stop['signal_at']:.1f} s after the signal; sacct {run.runs()}")
    assert requeued["reason"] == "preemption" and stop["signals"] == "SIGTERM", requeued
    assert stop["signal_at"] - preempted_at < 10, "SIGTERM should come as the preemptor is scheduled"
    # SLURM said it was preempting (PreemptTime, EndTime moved to GraceTime later), and the save, most
    # of that grace time, committed before it.
    assert stop["grace_s"] == GRACE_TIME_S and stop["committed_at"] < stop["grace_ends_at"], stop
    assert SAVE_S <= stop["committed_at"] - stop["signal_at"] < GRACE_TIME_S, stop
    assert (run.dir / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    started = run.events("started")
    assert [(e["restart"], e["step"], e["reason"]) for e in started] == [(0, 0, "submitted"), (1, step, "preemption")]
    assert f"resumed from step {step}, restart 1, reason: preemption" in run.log(), run.explain()
    assert run.events("finished")[-1]["step"] == STEPS
    status = _status(run)
    assert "restarts    1 (preemption 1)" in status and "max_failures 0/3" in status, status
    _assert_same_trajectory(run, reference)


def test_with_send_user_signal_the_warning_signal_starts_the_save(
        cluster_env: dict[str, str], reference: Run, tmp_path: Path) -> None:
    run, preempted_at, requeued = _preempted_while_training(cluster_env, tmp_path, "usr2", "slow@step_end:ms=300",
                                                            user_signal=True)
    stop = requeued["stop"]
    print(f"preempted: USR2 {stop['signal_at'] - preempted_at:.1f} s after the sbatch; sacct {run.runs()}")
    # The warning signal alone: no SIGTERM came before the stop was agreed and saved.
    assert requeued["reason"] == "preemption" and stop["signals"] == "warning signal", requeued
    assert stop["signal_at"] - preempted_at < 10
    ranks = run.ranks(0)
    assert sorted(ranks) == [0, 1] and all(r["status"] == "requeued" for r in ranks.values()), ranks
    assert [(e["restart"], e["step"]) for e in run.events("started")] == [(0, 0), (1, requeued["step"])]
    assert "restarts    1 (preemption 1)" in _status(run)
    _assert_same_trajectory(run, reference)


def test_a_save_longer_than_the_grace_time_leaves_the_previous_checkpoint_to_resume_from(
        cluster_env: dict[str, str], reference: Run, tmp_path: Path) -> None:
    # The save of step 10 commits at once; any other (the stop's, a few steps later) would take two
    # minutes to commit, longer than any grace time this cluster gives (GraceTime + up to ~30 s).
    every = 10
    faults = f"slow@step_end:ms=300,{_slow_saves(120_000, [s for s in range(1, STEPS) if s % every])}"
    with _preemption_signal(cluster_env, user_signal=False):  # before the submit, as above
        run = Run(cluster_env, tmp_path / "long",
                  submit(cluster_env, *LOW, f"checkpoint.every_steps={every}", f"run.root={tmp_path}",
                         "run.name=long", "--no-wait", faults=faults))
        committed = run.dir / "checkpoints" / f"step-{every}" / "manifest.json"
        wait_for(f"step {every} to commit", committed.is_file, 240, 0.2)
        preempted_at = _preempt(run, cluster_env)
        wait_for("SLURM to requeue the run at the end of its grace time",
                 lambda: len(run.events("started")) == 2, GRACE_TIME_S + 120)
    rerun_at = run.events("started")[1]["at"]
    assert run.wait(300) == "COMPLETED", run.explain()
    print(f"grace: the rerun trained again {rerun_at - preempted_at:.1f} s after the preemptor's sbatch; "
          f"sacct {run.runs()}")
    twice = [s for s, losses in _losses(run).items() if len(losses) == 2]  # before the stop and after the resume
    assert twice, f"no step was trained again after the restart: {_losses(run)}"
    stopped = max(twice)
    assert stopped % every, f"the stop fell on step {stopped}, a regular save: not the slow save this test needs"
    # The stop's files were uploaded, but its manifest never written: the rerun passed over it.
    partial = run.dir / "checkpoints" / f"step-{stopped}"
    assert not (partial / "manifest.json").exists(), f"{partial} was committed after its grace time"
    assert f"step-{stopped} skipped: no manifest" in run.log(), run.explain()
    [requeued] = run.events("requeued")
    print(f"recorded: {requeued}")
    assert requeued["reason"] == "preemption" and requeued["restart"] == 0, requeued
    assert requeued["state"] == "PREEMPTED" and "grace time ran out" in requeued["detail"], requeued
    # SLURM ended the run no sooner than GraceTime after the ranks saw SIGTERM (limits are checked late).
    assert requeued["at"] - requeued["stop"]["signal_at"] >= GRACE_TIME_S - 1, requeued
    resumed = run.events("started")[1]
    assert resumed["restart"] == 1 and resumed["step"] == stopped - stopped % every, resumed
    assert f"resumed from step {resumed['step']}, restart 1, reason: preemption" in run.log(), run.explain()
    status = _status(run)
    assert "restarts    1 (preemption 1)" in status and "max_failures 0/3" in status, status
    _assert_same_trajectory(run, reference)
