"""How each engine's model and optimizer state becomes files in a step folder, and back.

  dcp        DDP and FSDP: torch.distributed.checkpoint, one writer per rank (several files with
             `streams` threads), asynchronous: the caller waits only while tensors are copied to
             host memory. Loads at any world size (DCP reshards on load). Each file is checksummed
             as it is written (`StateFormat.written`), so the upload need not read it again.
  deepspeed  the engine's own save_checkpoint/load_checkpoint, synchronous (to fast local scratch;
             the slow upload is in the background either way). Bound to the world size it was
             saved at: another size goes through tools/ckpt_convert.

Per-rank RNG states go beside either, in `rng/rank-R.pt`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpc.checkpoint.manifest import CheckpointError
from hpc.checkpoint.safe_load import SafeFileSystemReader, UnsafeCheckpoint, deepspeed_loads_safely, safe_torch_load
from hpc.checkpoint.staging import FlatStager, rank_share
from hpc.checkpoint.storage import ALGORITHM, CHUNK, FileEntry, checksum_text, hasher
from hpc.faults import ENV as FAULTS_ENV
from hpc.faults import fault_point
from hpc.train import rng
from hpc.train.strategies import Engine

RNG_DIR = "rng"


def format_of(engine: Engine) -> str:
    return "deepspeed" if engine.name == "deepspeed" else "dcp"


def _done(value: Any = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class _ChecksummedStream:
    """Wraps a file DCP writes: hashes the bytes on their way to the file (the writer threads do it,
    in parallel, on bytes already in cache) and, under fault injection, lets a test SIGKILL this
    rank half-way through a shard. A seek or truncate (DCP does neither) voids the checksum."""

    def __init__(self, stream: Any, name: str, step: int, rank: int, faults: bool) -> None:
        self.stream, self.name, self.step, self.rank, self.faults = stream, name, step, rank, faults
        self.hash, self.written, self.void = hasher(ALGORITHM), 0, False
        self.entry: FileEntry | None = None
        """The file's size and checksum once closed, when every byte of it went through write()."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = 0
        for start in range(0, len(view), CHUNK):  # each piece hashed while it is still in cache
            piece = view[start:start + CHUNK]
            n += self.stream.write(piece)
            self.hash.update(piece)
        self.written += n
        if self.faults and self.written > 4096:
            fault_point("shard_write", step=self.step, rank=self.rank)
        return n

    def seek(self, *args: Any) -> int:
        position = self.stream.seek(*args)
        self.void = self.void or position != self.written
        return position

    def truncate(self, *args: Any) -> int:
        self.void = True
        return self.stream.truncate(*args)

    def close(self) -> None:
        if not self.stream.closed:
            self.stream.flush()
            # The file's own size, not only our count: bytes written around write() void it too.
            if not self.void and os.fstat(self.stream.fileno()).st_size == self.written:
                self.entry = FileEntry(self.name, self.written, checksum_text(ALGORITHM, self.hash))
        self.stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _dcp_writer(path: Path, streams: int, step: int, rank: int, written: dict[str, FileEntry]) -> Any:
    """DCP's file writer, each file checksummed into `written` (by name in `path`) once closed."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), thread_count=streams, sync_files=True)
    create_stream = writer.fs.create_stream
    faults = bool(os.environ.get(FAULTS_ENV))

    @contextlib.contextmanager
    def checksummed_stream(name: Any, mode: str) -> Iterator[Any]:
        with create_stream(name, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            wrapped = _ChecksummedStream(stream, os.path.relpath(name, path), step, rank, faults)
            yield wrapped
            wrapped.close()  # DCP closes data files itself (after its fsync); its metadata it leaves to us
            if wrapped.entry is not None:
                written[wrapped.name] = wrapped.entry

    rename = writer.fs.rename

    def rename_with_checksum(old: Any, new: Any) -> None:  # DCP writes .metadata.tmp, then renames it
        rename(old, new)
        entry = written.pop(os.path.relpath(old, path), None)
        if entry is not None:
            name = os.path.relpath(new, path)
            written[name] = FileEntry(name, entry.size, entry.checksum)

    writer.fs.create_stream = checksummed_stream  # type: ignore[method-assign]
    writer.fs.rename = rename_with_checksum  # type: ignore[method-assign]
    return writer


class StateFormat:
    """Save and load one engine's state in a step folder."""

    def __init__(self, engine: Engine, *, group: Any, streams: int, async_save: bool) -> None:
        self.engine, self.group, self.streams, self.async_save = engine, group, streams, async_save
        self.name = format_of(engine)
        self.stager = FlatStager(pin=torch.cuda.is_available() and engine.world.is_cuda) \
            if self.name == "dcp" else None
        self.written: dict[str, FileEntry] = {}
        """Files of the last save checksummed as this rank wrote them, by name in the step folder
        (complete once its future is done; DeepSpeed's files are checksummed on upload instead)."""

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.engine.model, self.engine.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, folder: Path, step: int, rank: int) -> Future:
        """Start writing the state into `folder`; returns when the loop may go on (tensors copied),
        with a future that completes when every rank's files are written."""
        if self.name == "deepspeed":
            # Writes `folder.parent/<tag>/...`; collective over the default group, like training.
            fault_point("shard_write", step=step, rank=rank)
            self.engine.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
            return _done()
        import torch.distributed.checkpoint as dcp

        self.written = {}
        writer = _dcp_writer(folder, self.streams, step, rank, self.written)
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        # Only what this rank writes: DCP writes each replicated tensor once, so under DDP the
        # ranks' shares together are one replica instead of every rank copying all of it.
        state = rank_share(self._dcp_state(), dist.get_rank(self.group) if world > 1 else 0, world)
        if not self.async_save or not dist.is_initialized():
            return _done(dcp.save(state, storage_writer=writer, process_group=self.group,
                                  no_dist=not dist.is_initialized()))
        # Its own gloo group: DCP's planning collectives run in a background thread while the
        # loop's own collectives go on; on the default group the two interleave and corrupt each
        # other (gloo fails with "Received data size doesn't match expected size").
        return dcp.async_save(state, storage_writer=writer, process_group=self.group,
                              async_stager=self.stager)

    def load(self, folder: Path, saved_world_size: int) -> None:
        if self.name == "deepspeed":
            world = dist.get_world_size() if dist.is_initialized() else 1
            if saved_world_size != world:
                raise CheckpointError(
                    f"{folder.name} was saved by DeepSpeed at world size {saved_world_size}; this job "
                    f"has {world}, and DeepSpeed checkpoints are bound to their world size. HINT: "
                    f"reshard it for {world} ranks with tools/ckpt_convert, or run with "
                    f"{saved_world_size} ranks")
            with deepspeed_loads_safely(self.engine.engine):
                load_path, _ = self.engine.engine.load_checkpoint(
                    str(folder.parent), tag=folder.name, load_optimizer_states=True,
                    load_lr_scheduler_states=False, load_module_strict=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        reader = SafeFileSystemReader(str(folder))  # its .metadata is read as data only
        saved = reader.read_metadata().state_dict_metadata
        if not any(key.startswith("optim.") for key in saved):
            # A step imported from Hugging Face weights: no optimizer state, AdamW starts afresh.
            model_state = self._dcp_state()["model"]
            dcp.load({"model": model_state}, storage_reader=SafeFileSystemReader(str(folder)),
                     process_group=self.group, no_dist=not dist.is_initialized())
            set_model_state_dict(self.engine.model, model_state)
            return
        state = self._dcp_state()
        dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), process_group=self.group,
                 no_dist=not dist.is_initialized())
        set_state_dict(self.engine.model, self.engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


def save_rng(folder: Path, rank: int, state: dict[str, Any] | None = None) -> None:
    """This rank's RNG states (`state`, as rng.capture() took them, or now) into the step folder."""
    path = folder / RNG_DIR / f"rank-{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng.capture() if state is None else state, path)


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states from the step folder; False (nothing restored) when the file
    holds anything but tensors, numbers and text: it is never unpickled into objects (an older
    checkpoint's pickled generator states, or a file planted to run code)."""
    try:
        state = safe_torch_load(folder / RNG_DIR / f"rank-{rank}.pt")
    except UnsafeCheckpoint:
        return False
    rng.restore(state)
    return True
