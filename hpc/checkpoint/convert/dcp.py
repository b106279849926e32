"""DCP step folders (DDP and FSDP) as the neutral shape, read and written one tensor at a time.

What torch.distributed.checkpoint's FileSystemWriter leaves in a step folder, and what its
FileSystemReader (so StateFormat.load, at any world size) reads back:

  .metadata       a pickled `Metadata`:
                    state_dict_metadata  flat key -> TensorStorageMetadata (dtype, size, chunks: the
                                         boxes the tensor was saved in) or BytesStorageMetadata
                    storage_data         MetadataIndex(flat key, chunk offsets) -> _StorageInfo
                                         (file, byte offset, length) of that chunk
                    planner_data         flat key -> its path in the nested state
  __R_S.distcp    items back to back, each one whole torch.save archive: a chunk of a tensor (a
                  plain tensor whole, or one rank's FSDP shard: a block of rows) or one object

Flat keys are the paths of the saved `{"model": ..., "optim": ...}` (get_state_dict) joined by dots:

  model.<fqn>                                 a parameter, fp32
  optim.state.<fqn>.<exp_avg|exp_avg_sq|step>
  optim.param_groups.<i>.<lr|betas|...|params>  one object each; params is [fqn, ...]

A load asks for every key of its own state dict (a missing one fails) and, on each rank, reads
the chunks that overlap that rank's shard; how the chunks were cut only changes how much it reads.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from hpc.checkpoint.convert.outfile import OutputFile
from hpc.checkpoint.convert.neutral import (
    ADAM_STATES,
    MODEL,
    OPTIM,
    StepState,
    TensorInfo,
    adamw_group_defaults,
    model_key,
    optim_key,
    split_key,
)
from hpc.checkpoint.manifest import CheckpointError
from hpc.checkpoint.safe_load import UnsafeCheckpoint, load_dcp_metadata

log = logging.getLogger("hpc")

METADATA = ".metadata"
GROUPS_FILE = "__param_groups.distcp"
"""Where a DcpWriter puts the param_groups objects (DCP names no file; any name in storage_data works)."""

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A chunk: (offsets, sizes) per dimension."""


# ---- keys ---------------------------------------------------------------------------------------

def _path_of(flat: str, planner_data: Any) -> tuple:
    """The nested path a flat key came from: planner_data's when saved (unambiguous), else parsed
    from the string (a parameter's FQN holds dots, so only the ends can be split off)."""
    if isinstance(planner_data, dict) and flat in planner_data:
        return tuple(planner_data[flat])
    head, _, rest = flat.partition(".")
    if head == MODEL:
        return MODEL, rest
    if head == OPTIM and rest.startswith("state."):
        fqn, _, name = rest.removeprefix("state.").rpartition(".")
        return OPTIM, "state", fqn, name
    if head == OPTIM and rest.startswith("param_groups."):
        index, _, name = rest.removeprefix("param_groups.").partition(".")
        return (OPTIM, "param_groups", int(index), name) if index.isdigit() else (flat,)
    return (flat,)


def _neutral_key(path: tuple) -> str | None:
    if len(path) == 2 and path[0] == MODEL:
        return model_key(path[1])
    if len(path) == 4 and path[:2] == (OPTIM, "state"):
        return optim_key(path[2], path[3])
    return None


def _flat_of(key: str) -> tuple[str, tuple]:
    """Neutral key -> (flat key, nested path) as get_state_dict + DCP's flattening name it."""
    kind, fqn, name = split_key(key)
    path = (MODEL, fqn) if kind == MODEL else (OPTIM, "state", fqn, name)
    return ".".join(map(str, path)), path


def model_order(config_yaml: str) -> list[str]:
    """The model's parameter names in its own order, from the step's resolved config (empty when
    there is none or it no longer composes: callers then keep the metadata's order)."""
    if not config_yaml:
        return []
    from hpc.config import ConfigError, from_yaml
    from hpc.train.model import parameter_shapes

    try:
        cfg = from_yaml(config_yaml)
    except ConfigError as err:
        log.warning("the step's config.yaml does not compose (%s); tensors keep the metadata's order", err)
        return []
    return list(parameter_shapes(cfg.model))


