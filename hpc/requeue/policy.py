"""Pure decisions (no I/O): why a run stopped, whether its budget allows another run, which nodes
to leave out, how much warning a save needs, and what kind of failure an error is. Unit-tested on plain values."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hpc.checkpoint.manifest import CheckpointError
from hpc.config import ConfigError
from hpc.config.requeue import RequeueConfig
from hpc.launch.preflight import PreflightError
from hpc.requeue.history import REQUEUED
from hpc.requeue.signals import DEADLINE

TIMEOUT, PREEMPTION, FAILURE, SLURM = "timeout", "preemption", "failure", "slurm"
"""Reasons a run ended early. `slurm`: SLURM requeued the job itself (a node failure, a crash) and
this run's code never got to say why; it counts as a failure. A preemption whose grace time ran out
before the save committed is still a preemption (accounting says PREEMPTED: `slurm_ending`)."""

SIGNAL_JITTER_S = 60
"""SLURM sends the warning up to ~30 s earlier than asked and checks limits every ~30 s."""
LEAD_MARGIN_S = 15
"""Added to measured save time and the step in flight: leaving the process group and the process.
(SLURM's jitter needs no room: its warning comes early, never late, and limits are enforced late.)"""

BUDGETS = {TIMEOUT: "max_requeues", PREEMPTION: "max_preemptions", FAILURE: "max_failures",
           SLURM: "max_failures"}


def stop_reason(mask: int, remaining_s: float | None, lead_s: float, *, preempted: bool = False) -> str:
    """A stop SLURM says is a preemption (its PreemptTime is set: see requeue.accounting) is one,
    however near the time limit; else a stop near the end of the allocation is a timeout, and any
    other signal a preemption (the signal alone cannot tell: SIGTERM, or the job's own warning
    signal with preempt_send_user_signal)."""
    if preempted:
        return PREEMPTION
    if mask & DEADLINE:
        return TIMEOUT
    if remaining_s is not None and remaining_s <= lead_s + SIGNAL_JITTER_S:
        return TIMEOUT
    return PREEMPTION


def slurm_ending(state: str) -> str:
    """The reason for a run that SLURM ended itself, from accounting's state of that run: PREEMPTED
    (the grace time ran out before the job saved and requeued itself) counts as a preemption, TIMEOUT
    as a timeout, anything else (NODE_FAIL, a crash SLURM requeued) as SLURM's doing, a failure."""
    return {"PREEMPTED": PREEMPTION, "TIMEOUT": TIMEOUT}.get(state, SLURM)


def limits(requeue: RequeueConfig) -> dict[str, int]:
    """Each budget's limit from the config's RequeueConfig."""
    return {"max_requeues": requeue.max_requeues, "max_preemptions": requeue.max_preemptions,
            "max_failures": requeue.max_failures}


def used(events: Iterable[Mapping[str, Any]], job_id: str, budget: str) -> int:
    """Requeues of this job so far that count against `budget`."""
    return sum(1 for e in events if e.get("event") == REQUEUED and e.get("job_id") == job_id
               and BUDGETS.get(e.get("reason", ""), "") == budget)


@dataclass(frozen=True)
class Decision:
    requeue: bool
    reason: str
    budget: str
    used: int
    """Requeues counted against this budget before this one."""
    limit: int
    message: str


def decide(reason: str, events: Iterable[Mapping[str, Any]], job_id: str, limits: Mapping[str, int],
           *, step: int | None, detail: str = "") -> Decision:
    """Requeue while the budget for this reason lasts; else a message that says which and why."""
    budget = BUDGETS[reason]
    count, limit = used(events, job_id, budget), int(limits[budget])
    where = (f"the last committed checkpoint is step {step}" if step is not None
             else "no checkpoint was committed")
    if count < limit:
        return Decision(True, reason, budget, count, limit,
                        f"{reason}{f' ({detail})' if detail else ''}: requeue {count + 1} of "
                        f"requeue.{budget}={limit}; {where}")
    return Decision(False, reason, budget, count, limit,
                    f"not requeued: {reason}{f' ({detail})' if detail else ''}, and the {reason} budget "
                    f"is spent ({count} of requeue.{budget}={limit} requeues used by job {job_id}). "
                    f"{where[0].upper()}{where[1:]}; it is intact. HINT: submit the same command again to "
                    f"continue from it (a new job starts with fresh budgets), or raise requeue.{budget}")


def unsaved_stop(decision: Decision, *, failed_step: int, error: str | None, step: int | None) -> Decision:
    """At the time limit the stop's own save did not commit (the checkpoint store unreachable
    after its retries, scratch full): a rerun would train again from `step` only to meet the same
    store at its next limit, so the job stops instead and says what to do. A preemption still
    requeues (it is not the store's fault), as does a stop that committed."""
    if not decision.requeue or decision.reason != TIMEOUT:
        return decision
    where = f"step {step}" if step is not None else "none"
    return Decision(False, decision.reason, decision.budget, decision.used, decision.limit,
                    f"not requeued: the save of step {failed_step} at the time limit did not commit ({error}); a "
                    f"rerun would train again from the last committed checkpoint ({where}, intact) and meet the "
                    "same problem. HINT: once the checkpoint store (checkpoint.dir) or the scratch is usable "
                    "again, submit the same command to continue from it")


def needed_lead(save_seconds: Sequence[float], step_s: float, margin_s: float = LEAD_MARGIN_S) -> int:
    """Seconds of warning a stop needs: the step in flight, a save already in flight plus the final
    one (hence twice the slowest measured save), and a margin; rounded up to 10 s."""
    worst = max(save_seconds, default=0.0)
    return int(math.ceil((margin_s + step_s + 2 * worst) / 10.0) * 10)


# ---- after a failure: what kind, and whose fault ----

@dataclass(frozen=True)
class Failure:
    kind: str
    """permanent: the same error would recur anywhere (config, refused checkpoint); preflight: named
    nodes failed their checks; hung: ranks the others timed out waiting for; crash: ranks died
    without a trace; error: ranks raised."""
    detail: str
    suspects: tuple[str, ...] = ()
    """Nodes to leave out of the next run."""


def diagnose(records: Mapping[int, Mapping[str, Any]], status: int) -> Failure:
    """Read the ranks' files of a failed run (see history.RankRecord)."""
    errors = {r: rec for r, rec in records.items() if rec.get("status") == "error"}
    permanent = [rec for rec in errors.values() if rec.get("permanent")]
    if permanent:
        return Failure("permanent", _first_line(permanent[0].get("error", "")))
    bad = sorted({node for rec in errors.values() for node in rec.get("bad_nodes", [])})
    nodes = {rec.get("node") for rec in records.values()}
    if bad:
        # Every node failing alike points at the config (e.g. scratch_dir), not at the nodes.
        return Failure("preflight", f"preflight failed on {', '.join(bad)}",
                       tuple(bad) if not nodes <= set(bad) else ())
    waited = {r for r, rec in errors.items() if TIMEOUT_HINTS.search(rec.get("error", ""))}
    if waited and len(waited) < len(records):
        # Some ranks timed out waiting in a collective: the others are the ones they waited for
        # (hung: stopped, stuck in a kernel, a dead network link), whatever those wrote later on.
        silent = sorted(set(records) - waited)
        where = sorted({records[r].get("node") for r in silent})
        detail = (f"rank(s) {', '.join(map(str, silent))} on {', '.join(map(str, where))} stopped answering: "
                  f"rank(s) {', '.join(map(str, sorted(waited)))} timed out waiting for them in a collective")
        return Failure("hung", detail, tuple(where) if len(where) < len(nodes) else ())
    dead = sorted({rec["node"] for rec in records.values() if rec.get("status") == "running"})
    if dead:
        ranks = sorted(r for r, rec in records.items() if rec.get("status") == "running")
        detail = f"rank(s) {', '.join(map(str, ranks))} on {', '.join(dead)} died or hung without a trace"
        # When every node lost a rank, nothing singles one out (e.g. all were SIGKILLed).
        return Failure("crash", detail, tuple(dead) if len(dead) < len(nodes) else ())
    own = [rec for rec in errors.values() if not rec.get("peer_failure")]
    if own:
        rec = min(own, key=lambda r: r.get("updated_at", 0))
        return Failure("error", f"rank {rec['rank']} on {rec['node']}: {_first_line(rec.get('error', ''))}")
    return Failure("error", f"the job step exited with status {status}"
                   + (" (no rank wrote a record)" if not records else ""))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "unknown error"


TIMEOUT_HINTS = re.compile(r"timed out|timing out|failed to pass monitoredbarrier", re.IGNORECASE)
"""A collective that gave up waiting: gloo's recv/send timeouts, its monitored barrier, NCCL's watchdog."""

PEER_FAILURE_HINTS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                      "distbackenderror", "remote process exited", "watchdog", "gloo/transport")
"""gloo (its transport's errors: peer gone, recv timed out) and NCCL (watchdog, remote exit)."""


def is_peer_failure(error: BaseException) -> bool:
    """Errors that mean another rank went away, not that this one went wrong."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(hint in text for hint in PEER_FAILURE_HINTS)


def excludable(suspects: Iterable[str], excluded: Iterable[str], usable: Iterable[str],
               nodes_needed: int) -> tuple[str, ...]:
    """The suspects to exclude, or () when SLURM could no longer place the job without them."""
    new = tuple(sorted(set(suspects) - set(excluded)))
    left = set(usable) - set(excluded) - set(new)
    return new if new and len(left) >= nodes_needed else ()


def failure_record(error: BaseException, phase: str) -> dict[str, Any]:
    """What a rank going down with `error` leaves in its record for the batch shell (`diagnose`):
    whether a rerun would meet the same error (a bad config or checkpoint found during set-up), whether
    a peer's death caused it, and the nodes a failed preflight blames."""
    return {"status": "error", "error": f"{type(error).__name__}: {error}", "phase": phase,
            "peer_failure": is_peer_failure(error),
            "permanent": phase == "setup" and isinstance(error, (ConfigError, CheckpointError)),
            "bad_nodes": list(error.nodes) if isinstance(error, PreflightError) else []}
