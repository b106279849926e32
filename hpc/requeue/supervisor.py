"""This rank's side of requeue for one run of the job (composed by hpc.job):

    start     take over the signals, write this rank's record, learn why this run started
    (loop)    poll at every step boundary: first step -> 'resumed from step N' line and timeline; rank 0 keeps
              the job's own deadline in step with measured save times
    finish    after the agreed stop and the commit: requeue, or give up with a message
    failed    an exception: say in the record how this rank went down (the batch shell decides)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from hpc.checkpoint.manifest import CheckpointError
from hpc.config import Config, ConfigError
from hpc.launch.environment import JobEnv
from hpc.launch.preflight import PreflightError
from hpc.requeue import history, policy
from hpc.requeue.signals import DEADLINE, TERM, WARNING, StopRequest, describe
from hpc.slurm import current_state, job_info, parse_time
from hpc.run_folder import RunFolder

log = logging.getLogger("hpc")

class NotRequeued(RuntimeError):
    """A stop came and the checkpoint committed, but the job ends here: the budget for its reason
    is spent, or the job was cancelled."""


class Supervisor:
    def __init__(self, cfg: Config, env: JobEnv, run_dir: Path) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.stop = StopRequest(cfg.requeue.signal)
        if env.launcher != "single":  # a library call must not take its caller's signals
            self.stop.install()
        self.record = history.RankRecord(self.run_dir, env.job_id, env.restart_count, env.rank, env.node_name)
        self.record.watch(self.stop)
        self.lead = self._asked_lead()
        self.checkpointer: Any = None
        self.phase = "setup"
        self.requeue_decided = False
        self.first_step_at: float | None = None
        self._last_poll: float | None = None
        self._step_s = 0.0
        self._intervals: list[float] = []
        self._saves_seen = 0
        self._save_s: list[float] = []
        self.job: dict[str, str] = {}
        self.why = "submitted"
        self.previous: dict[str, Any] | None = None
        if env.rank == 0:
            try:
                self._learn_why_we_started()
            except OSError as err:  # the run's record is bookkeeping: never a reason to stop training
                log.warning("cannot read or write %s: %s", RunFolder(self.run_dir).history, err)

    # ---- start ----

    def _asked_lead(self) -> int:
        """What SLURM was asked for at submit (the setup exports it; hpc.submit.plan.lead_time)."""
        try:
            return int(os.environ.get("HPC_REQUEUE_LEAD_S", ""))
        except ValueError:
            return self.cfg.requeue.lead_s

    def _learn_why_we_started(self) -> None:
        env = self.env
        if env.launcher == "slurm":
            try:
                self.job = job_info(env.job_id)
            except Exception as err:  # status is a nicety; the run goes on without it
                log.warning("scontrol show job %s failed: %s", env.job_id, err)
        events = history.read_events(self.run_dir)
        if env.restart_count > 0:
            self.previous = history.ending(events, env.job_id, env.restart_count - 1)
            if self.previous is None:
                # Our code never got to say: SLURM requeued the job itself (node failure, or a
                # preemption in REQUEUE mode). Counted as a failure, so a flapping job stops.
                self.previous = history.append_event(
                    self.run_dir, history.REQUEUED, job_id=env.job_id, restart=env.restart_count - 1,
                    reason=policy.SLURM, detail="requeued by SLURM (node failure or preemption)")
            self.why = self.previous.get("reason", policy.SLURM)
        elif any(e.get("job_id") != env.job_id for e in events):
            self.why = "resubmitted"

    def attach(self, checkpointer: Any) -> None:
        self.checkpointer = checkpointer
        self.stop.on_poll = self._on_poll

    # ---- in the loop, at every step boundary ----

    def _on_poll(self) -> None:
        now = time.time()
        first = self._last_poll is None
        if first:
            self.phase = "train"
            self.record.update(phase="train")
            self.first_step_at = now
        else:
            # The median of recent intervals: a step, not a step plus a blocking save.
            self._intervals = (self._intervals + [now - self._last_poll])[-21:]
            self._step_s = sorted(self._intervals)[len(self._intervals) // 2]
        self._last_poll = now
        if self.env.rank != 0:
            return
        try:
            if first:
                self._log_start()
            self._follow_saves()
        except OSError as err:  # bookkeeping: never a reason to stop training
            log.warning("requeue bookkeeping in %s failed: %s", self.run_dir, err)

    def _log_start(self) -> None:
        step = getattr(self.checkpointer, "resumed_step", None) or 0
        timeline = self._timeline()
        head = (f"resumed from step {step}" if step else "started at step 0")
        line = f"{head}, restart {self.env.restart_count}, reason: {self.why}"
        if timeline.get("total") is not None:
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in timeline.items()
                              if k != "total" and v is not None)
            line += f"; signal -> training again {timeline['total']:.1f} s ({parts})"
        log.info(line)
        history.append_event(self.run_dir, history.STARTED, job_id=self.env.job_id,
                             restart=self.env.restart_count, reason=self.why, step=step,
                             nodes=list(self.env.hostnames), timeline=timeline)

    def _timeline(self) -> dict[str, float | None]:
        """Seconds from the previous run's stop request to this run's first step, by phase."""
        prev = self.previous or {}
        stop = prev.get("stop", {})
        start = parse_time(self.job.get("StartTime", ""))
        window = getattr(self.checkpointer, "restore_window", None)
        restored_from, restored_to = window if window else (None, None)

        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        phases = stop.get("save_phases", {})
        out: dict[str, float | None] = {
            "stop": span(stop.get("signal_at"), stop.get("agreed_at")),
            "save": round(sum(phases.get(k, 0.0) for k in ("waited", "blocked", "write")), 3) if phases else None,
            "commit": round(sum(phases.get(k, 0.0) for k in ("upload", "commit")), 3) if phases else None,
            "scheduler_wait": span(prev.get("at"), start),
            "start_up": span(start, restored_from),
            "load": span(restored_from, restored_to),
            "first_step": span(restored_to, self.first_step_at),
        }
        began = stop.get("signal_at") or prev.get("at")
        out["total"] = span(began, self.first_step_at) if prev else None
        return out

    def _follow_saves(self, arm: bool = True) -> None:
        """Rank 0: each committed save tells how much warning a stop needs; when that outgrows
        what SLURM was asked for, the job keeps its own deadline (and tells the next submit)."""
        outcomes = getattr(self.checkpointer, "outcomes", [])
        if len(outcomes) == self._saves_seen:
            return
        fresh, self._saves_seen = outcomes[self._saves_seen:], len(outcomes)
        self._save_s += [sum(o.seconds.values()) for o in fresh if o.committed]
        if not self._save_s or not self.cfg.requeue.auto_lead:
            return
        recent = self._save_s[-5:]
        needed = policy.needed_lead(recent, self._step_s)
        RunFolder(self.run_dir).write_measured_lead({"needed_s": needed, "save_s": round(max(recent), 3),
                                           "step_s": round(self._step_s, 3), "job_id": self.env.job_id,
                                           "at": round(time.time(), 3)})
        end = parse_time(self.job.get("EndTime", ""))
        if not arm or needed <= self.lead or end is None or self.stop.deadline == end - needed:
            return
        if end - needed < time.time() + 2 * self._step_s:
            log.warning("saves take up to %.1f s, so a stop needs %d s before the time limit, but this "
                        "run has less left: relying on SLURM's warning (%d s). HINT: raise slurm.time",
                        max(recent), needed, self.lead)
            return
        self.stop.deadline = end - needed
        log.info("saves take up to %.1f s: stopping %d s before the time limit (SLURM warns %d s "
                 "before)", max(recent), needed, self.lead)

    # ---- after the loop ----

    def finish(self, outcome: Any, world: Any) -> str:
        """'done', 'stopped' (no requeue here: a local run, or a stop not from a signal) or
        'requeue' (rank 0 then calls `requeue_now` once the ranks let go of each other)."""
        mask = self.stop.agreed_mask
        step = getattr(self.checkpointer, "last_committed", None)
        if self.env.rank == 0:
            try:
                self._follow_saves(arm=False)  # the last save committed after the last poll
            except OSError as err:
                log.warning("requeue bookkeeping in %s failed: %s", self.run_dir, err)
        if not outcome.stopped_early:
            if self.env.rank == 0:
                history.append_event(self.run_dir, history.FINISHED, job_id=self.env.job_id,
                                     restart=self.env.restart_count, step=outcome.steps)
            self.record.update(status="ok")
            return "done"
        if not mask & (WARNING | TERM | DEADLINE) or self.env.launcher != "slurm":
            if self.env.rank == 0:
                log.info("stopped at step %d (%s); checkpoint step %s committed. Run the same command "
                         "again to continue from it", outcome.steps, describe(mask), step)
            self.record.update(status="stopped")
            return "stopped"
        decision = self._broadcast(self._decide(mask, step) if self.env.rank == 0 else None, world)
        if decision.requeue:
            self.record.update(status="requeued")
            self.requeue_decided = True
            return "requeue"
        self.record.update(status="gave_up")
        raise NotRequeued(decision.message)

    def _decide(self, mask: int, step: int | None) -> policy.Decision:
        end = parse_time(self.job.get("EndTime", ""))
        agreed_at = self.stop.agreed_at or time.time()
        reason = policy.stop_reason(mask, end - agreed_at if end else None, self.lead)
        decision = policy.decide(reason, history.read_events(self.run_dir), self.env.job_id,
                                 policy.limits(self.cfg.requeue), step=step, detail=describe(mask))
        if self._cancelled():
            # scancel sends SIGTERM too: the user asked the job to end, not to come back.
            decision = policy.Decision(False, reason, decision.budget, decision.used, decision.limit,
                                       f"the job was cancelled: not requeued. The last committed "
                                       f"checkpoint is step {step}; submit the same command to continue")
        outcomes = getattr(self.checkpointer, "outcomes", [])
        last = outcomes[-1] if outcomes and outcomes[-1].committed else None
        stop = {"signal_at": self.stop.first_seen, "agreed_at": agreed_at, "committed_at": time.time(),
                "save_phases": dict(last.seconds) if last else {}, "signals": describe(mask)}
        fields = dict(job_id=self.env.job_id, restart=self.env.restart_count, reason=reason, step=step,
                      detail=decision.message, stop=stop, nodes=list(self.env.hostnames))
        if decision.requeue:
            log.info("%s", decision.message)
            history.append_event(self.run_dir, history.REQUEUED, **fields)  # before the requeue itself
        else:
            log.error("%s", decision.message)
            history.append_event(self.run_dir, history.GAVE_UP, **fields)
        return decision

    def _cancelled(self) -> bool:
        if self.env.launcher != "slurm":
            return False
        try:
            return current_state(self.env.job_id) == "CANCELLED"
        except Exception:  # noqa: BLE001 - unknown: requeue as decided
            return False

    @staticmethod
    def _broadcast(decision: policy.Decision | None, world: Any) -> policy.Decision:
        if world.world_size > 1:
            import torch.distributed as dist

            box = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        assert decision is not None
        return decision

    def requeue_now(self) -> bool:
        """Rank 0, last thing before leaving: SLURM ends this run and queues the next. A refusal
        (slurmctld unreachable, the job already ending) is recorded as the run's last word."""
        from hpc.slurm import SlurmError, requeue

        try:
            requeue(self.env.job_id)
        except SlurmError as err:
            if current_state(self.env.job_id) in ("REQUEUED", "PENDING", "REQUEUE_HOLD"):
                log.info("job %s requeued (scontrol reported: %s)", self.env.job_id, err)
                return True
            step = getattr(self.checkpointer, "last_committed", None)
            message = (f"scontrol requeue failed: {err}. The last committed checkpoint is step {step}; "
                       "submit the same command to continue from it")
            log.error("%s", message)
            history.append_event(self.run_dir, history.GAVE_UP, job_id=self.env.job_id,
                                 restart=self.env.restart_count, reason=policy.FAILURE, step=step, detail=message)
            return False
        log.info("job %s requeued", self.env.job_id)
        return True

    def failed(self, error: BaseException) -> None:
        """This rank is going down with `error`: leave the evidence for the batch shell."""
        permanent = self.phase == "setup" and isinstance(error, (ConfigError, CheckpointError))
        self.record.update(status="error", error=f"{type(error).__name__}: {error}", phase=self.phase,
                           peer_failure=policy.is_peer_failure(error), permanent=permanent,
                           bad_nodes=list(getattr(error, "nodes", ()) if isinstance(error, PreflightError) else ()))