# ---- reading ------------------------------------------------------------------------------------

def read_metadata(folder: Path) -> Metadata:
    path = folder / METADATA
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing, so {folder} is not a complete DCP (DDP/FSDP) checkpoint: DCP writes it "
            f"last, after every rank's .distcp files. HINT: use a committed step (one with a manifest.json)")
    try:
        with path.open("rb") as f:
            metadata = load_dcp_metadata(f, str(path))  # data only: no code from the store runs
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]}); "
                              f"the file is truncated or corrupt") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not the metadata of a DCP FileSystemWriter checkpoint")
    return metadata


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a file of their own. torch.load finds an
    archive's index by searching back from the end of what it is given, so it must not see the
    items after this one; reads go straight into the caller's buffer (the tensor's storage)."""

    def __init__(self, raw: io.RawIOBase, start: int, length: int) -> None:
        super().__init__()
        self.raw, self.start, self.length, self.pos = raw, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self.length - self.pos))
        self.raw.seek(self.start + self.pos)
        done = 0
        while done < want:
            got = self.raw.readinto(view[done:want])
            if not got:
                break
            done += got
        self.pos += done
        return done


class DcpReader:
    """A DCP step folder, read one whole tensor at a time: only that tensor's items are read, and
    a tensor saved in several chunks (FSDP shards, in several files) is assembled into one."""

    def __init__(self, folder: Path, state: StepState) -> None:
        self.folder, self.state = Path(folder), state
        self.metadata = read_metadata(self.folder)
        self._flat: dict[str, str] = {}  # neutral key -> flat key
        groups: dict[int, dict[str, Any]] = {}
        for flat, md in self.metadata.state_dict_metadata.items():
            path = _path_of(flat, self.metadata.planner_data)
            key = _neutral_key(path)
            if key is not None and isinstance(md, TensorStorageMetadata):
                self._flat[key] = flat
            elif len(path) == 4 and path[:2] == (OPTIM, "param_groups") and isinstance(md, BytesStorageMetadata):
                groups.setdefault(int(path[2]), {})[str(path[3])] = self._load(flat, None)
        if not any(key.startswith(MODEL + "/") for key in self._flat):
            raise CheckpointError(f"{self.folder / METADATA}: no model.* tensors; not a step saved by "
                                  f"this toolkit's DDP/FSDP jobs")
        state.param_groups = [groups[i] for i in sorted(groups)]
        self._order = self._ordered(model_order(state.config_yaml))

    def _ordered(self, names: list[str]) -> list[str]:
        """Model keys in the model's order (metadata order for names it does not know), then each
        parameter's optimizer states in the same order."""
        place = {model_key(name): i for i, name in enumerate(names)}
        models = sorted((k for k in self._flat if k.startswith(MODEL + "/")),
                        key=lambda k: place.get(k, len(place)))
        fqn_place = {split_key(k)[1]: i for i, k in enumerate(models)}
        state_place = {name: i for i, name in enumerate(ADAM_STATES)}

        def optim_place(key: str) -> tuple[int, int]:
            _, fqn, name = split_key(key)
            return fqn_place.get(fqn, len(fqn_place)), state_place.get(name or "", len(state_place))

        optims = sorted((k for k in self._flat if k.startswith(OPTIM + "/")), key=optim_place)
        return models + optims

    def infos(self) -> list[TensorInfo]:
        infos = []
        for key in self._order:
            md = self.metadata.state_dict_metadata[self._flat[key]]
            infos.append(TensorInfo(key, tuple(md.size), md.properties.dtype))
        return infos

    def read(self, key: str) -> torch.Tensor:
        flat = self._flat.get(key)
        if flat is None:
            raise KeyError(f"{key}: no such tensor in {self.folder} (it holds {len(self._flat)}, "
                           f"e.g. {next(iter(self._order))})")
        md = self.metadata.state_dict_metadata[flat]
        size, dtype = tuple(md.size), md.properties.dtype
        if len(md.chunks) == 1 and tuple(md.chunks[0].sizes) == size:
            return self._load(flat, md.chunks[0], dtype)
        out = torch.empty(size, dtype=dtype)
        filled = 0
        for chunk in md.chunks:
            piece = self._load(flat, chunk, dtype)
            out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))].copy_(piece)
            filled += piece.numel()
            del piece  # at most the whole tensor and one chunk are held at once
        if filled != out.numel():
            raise CheckpointError(f"{self.folder / METADATA}: the chunks of {flat} cover {filled} of its "
                                  f"{out.numel()} elements; the metadata is incomplete")
        return out

    def _load(self, flat: str, chunk: ChunkStorageMetadata | None, dtype: torch.dtype | None = None) -> Any:
        """One item: a tensor chunk (checked against the metadata), or an object when `chunk` is None."""
        offsets = None if chunk is None else chunk.offsets
        info = self.metadata.storage_data.get(MetadataIndex(flat, offsets))
        if info is None:
            raise CheckpointError(f"{self.folder / METADATA}: no storage record for {flat}"
                                  f"{'' if offsets is None else f' at {tuple(offsets)}'}; the metadata is incomplete")
        path = self.folder / info.relative_path
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: {flat} was saved through stream transforms "
                                  f"{list(info.transform_descriptors)}, which this converter does not read")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; the metadata places {flat} in it") from None
        end = info.offset + info.length
        if size < end:
            raise CheckpointError(f"{path}: truncated: it has {size} bytes, but {flat} lies at bytes "
                                  f"{info.offset}..{end}")
        with open(path, "rb", buffering=0) as raw:
            try:
                value = torch.load(_Window(raw, info.offset, info.length), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - whatever torch.load raises, the item is unreadable
                raise CheckpointError(f"{path}: corrupt: the item {flat} at byte {info.offset} does not load "
                                      f"({type(err).__name__}: {str(err)[:200]})") from err
        if chunk is None:
            return value
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(chunk.sizes) or value.dtype != dtype:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{path}: corrupt: the item {flat} at byte {info.offset} holds {got}, but the "
                                  f"metadata says {dtype} {tuple(chunk.sizes)}")
        if value.untyped_storage().nbytes() > value.numel() * value.element_size():
            value = value.clone()  # saved as a view: keep only its own elements
        return value

    def close(self) -> None:
        pass  # every read opens and closes its file: nothing is held between reads


