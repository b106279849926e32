"""Moving a step from one format to another, one tensor at a time, and committing the result.

    reshard(src, out, ...)   any committed step -> a committed step a job with N ranks and a
                             strategy loads directly (verified against the source by default)
    write_step(...)          the shared core, also used by a job converting its own step on resume

The destination is written where it will live (or in a local folder uploaded after, for an object
store); its manifest is written last and atomically, so a conversion that fails or is killed
leaves nothing that looks committed. The source is only ever read.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc.checkpoint.convert.neutral import Part, Reader, StepState, TensorInfo, Writer
from hpc.checkpoint.convert.steps import (
    Source,
    Target,
    destination,
    open_source,
    refuse_unverified,
    target_from_preset,
    verify_source_async,
)
from hpc.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST,
    TRAINER_FILE,
    CheckpointError,
    Manifest,
)
from hpc.checkpoint.storage import FileEntry, Storage, file_checksum
from hpc.checkpoint.transfer import local_files, upload_step
from hpc.config.diff import config_hash

log = logging.getLogger("hpc")

RNG_NOTE = ("per-rank random states cannot map onto another world size: the resumed job seeds them "
            "afresh for the resumed step (model, optimizer, data position and LR schedule are exact)")


def open_reader(fmt: str, folder: Path, state: StepState, model_cfg: Any = None) -> Reader:
    """The Reader of a local, verified step folder in format `fmt`."""
    if fmt == "dcp":
        from hpc.checkpoint.convert.dcp import DcpReader

        return DcpReader(folder, state)
    if fmt == "deepspeed":
        from hpc.checkpoint.convert.zero import ZeroReader

        return ZeroReader(folder, state)
    if fmt == "hf":
        from hpc.checkpoint.convert.hf import HfReader

        return HfReader(folder, model_cfg)
    raise CheckpointError(f"{folder}: unknown checkpoint format {fmt!r}")


def open_writer(target: Target, folder: Path, state: StepState, infos: list[TensorInfo]) -> Writer:
    if target.format == "dcp":
        from hpc.checkpoint.convert.dcp import DcpWriter

        return DcpWriter(folder, state, infos, world_size=target.world_size, strategy_cfg=target.strategy)
    from hpc.checkpoint.convert.zero import ZeroWriter

    return ZeroWriter(folder, state, infos, world_size=target.world_size,
                      zero_stage=target.strategy.zero_stage, ds_config=target.ds_config or {})


@dataclass(frozen=True)
class ReaderSpec:
    """How a worker process opens the same source (readers hold open files: not picklable)."""

    fmt: str
    folder: Path
    state: StepState
    model_cfg: Any = None
    imported: bool = False
    """An import: the weights become fp32 master copies."""

    def open(self) -> Reader:
        reader = open_reader(self.fmt, self.folder, self.state, self.model_cfg)
        if self.imported:
            from hpc.checkpoint.convert.imports import ImportedReader

            return ImportedReader(reader, self.state)
        return reader


_counter: Any = None  # bytes moved, shared with worker processes


def _init_worker(counter: Any) -> None:
    global _counter
    _counter = counter
    torch.set_num_threads(1)  # the workers are the parallelism


def run_part(spec: ReaderSpec, part: Part, reader: Reader | None = None) -> Any:
    """Feed the part every tensor it asks for. The next tensor is read while the current one is
    written (disk reads and writes overlap; at most two tensors are held)."""
    own = reader is None
    reader = reader or spec.open()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="hpc-convert-read") as pool:
            keys = list(part.keys)
            ahead = pool.submit(reader.read, keys[0]) if keys else None
            for i, key in enumerate(keys):
                assert ahead is not None
                tensor = ahead.result()
                ahead = pool.submit(reader.read, keys[i + 1]) if i + 1 < len(keys) else None
                part.write(key, tensor)
                if _counter is not None:
                    with _counter.get_lock():
                        _counter.value += tensor.numel() * tensor.element_size()
                del tensor
        return part.close()
    finally:
        if own:
            reader.close()


class Progress:
    """A tqdm bar on a terminal, else a log line every `every_s` seconds."""

    def __init__(self, total: int, what: str, *, every_s: float = 10.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)
        self.shown, self.last_log, self.started = 0, time.monotonic(), time.monotonic()

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.shown)
        elif time.monotonic() - self.last_log >= self.every_s:
            self.last_log = time.monotonic()
            rate = done / max(time.monotonic() - self.started, 1e-9)
            log.info("%s: %.1f of %.1f GB (%.0f MB/s)", self.what, done / 1e9, self.total / 1e9, rate / 1e6)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _worker_context() -> Any:
    """Where worker processes come from: a fork server that imported this module (and so torch)
    once. Each worker is a fork of it: no 2-3 s torch import per worker, and torch's memory is
    shared among them rather than held once per worker. Never a fork of this process, whose
    torch thread pools may be in use (a fork copies them broken); spawn where there is no fork
    server (not POSIX)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def run_parts(spec: ReaderSpec, writer: Writer, *, workers: int, total: int, what: str) -> list[Any]:
    """Every part of the writer, in `workers` processes (in this one when 1), then writer.finish."""
    global _counter
    parts = writer.parts(max(1, workers))
    progress = Progress(total, what)
    ctx = _worker_context()
    counter = ctx.Value("q", 0)
    try:
        if len(parts) == 1:
            _counter = counter
            records: list[Any] = []
            done = threading.Event()

            def work() -> None:
                try:
                    reader = spec.open()
                    try:
                        records.append(run_part(spec, parts[0], reader))
                    finally:
                        reader.close()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    records.append(err)
                finally:
                    done.set()

            thread = threading.Thread(target=work, name="hpc-convert", daemon=True)
            thread.start()
            while not done.wait(0.5):
                progress.update(counter.value)
            if isinstance(records[0], BaseException):
                raise records[0]
        else:
            with ProcessPoolExecutor(len(parts), mp_context=ctx, initializer=_init_worker,
                                     initargs=(counter,)) as pool:
                futures = [pool.submit(run_part, spec, part) for part in parts]
                while not all(f.done() for f in futures):
                    progress.update(counter.value)
                    time.sleep(0.5)
                records = [f.result() for f in futures]
        progress.update(counter.value)
    finally:
        _counter = None
        progress.close()
    writer.finish(records)
    return records


