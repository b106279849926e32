"""The checkpointing the trainer calls, composed of its parts:

    Collectives  gather / broadcast / barrier / raise-together over a gloo group of its own, so
                 they can run in background threads while training's collectives go on
    Restorer     at start: the newest committed step that verifies, staged and loaded (restorer.py)
    Saver        at step boundaries: write on scratch, upload in the background, commit, retention
                 (saver.py)
    Cadence      when the regular schedule saves: every N steps, and on rank 0's clock, fixed or
                 chosen from measured saves (cadence.py)

`Checkpointer` is the facade that satisfies the loop's `Checkpoints` protocol (hpc.train.loop) and
the requeue stage's `CheckpointRecord` (hpc.requeue.saves): the step resumed, the last
committed step, every save's outcome and the restore's time window.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hpc.checkpoint.cadence import Cadence, save_duration
from hpc.checkpoint.collectives import Collectives
from hpc.checkpoint.formats import StateFormat
from hpc.checkpoint.manifest import MANIFEST, CheckpointError, Manifest, step_dir
from hpc.checkpoint.restorer import Restorer
from hpc.checkpoint.saver import SaveOutcome, Saver
from hpc.checkpoint.storage import open_storage
from hpc.config import Config
from hpc.train.data import GlobalBatches
from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")

__all__ = ["Checkpointer", "SaveOutcome"]


class Checkpointer:
    """One per rank: restore() once, then save() at step boundaries, close() at the end."""

    def __init__(self, cfg: Config, world: World, *, location: str, scratch: Path, config_yaml: str,
                 node_rank: int = 0, num_nodes: int = 1, host: str = "", restart_count: int = 0) -> None:
        self.cfg, self.world, self.scratch, self.config_yaml = cfg, world, scratch, config_yaml
        self.node = node_rank
        self.storage = open_storage(location)
        self.collectives = Collectives(world.world_size, cfg.checkpoint.timeout_s, cfg.cluster.nccl.timeout_s)
        self.restorer = Restorer(cfg, world, self.collectives, self.storage, scratch, node=node_rank,
                                 num_nodes=num_nodes, host=host, restart_count=restart_count,
                                 config_yaml=config_yaml)
        self.cadence = Cadence(cfg.checkpoint)
        self.measured = 0
        """Outcomes the cadence has seen."""
        self.format: StateFormat | None = None
        self.saver: Saver | None = None
        """Made by restore(): saving needs the engine's format and the step resumed (never deleted)."""

    # --- the loop's protocol ----------------------------------------------------------------------

    def restore(self, engine: Engine, batches: GlobalBatches) -> int:
        """Load the checkpoint `checkpoint.resume` names (also checks free space); the step to start at."""
        ckpt = self.cfg.checkpoint
        self.format = StateFormat(engine, group=self.collectives.group, streams=ckpt.streams,
                                  async_save=ckpt.async_save)
        step = self.restorer.restore(self.format, engine, batches)
        self.saver = Saver(self.cfg, self.world, self.collectives, self.storage, self.scratch, self.format,
                           node=self.node, config_yaml=self.config_yaml, resumed_step=self.restorer.resumed_step)
        self._start_clock()
        return step

    def due(self, step: int) -> bool:
        """This rank's vote: every_steps on every rank, the clock on rank 0 only (the loop ORs the
        votes in its one all-reduce, so all ranks save together on rank 0's clock)."""
        if self.cadence.step_due(step):
            return True
        if self.world.rank != 0:
            return False
        if self.cadence.auto:
            self._measure()
        return self.cadence.time_due()

    def save(self, step: int, engine: Engine, batches: GlobalBatches) -> None:
        """Checkpoint the state after `step` steps; returns once training may go on."""
        assert self.saver is not None, "restore() first: it also checks free space"
        self.cadence.saved()
        self.saver.save(step, engine, batches)

    def wait(self) -> SaveOutcome | None:
        """Block until the save in flight (if any) committed or failed."""
        return self.saver.wait() if self.saver is not None else None

    def finish(self, stopped: bool = False) -> None:
        """At the end of training: the last save must commit, or the job reports it. After a stop
        the requeue decision reads the outcome instead (hpc.requeue.handback: a stop whose save
        did not commit at the time limit is not requeued)."""
        outcome = self.wait()
        if outcome is not None and not outcome.committed and not stopped:
            raise CheckpointError(f"the checkpoint of step {outcome.step} did not commit: {outcome.error}. "
                                  f"The newest committed step is {self.last_committed}; a restart resumes "
                                  "from it")

    def close(self) -> None:
        self.wait()
        if self.format is not None:
            self.format.close()
        if not self.broken:  # after a failed collective a peer may be gone: destroying would hang
            self.collectives.close()

    # --- the schedule ----------------------------------------------------------------------------

    def _measure(self) -> None:
        """Auto mode, rank 0: tell the cadence how long each newly committed save took."""
        assert self.saver is not None
        pending = self.saver.pending
        if pending is not None and pending.done():
            self.saver.wait()  # finished already: collects its outcome without blocking the loop
        for outcome in self.saver.outcomes[self.measured:]:
            line = self.cadence.measured(save_duration(outcome.seconds)) if outcome.committed else None
            if line:
                log.info("%s", line)
        self.measured = len(self.saver.outcomes)

    def _start_clock(self) -> None:
        """Training starts now, and so does the clock between saves (rank 0 says how it runs)."""
        earlier = self._earlier_save_s() if self.cadence.auto and self.world.rank == 0 else None
        line = self.cadence.start(earlier)
        if self.world.rank == 0:
            log.info("%s", line)

    def _earlier_save_s(self) -> float | None:
        """How long the save of the step resumed took (its manifest records it), so that auto mode
        starts from a measurement after a requeue rather than from the starting interval."""
        step = self.restorer.resumed_step
        if step is None:
            return None
        try:
            raw = self.storage.read_bytes(f"{step_dir(step)}/{MANIFEST}")
            seconds = Manifest.from_json(raw).save_seconds if raw is not None else {}
        except Exception as err:  # noqa: BLE001 - a nicety: the starting interval does without it
            log.warning("could not read how long step %d took to save: %s", step, err)
            return None
        return save_duration(seconds) if seconds else None

    # --- what the requeue stage reads (its CheckpointRecord protocol) ----------------------------

    @property
    def resumed_step(self) -> int | None:
        return self.restorer.resumed_step

    @property
    def last_committed(self) -> int | None:
        return self.saver.last_committed if self.saver is not None else self.restorer.resumed_step

    @property
    def outcomes(self) -> list[SaveOutcome]:
        return self.saver.outcomes if self.saver is not None else []

    @property
    def restore_window(self) -> tuple[float, float] | None:
        return self.restorer.window

    @property
    def broken(self) -> str | None:
        return self.saver.broken if self.saver is not None else None
