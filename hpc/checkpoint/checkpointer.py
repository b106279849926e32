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
    ChecksumMismatch,
    clean_persistent,
    clean_scratch,
    stage_view,
    upload_step,
    verify_checksums,
)
from hpc.checkpoint.formats import RNG_DIR, StateFormat, load_rng, save_rng
from hpc.checkpoint.manifest import (
    MANIFEST,
    Candidate,
    CheckpointError,
    Manifest,
    changed_keys,
    committed,
    config_hash,
    list_steps,
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
RETIRED = "manifest.retired.json"


@dataclass
class SaveOutcome:
    step: int
    committed: bool
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


class Checkpointer:
    """One per rank. Implements the loop's `Checkpoints` protocol (hpc.train.loop)."""

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

    def _barrier(self) -> None:
        if self.group is not None and self.world.world_size > 1:
            dist.barrier(group=self.group)

    # --- protocol -------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.ckpt.every_steps
        return bool(every) and step % every == 0

    def restore(self, engine: Engine, batches: GlobalBatches) -> int:
        """Load the checkpoint `checkpoint.resume` names; returns the step to start from."""
        self.format = StateFormat(engine, group=self.group, streams=self.ckpt.streams,
                                  async_save=self.ckpt.async_save)
        self._raise_any(self._setup_problem())
        mode = str(self.ckpt.resume)
        if mode not in ("auto", "never") and self.restart_count > 0:
            # An explicit step was for the first start; a restart continues this run's own line.
            if self.world.rank == 0:
                log.info("restart %d: resuming from the newest committed step, not checkpoint.resume=%s",
                         self.restart_count, mode)
            mode = "auto"
        if mode == "never":
            existing = self._broadcast([c.step for c in committed(self.storage, warn=False)]
                                       if self.world.rank == 0 else None)
            if existing:
                raise CheckpointError(
                    f"checkpoint.resume=never, but {self.storage.url} already holds committed steps "
                    f"{existing}: a new run there would mix with them and retention would delete them. "
                    "HINT: use a new run.name or checkpoint.dir, or checkpoint.resume=auto to continue")
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
        candidates, broken = self._candidates(storage, only)
        for candidate in candidates:
            problem, counts = self._prepare(storage, candidate)
            if problem is None:
                if only is not None:
                    self._retire_newer(only)
                return self._load(storage, candidate, engine, batches, counts)
            if only is not None:
                raise CheckpointError(f"checkpoint.resume={mode}: {storage.url}/{step_dir(only)} does not "
                                      f"verify: {problem}")
            if self.world.rank == 0:
                log.warning("checkpoint %s/%s skipped: %s; falling back to the step before",
                            storage.url, step_dir(candidate.step), problem)
            broken.append(f"{step_dir(candidate.step)}: {problem}")
        if broken:
            # Starting over would overwrite (and retention delete) what may be repairable.
            raise CheckpointError(
                f"{storage.url} holds committed checkpoints but none verifies ({'; '.join(broken)}); "
                "nothing was loaded or deleted. HINT: restore the files, resume an older step with "
                "checkpoint.resume=<path of step-N>, or start afresh with a new run.name or checkpoint.dir")
        if self.world.rank == 0:
            log.info("no committed checkpoint in %s: starting from step 0", storage.url)
        return 0

    def _raise_any(self, problem: str | None) -> None:
        """Every rank raises together (the same message), or none does."""
        problems = [p for p in self._all_gather(problem) if p]
        if problems:
            raise CheckpointError(problems[0])

    def _setup_problem(self) -> str | None:
        """Space, and scratch that is really node-local and apart from the checkpoint store."""
        problem = None
        local = self.storage.local_path("")
        if local is not None:
            store, scratch = local.resolve(), self.scratch.resolve()
            if store == scratch or store in scratch.parents or scratch in store.parents:
                problem = (f"checkpoint.dir {store} and the scratch folder {scratch} overlap: uploads "
                           "would overwrite their own source. HINT: point checkpoint.dir at persistent storage")
        problem = problem or check_space(self.cfg, self.storage, self.scratch, self.num_nodes,
                                         drainer=self.drainer, rank=self.world.rank)
        if self.num_nodes > 1:  # a collective: every rank goes through it
            problem = self._shared_scratch_problem(problem)
        return problem

    def _shared_scratch_problem(self, problem: str | None) -> str | None:
        """Each node's first rank leaves a marker in its scratch; seeing another node's marker means
        the scratch folder is shared, and the nodes would upload and delete each other's files."""
        if self.drainer:
            self.scratch.mkdir(parents=True, exist_ok=True)
            (self.scratch / f".host-{self.host}").touch()
        hosts = {h for h in self._all_gather(self.host if self.drainer else None) if h}
        if problem is None and self.drainer:
            others = sorted(h for h in hosts - {self.host} if (self.scratch / f".host-{h}").exists())
            if others:
                problem = (f"scratch folder {self.scratch} on {self.host} also holds the marker of "
                           f"{', '.join(others)}: cluster.scratch_dir must be node-local (e.g. "
                           "/local_nvme/{user}/{job_id}), not shared storage")
        return problem

    def _candidates(self, storage: Storage, only: int | None) -> tuple[list[Candidate], list[str]]:
        """Committed steps to try, newest first, and the committed ones already known broken."""
        found: Any = None
        if self.world.rank == 0:
            steps = list_steps(storage) if only is None else [only]
            read = [read_manifest(storage, step) for step in steps]
            for c in read:
                if c.problem and only is None:
                    log.warning("checkpoint %s/%s skipped: %s", storage.url, step_dir(c.step), c.problem)
            if only is not None and read[0].problem:
                found = CheckpointError(f"checkpoint.resume: {storage.url}/{step_dir(only)} is not a "
                                        f"committed checkpoint: {read[0].problem}")
            else:
                found = ([c for c in read if c.problem is None],
                         [f"{step_dir(c.step)}: {c.problem}" for c in read if c.problem and c.has_manifest])
        found = self._broadcast(found)
        if isinstance(found, CheckpointError):
            raise found
        return found

    def _prepare(self, storage: Storage, candidate: Candidate) -> tuple[str | None, dict[str, int]]:
        """Every node gets a complete, verified view of the step in its scratch; all ranks agree.
        A file that does not match the manifest is a problem with this step (the caller falls
        back); any other error (full scratch, unreachable storage) is raised on every rank."""
        manifest = candidate.manifest
        assert manifest is not None
        entries = {e.name: e for e in manifest.files}
        problem, fatal, counts, linked = None, None, {}, []
        if self.drainer:
            try:
                counts, linked = stage_view(manifest.files, storage, candidate.step,
                                            self.scratch / step_dir(candidate.step), retries=self.ckpt.retries,
                                            backoff_s=self.ckpt.backoff_s, streams=self.ckpt.streams)
            except (ChecksumMismatch, FileNotFoundError) as err:
                problem = str(err)
            except Exception as err:  # noqa: BLE001
                fatal = f"staging {storage.url}/{step_dir(candidate.step)} on {self.host or 'this node'} failed: {err}"
        # Files read from the persistent copy are checksummed once, shared out over the nodes.
        to_check = sorted(set().union(*self._all_gather(linked)))
        if self.drainer and problem is None and fatal is None:
            mine = [name for i, name in enumerate(to_check) if i % self.num_nodes == self.node]
            try:
                problem = verify_checksums(storage, candidate.step, entries, mine, streams=self.ckpt.streams)
            except FileNotFoundError as err:
                problem = str(err)
            except Exception as err:  # noqa: BLE001
                fatal = f"reading {storage.url}/{step_dir(candidate.step)} failed: {err}"
        outcomes = self._all_gather((problem, fatal))
        self._raise_any(next((f for _, f in outcomes if f), None))
        problems = [p for p, _ in outcomes if p]
        return (problems[0] if problems else None), counts

    def _retire_newer(self, step: int) -> None:
        """Resuming an older step starts a new line of history: committed steps after it stop
        counting (their manifest is renamed, not deleted), so that a restart's `auto` and
        retention see only the new line."""
        if self.world.rank == 0:
            for newer in [c.step for c in committed(self.storage, warn=False) if c.step > step]:
                name = f"{step_dir(newer)}/{MANIFEST}"
                data = self.storage.read_bytes(name)
                if data is not None:
                    self.storage.write_atomic(f"{step_dir(newer)}/{RETIRED}", data)
                    self.storage.remove(name)
                    log.warning("resuming step %d: %s/%s set aside (its manifest is now %s)", step,
                                self.storage.url, step_dir(newer), RETIRED)
        self._barrier()

    def _load(self, storage: Storage, candidate: Candidate, engine: Engine, batches: GlobalBatches,
              counts: dict[str, int]) -> int:
        manifest = candidate.manifest
        assert manifest is not None and self.format is not None
        started = time.perf_counter()
        view = self.scratch / step_dir(candidate.step)
        self._log_config_changes(view)
        if manifest.format != self.format.name:
            raise CheckpointError(
                f"{storage.url}/{view.name} was saved by strategy {manifest.strategy} ({manifest.format} "
                f"format); strategy {engine.name} cannot load it. HINT: convert it with "
                "tools/ckpt_convert, or resume with the strategy that saved it")
        if manifest.format == "deepspeed" and manifest.zero_stage != self.cfg.strategy.zero_stage:
            raise CheckpointError(
                f"{storage.url}/{view.name} was saved with ZeRO stage {manifest.zero_stage}; this run uses "
                f"stage {self.cfg.strategy.zero_stage}. HINT: resume with strategy=zero{manifest.zero_stage}, "
                "or convert it with tools/ckpt_convert")
        self.format.load(view, manifest.world_size)
        if manifest.world_size == self.world.world_size:
            load_rng(view, self.world.rank)
        elif self.world.rank == 0:
            log.warning("saved at world size %d, now %d: random states start afresh (model, optimizer "
                        "and data position are resharded exactly)", manifest.world_size, self.world.world_size)
        batches.load_state_dict(manifest.data)
        self.resumed_step = self.last_committed = candidate.step
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
