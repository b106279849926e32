"""FSDP2 (`fully_shard`): each transformer block is one unit of sharding, then the root.

Sharding modes map onto FSDP2 as
  full_shard     1-D mesh over all ranks; parameters re-sharded after forward (ZeRO-3-like)
  shard_grad_op  same mesh, parameters kept gathered from forward to backward (ZeRO-2-like)
  hybrid_shard   2-D mesh (replicate, shard): shard within a group of `hsdp_shard_size` ranks
                 (default: a node), replicate across groups
  no_shard       2-D mesh (world, 1): every rank a full replica, gradients all-reduced (DDP-like)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from hpc.config import Config
from hpc.train.model import Transformer, materialize
from hpc.train.optim import build_optimizer
from hpc.train.strategies.base import (
    DTYPES,
    Engine,
    World,
    build_full_model,
    build_meta_model,
    compute_loss,
    grad_norm_value,
    wants_sharded_init,
)


def mesh_shape(cfg: Config, world_size: int, local_world_size: int) -> tuple[int, ...]:
    sharding = cfg.strategy.sharding
    if sharding == "no_shard":
        return (world_size, 1)
    if sharding == "hybrid_shard":
        shard = cfg.strategy.hsdp_shard_size or local_world_size
        if world_size % shard:
            raise ValueError(f"strategy.hsdp_shard_size={shard} must divide the world size {world_size}")
        return (world_size // shard, shard)
    return (world_size,)


def build_mesh(cfg: Config, world: World) -> DeviceMesh:
    shape = mesh_shape(cfg, world.world_size, world.local_world_size)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh(world.device.type, shape, mesh_dim_names=names)


WRAPS = ("block", "model", "size", "size:N")
"""Units of sharding: block (each transformer block its own unit: the default), model (the whole
model one unit: every parameter gathered at once), size[:N] (consecutive blocks grouped until a
unit holds at least N parameters, default SIZE_WRAP_PARAMS, as a size-based auto-wrap policy
would). The benchmark compares them (python -m hpc.bench --fsdp-wrap)."""
SIZE_WRAP_PARAMS = 100_000_000


def units(model: Transformer, wrap: str) -> list[list[nn.Module]]:
    """The groups of blocks that become one FSDP unit each (the root takes the rest)."""
    if wrap == "model":
        return []
    if wrap == "block":
        return [[block] for block in model.layers]
    kind, _, size = wrap.partition(":")
    if kind != "size" or not (size.isdigit() or not size):
        raise ValueError(f"FSDP wrap {wrap!r}: one of {', '.join(WRAPS)}")
    min_params = int(size) if size else SIZE_WRAP_PARAMS
    groups: list[list[nn.Module]] = [[]]
    held = 0
    for block in model.layers:
        if held >= min_params:
            groups.append([])
            held = 0
        groups[-1].append(block)
        held += sum(p.numel() for p in block.parameters())
    return [g for g in groups if g]


def shard_model(model: Transformer, cfg: Config, mesh: DeviceMesh, wrap: str = "block") -> None:
    """fully_shard every block (or group of blocks, `wrap`), then the root (embeddings, final norm,
    output)."""
    strategy = cfg.strategy
    if strategy.mixed_precision == "bf16":
        # Compute in bf16, reduce gradients in fp32: bf16 sums over many ranks lose too much.
        mp = MixedPrecisionPolicy(param_dtype=DTYPES["bf16"], reduce_dtype=torch.float32)
        # A block's forward inputs are left as they come: FSDP2 would cast every floating-point
        # argument to bf16, the fp32 rotary table too (8 significant bits: wrong angles far into a long
        # sequence). The hidden state needs no cast: it leaves the root's bf16 embedding in bf16.
        block_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    else:
        mp = block_mp = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if strategy.offload_params == "cpu" else OffloadPolicy()
    reshard = strategy.sharding != "shard_grad_op"
    for unit in units(model, wrap):
        fully_shard(unit[0] if len(unit) == 1 else unit, mesh=mesh, reshard_after_forward=reshard,
                    mp_policy=block_mp, offload_policy=offload)
    # The root's parameters are needed first in backward (output layer): keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg: Config, world: World, *, sharded_init: bool | None = None, wrap: str = "block") -> None:
        self.cfg, self.world = cfg, world
        self.mesh = build_mesh(cfg, world)
        self.replicated = self.mesh.ndim == 2
        if wants_sharded_init(cfg, sharded_init):
            self.module = build_meta_model(cfg)
            shard_model(self.module, cfg, self.mesh, wrap)
            # Each shard is drawn from its own stream, but replicas of a shard (HSDP's replicate
            # dimension) must draw the same numbers, so the offset is the rank within the shard group.
            shard_rank = self.mesh["shard"].get_local_rank()
            # With CPU offload the parameter shards live on the host between uses, but buffers
            # (the rotary table) are read by the GPU every forward: they stay on the device.
            device = "cpu" if cfg.strategy.offload_params == "cpu" else world.device
            materialize(self.module, device, cfg.train.seed, rank_offset=shard_rank,
                        buffer_device=world.device)
        else:
            self.module = build_full_model(cfg, world.device)
            shard_model(self.module, cfg, self.mesh, wrap)
        self.model = self.module
        self.optimizer = build_optimizer(self.module, cfg.train)
        self.accum = cfg.train.grad_accum

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *, sync: bool) -> torch.Tensor:
        # Gradients are reduce-scattered on every micro-step and accumulate as shards: skipping the
        # reduce-scatter would leave each rank holding the whole unsharded fp32 gradient (280 GB at
        # 70B). What waits for the last micro-step is the all-reduce across replicas (HSDP's
        # replicate dimension, no_shard), the collective that gradient accumulation exists to save.
        if self.replicated:
            self.module.set_requires_all_reduce(sync)
        loss = compute_loss(self.model, inputs, targets)
        (loss / self.accum).backward()
        return loss.detach()

    def step(self) -> float:
        clip = self.cfg.train.grad_clip or float("inf")
        # On DTensor gradients the norm is reduced over the whole mesh: a true global norm.
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm_value(norm)
