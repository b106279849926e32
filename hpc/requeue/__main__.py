"""`python -m hpc.requeue after-srun --status N`: the batch shell's verdict once srun returned.

The ranks settle the runs they can (finished, or stopped, committed and requeued by rank 0). A run
that ended without a word from rank 0 failed: a rank crashed or was killed, a node died, a
preflight check failed. Then this decides, from the ranks' records (hpc.requeue.history):

    permanent error (config, refused checkpoint)  -> not requeued: it would fail the same way
    preempted, the grace time ran out (PREEMPTED) -> a preemption, not a failure; SLURM requeued
                                                     the job already (PreemptMode=REQUEUE)
    failure budget spent                          -> not requeued, with a message saying so
    otherwise                                     -> requeued, leaving out the nodes at fault when
                                                     SLURM can still place the job without them

The next run resumes from the newest committed checkpoint (checkpoint.resume=auto on restarts).
Runs in a bare python (no torch) on the batch node; SIGTERM is ignored while it acts, because
SLURM may be ending the job around it. When SLURM ends the batch shell before this could run (srun
outlasting KillWait), the next run asks accounting instead (requeue.supervisor).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hpc.files import deny_world_write
from hpc.config import from_yaml
from hpc.requeue import accounting, history, policy, timeline
from hpc.run_folder import RunFolder


def _last_committed(cfg, run_dir: Path) -> int | None:
    from hpc.checkpoint.manifest import newest_committed

    try:
        newest = newest_committed(RunFolder(run_dir).checkpoint_location(cfg.checkpoint.dir))
    except Exception:  # the verdict must not fail on a store it only reads for the message
        return None
    return newest.step if newest is not None else None


def after_srun(status: int, run_dir: Path, environ: dict[str, str]) -> int:
    from hpc import slurm

    job_id, restart = slurm.job_id_from(environ), int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    events = history.read_events(run_dir)
    settled = history.ending(events, job_id, restart)
    if settled is not None or status == 0:
        return 0  # rank 0 said how this run ended (or it simply succeeded)
    _end_orphaned_steps(job_id, status)
    cfg = from_yaml(RunFolder(run_dir).config.read_text())
    failure = policy.diagnose(history.read_ranks(run_dir, job_id, restart), status)
    step = _last_committed(cfg, run_dir)
    state = slurm.current_state(job_id)
    # SLURM ended this run itself: the time limit struck before the save (a timeout, budgeted as
    # one), a preemption's grace time ran out before the save committed (PREEMPTED: a preemption),
    # or someone cancelled the job (never undone from here).
    reason = policy.slurm_ending(state) if state in ("TIMEOUT", "PREEMPTED") else policy.FAILURE
    fields = dict(job_id=job_id, restart=restart, reason=reason, step=step, kind=failure.kind, state=state)
    if state == "CANCELLED" or failure.kind == "permanent":
        message = ("not requeued: the job was cancelled" if state == "CANCELLED" else
                   f"not requeued: {failure.detail} (an error in the config or the checkpoints, which a "
                   "rerun would meet again)")
        history.append_event(run_dir, history.GAVE_UP, detail=message, **fields)
        print(f"hpc: {message}", file=sys.stderr)
        return 0
    if reason == policy.PREEMPTION and _requeued_by_slurm(job_id, restart):
        # PreemptMode=REQUEUE: SLURM has requeued the job already; asking again would requeue the rerun.
        _, said = timeline.slurm_requeue(accounting.RunEnd(state, time.time()),
                                         history.read_ranks(run_dir, job_id, restart))
        history.append_event(run_dir, history.REQUEUED, **{**said, **fields})
        _drop_result(run_dir, job_id)
        print(f"hpc: {said['detail']} (last committed step {step})", file=sys.stderr)
        return 0
    decision = policy.decide(reason, events, job_id, policy.limits(cfg.requeue), step=step,
                             detail="the time limit struck before the stop was saved" if reason == policy.TIMEOUT
                             else failure.detail)
    if not decision.requeue:
        history.append_event(run_dir, history.GAVE_UP, detail=decision.message, **fields)
        print(f"hpc: {decision.message}", file=sys.stderr)
        return 0
    exclude: tuple[str, ...] = ()
    if failure.suspects and reason == policy.FAILURE:
        info = slurm.job_info(job_id)
        excluded = slurm.expand_nodelist(info.get("ExcNodeList", "") or "")
        usable = slurm.usable_nodes(info.get("Partition") or None)
        exclude = policy.excludable(failure.suspects, excluded, usable, int(info.get("NumNodes", "1") or 1))
        if not exclude:
            print(f"hpc: not excluding {', '.join(failure.suspects)}: SLURM could not place the job "
                  "without them", file=sys.stderr)
    history.append_event(run_dir, history.REQUEUED, detail=decision.message, excluded=list(exclude),
                         **fields)
    _drop_result(run_dir, job_id)
    print(f"hpc: {decision.message}; requeued" + (f", excluding {', '.join(exclude)}" if exclude else ""),
          file=sys.stderr)
    slurm.requeue(job_id, exclude=exclude)
    return 0


def _end_orphaned_steps(job_id: str, status: int, wait_s: float = 30) -> None:
    """srun gone (killed, crashed) while its step's ranks still train: end them before deciding.
    Requeued with them alive, they would live on beside the rerun's ranks (two of each rank
    writing checkpoints) until SLURM's requeue signals them, and then save and requeue once more."""
    from hpc import slurm

    try:
        steps = slurm.task_steps(job_id)
    except slurm.SlurmError:
        return  # no squeue to ask: nothing to end from here
    if not steps:
        return
    print(f"hpc: srun exited with status {status} while step(s) {', '.join(steps)} still ran: ending them "
          "before the verdict", file=sys.stderr)
    for step in steps:
        slurm.run(["scancel", "--signal=KILL", step], check=False)
    deadline = time.monotonic() + wait_s
    while slurm.task_steps(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)


def _requeued_by_slurm(job_id: str, restart: int) -> bool:
    """Has SLURM requeued the job itself (its restart count moved past this run's)?"""
    from hpc import slurm

    try:
        return int(slurm.job_info(job_id).get("Restarts", "0") or 0) > restart
    except (slurm.SlurmError, ValueError):
        return False


def _drop_result(run_dir: Path, job_id: str) -> None:
    # submitit's client treats a result file as the end of the job: this run's error is not.
    for stale in RunFolder(run_dir).submitit.glob(f"{job_id}_*_result.pkl"):
        stale.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    deny_world_write()  # the records it writes: not writable by other users
    parser = argparse.ArgumentParser(prog="python -m hpc.requeue", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    after = sub.add_parser("after-srun", help="decide about a run whose srun just returned")
    after.add_argument("--status", type=int, required=True, help="srun's exit status")
    after.add_argument("--run-dir", default=os.environ.get("HPC_RUN_DIR"), help="default: $HPC_RUN_DIR")
    args = parser.parse_args(argv)
    if not args.run_dir or "SLURM_JOB_ID" not in os.environ:
        print("hpc.requeue after-srun: needs $HPC_RUN_DIR and a SLURM job (run it from the batch script)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return after_srun(args.status, Path(args.run_dir), dict(os.environ))
    except Exception as err:  # never let the verdict mask the job's own status
        print(f"hpc.requeue after-srun: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
