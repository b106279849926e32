"""The saving half of the checkpointer: write on scratch, upload, commit, retention.

    save(step)   [loop blocked]  wait for the previous save -> copy tensors to host (DCP async) or
                                 write them (DeepSpeed) into scratch/step-N on each node; RNG
                                 states are taken (and written with the small files later)
                 [background]    all ranks' shards written (and checksummed as written) -> each
                                 node's local rank 0 uploads its node's files (parallel streams,
                                 retries; files checksummed as written are copied in the kernel)
                                 -> rank 0 gathers sizes and checksums and writes
                                 step-N/manifest.json last, atomically -> retention (persistent
                                 and scratch)
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.checkpoint.collectives import Collectives
from hpc.checkpoint.formats import RNG_DIR, StateFormat, save_rng
from hpc.checkpoint.manifest import CONFIG_FILE, MANIFEST, TRAINER_FILE, CheckpointError, Manifest, committed, step_dir
from hpc.checkpoint.retention import clean_persistent, clean_scratch
from hpc.checkpoint.storage import FileEntry, Storage
from hpc.checkpoint.transfer import upload_step
from hpc.config import Config
from hpc.config.diff import config_hash
from hpc.faults import fault_point
from hpc.train import rng
from hpc.train.data import GlobalBatches
from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")


def _describe(err: BaseException) -> str:
    """One line for a failed write: DCP's CheckpointException carries each rank's own exception
    (its text is a whole traceback per rank); anything else is its first line."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for failed_rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            text = str(inner).strip().splitlines()
            parts.append(f"rank {failed_rank}: {type(inner).__name__}: {text[0] if text else ''}")
        return "; ".join(parts)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@dataclass
class SaveOutcome:
    """How one save ended (broadcast from rank 0, so every rank holds the same)."""

    step: int
    committed: bool
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """How long each phase took: waited, blocked, write, upload, commit."""
    bytes: int = 0


@dataclass(frozen=True)
class SaveInFlight:
    """What the background half of one save needs from the part the loop waited for."""

    step: int
    data: dict[str, int]
    """The data position (GlobalBatches.state_dict) at this step."""
    strategy: str
    started: float
    """perf_counter() when save() was called."""
    waited: float
    """Seconds save() waited for the previous save."""
    blocked: float
    """Seconds the loop was blocked by this save (after that wait)."""
    rng: dict[str, Any]
    """This rank's RNG states at this step (hpc.train.rng.capture)."""


@dataclass(frozen=True)
class NodeUpload:
    """One rank's part of a save, gathered by rank 0 to commit (only drainers upload files)."""

    entries: list[FileEntry]
    error: str | None
    seconds: float


