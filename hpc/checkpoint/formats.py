"""How each engine's model and optimizer state becomes files in a step folder, and back.

  dcp        DDP and FSDP: torch.distributed.checkpoint, one writer per rank (several files with
             `streams` threads), asynchronous: the caller waits only while tensors are copied to
             host memory. Loads at any world size (DCP reshards on load).
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
from hpc.checkpoint.staging import FlatStager, rank_share
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


class _FaultyStream:
    """Wraps a shard file being written so a test can SIGKILL this rank half-way through it."""

    def __init__(self, stream: Any, step: int, rank: int) -> None:
        self.stream, self.step, self.rank, self.written = stream, step, rank, 0

    def write(self, data: Any) -> int:
        n = self.stream.write(data)
        self.written += len(memoryview(data).cast("B"))
        if self.written > 4096:
            fault_point("shard_write", step=self.step, rank=self.rank)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def __enter__(self) -> _FaultyStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stream.close()


def _dcp_writer(path: Path, streams: int, step: int, rank: int) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), thread_count=streams, sync_files=True)
    if os.environ.get(FAULTS_ENV):  # fault-injection tests only: wrap each shard file being written
        create_stream = writer.fs.create_stream

        @contextlib.contextmanager
        def faulty_create_stream(name: Any, mode: str) -> Iterator[Any]:
            with create_stream(name, mode) as stream:
                yield _FaultyStream(stream, step, rank) if "w" in mode else stream

        writer.fs.create_stream = faulty_create_stream  # type: ignore[method-assign]
    return writer


class StateFormat:
    """Save and load one engine's state in a step folder."""

    def __init__(self, engine: Engine, *, group: Any, streams: int, async_save: bool) -> None:
        self.engine, self.group, self.streams, self.async_save = engine, group, streams, async_save
        self.name = format_of(engine)
        self.stager = FlatStager(pin=torch.cuda.is_available() and engine.world.is_cuda) \
            if self.name == "dcp" else None

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

        writer = _dcp_writer(folder, self.streams, step, rank)
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
            load_path, _ = self.engine.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=True,
                load_lr_scheduler_states=False, load_module_strict=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        if not any(key.startswith("optim.") for key in saved):
            # A step imported from Hugging Face weights: no optimizer state, AdamW starts afresh.
            model_state = self._dcp_state()["model"]
            dcp.load({"model": model_state}, checkpoint_id=str(folder), process_group=self.group,
                     no_dist=not dist.is_initialized())
            set_model_state_dict(self.engine.model, model_state)
            return
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder), process_group=self.group,
                 no_dist=not dist.is_initialized())
        set_state_dict(self.engine.model, self.engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


def save_rng(folder: Path, rank: int) -> None:
    path = folder / RNG_DIR / f"rank-{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng.capture(), path)


def load_rng(folder: Path, rank: int) -> None:
    rng.restore(torch.load(folder / RNG_DIR / f"rank-{rank}.pt", weights_only=False))