@dataclass
class Report:
    """What a conversion did, for the command's output and the job's log."""

    source: str
    output: str
    step: int
    target: str
    tensors: int = 0
    bytes: int = 0
    files: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verified: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_step(reader: Reader, spec: ReaderSpec, target: Target, folder: Path, *, config_yaml: str,
               workers: int = 1, what: str = "convert") -> tuple[list[TensorInfo], list[str]]:
    """The target's files for the reader's step in the local `folder` (format files, config.yaml,
    trainer.json, and RNG files when the world size is unchanged); returns the tensors moved and notes."""
    infos = reader.infos()
    folder.mkdir(parents=True, exist_ok=True)
    writer = open_writer(target, folder, reader.state, infos)
    run_parts(spec, writer, workers=workers, total=sum(i.nbytes for i in infos), what=what)
    return infos, write_extras(folder, reader.state, target, config_yaml=config_yaml, source_folder=spec.folder)


def write_extras(folder: Path, state: StepState, target: Target, *, config_yaml: str, source_folder: Path) -> list[str]:
    """Everything of a converted step but the tensors: its config, the trainer's record (step,
    data position, LR schedule position) and, at an unchanged world size, the ranks' RNG states."""
    (folder / CONFIG_FILE).write_text(config_yaml)
    (folder / TRAINER_FILE).write_text(json.dumps(
        {"step": state.step, "data": state.data, "lr_schedule": {"at_step": state.step},
         "world_size": target.world_size, "strategy": target.strategy.name,
         "converted_from": {"strategy": state.strategy, "zero_stage": state.zero_stage,
                            "world_size": state.world_size}}, indent=1))
    rng = source_folder / "rng"
    if state.world_size == target.world_size and rng.is_dir():
        shutil.copytree(rng, folder / "rng", dirs_exist_ok=True)
        return []
    return [RNG_NOTE] if state.strategy != "hf" else []


def commit_step(folder: Path, storage: Storage, name: str, step: int, *, target: Target, state: StepState,
                config_yaml: str, in_place: bool, streams: int = 4, seconds: dict[str, float] | None = None) -> Manifest:
    """Checksum (or upload) every file of `folder`, then write the manifest last, atomically."""
    if in_place:
        def one(rel: str) -> FileEntry:
            size, checksum = file_checksum(folder / rel)
            return FileEntry(rel, size, checksum)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, streams)) as pool:
            entries = list(pool.map(one, local_files(folder)))
        _fsync_tree(folder)
    else:
        entries = _upload(folder, storage, name, streams=streams)
    manifest = converted_manifest(step, target, state, config_yaml, entries, seconds)
    storage.write_atomic(f"{name}/{MANIFEST}", manifest.to_json())
    return manifest


def converted_manifest(step: int, target: Target, state: StepState, config_yaml: str, entries: list[FileEntry],
                       seconds: dict[str, float] | None = None) -> Manifest:
    """The manifest of a converted step (the command's output, or the copy a job makes on resume)."""
    return Manifest(step=step, world_size=target.world_size, strategy=target.strategy.name, format=target.format,
                    config_hash=config_hash(config_yaml), data=state.data,
                    files=sorted(entries, key=lambda e: e.name), zero_stage=target.strategy.zero_stage,
                    saved_at=time.time(), save_seconds=dict(seconds or {}))


def _upload(folder: Path, storage: Storage, name: str, *, streams: int) -> list[FileEntry]:
    """upload_step writes under `step-N/` of the storage root: give it a root where that is `name`."""
    from hpc.checkpoint.manifest import parse_step_dir

    step = parse_step_dir(name)
    assert step is not None
    return upload_step(folder, storage, step, streams=streams, retries=4, backoff_s=1.0, rank=0)


