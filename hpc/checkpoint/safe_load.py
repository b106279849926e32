"""Loading a checkpoint never runs code from the store: every file is read as data only.

A pickle can name any importable function and have it called while it is read, and a checkpoint
store is written by many hands (a shared file system, a bucket). So nothing from a step folder is
unpickled with the standard unpickler:

  - tensor files (`torch.load`) are read with `weights_only=True`: tensors, containers, numbers, text
    and the few classes allowed by name (DeepSpeed's loss scalers and ZeRO stage for its files);
  - DCP's `.metadata`, a plain pickle of DCP's own dataclasses, is read by `load_dcp_metadata`, whose
    unpickler resolves only those classes (and torch sizes, dtypes, layouts, paths) by name.

A file that names anything else is refused with UnsafeCheckpoint, a CheckpointError that says which
file and which name, before any of it is built.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import inspect
import io
import pathlib
import pickle
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import torch

from hpc.checkpoint.manifest import CheckpointError

if TYPE_CHECKING:
    import torch.distributed.checkpoint.metadata as dcp_metadata


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file names something to import or call that a checkpoint has no need of."""


@functools.cache
def _allowed() -> dict[tuple[str, str], Any]:
    # Imported here: torch.distributed.checkpoint takes over a second to import, and a conversion
    # of DeepSpeed files never needs it.
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    names: dict[tuple[str, str], Any] = {}
    for name, value in vars(dcp_metadata).items():
        if inspect.isclass(value) and value.__module__ == dcp_metadata.__name__:
            names[(dcp_metadata.__name__, name)] = value
    names[(dcp_filesystem.__name__, "_StorageInfo")] = dcp_filesystem._StorageInfo
    names[("torch", "Size")] = torch.Size
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            names[("torch", name)] = value
    names[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # by name, from torch
    names[("collections", "OrderedDict")] = collections.OrderedDict
    for path_class in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        names[("pathlib", path_class)] = getattr(pathlib, path_class)
    return names


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream: IO[bytes], source: str) -> None:
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed().get((module, name))
        if found is None:
            raise UnsafeCheckpoint(f"{self.source}: refused: it names {module}.{name}, which DCP metadata never "
                                   "holds (loading it could run code from the checkpoint store)")
        return found


def load_dcp_metadata(stream: IO[bytes], source: str) -> dcp_metadata.Metadata:
    """DCP's `.metadata` from `stream`, built only from DCP's own classes (see the module docstring)."""
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = _MetadataUnpickler(stream, source).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{source}: not DCP metadata (a {type(metadata).__name__})")
    return metadata


def SafeFileSystemReader(path: str) -> Any:  # noqa: N802 - it stands for a class
    """DCP's FileSystemReader for `path`, reading `.metadata` with load_dcp_metadata (its tensors it
    already reads with weights_only=True)."""
    return _safe_reader_class()(path)


@functools.cache
def _safe_reader_class() -> type:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_dcp_metadata(io.BytesIO(stream.read()), str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def safe_torch_load(path: str | pathlib.Path, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`, its refusal as UnsafeCheckpoint naming the file."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpoint(f"{path}: refused: it holds more than tensors and plain data, and "
                               f"loading it could run code from the checkpoint store ({first})") from None


@contextlib.contextmanager
def deepspeed_loads_safely(engine: Any) -> Iterator[None]:
    """While the block runs, DeepSpeed's engine reads its checkpoint files with weights_only=True
    and its own four pickled classes allowed by name (its TorchCheckpointEngine turns torch.load's
    weights-only mode off, which would rebuild any object a file names)."""
    from hpc.checkpoint.convert.zero_pickles import STAND_INS

    classes = []
    for _, name in STAND_INS:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(classes):
            return safe_torch_load(path, map_location=map_location)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        checkpoint_engine.load = original


__all__ = ["SafeFileSystemReader", "UnsafeCheckpoint", "deepspeed_loads_safely", "load_dcp_metadata",
           "safe_torch_load"]
