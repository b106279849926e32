"""When and how often a job saves and requeues itself: the warning signal, its lead, the budgets per
reason. Part of the one schema (hpc.config.schema imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.errors import require_choice, require_positive


@dataclass(frozen=True)
class RequeueConfig:
    """When and how often the job saves and requeues itself."""

    signal: str = "USR2"
    """Signal SLURM sends ahead of the time limit (NCCL may use USR1, so USR2 by default)."""
    lead_s: int = 300
    """Seconds before the time limit that the signal arrives: at least save time plus a margin."""
    auto_lead: bool = True
    """Raise lead_s (never lower it) to what this run's measured saves need: at submit time for
    SLURM's warning, and in the job as its own deadline once a save takes longer."""
    max_requeues: int = 20
    """Requeues after time limits before the job gives up."""
    max_preemptions: int = 50
    """Requeues after preemption (SIGTERM, or the warning signal well before the limit)."""
    max_failures: int = 3
    """Requeues after crashes, dead nodes or failed preflights before the job gives up."""

    def __post_init__(self) -> None:
        require_choice("requeue.signal", self.signal, ("USR2", "USR1"))
        require_positive("requeue.lead_s", self.lead_s, 10)
        require_positive("requeue.max_requeues", self.max_requeues, 0)
        require_positive("requeue.max_preemptions", self.max_preemptions, 0)
        require_positive("requeue.max_failures", self.max_failures, 0)
