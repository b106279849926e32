"""Hugging Face Llama folders: export any checkpoint to one, read one as a checkpoint, and start a
run from one (`checkpoint.init_from`). Names, the rotary row order and config.json: hf_layout.py.

A folder is safetensors shards + model.safetensors.index.json + config.json +
generation_config.json. A shard's header follows from the shapes alone, so each shard is written
one tensor at a time (no process holds more than one tensor), and each rank of a run reads only
the rows of its own shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpc.checkpoint.convert.hf_layout import (
    IGNORED,
    from_hf_rows,
    function_differences,
    hf_config,
    hf_name,
    model_fields,
    model_shapes,
    rotary_heads,
    to_hf_rows,
)
from hpc.checkpoint.convert.outfile import OutputFile
from hpc.checkpoint.convert.neutral import MODEL, StepState, TensorInfo, model_key, split_key
from hpc.config.schema import ModelConfig

if TYPE_CHECKING:
    from hpc.config import Config
    from hpc.train.strategies import Engine, World

log = logging.getLogger("hpc")

MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's own default shard size ("5GB")."""
INDEX, CONFIG, GENERATION_CONFIG = "model.safetensors.index.json", "config.json", "generation_config.json"
INSTALL_HINT = "reading Hugging Face folders needs safetensors: pip install hpc[hf]"

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


# --- export -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    key: str
    name: str
    shape: tuple[int, ...]
    heads: int


@dataclass
class HfShardPart:
    """One worker's shards (a Writer Part): each shard's header is written when its first tensor
    comes, then tensors are streamed to it in `keys` order, one at a time."""

    folder: str
    shards: list[tuple[str, list[_Entry]]]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.keys = [e.key for _, entries in self.shards for e in entries]
        self._at = 0
        self._file: Any = None
        self._written: list[tuple[str, list[str], int]] = []

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shard, index = self._position()
        file_name, entries = self.shards[shard]
        entry = entries[index]
        if key != entry.key:
            raise ValueError(f"{file_name}: expected {entry.key} next, got {key}")
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, the model config expects {entry.shape}")
        if index == 0:
            self._file = OutputFile(self._partial(file_name))
            self._file.write(_header(entries, self.dtype))
        out = to_hf_rows(tensor, entry.heads) if entry.heads else tensor
        out = out.detach().to(self.dtype).contiguous().reshape(-1)
        self._file.write(out.view(torch.uint8).numpy().data)
        self._at += 1
        if index == len(entries) - 1:
            self._file.close()  # durable
            os.replace(self._partial(file_name), Path(self.folder) / file_name)
            nbytes = sum(math.prod(e.shape) for e in entries) * self.dtype.itemsize
            self._written.append((file_name, [e.name for e in entries], nbytes))

    def close(self) -> list[tuple[str, list[str], int]]:
        if self._at != len(self.keys):
            raise ValueError(f"{len(self.keys) - self._at} tensor(s) never written, from {self.keys[self._at]}")
        return self._written

    def _position(self) -> tuple[int, int]:
        at = self._at
        for shard, (_, entries) in enumerate(self.shards):
            if at < len(entries):
                return shard, at
            at -= len(entries)
        raise ValueError(f"every tensor of this part is already written ({len(self.keys)})")

    def _partial(self, file_name: str) -> Path:
        return Path(self.folder) / f"{file_name}.partial"


