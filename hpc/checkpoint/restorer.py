"""The restoring half of the checkpointer: which step to resume, a verified copy of it on every
node, and loading it into the engine.

    restore()    newest committed step whose files verify: each node builds scratch/step-N from
                 its own scratch copy where it matches the manifest, else links or downloads the
                 persistent copy; checksums are checked (shared out over nodes); all ranks agree,
                 or fall back to the step before with a warning naming the problem.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hpc.checkpoint.collectives import Collectives
from hpc.checkpoint.formats import StateFormat, load_rng
from hpc.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST,
    RETIRED,
    Candidate,
    CheckpointError,
    committed,
    parse_step_dir,
    read_manifest,
    scan,
    step_dir,
)
from hpc.checkpoint.space import check_space
from hpc.checkpoint.storage import Storage, open_storage
from hpc.checkpoint.transfer import ChecksumMismatch, stage_view, verify_checksums
from hpc.config import Config
from hpc.config.diff import changed_keys
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
        return 0

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
        to_check = sorted(set().union(*self.collectives.gather(linked)))
        if self.drainer and problem is None and fatal is None:
            mine = [name for i, name in enumerate(to_check) if i % self.num_nodes == self.node]
            try:
                problem = verify_checksums(storage, candidate.step, entries, mine, streams=self.ckpt.streams)
            except FileNotFoundError as err:
                problem = str(err)
            except Exception as err:  # noqa: BLE001
                fatal = f"reading {storage.url}/{step_dir(candidate.step)} failed: {err}"
        outcomes = self.collectives.gather((problem, fatal))
        self.collectives.raise_any(next((f for _, f in outcomes if f), None))
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
        self.collectives.barrier()

    def _load(self, storage: Storage, candidate: Candidate, state_format: StateFormat, engine: Engine,
              batches: GlobalBatches, counts: dict[str, int]) -> int:
        manifest = candidate.manifest
        assert manifest is not None
        started = time.perf_counter()
        view = self.scratch / step_dir(candidate.step)
        self._log_config_changes(view)
        if manifest.format != state_format.name:
            raise CheckpointError(
                f"{storage.url}/{view.name} was saved by strategy {manifest.strategy} ({manifest.format} "
                f"format); strategy {engine.name} cannot load it. HINT: convert it with "
                "tools/ckpt_convert, or resume with the strategy that saved it")
        if manifest.format == "deepspeed" and manifest.zero_stage != self.cfg.strategy.zero_stage:
            raise CheckpointError(
                f"{storage.url}/{view.name} was saved with ZeRO stage {manifest.zero_stage}; this run uses "
                f"stage {self.cfg.strategy.zero_stage}. HINT: resume with strategy=zero{manifest.zero_stage}, "
                "or convert it with tools/ckpt_convert")
        state_format.load(view, manifest.world_size)
        if manifest.world_size == self.world.world_size:
            load_rng(view, self.world.rank)
        else:
            seed_rank_streams(self.cfg.train.seed, self.world.rank, step=candidate.step)
            if self.world.rank == 0:
                log.warning("saved at world size %d, now %d: random states are seeded afresh for step %d "
                            "(model, optimizer and data position are resharded exactly)",
                            manifest.world_size, self.world.world_size, candidate.step)
        batches.load_state_dict(manifest.data)
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
