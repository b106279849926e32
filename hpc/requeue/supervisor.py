"""This rank's side of requeue for one run of the job (composed by hpc.job); it only sequences:

    start     take over the signals, write this rank's record, learn why this run started
    (loop)    at every step boundary: the first step's line and timeline (timeline.py); rank 0
              keeps the job's own deadline in step with measured saves (deadline.py)
    finish    after the agreed stop and the commit: requeue, or give up (handback.py)
    failed    an exception: say in the record how this rank went down (the batch shell decides)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc.config import Config
from hpc.launch.environment import JobEnv
from hpc.requeue import accounting, deadline, handback, history, policy, timeline
from hpc.requeue.saves import CheckpointRecord, NoCheckpoints
from hpc.requeue.signals import DEADLINE, TERM, WARNING, StopRequest, describe
from hpc.run_folder import RunFolder
from hpc.slurm import job_info, parse_time

if TYPE_CHECKING:  # the loop imports torch; this stage is imported in a bare python too
    from hpc.train.loop import TrainResult

log = logging.getLogger("hpc")


class NotRequeued(RuntimeError):
    """The stop's checkpoint committed, but the job ends here: its budget is spent, or it was cancelled."""


class Supervisor:
    def __init__(self, cfg: Config, env: JobEnv, run_dir: Path) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.stop = StopRequest(cfg.requeue.signal)
        if env.launcher != "single":  # a library call must not take its caller's signals
            self.stop.install()
        self.record = history.RankRecord(self.run_dir, env.job_id, env.restart_count, env.rank, env.node_name)
        self.record.watch(self.stop)
        self.lead = deadline.asked_lead(cfg.requeue.lead_s)
        self.checkpoints: CheckpointRecord = NoCheckpoints()
        self.phase, self.requeue_decided, self.saves = "setup", False, deadline.SaveTimes()
        self.first_step_at: float | None = None
        self.last_poll: float | None = None
        self.job: dict[str, str] = {}  # scontrol show job (rank 0, SLURM only): start and end times
        self.why, self.previous = "submitted", None
        if env.rank == 0:
            self._bookkeeping(self._learn_why_we_started)
            self._bookkeeping(lambda: history.prune_rank_records(self.run_dir))

    def _bookkeeping(self, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as err:  # the run's record is bookkeeping: never a reason to stop training
            log.warning("requeue bookkeeping in %s failed: %s", RunFolder(self.run_dir).requeue, err)

    def _learn_why_we_started(self) -> None:
        env = self.env
        if env.launcher == "slurm":
            try:
                self.job = job_info(env.job_id)
            except Exception as err:  # status is a nicety; the run goes on without it
                log.warning("scontrol show job %s failed: %s", env.job_id, err)
        self.why, self.previous = timeline.why_started(history.read_events(self.run_dir), env.job_id,
                                                       env.restart_count)
        if env.restart_count > 0 and self.previous is None:
            # Our code never got to say: SLURM ended the last run and requeued the job itself.
            self.why, fields = timeline.slurm_requeue(
                accounting.previous_run(env.job_id, env.restart_count) if env.launcher == "slurm" else None,
                history.read_ranks(self.run_dir, env.job_id, env.restart_count - 1))
            self.previous = history.append_event(self.run_dir, history.REQUEUED, job_id=env.job_id,
                                                 restart=env.restart_count - 1, **fields)

    def attach(self, checkpoints: CheckpointRecord) -> None:
        self.checkpoints = checkpoints
        self.stop.on_poll = self._on_poll

    # ---- in the loop, at every step boundary ----

    def _on_poll(self) -> None:
        now = time.time()
        first = self.last_poll is None
        if first:
            self.phase = "train"
            self.record.update(phase="train")
            self.first_step_at = now
        else:
            self.saves.step_interval(now - self.last_poll)
        self.last_poll = now
        if self.env.rank == 0:
            self._bookkeeping(self._log_start if first else self._follow_saves)

    def _log_start(self) -> None:
        step = self.checkpoints.resumed_step or 0
        spans = timeline.restart_timeline(self.previous, parse_time(self.job.get("StartTime", "")),
                                          self.checkpoints.restore_window, self.first_step_at)
        log.info("%s", timeline.start_line(step, self.env.restart_count, self.why, spans))
        history.append_event(self.run_dir, history.STARTED, job_id=self.env.job_id,
                             restart=self.env.restart_count, reason=self.why, step=step,
                             nodes=list(self.env.hostnames), timeline=spans)
        self._follow_saves()

    def _follow_saves(self, arm: bool = True) -> None:
        """Rank 0: each committed save tells how much warning a stop needs; when that outgrows
        what SLURM was asked for, the job keeps its own deadline (and tells the next submit)."""
        if not self.saves.take(self.checkpoints.outcomes) or not self.saves.save_s or not self.cfg.requeue.auto_lead:
            return
        RunFolder(self.run_dir).write_measured_lead(self.saves.record(self.env.job_id))
        if arm:
            self.stop.deadline = deadline.keep_deadline(self.saves, self.lead, parse_time(self.job.get("EndTime", "")),
                                                        self.stop.deadline)

    # ---- after the loop ----

    def finish(self, outcome: TrainResult, broadcast: Callable[[Any], Any]) -> str:
        """'done', 'stopped' (no requeue here: a local run, or a stop not from a signal) or
        'requeue' (rank 0 then calls `requeue_now` once the ranks let go of each other).
        `broadcast(x)` returns rank 0's x on every rank."""
        mask, step = self.stop.agreed_mask, self.checkpoints.last_committed
        if self.env.rank == 0:
            self._bookkeeping(lambda: self._follow_saves(arm=False))  # the last save committed after the last poll
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
        mine = handback.decide(self.cfg, self.env, self.run_dir, self.job, self.stop, self.lead,
                               self.checkpoints) if self.env.rank == 0 else None
        decision: policy.Decision = broadcast(mine)
        if decision.requeue:
            self.record.update(status="requeued")
            self.requeue_decided = True
            return "requeue"
        self.record.update(status="gave_up")
        raise NotRequeued(decision.message)

    def requeue_now(self) -> bool:
        return handback.requeue_now(self.env, self.run_dir, self.checkpoints.last_committed)

    def failed(self, error: BaseException) -> None:
        """This rank is going down with `error`: leave the evidence for the batch shell."""
        self.record.update(**policy.failure_record(error, self.phase))