# ---- writing ------------------------------------------------------------------------------------

def check_target(strategy_cfg: Any, world_size: int) -> None:
    """A DCP step is for DDP or FSDP, on a world size that strategy can run on."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: a job needs at least one rank")
    if strategy_cfg.name not in ("ddp", "fsdp"):
        raise ValueError(f"strategy.name={strategy_cfg.name}: a DCP checkpoint is loaded by ddp or fsdp; "
                         f"DeepSpeed loads its own format (write the target as format deepspeed)")
    shard = strategy_cfg.hsdp_shard_size
    if strategy_cfg.name == "fsdp" and strategy_cfg.sharding == "hybrid_shard" and shard and world_size % shard:
        fits = max(d for d in range(1, shard + 1) if world_size % d == 0)
        raise ValueError(f"strategy.hsdp_shard_size={shard} must divide the world size {world_size} (HSDP "
                         f"replicates whole shard groups); set strategy.hsdp_shard_size={fits}, or a world "
                         f"size that is a multiple of {shard}")


def shard_count(strategy_cfg: Any, world_size: int) -> int:
    """Into how many blocks of rows the target's FSDP shards each tensor (1: whole replicas)."""
    if strategy_cfg.name != "fsdp" or strategy_cfg.sharding == "no_shard":
        return 1
    if strategy_cfg.sharding == "hybrid_shard":
        # Unset, the group is a node, whose size a StrategyConfig does not hold: ranks' blocks then
        # still tile each shard, just finer than needed.
        return strategy_cfg.hsdp_shard_size or world_size
    return world_size


