"""Why a run started and how long it took to train again: pure functions over the run's history.

A restart's timeline splits the seconds from the previous run's stop request to this run's first
step into phases (stop agreement, save, commit, waiting in SLURM's queue, start-up, loading, first
step), so a slow restart names its slow phase (shown by `python -m hpc.status`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hpc.requeue import history, policy
from hpc.requeue.accounting import RunEnd


def why_started(events: Sequence[dict[str, Any]], job_id: str, restart: int) -> tuple[str, dict[str, Any] | None]:
    """(reason, the previous run's ending event or None). A restart that no one recorded the end
    of was requeued by SLURM itself: the caller asks accounting why and records it (slurm_requeue)."""
    if restart > 0:
        previous = history.ending(events, job_id, restart - 1)
        if previous is None:
            return policy.SLURM, None
        return previous.get("reason", policy.SLURM), previous
    if any(e.get("job_id") != job_id for e in events):
        return "resubmitted", None
    return "submitted", None


def slurm_requeue(ended: RunEnd | None, ranks: Mapping[int, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(reason, fields of the `requeued` event to record) for a previous run that SLURM ended and
    requeued itself, from accounting's word on that run (None: unknown) and its ranks' records: the
    reason follows accounting's state (PREEMPTED: a preemption whose grace time ran out before the
    save committed); the event is dated when that run ended (the restart's wait in the queue counts
    from there) and its stop from the first signal a rank saw."""
    state = ended.state if ended is not None else ""
    reason = policy.slurm_ending(state)
    if reason == policy.PREEMPTION:
        detail = ("preempted, and the grace time ran out before the save committed: SLURM ended the run and "
                  "requeued the job itself; the rerun resumes from the last committed checkpoint. HINT: the "
                  "partition's GraceTime must exceed the save time (requeue/lead.json holds the measured need)")
    elif state:
        detail = f"SLURM ended the run ({state}) and requeued the job itself"
    else:
        detail = "requeued by SLURM (node failure or preemption)"
    fields: dict[str, Any] = {"reason": reason, "detail": detail}
    if state:
        fields["state"] = state
    if ended is not None and ended.ended_at is not None:
        fields["at"] = ended.ended_at
    signalled = [r["signalled_at"] for r in ranks.values() if r.get("signalled_at")]
    if signalled:
        fields["stop"] = {"signal_at": min(signalled)}
    return reason, fields


def _span(a: float | None, b: float | None) -> float | None:
    return round(b - a, 3) if a is not None and b is not None else None


def restart_timeline(previous: dict[str, Any] | None, job_start: float | None,
                     restore_window: tuple[float, float] | None, first_step_at: float | None) -> dict[str, float | None]:
    """Seconds from the previous run's stop request to this run's first step, by phase."""
    prev = previous or {}
    stop = prev.get("stop", {})
    restored_from, restored_to = restore_window if restore_window else (None, None)
    phases = stop.get("save_phases", {})
    out: dict[str, float | None] = {
        "stop": _span(stop.get("signal_at"), stop.get("agreed_at")),
        "save": round(sum(phases.get(k, 0.0) for k in ("waited", "blocked", "write")), 3) if phases else None,
        "commit": round(sum(phases.get(k, 0.0) for k in ("upload", "commit")), 3) if phases else None,
        "scheduler_wait": _span(prev.get("at"), job_start),
        "start_up": _span(job_start, restored_from),
        "load": _span(restored_from, restored_to),
        "first_step": _span(restored_to, first_step_at),
    }
    began = stop.get("signal_at") or prev.get("at")
    out["total"] = _span(began, first_step_at) if prev else None
    return out


def start_line(step: int, restart: int, why: str, timeline: dict[str, float | None]) -> str:
    """The log line of a run's first step: where it resumed, why, and what the restart cost."""
    head = f"resumed from step {step}" if step else "started at step 0"
    line = f"{head}, restart {restart}, reason: {why}"
    total = timeline.get("total")
    if total is not None:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in timeline.items()
                          if k != "total" and v is not None)
        line += f"; signal -> training again {total:.1f} s ({parts})"
    return line
