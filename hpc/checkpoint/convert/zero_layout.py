"""Where a DeepSpeed ZeRO checkpoint keeps each element: the flat partitions of one world size and
stage, as DeepSpeed 0.19 builds them (stage_1_and_2.py, bf16_optimizer.py, stage3.py), and the
settings of a DeepSpeed config that change them. Pure arithmetic on shapes; no tensors.

  ZeRO-1/2  each optimizer group's parameters flattened in order (round-robin reordered when
            round_robin_gradients, each start aligned to 16 bytes when parameter_alignment),
            zero-padded at the end to a multiple of 2 x world, cut into `world` equal partitions.
  ZeRO-3    each parameter zero-padded to a multiple of world and cut into `world` equal pieces; a
            rank's flat tensor per sub-group (at most sub_group_size elements) is its pieces in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc.checkpoint.manifest import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"


def model_states_name(rank: int, stage: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else MODEL_STATES


def optim_states_name(rank: int, bf16: bool) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# ---- where each element lives ---------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """A run of a parameter's flat elements held by one rank."""

    rank: int
    flat: int
    """Which flat tensor of that rank: the optimizer group (ZeRO-1/2) or sub-group (ZeRO-3)."""
    offset: int
    """Where the run starts in that flat tensor."""
    start: int
    """Where the run starts in the parameter."""
    count: int


@dataclass
class Layout:
    """The flat partitions of one world size and stage, and where each parameter's elements are."""

    stage: int
    world: int
    groups: list[list[str]]
    """Each optimizer group's parameters in flat order."""
    shapes: dict[str, tuple[int, ...]]
    flat_group: list[int]
    """The optimizer group of each flat tensor."""
    flat_numel: list[int]
    """Each flat tensor's size on every rank, padding included (AdamW's state has this size)."""
    saved_numel: list[list[int]]
    """[rank][flat]: the fp32 master partition's size as saved (ZeRO-1/2 drop trailing padding)."""
    used: list[int] = field(default_factory=list)
    """Each flat's elements before its trailing padding, over all ranks (ZeRO-1/2)."""
    param_padding: list[list[int]] = field(default_factory=list)
    """ZeRO-1/2: zeros after each parameter in its group's flat buffer (parameter_alignment)."""
    pieces: dict[str, list[Piece]] = field(default_factory=dict)

    def fqns(self) -> list[str]:
        return [fqn for group in self.groups for fqn in group]

    def on_ranks(self, fqn: str, ranks: range) -> list[Piece]:
        return [p for p in self.pieces[fqn] if p.rank in ranks]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def layout_12(groups: list[list[str]], shapes: dict[str, tuple[int, ...]], world: int, *,
              param_padding: list[list[int]] | None = None, keep_padding: bool = False) -> Layout:
    """ZeRO-1/2 (and the BF16 optimizer, `keep_padding`): groups flattened, padded to 2 x world."""
    padding = param_padding or [[0] * len(g) for g in groups]
    layout = Layout(1, world, groups, shapes, [], [], [[] for _ in range(world)], param_padding=padding)
    for g, group in enumerate(groups):
        offsets, at = [], 0
        for fqn, pad in zip(group, padding[g]):
            offsets.append(at)
            at += _numel(shapes[fqn]) + pad
        used = at
        # 2 elements = 4 bytes of fp16: DeepSpeed aligns NCCL's all-gather starts to that.
        size = math.ceil(used / (2 * world)) * 2 * world // world if used else 0
        layout.flat_group.append(g)
        layout.flat_numel.append(size)
        layout.used.append(used)
        for rank in range(world):
            real = min(max(used - rank * size, 0), size)
            layout.saved_numel[rank].append(size if keep_padding else real)
        for fqn, off in zip(group, offsets):
            pieces, n = [], _numel(shapes[fqn])
            start = 0
            while start < n and size:
                rank = (off + start) // size
                count = min(n - start, (rank + 1) * size - (off + start))
                pieces.append(Piece(rank, g, off + start - rank * size, start, count))
                start += count
            layout.pieces[fqn] = pieces
    return layout


