"""After the agreed stop and the commit: hand the job back to SLURM, or end it with the reason.

Rank 0 decides (policy: which budget the stop counts against, whether it is spent, whether the
user cancelled the job), writes the decision to the run's history *before* acting on it, and then,
once every rank let go of the others, asks SLURM to requeue the job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hpc.config import Config
from hpc.launch.environment import JobEnv
from hpc.requeue import accounting, history, policy
from hpc.requeue.saves import CheckpointRecord
from hpc.requeue.signals import StopRequest, describe
from hpc.slurm import SlurmError, current_state, parse_time, requeue

log = logging.getLogger("hpc")


def cancelled(env: JobEnv) -> bool:
    """Did the user cancel the job? (scancel also sends SIGTERM: that stop is not a preemption.)"""
    if env.launcher != "slurm":
        return False
    try:
        return current_state(env.job_id) == "CANCELLED"
    except Exception:  # noqa: BLE001 - unknown: requeue as decided
        return False


def decide(cfg: Config, env: JobEnv, run_dir: Path, job: dict[str, str], stop: StopRequest, lead_s: int,
           checkpoints: CheckpointRecord) -> policy.Decision:
    """Rank 0: requeue or not, recorded in the run's history."""
    mask, step = stop.agreed_mask, checkpoints.last_committed
    end = parse_time(job.get("EndTime", ""))
    agreed_at = stop.agreed_at or time.time()
    # Asked now, after the save: SLURM may have decided to preempt the run while it saved.
    preempted = accounting.preemption(env.job_id) if env.launcher == "slurm" else None
    reason = policy.stop_reason(mask, end - agreed_at if end else None, lead_s, preempted=preempted is not None)
    decision = policy.decide(reason, history.read_events(run_dir), env.job_id, policy.limits(cfg.requeue),
                             step=step, detail=describe(mask))
    if cancelled(env):
        decision = policy.Decision(False, reason, decision.budget, decision.used, decision.limit,
                                   f"the job was cancelled: not requeued. The last committed "
                                   f"checkpoint is step {step}; submit the same command to continue")
    outcomes = checkpoints.outcomes
    if outcomes and not outcomes[-1].committed and (step is None or outcomes[-1].step > step):
        decision = policy.unsaved_stop(decision, failed_step=outcomes[-1].step, error=outcomes[-1].error, step=step)
    last = outcomes[-1] if outcomes and outcomes[-1].committed else None
    stopped: dict[str, Any] = {"signal_at": stop.first_seen, "agreed_at": agreed_at, "committed_at": time.time(),
                               "save_phases": dict(last.seconds) if last else {}, "signals": describe(mask)}
    if preempted is not None:  # when SLURM decided, and when it would have ended the run (GraceTime)
        stopped.update(preempted_at=preempted.at, grace_ends_at=preempted.ends_at, grace_s=preempted.grace_s)
        if preempted.grace_s is not None and preempted.ends_at is not None:
            signal_at, committed_at = stop.first_seen or agreed_at, stopped["committed_at"]
            log.info("preempted: SLURM ends this run %.0f s after it decided (the partition's GraceTime); "
                     "the checkpoint committed %.1f s after the signal, %.0f s before that end",
                     preempted.grace_s, committed_at - signal_at, preempted.ends_at - committed_at)
    fields = dict(job_id=env.job_id, restart=env.restart_count, reason=reason, step=step,
                  detail=decision.message, stop=stopped, nodes=list(env.hostnames))
    if decision.requeue:
        log.info("%s", decision.message)
        history.append_event(run_dir, history.REQUEUED, **fields)  # before the requeue itself
    else:
        log.error("%s", decision.message)
        history.append_event(run_dir, history.GAVE_UP, **fields)
    return decision


def requeue_now(env: JobEnv, run_dir: Path, step: int | None) -> bool:
    """Rank 0, last thing before leaving: SLURM ends this run and queues the next. A refusal
    (slurmctld unreachable, the job already ending) is recorded as the run's last word."""
    try:
        requeue(env.job_id)
    except SlurmError as err:
        if current_state(env.job_id) in ("REQUEUED", "PENDING", "REQUEUE_HOLD"):
            log.info("job %s requeued (scontrol reported: %s)", env.job_id, err)
            return True
        message = (f"scontrol requeue failed: {err}. The last committed checkpoint is step {step}; "
                   "submit the same command to continue from it")
        log.error("%s", message)
        history.append_event(run_dir, history.GAVE_UP, job_id=env.job_id, restart=env.restart_count,
                             reason=policy.FAILURE, step=step, detail=message)
        return False
    log.info("job %s requeued", env.job_id)
    return True