class Saver:
    """Saves one rank's engine state; at most one save in flight."""

    def __init__(self, cfg: Config, world: World, collectives: Collectives, storage: Storage, scratch: Path,
                 state_format: StateFormat, *, node: int, config_yaml: str, resumed_step: int | None) -> None:
        self.cfg, self.ckpt, self.world = cfg, cfg.checkpoint, world
        self.collectives, self.storage, self.scratch, self.format = collectives, storage, scratch, state_format
        self.node, self.config_yaml = node, config_yaml
        self.drainer = world.local_rank == 0  # uploads its node's files
        self.resumed_step = resumed_step
        """Never deleted by retention during this run."""
        self.last_committed = resumed_step
        self.outcomes: list[SaveOutcome] = []
        self.pending: Future | None = None
        self.broken: str | None = None
        """Set when a checkpoint collective failed: the group is unusable, later saves refuse."""
        self.stop_error: str | None = None
        """Set when a save failed and checkpoint.on_failure=stop: the next save refuses, ending the job."""

    def save(self, step: int, engine: Engine, batches: GlobalBatches) -> None:
        """Checkpoint the state after `step` steps; returns once training may go on."""
        started = time.perf_counter()
        self.wait()  # one save in flight at a time (and the staging buffers are reused)
        if self.broken:
            raise CheckpointError(f"cannot save step {step}: {self.broken}. The newest committed "
                                  f"step is {self.last_committed}; the job must restart to checkpoint again")
        if self.stop_error:  # set alike on every rank (the outcome is broadcast): all stop at this save
            raise CheckpointError(self.stop_error)
        waited = time.perf_counter() - started
        folder = self.scratch / step_dir(step)
        if self.drainer and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a leftover of an interrupted attempt at this step
        self.collectives.barrier()
        # Taken now, before training draws again; written (with the small files) in the background.
        rng_state, data = rng.capture(), batches.state_dict()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            written = self.format.save(folder, step, self.world.rank)
        except OSError as err:  # scratch full or gone: this save fails, the run does not
            # The background half still runs every collective, carrying the error, so that no
            # rank waits for one this rank skipped.
            written = Future()
            written.set_exception(err)
        flight = SaveInFlight(step=step, data=data, strategy=engine.name, started=started, waited=waited,
                              blocked=time.perf_counter() - started - waited, rng=rng_state)
        future: Future = Future()
        self.pending = future
        threading.Thread(target=self._finish, args=(folder, written, flight, future), daemon=True,
                         name=f"hpc-ckpt-{step}").start()

    def _finish(self, folder: Path, written: Future, flight: SaveInFlight, future: Future) -> None:
        """The background half of a save. Every rank runs the same collectives in the same order,
        whatever failed locally: a local error travels inside them, so no rank is left waiting in
        a collective its peers skipped (that would also misalign the next save's collectives)."""
        step, rank = flight.step, self.world.rank
        error: str | None = None
        metadata = None
        try:
            try:
                self._write_small_files(folder, flight)
            except Exception as err:  # noqa: BLE001
                error = f"writing the RNG state or trainer files on rank {rank} failed: {err}"
            try:
                metadata = written.result()
            except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                error = error or f"writing the shards on rank {rank} failed: {_describe(err)}"
            write_s = time.perf_counter() - flight.started
            if rank == 0 and error is None:
                try:
                    # A folder of this step from an abandoned attempt: its manifest must go first.
                    self.storage.remove(f"{step_dir(step)}/{MANIFEST}")
                except Exception as err:  # noqa: BLE001
                    error = f"removing a stale {step_dir(step)}/{MANIFEST} failed: {err}"
            # Also the barrier after which every node's shards are complete on its scratch: each
            # rank's checksums of the files it wrote reach its node's drainer, which then need not
            # read those files again to upload them.
            written: dict[str, FileEntry] = {}
            for part in self.collectives.gather(dict(self.format.written) if error is None else {}):
                written.update(part)
            up_started = time.perf_counter()
            entries: list[FileEntry] = []
            if self.drainer and error is None:
                try:
                    entries = upload_step(folder, self.storage, step, streams=self.ckpt.streams,
                                          retries=self.ckpt.retries, backoff_s=self.ckpt.backoff_s, rank=rank,
                                          written=written)
                except Exception as err:  # noqa: BLE001
                    error = f"upload from node {self.node} failed: {err}"
            gathered = self.collectives.gather(NodeUpload(entries, error, time.perf_counter() - up_started))
            outcome = SaveOutcome(step, False)
            if rank == 0:
                try:
                    outcome = self._commit(flight, gathered, write_s, metadata)
                except Exception as err:  # noqa: BLE001
                    outcome = SaveOutcome(step, False, f"commit failed: {err}")
                if not outcome.committed:
                    log.error("checkpoint step %d not committed: %s", step, outcome.error)
            outcome = self.collectives.broadcast(outcome)
        except Exception as err:  # noqa: BLE001 - a collective itself failed: a peer died or hung
            self.broken = f"checkpoint collectives failed at step {step}: {err}"
            log.error("%s", self.broken)
            future.set_result(SaveOutcome(step, False, self.broken))
            return
        if outcome.committed:
            self.last_committed = step
            if rank == 0:
                self._retention(step)
        elif self.ckpt.on_failure == "stop":
            self.stop_error = (f"checkpoint step {step} was not committed ({outcome.error}) and "
                               f"checkpoint.on_failure=stop; the newest committed step is {self.last_committed}")
        if self.drainer:
            # A step that was not committed goes too: what it wrote may be what filled the scratch.
            clean_scratch(self.scratch, keep={self.last_committed if self.last_committed is not None else -1})
        future.set_result(outcome)

    def _write_small_files(self, folder: Path, flight: SaveInFlight) -> None:
        """Beside the shards: this rank's RNG states; on rank 0 the config and the trainer state."""
        save_rng(folder, self.world.rank, flight.rng)
        if self.world.rank == 0:
            (folder / CONFIG_FILE).write_text(self.config_yaml)
            # The LR schedule is a pure function of the step (hpc.train.optim.lr_at): its position is the step.
            (folder / TRAINER_FILE).write_text(json.dumps(
                {"step": flight.step, "data": flight.data, "lr_schedule": {"at_step": flight.step},
                 "world_size": self.world.world_size, "strategy": flight.strategy}, indent=1))

    def _retention(self, step: int) -> None:
        protected = {step} | ({self.resumed_step} if self.resumed_step is not None else set())
        try:
            deleted = clean_persistent(self.storage, committed(self.storage, warn=False),
                                       keep_last=self.ckpt.keep_last, keep_every=self.ckpt.keep_every,
                                       protected=protected)
            if deleted:
                log.info("retention: deleted %s", ", ".join(step_dir(s) for s in deleted))
        except Exception as err:  # noqa: BLE001 - retention never fails a save
            log.warning("retention skipped: %s", err)

    def _commit(self, flight: SaveInFlight, gathered: list[NodeUpload], write_s: float,
                metadata: Any) -> SaveOutcome:
        step = flight.step
        errors = [upload.error for upload in gathered if upload.error]
        if errors:
            return SaveOutcome(step, False, "; ".join(errors))
        files: dict[str, FileEntry] = {}
        for upload in gathered:
            for entry in upload.entries:
                seen = files.setdefault(entry.name, entry)
                if seen.checksum != entry.checksum:
                    return SaveOutcome(step, False, f"two nodes wrote different {entry.name} (is "
                                       "cluster.scratch_dir shared between nodes?)")
        missing = sorted(self._expected_files(metadata) - set(files))
        if missing:
            return SaveOutcome(step, False, f"files written but not uploaded: {', '.join(missing[:5])}")
        upload_s = max(upload.seconds for upload in gathered)
        commit_started = time.perf_counter()
        seconds = {"waited": round(flight.waited, 4), "blocked": round(flight.blocked, 4),
                   "write": round(write_s, 4), "upload": round(upload_s, 4)}
        manifest = Manifest(step=step, world_size=self.world.world_size, strategy=flight.strategy,
                            format=self.format.name, config_hash=config_hash(self.config_yaml), data=flight.data,
                            files=sorted(files.values(), key=lambda e: e.name),
                            zero_stage=self.cfg.strategy.zero_stage, saved_at=time.time(), save_seconds=seconds)
        self.storage.write_atomic(f"{step_dir(step)}/{MANIFEST}", manifest.to_json(),
                                  before_rename=lambda: fault_point("manifest_write", step=step, rank=0))
        seconds["commit"] = round(time.perf_counter() - commit_started, 4)
        total = manifest.total_bytes
        log.info("checkpoint step %d committed to %s: %.1f MB in %d files; loop blocked %.3f s, write "
                 "%.2f s, upload %.2f s (%.0f MB/s), commit %.3f s", step, self.storage.url, total / 1e6,
                 len(files), seconds["blocked"], write_s, upload_s, total / 1e6 / max(upload_s, 1e-9),
                 seconds["commit"])
        return SaveOutcome(step, True, seconds=seconds, bytes=total)

    def _expected_files(self, metadata: Any) -> set[str]:
        """Files the ranks are known to have written: what is committed must include them all."""
        names = {CONFIG_FILE, TRAINER_FILE} | {f"{RNG_DIR}/rank-{r}.pt" for r in range(self.world.world_size)}
        storage_data = getattr(metadata, "storage_data", None)  # DCP's own Metadata object
        if storage_data:  # DCP: every data file .metadata points into, and .metadata itself
            names |= {info.relative_path for info in storage_data.values()} | {".metadata"}
        return names

    def wait(self) -> SaveOutcome | None:
        """Block until the save in flight (if any) committed or failed."""
        if self.pending is None:
            return None
        outcome = self.pending.result()
        self.pending = None
        self.outcomes.append(outcome)
        return outcome