def _fsync_tree(folder: Path) -> None:
    """Files written by the writers are made durable before the manifest promises them."""
    for path in folder.rglob("*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output(storage: Storage, name: str, *, force: bool) -> None:
    """An existing output is refused (or, with force, removed: manifest first)."""
    if storage.listdir(name) or storage.size(name) is not None:
        if not force:
            raise CheckpointError(f"{storage.url}/{name} already exists. HINT: pick another output, or "
                                  "pass --force to replace it")
        storage.remove(f"{name}/{MANIFEST}")
        storage.remove(name)


def reshard(src: str, out: str, *, world: int, strategy: str | None = None, overrides: list[str] = (),
            workers: int = 1, force: bool = False, verify: bool = True, model_cfg: Any = None,
            config_yaml: str | None = None, tmp_dir: str | None = None,
            on_source: Callable[[Source, Target], bool | None] | None = None) -> Report:
    """Convert the committed step `src` into a committed step at `out` that a job with `world`
    ranks and `strategy` (a configs/strategy/ preset; default: the source's own) loads directly."""
    started = time.perf_counter()
    # The source's checksums are checked while it is converted (both read the same files, the
    # second from the page cache); nothing is committed unless they match.
    source = open_source(src, tmp_dir=tmp_dir, verify=False)
    checking = verify_source_async(source)
    try:
        state = source.state
        name = strategy or _preset_of(state)
        target, target_yaml = target_from_preset(config_yaml if config_yaml is not None else state.config_yaml,
                                                 name, world, list(overrides))
        # An import fills in the step's state (data position, AdamW's groups).
        imported = bool(on_source(source, target)) if on_source is not None else False
        storage, out_name, out_step = destination(out, state.step)
        if source.format != "hf" and out_step != state.step:
            raise CheckpointError(f"{out}: the output step folder must be step-{state.step} (the source's "
                                  "step), or name a checkpoint folder to write step-N into")
        if _same_place(src, storage, out_name):
            raise CheckpointError(f"{out} is the source itself; nothing is ever written into a source")
        # Opened before the output is touched: a source the target cannot take costs nothing.
        spec = ReaderSpec(source.format, source.folder, state, model_cfg, imported)
        reader = spec.open()
        opened = time.perf_counter()
        local = storage.local_path(out_name)
        try:
            prepare_output(storage, out_name, force=force)
        except BaseException:
            reader.close()
            raise
        work = local if local is not None else Path(tempfile.mkdtemp(prefix="hpc-convert-out-", dir=tmp_dir)) / out_name
        try:
            try:
                infos, notes = write_step(reader, spec, target, work, config_yaml=target_yaml, workers=workers,
                                          what=f"step {state.step} -> {target.describe()}")
            except Exception:
                refuse_unverified(src, checking.result())  # a corrupt file is best named by its checksum
                raise
            converted = time.perf_counter()
            refuse_unverified(src, checking.result())
            manifest = commit_step(work, storage, out_name, out_step, target=target, state=state,
                                   config_yaml=target_yaml, in_place=local is not None,
                                   seconds={"convert": round(converted - opened, 3)})
        except BaseException:
            # Nothing committed may stay behind: the manifest was never written, the files go too.
            storage.remove(f"{out_name}/{MANIFEST}")
            storage.remove(out_name)
            raise
        finally:
            reader.close()
            if local is None:
                shutil.rmtree(work.parent, ignore_errors=True)
        report = Report(src, f"{storage.url}/{out_name}", state.step, target.describe(), tensors=len(infos),
                        bytes=sum(i.nbytes for i in infos), files=len(manifest.files), notes=notes,
                        seconds={"open": round(opened - started, 3), "convert": round(converted - opened, 3),
                                 "commit": round(time.perf_counter() - converted, 3)})
    finally:
        source.close()
    if verify:
        from hpc.checkpoint.convert.verify import verify as verify_steps

        verify_started = time.perf_counter()
        result = verify_steps(src, report.output, model_cfg=model_cfg)
        report.verified = result.to_dict()
        report.seconds["verify"] = round(time.perf_counter() - verify_started, 3)
        if not result.ok:
            raise CheckpointError(f"{report.output} does not match its source: {result.summary()}")
    return report


def _preset_of(state: StepState) -> str:
    if state.strategy == "deepspeed":
        return f"zero{state.zero_stage}"
    if state.strategy == "fsdp":
        import yaml

        sharding = ((yaml.safe_load(state.config_yaml) or {}).get("strategy") or {}).get("sharding", "full_shard") \
            if state.config_yaml else "full_shard"
        return f"fsdp_{sharding}"
    if state.strategy == "ddp":
        return "ddp"
    raise CheckpointError("an imported step needs --strategy NAME (a configs/strategy/ preset)")


def _same_place(src: str, storage: Storage, name: str) -> bool:
    local = storage.local_path(name)
    return local is not None and "://" not in src and Path(src).resolve() == local.resolve()
