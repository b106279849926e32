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

from hpc.checkpoint.drain import (
    clean_persistent,
    clean_scratch,
    stage_view,
    upload_step,
    verify_checksums,
)
from hpc.checkpoint.formats import StateFormat, load_rng, save_rng
from hpc.checkpoint.manifest import (
    MANIFEST,
    Candidate,
    CheckpointError,
    Manifest,
    changed_keys,
    committed,
    config_hash,
    parse_step_dir,
    read_manifest,
    step_dir,
)
from hpc.checkpoint.storage import FileEntry, Storage, open_storage
from hpc.checkpoint.space import check_space
from hpc.config import Config
from hpc.faults import fault_point
from hpc.train.data import GlobalBatches
from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")

CONFIG_FILE = "config.yaml"
TRAINER_FILE = "trainer.json"


@dataclass
class SaveOutcome:
    step: int
    committed: bool
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


class Checkpointer:
    """One per rank. Implements the loop's `Checkpoints` protocol (hpc.train.loop)."""

    def __init__(self, cfg: Config, world: World, *, location: str, scratch: Path, config_yaml: str) -> None:
        self.cfg, self.ckpt, self.world = cfg, cfg.checkpoint, world
        self.storage: Storage = open_storage(location)
        self.scratch = scratch
        self.node = world.rank // world.local_world_size
        self.num_nodes = max(world.world_size // world.local_world_size, 1)
        self.drainer = world.local_rank == 0  # uploads and stages its node's files
        self.config_yaml = config_yaml
        self.group = None
        if dist.is_initialized() and world.world_size > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.ckpt.timeout_s))
        self.format: StateFormat | None = None
        self.pending: Future | None = None
        self.outcomes: list[SaveOutcome] = []
        self.resumed_step: int | None = None
        self.in_flight: int | None = None

    # --- collectives over the checkpoint group -------------------------------------------------

    def _all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    # --- protocol -------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.ckpt.every_steps
        return bool(every) and step % every == 0

    def restore(self, engine: Engine, batches: GlobalBatches) -> int:
        """Load the checkpoint `checkpoint.resume` names; returns the step to start from."""
        self.format = StateFormat(engine, group=self.group, streams=self.ckpt.streams,
                                  async_save=self.ckpt.async_save)
        problems = self._all_gather(check_space(self.cfg, self.storage, self.scratch, self.num_nodes,
                                                drainer=self.drainer, rank=self.world.rank))
        problem = next((p for p in problems if p), None)
        if problem:
            raise CheckpointError(problem)
        mode = str(self.ckpt.resume)
        if mode == "never":
            if self.world.rank == 0:
                log.info("checkpoint.resume=never: starting from step 0")
            return 0
        storage, only = self.storage, None
        if mode.isdigit():
            only = int(mode)
        elif mode != "auto":
            parent, _, name = mode.rstrip("/").rpartition("/")
            only = parse_step_dir(name)
            if only is None:
                raise CheckpointError(f"checkpoint.resume={mode}: not a step folder (step-N)")
            storage = open_storage(parent)
        candidates = self._candidates(storage, only)
        for candidate in candidates:
            problem, counts = self._prepare(storage, candidate)
            if problem is None:
                return self._load(storage, candidate, engine, batches, counts)
            if only is not None:
                raise CheckpointError(f"checkpoint.resume={mode}: {storage.url}/{step_dir(only)} does not "
                                      f"verify: {problem}")
            if self.world.rank == 0:
                log.warning("checkpoint %s/%s skipped: %s; falling back to the step before",
                            storage.url, step_dir(candidate.step), problem)
        if self.world.rank == 0:
            log.info("no committed checkpoint in %s: starting from step 0", storage.url)
        return 0

    def _candidates(self, storage: Storage, only: int | None) -> list[Candidate]:
        if self.world.rank == 0:
            if only is None:
                found = committed(storage)
            else:
                candidate = read_manifest(storage, only)
                if candidate.problem:
                    found = CheckpointError(f"checkpoint.resume: {storage.url}/{step_dir(only)} is not "
                                            f"a committed checkpoint: {candidate.problem}")
                else:
                    found = [candidate]
        else:
            found = None
        found = self._broadcast(found)
        if isinstance(found, CheckpointError):
            raise found
        return found

    def _prepare(self, storage: Storage, candidate: Candidate) -> tuple[str | None, dict[str, int]]:
        """Every node gets a complete, verified view of the step in its scratch; all ranks agree."""
        manifest = candidate.manifest
        assert manifest is not None
        entries = {e.name: e for e in manifest.files}
        problem, counts, linked = None, {}, []
        if self.drainer:
            try:
                counts, linked = stage_view(manifest.files, storage, candidate.step,
                                            self.scratch / step_dir(candidate.step), retries=self.ckpt.retries,
                                            backoff_s=self.ckpt.backoff_s, streams=self.ckpt.streams)
            except OSError as err:
                problem = str(err)
        # Files read from the persistent copy are checksummed once, shared out over the nodes.
        to_check = sorted(set().union(*self._all_gather(linked)))
        if self.drainer and problem is None:
            mine = [name for i, name in enumerate(to_check) if i % self.num_nodes == self.node]
            try:
                problem = verify_checksums(storage, candidate.step, entries, mine)
            except OSError as err:
                problem = str(err)
        problems = [p for p in self._all_gather(problem) if p]
        return (problems[0] if problems else None), counts

    def _load(self, storage: Storage, candidate: Candidate, engine: Engine, batches: GlobalBatches,
              counts: dict[str, int]) -> int:
        manifest = candidate.manifest
        assert manifest is not None and self.format is not None
        started = time.perf_counter()
        view = self.scratch / step_dir(candidate.step)
        if manifest.format != self.format.name:
            raise CheckpointError(
                f"{storage.url}/{view.name} was saved by strategy {manifest.strategy} ({manifest.format} "
                f"format); strategy {engine.name} cannot load it. HINT: convert it with "
                "tools/ckpt_convert, or resume with the strategy that saved it")
        self.format.load(view, manifest.world_size)
        if manifest.world_size == self.world.world_size:
            load_rng(view, self.world.rank)
        elif self.world.rank == 0:
            log.warning("saved at world size %d, now %d: random states start afresh (model, optimizer "
                        "and data position are resharded exactly)", manifest.world_size, self.world.world_size)
        batches.load_state_dict(manifest.data)
        self._log_config_changes(view)
        self.resumed_step = candidate.step
        if self.world.rank == 0:
            log.info("resumed from step %d (%s/%s): %.1f MB in %.2f s, data at sample %d; files from "
                     "scratch %d, linked %d, downloaded %d", candidate.step, storage.url, view.name,
                     manifest.total_bytes / 1e6, time.perf_counter() - started,
                     manifest.data["consumed_samples"], counts.get("local", 0), counts.get("linked", 0),
                     counts.get("downloaded", 0))
        return candidate.step

    def _log_config_changes(self, view: Path) -> None:
        if self.world.rank != 0 or not (view / CONFIG_FILE).exists():
            return
        import yaml

        old = yaml.safe_load((view / CONFIG_FILE).read_text()) or {}
        new = yaml.safe_load(self.config_yaml) or {}
        changed = [k for k in changed_keys(old, new) if not k.startswith("run.")]
        if changed:
            log.warning("config changed since this checkpoint was saved: %s", ", ".join(changed))

    def save(self, step: int, engine: Engine, batches: GlobalBatches) -> None:
        """Checkpoint the state after `step` steps; returns once training may go on."""
        assert self.format is not None, "restore() first: it also checks free space"
        started = time.perf_counter()
        self.wait()  # one save in flight at a time (and the staging buffers are reused)
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
        self.pending, self.in_flight = future, step
        meta = {"step": step, "data": data, "blocked": blocked, "waited": waited, "started": started,
                "strategy": engine.name}
        threading.Thread(target=self._finish, args=(folder, written, meta, future), daemon=True,
                         name=f"hpc-ckpt-{step}").start()

    def _finish(self, folder: Path, written: Future, meta: dict[str, Any], future: Future) -> None:
        step = meta["step"]
        try:
            written.result()
            write_s = time.perf_counter() - meta["started"]
            if self.world.rank == 0:
                # A folder of this step from an abandoned attempt: its manifest must not outlive it.
                self.storage.remove(f"{step_dir(step)}/{MANIFEST}")
            self._barrier()  # every node's shards are complete on its scratch
            up_started = time.perf_counter()
            result: list[FileEntry] | str = []
            if self.drainer:
                try:
                    result = upload_step(folder, self.storage, step, streams=self.ckpt.streams,
                                         retries=self.ckpt.retries, backoff_s=self.ckpt.backoff_s,
                                         rank=self.world.rank)
                except OSError as err:
                    result = f"upload from node {self.node} failed: {err}"
            upload_s = time.perf_counter() - up_started
            gathered = self._all_gather((result, upload_s))
            outcome = SaveOutcome(step, False)
            if self.world.rank == 0:
                outcome = self._commit(step, meta, gathered, write_s)
            outcome = self._broadcast(outcome)
            if self.drainer:
                keep = {step} if outcome.committed else {step, self.last_committed or -1}
                clean_scratch(self.scratch, keep=keep)
            future.set_result(outcome)
        except BaseException as err:  # noqa: BLE001 - reported to whoever waits on the save
            log.error("checkpoint step %d failed: %s", step, err)
            future.set_result(SaveOutcome(step, False, f"{type(err).__name__}: {err}"))

    def _commit(self, step: int, meta: dict[str, Any], gathered: list[Any], write_s: float) -> SaveOutcome:
        errors = [r for r, _ in gathered if isinstance(r, str)]
        if errors:
            log.error("checkpoint step %d not committed: %s", step, "; ".join(errors))
            return SaveOutcome(step, False, "; ".join(errors))
        files: dict[str, FileEntry] = {}
        for entries, _ in gathered:
            for entry in entries:
                seen = files.setdefault(entry.name, entry)
                if seen.checksum != entry.checksum:
                    message = f"two nodes wrote different {entry.name}"
                    log.error("checkpoint step %d not committed: %s", step, message)
                    return SaveOutcome(step, False, message)
        upload_s = max(s for _, s in gathered)
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
        self.last_committed = step
        try:
            deleted = clean_persistent(self.storage, committed(self.storage, warn=False),
                                       keep_last=self.ckpt.keep_last, keep_every=self.ckpt.keep_every,
                                       protected={step} | ({self.resumed_step} if self.resumed_step is not None else set()))
            if deleted:
                log.info("retention: deleted %s", ", ".join(step_dir(s) for s in deleted))
        except OSError as err:
            log.warning("retention skipped: %s", err)
        return SaveOutcome(step, True, seconds=seconds, bytes=total)

    last_committed: int | None = None

    def wait(self) -> SaveOutcome | None:
        """Block until the save in flight (if any) committed or failed."""
        if self.pending is None:
            return None
        outcome = self.pending.result()
        self.pending, self.in_flight = None, None
        self.outcomes.append(outcome)
        if outcome.committed:
            self.last_committed = outcome.step
        return outcome

    def finish(self) -> None:
        """At the end of training: the last save must commit, or the job reports it."""
        outcome = self.wait()
        if outcome is not None and not outcome.committed:
            raise CheckpointError(f"the checkpoint of step {outcome.step} did not commit: {outcome.error}")

    def close(self) -> None:
        if self.pending is not None:
            self.wait()
        if self.format is not None:
            self.format.close()