def _header(entries: list[_Entry], dtype: torch.dtype) -> bytes:
    """safetensors' header: u64 little-endian length, then JSON padded with spaces to 8 bytes."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        end = offset + math.prod(e.shape) * dtype.itemsize
        meta[e.name] = {"dtype": _ST_DTYPES[dtype], "shape": list(e.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class HfWriter:
    """A Hugging Face Llama folder being written (a Writer: shards spread over the parts, then the
    index, config.json and generation_config.json in finish)."""

    def __init__(self, out: Path, model_cfg: ModelConfig, *, dtype: torch.dtype,
                 max_shard_bytes: int = MAX_SHARD_BYTES, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> None:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"dtype {dtype}: export writes one of {', '.join(map(str, _ST_DTYPES))}")
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        self.out, self.cfg, self.dtype = Path(out), model_cfg, dtype
        self.token_ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
        self.shapes = model_shapes(model_cfg)
        groups: list[list[_Entry]] = [[]]
        size = 0
        for fqn, shape in self.shapes.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(_Entry(model_key(fqn), hf_name(fqn), shape, rotary_heads(fqn, model_cfg)))
            size += nbytes
        n = len(groups)
        self.shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def parts(self, workers: int) -> list[HfShardPart]:
        self.out.mkdir(parents=True, exist_ok=True)
        n = max(1, min(workers, len(self.shards)))
        return [HfShardPart(str(self.out), self.shards[i::n], self.dtype) for i in range(n)]

    def finish(self, records: list[Any]) -> None:
        weight_map, total = {}, 0
        for part in records:
            for file_name, names, nbytes in part:
                weight_map.update(dict.fromkeys(names, file_name))
                total += nbytes
        expected = sum(len(entries) for _, entries in self.shards)
        if len(weight_map) != expected:
            raise ValueError(f"{self.out}: {len(weight_map)} of {expected} tensors written; not finishing")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        generation = {"_from_model_config": True, **{k: v for k, v in self.token_ids.items() if v is not None}}
        for name, value in ((INDEX, index), (GENERATION_CONFIG, generation),
                            (CONFIG, hf_config(self.cfg, self.dtype, **self.token_ids))):
            _write_json(self.out / name, value)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def export_hf(reader: Any, out: Path, model_cfg: ModelConfig, *, dtype: torch.dtype,
              max_shard_bytes: int = MAX_SHARD_BYTES, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> list[Path]:
    """Write the model weights of any Reader (neutral.py) as a Hugging Face Llama folder, reading one
    tensor at a time; returns the shard files."""
    _check_reader(reader, model_cfg)
    writer = HfWriter(out, model_cfg, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (part,) = writer.parts(1)
    for key in part.keys:
        part.write(key, reader.read(key))
    writer.finish([part.close()])
    log.info("exported %d tensors to %s (%d shard(s), %s)", len(part.keys), out, len(writer.shards), dtype)
    return [writer.out / name for name, _ in writer.shards]


def _check_reader(reader: Any, cfg: ModelConfig) -> None:
    have = {info.key: info.shape for info in reader.infos() if info.key.startswith(MODEL + "/")}
    for fqn, shape in model_shapes(cfg).items():
        key = model_key(fqn)
        if key not in have:
            raise ValueError(f"{key}: missing from the checkpoint, which model preset {cfg.name} needs; "
                             "pick the model preset the checkpoint was trained with")
        held = tuple(have.pop(key))
        if held != shape:
            raise ValueError(f"{key}: the checkpoint holds shape {held}, model preset {cfg.name} expects "
                             f"{shape}; pick the model preset the checkpoint was trained with")
    if have:
        raise ValueError(f"{sorted(have)[0]}: in the checkpoint but not in model preset {cfg.name} "
                         f"({len(have)} such tensor(s)); pick the model preset the checkpoint was trained with")


# --- import -------------------------------------------------------------------------------------------


def _safetensors() -> Any:
    try:
        import safetensors
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return safetensors


class HfReader:
    """A Hugging Face Llama folder as a Reader: model keys only, in our parameter order, q/k rows back
    in our rotary layout. Reads one tensor, or a slice of one, at a time (memory-mapped).

    With `model_cfg`, every tensor must have the shape that config gives it; without, the model is
    the one config.json describes (`self.cfg`)."""

    def __init__(self, hf_dir: Path, model_cfg: ModelConfig | None = None) -> None:
        _safetensors()  # the install hint, before anything else fails
        self.dir = Path(hf_dir)
        self.hf = _read_config(self.dir)
        own = ModelConfig(name=f"config.json of {self.dir.name}", **model_fields(self.hf))
        self.cfg = model_cfg or own
        self.state = StepState(step=0, world_size=1, strategy="hf")
        self._files: dict[str, Any] = {}
        self._source: dict[str, tuple[str, int, str]] = {}
        """fqn -> (Hugging Face name, rotary heads, file)."""
        self._infos: list[TensorInfo] = []
        # The fix a mismatch message ends with: config.json's own shape is the model the folder holds.
        fix = _fix(model_cfg, own) if model_cfg is not None else ""
        if model_cfg is not None and (own.n_heads, own.n_kv_heads) != (model_cfg.n_heads, model_cfg.n_kv_heads):
            # Equal shapes can hide this, and the rotary row order depends on the head count.
            raise ValueError(f"{self.dir}/config.json has {own.n_heads} attention heads ({own.n_kv_heads} "
                             f"key/value), model preset {model_cfg.name} {model_cfg.n_heads} "
                             f"({model_cfg.n_kv_heads}); {fix}")
        self._map(fix, preset=model_cfg is not None)

    def _map(self, fix: str, *, preset: bool) -> None:
        """Find every parameter's tensor and check its shape (file headers only); nothing may be left over."""
        located = {name: file for file in self._file_names() for name in self._open(file).keys()}  # noqa: SIM118
        tied = bool(self.hf.get("tie_word_embeddings")) and "lm_head.weight" not in located
        for fqn, shape in model_shapes(self.cfg).items():
            name = "model.embed_tokens.weight" if fqn == "output.weight" and tied else hf_name(fqn)
            if name not in located:
                raise ValueError(f"{self.dir} has no tensor {name} ({fqn}); " + (fix or
                                 "config.json describes a model with it: the folder is incomplete"))
            piece = self._open(located[name]).get_slice(name)
            held = tuple(piece.get_shape())
            if held != shape:
                wants = f"model preset {self.cfg.name} expects" if preset else "its config.json implies"
                raise ValueError(f"{name} ({fqn}) in {self.dir} has shape {held}; {wants} {shape}; "
                                 + (fix or "config.json and the weights disagree: the folder is broken"))
            dtype = _TORCH_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise ValueError(f"{name} in {self.dir} is {piece.get_dtype()}; weights are read as one of "
                                 f"{', '.join(_TORCH_DTYPES)} (dequantise the model first)")
            self._source[fqn] = (name, rotary_heads(fqn, self.cfg), located[name])
            self._infos.append(TensorInfo(model_key(fqn), shape, dtype))
        used = {name for name, _, _ in self._source.values()}
        extra = sorted(n for n in located if n not in used and not IGNORED.fullmatch(n))
        if extra:
            raise ValueError(f"{extra[0]} in {self.dir} ({len(extra)} such tensor(s)) has no place in this "
                             f"Llama Transformer; {fix or 'the folder holds another architecture'}")

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, key: str) -> torch.Tensor:
        name, heads, file = self._locate(key)
        tensor = self._files[file].get_tensor(name)
        return from_hf_rows(tensor, heads) if heads else tensor

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor in our layout, reading little more than those rows: a
        q/k slice reads the whole heads it touches."""
        name, heads, file = self._locate(key)
        piece = self._files[file].get_slice(name)
        if not heads:
            return piece[start:stop]
        head_dim = piece.get_shape()[0] // heads
        first, last = start // head_dim, -(-stop // head_dim)
        block = from_hf_rows(piece[first * head_dim:last * head_dim], last - first)
        return block[start - first * head_dim:stop - first * head_dim]

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, reading only the rows that hold them."""
        name, _, file = self._locate(key)
        row = math.prod(self._files[file].get_slice(name).get_shape()[1:])
        first, last = start // row, -(-stop // row)
        return self.read_rows(key, first, last).reshape(-1)[start - first * row:stop - first * row]

    def close(self) -> None:
        self._files.clear()  # safe_open handles unmap when dropped

    def _locate(self, key: str) -> tuple[str, int, str]:
        kind, fqn, _ = split_key(key)
        if kind != MODEL or fqn not in self._source:
            raise KeyError(f"{key}: a Hugging Face folder holds model weights only (model/<fqn>)")
        return self._source[fqn]

    def _file_names(self) -> list[str]:
        index = self.dir / INDEX
        if index.exists():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if (self.dir / "model.safetensors").exists():
            return ["model.safetensors"]
        raise ValueError(f"{self.dir} has neither {INDEX} nor model.safetensors; a Hugging Face folder "
                         "saved as .bin needs re-saving with save_pretrained(safe_serialization=True)")

    def _open(self, file: str) -> Any:
        if file not in self._files:
            from safetensors import safe_open

            path = self.dir / file
            if not path.exists():
                raise ValueError(f"{path}: listed in {INDEX} but missing; the folder is incomplete")
            self._files[file] = safe_open(str(path), framework="pt")
        return self._files[file]