def row_blocks(shape: tuple[int, ...], shards: int) -> list[Box]:
    """The boxes FSDP2's Shard(0) gives `shards` ranks: ceil(rows / shards) rows each, the last
    ones shorter or empty (empty ones are left out). A 0-d tensor or 1 shard: the whole tensor."""
    if not shape or shards <= 1 or shape[0] <= 1:
        return [((0,) * len(shape), tuple(shape))]
    per = -(-shape[0] // shards)
    return [((start, *(0,) * (len(shape) - 1)), (min(per, shape[0] - start), *shape[1:]))
            for start in range(0, shape[0], per)]


def _check_complete(infos: list[TensorInfo], groups: list[dict[str, Any]]) -> None:
    """What a DDP/FSDP load needs of the neutral tensors: a load fails on any key it lacks."""
    keys = {info.key for info in infos}
    params = [split_key(info.key)[1] for info in infos if info.kind == "model"]
    if not params:
        raise ValueError("no model/<fqn> tensors to write")
    if not any(key.startswith(OPTIM + "/") for key in keys):
        return  # weights only (an import): the job's load starts AdamW afresh (formats.StateFormat.load)
    missing = [optim_key(fqn, name) for fqn in params for name in ADAM_STATES if optim_key(fqn, name) not in keys]
    if missing:
        raise ValueError(f"{len(missing)} optimizer tensors missing (e.g. {missing[0]}): a DDP/FSDP job loads "
                         f"AdamW's {', '.join(ADAM_STATES)} for every parameter; give a weights-only source a "
                         f"fresh optimizer state")
    orphans = sorted({split_key(k)[1] for k in keys if k.startswith(OPTIM + "/")} - set(params))
    if orphans:
        raise ValueError(f"optimizer state for {len(orphans)} names that are no model parameter, e.g. {orphans[0]}")
    if not groups:
        raise ValueError("state.param_groups is empty: a load needs AdamW's param groups "
                         "(hyperparameters and 'params': [fqn, ...])")
    grouped = [fqn for group in groups for fqn in group.get("params", [])]
    if sorted(grouped) != sorted(params):
        extra, lost = sorted(set(grouped) - set(params)), sorted(set(params) - set(grouped))
        twice = sorted({f for f in grouped if grouped.count(f) > 1})
        raise ValueError(f"state.param_groups must list every parameter exactly once: not listed {lost[:3]}, "
                         f"unknown {extra[:3]}, listed twice {twice[:3]}")


@dataclass
class DcpPart:
    """One file of a DcpWriter's output, written one tensor at a time (picklable until first written)."""

    folder: Path
    file_name: str
    keys: list[str]
    plan: dict[str, tuple[TensorInfo, list[Box]]]
    records: list[tuple[str, tuple[int, ...], str, int, int]] = field(default_factory=list)
    """(flat key, chunk offsets, file, byte offset, length) of every item written."""
    _written: set[str] = field(default_factory=set, repr=False)
    _stream: Any = field(default=None, repr=False)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.plan:
            raise KeyError(f"{key}: not a tensor of this part ({self.file_name})")
        info, boxes = self.plan[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise ValueError(f"{key}: given {tensor.dtype} {tuple(tensor.shape)}, but its info says "
                             f"{info.dtype} {info.shape}")
        if key in self._written:
            raise ValueError(f"{key}: given twice")
        self._written.add(key)
        flat, _ = _flat_of(key)
        if self._stream is None:
            self._stream = OutputFile(self.folder / self.file_name)
        tensor = tensor.detach().cpu()
        for offsets, sizes in boxes:
            piece = _box(tensor, offsets, sizes)
            start = self._stream.tell()
            # DCP's own item encoding: one torch.save archive per chunk, at an offset in the file.
            torch.save(piece, self._stream)
            self.records.append((flat, offsets, self.file_name, start, self._stream.tell() - start))
            del piece

    def close(self) -> list[tuple[str, tuple[int, ...], str, int, int]]:
        missing = [key for key in self.keys if key not in self._written]
        if missing:
            raise ValueError(f"{self.file_name}: {len(missing)} tensors never written, e.g. {missing[0]}")
        if self._stream is not None:
            self._stream.close()  # durable
            self._stream = None
        return list(self.records)


def _box(tensor: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """The chunk as a tensor of its own: torch.save writes a view's whole storage, not just the view."""
    if tuple(sizes) == tuple(tensor.shape):
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        return tensor if whole else tensor.clone(memory_format=torch.contiguous_format)
    return tensor.narrow(0, offsets[0], sizes[0]).clone(memory_format=torch.contiguous_format)


class DcpWriter:
    """A DCP step folder that StateFormat.load reads at any world size with DDP or FSDP (any
    sharding). Tensors are cut into the row blocks of the target's own FSDP shards, so each of its
    ranks reads only its own rows; other world sizes load too, reading some rows they drop."""

    def __init__(self, folder: Path, state: StepState, infos: list[TensorInfo], *, world_size: int,
                 strategy_cfg: Any) -> None:
        check_target(strategy_cfg, world_size)
        _check_complete(infos, state.param_groups)
        self.folder, self.state, self.infos = Path(folder), state, list(infos)
        shards = shard_count(strategy_cfg, world_size)
        # AdamW's step is one plain (replicated) tensor per parameter under every strategy.
        self.boxes = {info.key: row_blocks(info.shape, 1 if split_key(info.key)[2] == "step" else shards)
                      for info in self.infos}

    def parts(self, workers: int) -> list[DcpPart]:
        """Largest tensors first onto the least-loaded part, each part one file; keys in infos order."""
        count = max(1, min(workers, len(self.infos)))
        load, owner = [0] * count, {}
        for info in sorted(self.infos, key=lambda i: -i.nbytes):
            part = min(range(count), key=lambda p: (load[p], p))
            owner[info.key] = part
            load[part] += info.nbytes
        self.folder.mkdir(parents=True, exist_ok=True)
        return [DcpPart(self.folder, f"__{p}_0.distcp", [i.key for i in self.infos if owner[i.key] == p],
                        {i.key: (i, self.boxes[i.key]) for i in self.infos if owner[i.key] == p})
                for p in range(count)]

    def finish(self, records: list[Any]) -> None:
        """The param_groups objects, then `.metadata` (atomically: its presence means complete)."""
        stored: dict[tuple[str, tuple[int, ...]], _StorageInfo] = {}
        for part_records in records:
            for flat, offsets, file_name, offset, length in part_records:
                if (flat, tuple(offsets)) in stored:
                    raise ValueError(f"{flat} at {tuple(offsets)} written by two parts")
                stored[(flat, tuple(offsets))] = _StorageInfo(file_name, offset, length)
        tensors: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        paths: dict[str, tuple] = {}
        for info in self.infos:
            flat, path = _flat_of(info.key)
            chunks = []
            for index, (offsets, sizes) in enumerate(self.boxes[info.key]):
                if (flat, offsets) not in stored:
                    raise ValueError(f"{flat} at {offsets} was never written: a part did not run, or its "
                                     f"record was not passed to finish")
                storage[MetadataIndex(flat, offsets, index)] = stored[(flat, offsets)]
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            tensors[flat] = TensorStorageMetadata(properties=TensorProperties(dtype=info.dtype),
                                                  size=torch.Size(info.shape), chunks=chunks)
            paths[flat] = path
        defaults = adamw_group_defaults()
        weights_only = not any(info.kind == "optimizer" for info in self.infos)
        with open(self.folder / GROUPS_FILE, "wb") as stream:
            for index, group in enumerate([] if weights_only else self.state.param_groups):
                for name, value in {**defaults, **group}.items():
                    path = (OPTIM, "param_groups", index, name)
                    flat = ".".join(map(str, path))
                    data = io.BytesIO()
                    torch.save(value, data)
                    start = stream.tell()
                    stream.write(data.getbuffer())
                    tensors[flat] = BytesStorageMetadata()
                    storage[MetadataIndex(flat)] = _StorageInfo(GROUPS_FILE, start, stream.tell() - start)
                    paths[flat] = path
            stream.flush()
            os.fsync(stream.fileno())
        metadata = Metadata(state_dict_metadata=tensors, planner_data=paths, storage_data=storage,
                            storage_meta=StorageMeta(checkpoint_id=str(self.folder), save_id=str(uuid.uuid4())),
                            version=CURRENT_DCP_VERSION)
        tmp = self.folder / (METADATA + ".tmp")
        with tmp.open("wb") as stream:
            pickle.dump(metadata, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, self.folder / METADATA)
