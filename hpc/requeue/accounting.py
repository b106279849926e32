"""What SLURM itself says about this job's runs, where our own record cannot say it (no torch).

    preemption(job_id)    is SLURM preempting the run now? Once a preemptor is scheduled, slurmctld
                          sets the job's PreemptTime and moves its EndTime to PreemptTime + GraceTime
                          (`scontrol show job`); the signal alone does not tell a preemption from
                          the time limit's warning or an `scancel --signal`
    previous_run(job_id, restart)  how the run before this one ended, from accounting (`sacct -D`: one line
                          per run of a requeued job): PREEMPTED when SLURM ended it at the end of its
                          grace time and requeued it itself, TIMEOUT, NODE_FAIL, ...

Both go through hpc.slurm's one seam; both answer None when SLURM cannot say (no accounting, no
SLURM at all), and the caller carries on with what it knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hpc import slurm


@dataclass(frozen=True)
class Preemption:
    """A preemption under way: when SLURM decided it, and when it will end the run (GraceTime later)."""

    at: float | None
    ends_at: float | None

    @property
    def grace_s(self) -> float | None:
        return round(self.ends_at - self.at, 3) if self.at is not None and self.ends_at is not None else None


def preemption(job_id: str) -> Preemption | None:
    try:
        info = slurm.job_info(job_id)
    except slurm.SlurmError:
        return None
    if not info.get("PreemptTime"):
        return None
    return Preemption(slurm.parse_time(info["PreemptTime"]), slurm.parse_time(info.get("EndTime", "")))


@dataclass(frozen=True)
class RunEnd:
    """One earlier run of the job as accounting has it."""

    state: str
    """First word of sacct's State: PREEMPTED, REQUEUED, TIMEOUT, NODE_FAIL, CANCELLED, ..."""
    ended_at: float | None


def previous_run(job_id: str, restart: int) -> RunEnd | None:
    """How run `restart - 1` of `job_id` ended (runs count from 0, as SLURM_RESTART_COUNT does), or
    None when accounting has no such ended run. Picked by position, not as "the line before the
    last": slurmdbd records asynchronously, and on a busy cluster the current run's line may not
    be there yet."""
    if restart < 1:
        return None
    try:
        out = slurm.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State,End", "-j", job_id],
                        env={**os.environ, "SLURM_TIME_FORMAT": "standard"})
    except slurm.SlurmError:
        return None
    runs = [line.split("|") for line in out.splitlines() if line.strip()]
    if len(runs) < restart or len(runs[restart - 1]) < 2 or not runs[restart - 1][0].split():
        return None
    state, end = runs[restart - 1][0].split()[0], runs[restart - 1][1]
    if state in ("RUNNING", "PENDING", "REQUEUED_PENDING"):
        return None
    return RunEnd(state, slurm.parse_time(end))