def model_config_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """The ModelConfig fields (all but name) of a Hugging Face folder's config.json."""
    return model_fields(_read_config(Path(hf_dir)))


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.exists():
        raise ValueError(f"{folder}: no {CONFIG}; point at a Hugging Face model folder (the one holding "
                         f"{CONFIG} and *.safetensors)")
    return json.loads(path.read_text())


def _fix(cfg: ModelConfig, own: ModelConfig) -> str:
    """'pick the model preset that matches config.json (or set model.dim=...)' for a mismatch."""
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
    differ = " ".join(f"model.{k}={getattr(own, k)}" for k in keys if getattr(own, k) != getattr(cfg, k))
    return "pick the model preset that matches config.json" + (f" (or set {differ})" if differ else "")


# --- checkpoint.init_from -----------------------------------------------------------------------------


def load_init_weights(engine: Engine, cfg: Config, world: World) -> None:
    """Fill a freshly built engine with the weights of the Hugging Face folder `checkpoint.init_from`.

    Each rank reads what it holds: FSDP2 the rows of its dim-0 shard, ZeRO-3 the flat range of its
    partition (and the rows around it); DDP and ZeRO-1/2 hold whole parameters and read them whole.
    DeepSpeed's fp32 master copy gets the weights too, or its first step would undo them.
    """
    assert cfg.checkpoint.init_from, "checkpoint.init_from is not set"
    started = time.perf_counter()
    reader = HfReader(Path(cfg.checkpoint.init_from), cfg.model)
    nbytes = 0
    try:
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                nbytes += _load_param(engine, param, reader, model_key(name), world)
    finally:
        reader.close()
    if world.rank == 0:
        for difference in function_differences(reader.hf, cfg.model):
            log.warning("checkpoint.init_from=%s: %s", cfg.checkpoint.init_from, difference)
        log.info("weights from %s (checkpoint.init_from): %.1f MB read by rank 0 in %.2f s",
                 cfg.checkpoint.init_from, nbytes / 1e6, time.perf_counter() - started)


