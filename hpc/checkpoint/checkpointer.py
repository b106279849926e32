"""The checkpoint pipeline the trainer calls: restore at start, save at step boundaries.

    save(step)   [loop blocked]  wait for the previous save -> copy tensors to host (DCP async) or
                                 write them (DeepSpeed) into scratch/step-N on each node
                 [background]    all ranks' shards written -> each node's local rank 0 uploads its
                                 node's files (parallel streams, retries) -> rank 0 gathers sizes
                                 and checksums and writes step-N/manifest.json last, atomically
                                 -> retention (persistent and scratch)
    restore()    newest committed step whose files verify: each node builds scratch/step-N from
                 its own scratch copy where it matches the manifest, else links or downloads the
                 persistent copy; checksums are checked (shared out over nodes); all ranks agree,
                 or fall back to the step before with a warning naming the problem.

All checkpoint collectives use one gloo group of their own, so they can run in background threads
while training's collectives go on.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpc.checkpoint.drain import clean_persistent, clean_scratch, upload_step
from hpc.checkpoint.formats import RNG_DIR, StateFormat, save_rng
from hpc.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST,
    TRAINER_FILE,
    CheckpointError,
    Manifest,
    committed,
    config_hash,
    step_dir,
)
from hpc.checkpoint.restore import Restore
from hpc.checkpoint.storage import FileEntry, Storage, open_storage
from hpc.config import Config
from hpc.faults import fault_point
from hpc.train.data import GlobalBatches
from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")



@dataclass
class SaveOutcome:
    step: int
    committed: bool
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


class Checkpointer(Restore):
    """One per rank. Implements the loop's `Checkpoints` protocol (hpc.train.loop); the restore
    half lives in hpc.checkpoint.restore."""

    def __init__(self, cfg: Config, world: World, *, location: str, scratch: Path, config_yaml: str,
                 node_rank: int = 0, num_nodes: int = 1, host: str = "", restart_count: int = 0) -> None:
        self.cfg, self.ckpt, self.world = cfg, cfg.checkpoint, world
        self.storage: Storage = open_storage(location)
        self.scratch = scratch
        # From the scheduler, not from rank arithmetic: ranks need not be laid out node by node.
        self.node, self.num_nodes, self.host = node_rank, max(num_nodes, 1), host
        self.restart_count = restart_count
        self.drainer = world.local_rank == 0  # uploads and stages its node's files
        self.config_yaml = config_yaml
        self.group = None
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.ckpt.timeout_s))
        self.format: StateFormat | None = None
        self.pending: Future | None = None
        self.outcomes: list[SaveOutcome] = []
        self.resumed_step: int | None = None
        """Never deleted by retention during this run."""
        self.last_committed: int | None = None
        self.broken: str | None = None
        """Set when a checkpoint collective failed: the group is unusable, later saves refuse."""

    # --- collectives over the checkpoint group -------------------------------------------------

    def _all_gather(self, obj: Any) -> list[Any]:
        if self.group is None or self.world.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None or self.world.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _raise_any(self, problem: str | None) -> None:
        """Every rank raises together (the same message), or none does."""
        problems = [p for p in self._all_gather(problem) if p]
        if problems:
            raise CheckpointError(problems[0])

    def _barrier(self) -> None:
        if self.group is not None and self.world.world_size > 1:
            dist.barrier(group=self.group)

    # --- protocol -------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.ckpt.every_steps
        return bool(every) and step % every == 0

    def save(self, step: int, engine: Engine, batches: GlobalBatches) -> None:
        """Checkpoint the state after `step` steps; returns once training may go on."""
        assert self.format is not None, "restore() first: it also checks free space"
        started = time.perf_counter()
        self.wait()  # one save in flight at a time (and the staging buffers are reused)
        if self.broken:
            raise CheckpointError(f"cannot save step {step}: {self.broken}. The newest committed "
                                  f"step is {self.last_committed}; the job must restart to checkpoint again")
        waited = time.perf_counter() - started
        folder = self.scratch / step_dir(step)
        if self.drainer and folder.exists():
            shutil.rmtree(folder)  # a leftover of an interrupted attempt at this step
        self._barrier()
        folder.mkdir(parents=True, exist_ok=True)
        save_rng(folder, self.world.rank)
        data = batches.state_dict()
        if self.world.rank == 0:
            (folder / CONFIG_FILE).write_text(self.config_yaml)
            (folder / TRAINER_FILE).write_text(json.dumps(
                {"step": step, "data": data, "lr_schedule": {"at_step": step, "note": "lr_at(step, train)"},
                 "world_size": self.world.world_size, "strategy": engine.name}, indent=1))
        written = self.format.save(folder, step, self.world.rank)
        blocked = time.perf_counter() - started - waited
        future: Future = Future()
        self.pending = future
        meta = {"step": step, "data": data, "blocked": blocked, "waited": waited, "started": started,
                "strategy": engine.name}
        threading.Thread(target=self._finish, args=(folder, written, meta, future), daemon=True,
                         name=f"hpc-ckpt-{step}").start()

    def _finish(self, folder: Path, written: Future, meta: dict[str, Any], future: Future) -> None:
        """The background half of a save. Every rank runs the same collectives in the same order,
        whatever failed locally: a local error travels inside them, so no rank is left waiting in
        a collective its peers skipped (that would also misalign the next save's collectives)."""
        step, rank = meta["step"], self.world.rank
        error: str | None = None
        metadata = None
        try:
            try:
                metadata = written.result()
            except Exception as err:  # noqa: BLE001
                error = f"writing the shards on rank {rank} failed: {err}"
            write_s = time.perf_counter() - meta["started"]
            if rank == 0 and error is None:
                try:
                    # A folder of this step from an abandoned attempt: its manifest must go first.
                    self.storage.remove(f"{step_dir(step)}/{MANIFEST}")
                except Exception as err:  # noqa: BLE001
                    error = f"removing a stale {step_dir(step)}/{MANIFEST} failed: {err}"
            self._barrier()  # every node's shards are complete on its scratch
            up_started = time.perf_counter()
            entries: list[FileEntry] = []
            if self.drainer and error is None:
                try:
                    entries = upload_step(folder, self.storage, step, streams=self.ckpt.streams,
                                          retries=self.ckpt.retries, backoff_s=self.ckpt.backoff_s, rank=rank)
                except Exception as err:  # noqa: BLE001
                    error = f"upload from node {self.node} failed: {err}"
            upload_s = time.perf_counter() - up_started
            gathered = self._all_gather((entries, error, upload_s))
            outcome = SaveOutcome(step, False)
            if rank == 0:
                try:
                    outcome = self._commit(step, meta, gathered, write_s, metadata)
                except Exception as err:  # noqa: BLE001
                    outcome = SaveOutcome(step, False, f"commit failed: {err}")
                if not outcome.committed:
                    log.error("checkpoint step %d not committed: %s", step, outcome.error)
            outcome = self._broadcast(outcome)
        except Exception as err:  # noqa: BLE001 - a collective itself failed: a peer died or hung
            self.broken = f"checkpoint collectives failed at step {step}: {err}"
            log.error("%s", self.broken)
            future.set_result(SaveOutcome(step, False, self.broken))
            return
        if outcome.committed:
            self.last_committed = step
            if rank == 0:
                self._retention(step)
        if self.drainer:
            clean_scratch(self.scratch, keep={step, self.last_committed if self.last_committed is not None else -1})
        future.set_result(outcome)

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

    def _commit(self, step: int, meta: dict[str, Any], gathered: list[Any], write_s: float,
                metadata: Any) -> SaveOutcome:
        errors = [error for _, error, _ in gathered if error]
        if errors:
            return SaveOutcome(step, False, "; ".join(errors))
        files: dict[str, FileEntry] = {}
        for entries, _, _ in gathered:
            for entry in entries:
                seen = files.setdefault(entry.name, entry)
                if seen.checksum != entry.checksum:
                    return SaveOutcome(step, False, f"two nodes wrote different {entry.name} (is "
                                       "cluster.scratch_dir shared between nodes?)")
        missing = sorted(self._expected_files(metadata) - set(files))
        if missing:
            return SaveOutcome(step, False, f"files written but not uploaded: {', '.join(missing[:5])}")
        upload_s = max(s for _, _, s in gathered)
        commit_started = time.perf_counter()
        seconds = {"waited": round(meta["waited"], 4), "blocked": round(meta["blocked"], 4),
                   "write": round(write_s, 4), "upload": round(upload_s, 4)}
        manifest = Manifest(step=step, world_size=self.world.world_size, strategy=meta["strategy"],
                            format=self.format.name if self.format else "dcp",
                            config_hash=config_hash(self.config_yaml), data=meta["data"],
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
        storage_data = getattr(metadata, "storage_data", None)
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

    def finish(self) -> None:
        """At the end of training: the last save must commit, or the job reports it."""
        outcome = self.wait()
        if outcome is not None and not outcome.committed:
            raise CheckpointError(f"the checkpoint of step {outcome.step} did not commit: {outcome.error}. "
                                  f"The newest committed step is {self.last_committed}; a restart resumes "
                                  "from it")

    def close(self) -> None:
        if self.pending is not None:
            self.wait()
        if self.format is not None:
            self.format.close()
        if self.group is not None and not self.broken:
            dist.destroy_process_group(self.group)
            self.group = None
