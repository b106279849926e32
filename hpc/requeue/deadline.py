"""How much warning a stop needs, and the job's own deadline when SLURM's warning is too short.

SLURM is asked at submit (`--signal=USR2@lead`) for `requeue.lead_s`, or for what earlier runs of the
run folder measured (`RunFolder.read_measured_lead`). Each committed save measures again: when saves
outgrow the lead SLURM was asked for, rank 0 stops the run itself at `end - needed`, and records the
need so that the next submission asks for enough.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hpc.requeue import policy
from hpc.requeue.saves import SaveResult

log = logging.getLogger("hpc")

LEAD_ENV = "HPC_REQUEUE_LEAD_S"
"""The lead SLURM was actually asked for (the batch setup exports it: hpc.submit.plan.lead_time)."""


def asked_lead(default_s: int, environ: Mapping[str, str] = os.environ) -> int:
    try:
        return int(environ.get(LEAD_ENV, ""))
    except ValueError:
        return default_s


def deadline_for(needed_s: int, asked_s: int, end: float | None, now: float, step_s: float) -> tuple[float | None, str]:
    """(the job's own deadline or None, and why). None when SLURM's warning is early enough, the
    end is unknown, or too little time is left to stop earlier than SLURM's warning anyway."""
    if needed_s <= asked_s or end is None:
        return None, ""
    if end - needed_s < now + 2 * step_s:
        return None, "too late"
    return end - needed_s, ""


@dataclass
class SaveTimes:
    """Rank 0's running measure of steps and committed saves (what a stop has to wait for)."""

    intervals: list[float] = field(default_factory=list)
    step_s: float = 0.0
    save_s: list[float] = field(default_factory=list)
    seen: int = 0

    def step_interval(self, seconds: float) -> None:
        # The median of recent intervals: a step, not a step plus a blocking save.
        self.intervals = (self.intervals + [seconds])[-21:]
        self.step_s = sorted(self.intervals)[len(self.intervals) // 2]

    def take(self, outcomes: Sequence[SaveResult]) -> bool:
        """Note the saves finished since the last call; whether any was new."""
        fresh, self.seen = list(outcomes[self.seen:]), len(outcomes)
        self.save_s += [sum(o.seconds.values()) for o in fresh if o.committed]
        return bool(fresh)

    def recent(self) -> list[float]:
        return self.save_s[-5:]

    def needed_lead(self) -> int:
        return policy.needed_lead(self.recent(), self.step_s)

    def record(self, job_id: str) -> dict[str, float | int | str]:
        """What the run folder's lead file holds (the next submit reads `needed_s`)."""
        return {"needed_s": self.needed_lead(), "save_s": round(max(self.recent()), 3),
                "step_s": round(self.step_s, 3), "job_id": job_id, "at": round(time.time(), 3)}


def keep_deadline(saves: SaveTimes, asked_s: int, end: float | None, current: float | None) -> float | None:
    """The job's deadline after a new save measurement (the current one when nothing changes),
    saying so in the log when it moves or when it is too late to move it."""
    needed, slowest = saves.needed_lead(), max(saves.recent())
    if end is not None and current == end - needed:
        return current  # already armed there: nothing to move, nothing to say
    own, why = deadline_for(needed, asked_s, end, time.time(), saves.step_s)
    if why == "too late":
        log.warning("saves take up to %.1f s, so a stop needs %d s before the time limit, but this "
                    "run has less left: relying on SLURM's warning (%d s). HINT: raise slurm.time",
                    slowest, needed, asked_s)
    elif own is not None:  # differs from `current`: the armed case returned above
        log.info("saves take up to %.1f s: stopping %d s before the time limit (SLURM warns %d s "
                 "before)", slowest, needed, asked_s)
        return own
    return current