def _load_param(engine: Engine, param: torch.Tensor, reader: HfReader, key: str, world: World) -> int:
    """Copy this rank's part of one parameter from the folder; returns the bytes read."""
    if hasattr(param, "ds_tensor"):
        return _load_zero3(param, reader, key, world)
    if hasattr(param, "to_local"):
        start, stop = _dtensor_rows(param)
        local = param.to_local()
        if local.shape[0] != stop - start:
            raise RuntimeError(f"{key}: local shard has {local.shape[0]} rows, rows [{start}, {stop}) expected; "
                               "FSDP's sharding is not the torch.chunk split this loader assumes")
        if stop == start:
            return 0
        rows = reader.read_rows(key, start, stop)
        local.copy_(rows)
        return rows.nbytes
    full = reader.read(key)
    param.copy_(full)
    if engine.name == "deepspeed":
        from deepspeed.utils import safe_set_full_fp32_param

        if not hasattr(param, "_hp_mapping"):
            raise RuntimeError(f"{key}: DeepSpeed keeps no fp32 mapping for this parameter; "
                               "checkpoint.init_from supports ZeRO stages 1-3")
        safe_set_full_fp32_param(param, full)  # narrows to this rank's fragment of the master copy
    return full.nbytes


def _dtensor_rows(param: Any) -> tuple[int, int]:
    """The global rows [start, stop) of this rank's shard: FSDP2 splits dim 0 as torch.chunk does,
    once per mesh dimension that shards (HSDP's replicate dimension holds copies)."""
    start, stop = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not (placement.is_shard() and placement.dim == 0):
            raise NotImplementedError(f"placement {placement}: only dim-0 sharding is read in shards")
        length, parts = stop - start, param.device_mesh.size(mesh_dim)
        chunk, index = -(-length // parts), param.device_mesh.get_local_rank(mesh_dim)
        start, stop = start + min(index * chunk, length), start + min((index + 1) * chunk, length)
    return start, stop


def _load_zero3(param: Any, reader: HfReader, key: str, world: World) -> int:
    """A ZeRO-3 partition is elements [rank * size, (rank + 1) * size) of the flattened parameter,
    zero-padded at the end; it is written into the bf16/fp32 partition (ds_tensor) and into the
    optimizer's fp32 partition."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus, ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param

    size = param.ds_tensor.ds_numel
    rank = dist.get_rank(group=param.ds_process_group)
    start, stop = rank * size, min((rank + 1) * size, param.ds_numel)
    values, nbytes = torch.zeros(size, dtype=torch.float32), 0
    if stop > start:
        part = reader.read_flat(key, start, stop)
        values[:stop - start], nbytes = part, part.nbytes
    if param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE:
        # The partition lives on NVMe: DeepSpeed's own gather/re-partition path writes it (rank 0
        # reads the whole tensor here; this path is not covered by the tests, which have no NVMe).
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if world.rank == 0:
                param.data.copy_(reader.read(key))
    else:
        param.ds_tensor.copy_(values)
    if param.ds_status == ZeroParamStatus.AVAILABLE:
        # Gathered already (a persistent small parameter): the full copy is what forward uses.
        param.data.copy_(reader.read(key))
    if param.requires_grad:
        safe_set_local_fp32_param(param, values)
    return nbytes