def layout_3(groups: list[list[str]], shapes: dict[str, tuple[int, ...]], world: int,
             sub_groups: list[tuple[int, list[str]]]) -> Layout:
    """ZeRO-3: every parameter padded to a multiple of world and cut in `world` equal pieces."""
    layout = Layout(3, world, groups, shapes, [], [], [[] for _ in range(world)])
    for flat, (g, members) in enumerate(sub_groups):
        at = 0
        for fqn in members:
            n = _numel(shapes[fqn])
            part = math.ceil(n / world)
            layout.pieces[fqn] = [Piece(r, flat, at, r * part, min(part, n - r * part))
                                  for r in range(world) if n > r * part]
            at += part
        layout.flat_group.append(g)
        layout.flat_numel.append(at)
        for rank in range(world):
            layout.saved_numel[rank].append(at)
    return layout


def sub_groups_by_size(groups: list[list[str]], shapes: dict[str, tuple[int, ...]], world: int,
                       size: int) -> list[tuple[int, list[str]]]:
    """DeepSpeed's split of each group: close a sub-group once its partition reaches `size`."""
    out: list[tuple[int, list[str]]] = []
    for g, group in enumerate(groups):
        parts = [math.ceil(_numel(shapes[f]) / world) for f in group]
        if size >= sum(parts):
            out.append((g, list(group)))
            continue
        current, total = [], 0
        for fqn, part in zip(group, parts):
            current.append(fqn)
            total += part
            if total >= size or fqn == group[-1]:
                out.append((g, current))
                current, total = [], 0
    return out


def sub_groups_by_numel(groups: list[list[str]], shapes: dict[str, tuple[int, ...]], world: int,
                         flat_numel: list[int], where: Path) -> list[tuple[int, list[str]]]:
    """The saved split, recovered from the saved flat sizes (sub-groups hold whole parameters)."""
    out: list[tuple[int, list[str]]] = []
    for g, group in enumerate(groups):
        if not group and len(out) < len(flat_numel) and flat_numel[len(out)] == 0:
            out.append((g, []))  # a group without parameters still has its (empty) flat
            continue
        current: list[str] = []
        total = 0
        for fqn in group:
            current.append(fqn)
            total += math.ceil(_numel(shapes[fqn]) / world)
            if len(out) < len(flat_numel) and total == flat_numel[len(out)]:
                out.append((g, current))
                current, total = [], 0
        if current:
            break
    if len(out) != len(flat_numel) or sum(len(m) for _, m in out) != sum(len(g) for g in groups):
        raise CheckpointError(f"{where}: ZeRO-3 flat groups of {flat_numel} elements do not match the parameter "
                              f"shapes saved beside it at world size {world}; are files of two saves mixed?")
    return out


# ---- what a DeepSpeed config changes -----------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def _enabled(ds_config: dict[str, Any], name: str) -> bool:
    section = ds_config.get(name) or {}
    return bool(section.get("enabled")) if isinstance(section, dict) else False


def model_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if _enabled(ds_config, "fp16"):
        return torch.float16
    return torch.bfloat16 if _enabled(ds_config, "bf16") or _enabled(ds_config, "bfloat16") else torch.float32


def uses_bf16_optimizer(ds_config: dict[str, Any], stage: int) -> bool:
    """DeepSpeed hands ZeRO-1 with bf16 weights and fp32 gradient accumulation to its BF16 optimizer
    (unless the optimizer is offloaded), which saves another layout."""
    dtype = model_dtype(ds_config)
    accum = _DTYPES.get(str((ds_config.get("data_types") or {}).get("grad_accum_dtype")).lower(), dtype)
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return stage == 1 and dtype == torch.bfloat16 and accum == torch.float32 and offload in (None, "none")


def round_robin(group: list[str], world: int) -> list[str]:
    return [fqn for r in range(world) for fqn in group[r::world]]


def alignment_padding(groups: list[list[str]], shapes: dict[str, tuple[int, ...]], align: int) -> list[list[int]]:
    """Zeros after each parameter but a group's last so the next starts on a multiple of `align`."""
    out = []
    for group in groups:
        pads, at = [], 0
        for i, fqn in enumerate(group):
            at += _numel(shapes[fqn])
            pads.append(0 if i == len(group) - 1 else -at % align)
            at += pads[-1]
        out.append(pads)
    return out
