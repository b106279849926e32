"""The restoring half of the checkpointer: which step to resume, a verified copy of it on every
node, and loading it into the engine.

    restore()    newest committed step whose files verify: each node builds scratch/step-N from
                 its own scratch copy where it matches the manifest, else links or downloads the
                 persistent copy; checksums are checked (shared out over nodes); all ranks agree,
                 or fall back to the step before with a warning naming the problem.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hpc.checkpoint.collectives import Collectives
from hpc.checkpoint.convert.pipeline import (ReaderSpec, converted_manifest, open_reader, open_writer, run_part,
                                             write_extras)
from hpc.checkpoint.convert.resume import conversion_reason, converted_folder
from hpc.checkpoint.convert.steps import Target, state_of, target_for_job
from hpc.checkpoint.formats import RNG_DIR, StateFormat, load_rng
from hpc.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST,
    RETIRED,
    TRAINER_FILE,
    Candidate,
    CheckpointError,
    Manifest,
    committed,
    parse_step_dir,
    read_manifest,
    scan,
    step_dir,
)
from hpc.checkpoint.space import check_space
from hpc.checkpoint.storage import Storage, open_storage
from hpc.checkpoint.transfer import ChecksumMismatch, stage_view, upload_step, verify_checksums
from hpc.config import Config
from hpc.config.diff import changed_keys
from hpc.faults import fault_point
from hpc.train.data import GlobalBatches
from hpc.train.rng import seed_rank_streams
from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")


class Restorer:
    """restore(): the step to start from, with model, optimizer, RNG and data position loaded."""

    def __init__(self, cfg: Config, world: World, collectives: Collectives, storage: Storage, scratch: Path,
                 *, node: int, num_nodes: int, host: str, restart_count: int, config_yaml: str) -> None:
        self.cfg, self.ckpt, self.world = cfg, cfg.checkpoint, world
        self.collectives, self.storage, self.scratch = collectives, storage, scratch
        # From the scheduler, not from rank arithmetic: ranks need not be laid out node by node.
        self.node, self.num_nodes, self.host = node, max(num_nodes, 1), host
        self.drainer = world.local_rank == 0  # stages its node's files
        self.restart_count, self.config_yaml = restart_count, config_yaml
        self.resumed_step: int | None = None
        self.window: tuple[float, float] | None = None
        """Wall-clock start and end of restore(), for the requeue timeline."""

    def restore(self, state_format: StateFormat, engine: Engine, batches: GlobalBatches) -> int:
        """Load the checkpoint `checkpoint.resume` names; returns the step to start from."""
        started = time.time()
        try:
            return self._restore(state_format, engine, batches)
        finally:
            self.window = (started, time.time())

    def _restore(self, state_format: StateFormat, engine: Engine, batches: GlobalBatches) -> int:
        self.collectives.raise_any(self._setup_problem())
        mode = str(self.ckpt.resume)
        if mode not in ("auto", "never") and self.restart_count > 0:
            # An explicit step was for the first start; a restart continues this run's own line.
            if self.world.rank == 0:
                log.info("restart %d: resuming from the newest committed step, not checkpoint.resume=%s",
                         self.restart_count, mode)
            mode = "auto"
        if mode == "never" and self.restart_count > 0:
            mode = "auto"  # 'never' was about other runs' checkpoints; a restart continues its own
        if mode == "never":
            existing = self.collectives.broadcast([c.step for c in committed(self.storage, warn=False)]
                                       if self.world.rank == 0 else None)
            if existing:
                raise CheckpointError(
                    f"checkpoint.resume=never, but {self.storage.url} already holds committed steps "
                    f"{existing}: a new run there would mix with them and retention would delete them. "
                    "HINT: use a new run.name or checkpoint.dir, or checkpoint.resume=auto to continue")
            if self.world.rank == 0:
                log.info("checkpoint.resume=never: starting from step 0")
            self._init_weights(engine)
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
            converted = self._converted_copy(storage, candidate)
            if converted is not None:  # converted for this job's size and strategy by an earlier start
                folder, copy = converted
                problem, counts = self._prepare(storage, copy, folder=folder)
                if problem is None:
                    if only is not None:
                        self._retire_newer(only)
                    return self._load(storage, copy, state_format, engine, batches, counts, folder=folder)
                if self.world.rank == 0:
                    log.warning("converted copy %s/%s skipped: %s; converting the step again",
                                storage.url, folder, problem)
            problem, counts = self._prepare(storage, candidate)
            if problem is None:
                if only is not None:
                    self._retire_newer(only)
                target = self._conversion_target(candidate)
                if target is not None:
                    folder, candidate, counts = self._convert(storage, candidate, target)
                    return self._load(storage, candidate, state_format, engine, batches, counts, folder=folder)
                return self._load(storage, candidate, state_format, engine, batches, counts)
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
        self._init_weights(engine)
        return 0

    def _init_weights(self, engine: Engine) -> None:
        """No step to resume: start from the Hugging Face folder checkpoint.init_from, if set."""
        if not self.ckpt.init_from:
            return
        from hpc.checkpoint.convert.hf import load_init_weights  # safetensors only when asked for

        problem = None
        try:
            load_init_weights(engine, self.cfg, self.world)
        except (ValueError, OSError, ImportError) as err:
            problem = f"checkpoint.init_from={self.ckpt.init_from}: {err}"
        self.collectives.raise_any(problem)  # one rank's bad read must not leave the others training

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
        hosts = {h for h in self.collectives.gather(self.host if self.drainer else None) if h}
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
            read = scan(storage) if only is None else [read_manifest(storage, only)]
            if only is not None and read[0].problem:
                found = CheckpointError(f"checkpoint.resume: {storage.url}/{step_dir(only)} is not a "
                                        f"committed checkpoint: {read[0].problem}")
            else:
                found = ([c for c in read if c.problem is None],
                         [f"{step_dir(c.step)}: {c.problem}" for c in read if c.problem and c.has_manifest])
        found = self.collectives.broadcast(found)
        if isinstance(found, CheckpointError):
            raise found
        return found

    def _prepare(self, storage: Storage, candidate: Candidate,
                 folder: str | None = None) -> tuple[str | None, dict[str, int]]:
        """Every node gets a complete, verified view of the step (or of its converted copy in
        `folder`) in its scratch; all ranks agree. A file that does not match the manifest is a
        problem with this step (the caller falls back); any other error (full scratch,
        unreachable storage) is raised on every rank."""
        manifest = candidate.manifest
        assert manifest is not None
        folder = folder or step_dir(candidate.step)
        entries = {e.name: e for e in manifest.files}
        problem, fatal, counts, linked = None, None, {}, []
        if self.drainer:
            try:
                counts, linked = stage_view(manifest.files, storage, candidate.step, self.scratch / folder,
                                            retries=self.ckpt.retries, backoff_s=self.ckpt.backoff_s,
                                            streams=self.ckpt.streams, prefix=folder)
            except (ChecksumMismatch, FileNotFoundError) as err:
                problem = str(err)
            except Exception as err:  # noqa: BLE001
                fatal = f"staging {storage.url}/{step_dir(candidate.step)} on {self.host or 'this node'} failed: {err}"
        # Files read from the persistent copy are checksummed once, shared out over the nodes.
        to_check = sorted(set().union(*self.collectives.gather(linked)))
        if self.drainer and problem is None and fatal is None:
            mine = [name for i, name in enumerate(to_check) if i % self.num_nodes == self.node]
            try:
                problem = verify_checksums(storage, candidate.step, entries, mine, streams=self.ckpt.streams,
                                           prefix=folder)
            except FileNotFoundError as err:
                problem = str(err)
            except Exception as err:  # noqa: BLE001
                fatal = f"reading {storage.url}/{step_dir(candidate.step)} failed: {err}"
        outcomes = self.collectives.gather((problem, fatal))
        self.collectives.raise_any(next((f for _, f in outcomes if f), None))
        problems = [p for p, _ in outcomes if p]
        return (problems[0] if problems else None), counts

    def _conversion_target(self, candidate: Candidate) -> Target | None:
        """This job's target when it cannot load the step as saved and may convert it."""
        assert candidate.manifest is not None
        target = target_for_job(self.cfg, self.world.world_size)
        if self.ckpt.convert == "never" or conversion_reason(candidate.manifest, target) is None:
            return None
        return target

    def _converted_copy(self, storage: Storage, candidate: Candidate) -> tuple[str, Candidate] | None:
        """A committed converted copy of the step for this job, made by an earlier start."""
        target = self._conversion_target(candidate)
        if target is None:
            return None
        folder = converted_folder(candidate.step, target)
        found = None
        if self.world.rank == 0:
            copy = read_manifest(storage, candidate.step, folder)
            found = copy if copy.problem is None else None
        found = self.collectives.broadcast(found)
        return (folder, found) if found is not None else None

    def _convert(self, storage: Storage, candidate: Candidate,
                 target: Target) -> tuple[str, Candidate, dict[str, int]]:
        """Convert the step (staged and verified on every node) for this job and commit the copy
        inside the step folder; every rank writes its part of the files. Returns the copy."""
        manifest = candidate.manifest
        assert manifest is not None
        started = time.perf_counter()
        reason = conversion_reason(manifest, target)
        folder = converted_folder(candidate.step, target)
        source, out = self.scratch / step_dir(candidate.step), self.scratch / folder
        if self.drainer:
            shutil.rmtree(out, ignore_errors=True)  # a leftover of an interrupted conversion
        self.collectives.barrier()
        rank = self.world.rank
        if rank == 0:
            log.info("step %d was %s: converting it (checkpoint.convert=auto)", candidate.step, reason)
            # A manifest left by an attempt that did not verify must go before new files land.
            storage.remove(f"{folder}/{MANIFEST}")
        state = state_of(source, manifest)
        writer, record, error, moved, n_parts = None, None, None, 0, 0
        try:
            out.mkdir(parents=True, exist_ok=True)
            reader = open_reader(manifest.format, source, state)
            try:
                infos = reader.infos()
                moved = sum(i.nbytes for i in infos)
                writer = open_writer(target, out, reader.state, infos)
                parts = writer.parts(self.world.world_size)
                n_parts = len(parts)
                if rank < len(parts):
                    record = run_part(ReaderSpec(manifest.format, source, reader.state), parts[rank], reader)
            finally:
                reader.close()
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = f"converting {step_dir(candidate.step)} on rank {rank} failed: {err}"
        results = self.collectives.gather((record, error))
        errors = [e for _, e in results if e]
        if rank == 0 and not errors:
            try:
                assert writer is not None
                writer.finish([r for r, _ in results[:n_parts]])
                write_extras(out, state, target, config_yaml=self.config_yaml, source_folder=source)
            except Exception as err:  # noqa: BLE001
                errors.append(f"finishing the converted {step_dir(candidate.step)} failed: {err}")
        self.collectives.raise_any(self.collectives.broadcast(errors[0] if errors else None))
        entries, upload_error = [], None
        if self.drainer:
            try:
                entries = upload_step(out, storage, candidate.step, streams=self.ckpt.streams,
                                      retries=self.ckpt.retries, backoff_s=self.ckpt.backoff_s, rank=rank,
                                      prefix=folder)
            except Exception as err:  # noqa: BLE001
                upload_error = f"uploading the converted step from node {self.node} failed: {err}"
        uploads = self.collectives.gather((entries, upload_error))
        outcome: Any = None
        if rank == 0:
            outcome = next((e for _, e in uploads if e), None)
            if outcome is None:
                files = {entry.name: entry for node_entries, _ in uploads for entry in node_entries}
                copy = converted_manifest(candidate.step, target, state, self.config_yaml, list(files.values()),
                                          {"convert": round(time.perf_counter() - started, 3)})
                storage.write_atomic(f"{folder}/{MANIFEST}", copy.to_json())
                outcome = Candidate(candidate.step, copy)
                log.info("converted step %d for %s in %.2f s: %d MB of model and optimizer state, %d files, "
                         "committed as %s/%s (the original step is unchanged and still loads at its own "
                         "size and strategy)", candidate.step, target.describe(), time.perf_counter() - started,
                         moved / 1e6, len(files), storage.url, folder)
        outcome = self.collectives.broadcast(outcome)
        if isinstance(outcome, str):
            raise CheckpointError(outcome)
        return folder, outcome, {"local": len(outcome.manifest.files)}

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
        self.collectives.barrier()

    def _load(self, storage: Storage, candidate: Candidate, state_format: StateFormat, engine: Engine,
              batches: GlobalBatches, counts: dict[str, int], folder: str | None = None) -> int:
        manifest = candidate.manifest
        assert manifest is not None
        started = time.perf_counter()
        folder = folder or step_dir(candidate.step)
        view = self.scratch / folder
        fault_point("restore", step=candidate.step, rank=self.world.rank)
        self._log_config_changes(view)
        reason = conversion_reason(manifest, target_for_job(self.cfg, self.world.world_size))
        if reason is not None:  # only with checkpoint.convert=never
            raise CheckpointError(
                f"{storage.url}/{folder} was {reason}, which cannot load it as saved. HINT: set "
                f"checkpoint.convert=auto (the job converts it), convert it with tools/ckpt_convert reshard, "
                f"or resume with the strategy and world size that saved it")
        state_format.load(view, manifest.world_size)
        own_rng = f"{RNG_DIR}/rank-{self.world.rank}.pt"
        same_world = manifest.world_size == self.world.world_size
        if same_world and any(e.name == own_rng for e in manifest.files):
            if not load_rng(view, self.world.rank):
                seed_rank_streams(self.cfg.train.seed, self.world.rank, step=candidate.step)
                log.warning("rank %d: %s/%s/%s holds pickled objects, which are never loaded (no code from "
                            "storage runs): random states are seeded afresh for step %d", self.world.rank,
                            storage.url, folder, own_rng, candidate.step)
        else:
            seed_rank_streams(self.cfg.train.seed, self.world.rank, step=candidate.step)
            if self.world.rank == 0:
                saved = self._saved_world_size(view, manifest)
                log.warning("saved at world size %d, now %d: random states are seeded afresh for step %d "
                            "(model, optimizer, data position and LR schedule are resharded exactly)",
                            saved, self.world.world_size, candidate.step)
        batches.load_state_dict(manifest.data)
        self.resumed_step = candidate.step
        if self.world.rank == 0:
            log.info("resumed from step %d (%s/%s): %.1f MB in %.2f s, data at sample %d; files from "
                     "scratch %d, linked %d, downloaded %d", candidate.step, storage.url, folder,
                     manifest.total_bytes / 1e6, time.perf_counter() - started,
                     manifest.data["consumed_samples"], counts.get("local", 0), counts.get("linked", 0),
                     counts.get("downloaded", 0))
        return candidate.step

    @staticmethod
    def _saved_world_size(view: Path, manifest: Manifest) -> int:
        """The world size the training state was saved at (a converted copy records its source's)."""
        try:
            trainer = json.loads((view / TRAINER_FILE).read_text())
            return int(trainer.get("converted_from", {}).get("world_size", manifest.world_size))
        except (OSError, ValueError, TypeError):
            return manifest.world_size

    def _log_config_changes(self, view: Path) -> None:
        if self.world.rank != 0 or not (view / CONFIG_FILE).exists():
            return
        import yaml

        old = yaml.safe_load((view / CONFIG_FILE).read_text()) or {}
        new = yaml.safe_load(self.config_yaml) or {}
        changed = [k for k in changed_keys(old, new) if not k.startswith("run.")]
        if changed:
            log.warning("config changed since this checkpoint was saved: %s", ", ".join(changed))
