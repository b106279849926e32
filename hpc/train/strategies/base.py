"""The one interface every strategy implements, and what they share.

A strategy turns the config and this rank's place in the world into an `Engine`: a model ready for
forward, and two verbs the loop calls. The loop never asks which engine it has.

    for micro-batch in step:   loss = engine.forward_backward(x, y, sync=is_last)
    grad_norm = engine.step()  # clip, optimizer step, zero grads
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from hpc.config import Config
from hpc.launch.rendezvous import Rendezvous
from hpc.estimate.shape import count_params
from hpc.train.model import Transformer, loss_fn

# Above this many fp32 parameter bytes a model is built on the meta device and materialised only
# after sharding; below it every rank builds the whole model from the seed (bit-identical starting
# weights whatever the strategy, which the equivalence tests rely on).
SHARDED_INIT_BYTES = 2 << 30

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class World:
    """This rank's place among the ranks; all the trainer knows of the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @classmethod
    def from_rendezvous(cls, rdzv: Rendezvous, *, local_world_size: int) -> World:
        return cls(rank=rdzv.rank, world_size=rdzv.world_size, local_rank=rdzv.local_rank,
                   local_world_size=local_world_size, device=torch.device(rdzv.device))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


class Engine(ABC):
    """A model wrapped for one strategy, with the optimizer the loop schedules."""

    name: str
    model: nn.Module
    """What the loop calls for forward (the wrapped module)."""
    module: Transformer
    """The bare model underneath."""
    optimizer: torch.optim.Optimizer
    """The base optimizer; its param_groups' lr is set by the loop before every step."""

    @abstractmethod
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *, sync: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; gradients are reduced across ranks only when
        `sync` (the last micro-batch of the step). Returns the unscaled loss, detached."""

    @abstractmethod
    def step(self) -> float:
        """Clip, step the optimizer, zero the gradients; returns the global grad norm before clipping."""

    def local_param_bytes(self) -> int:
        """Bytes of parameters this rank holds (its shards only)."""
        return sum(_local(p).numel() * _local(p).element_size() for p in self.module.parameters())

    def close(self) -> None:
        """Release engine state so another engine can be built in the same process."""


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def wants_sharded_init(cfg: Config, sharded_init: bool | None) -> bool:
    if sharded_init is not None:
        return sharded_init
    return count_params(cfg.model) * 4 > SHARDED_INIT_BYTES


def build_full_model(cfg: Config, device: torch.device) -> Transformer:
    """The whole model on `device`, filled from the seed: identical on every rank."""
    with device:
        model = Transformer(cfg.model)
    # Seed after construction, so the numbers drawn do not depend on what the constructors drew
    # (DeepSpeed's partitioned ZeRO-3 build draws the same sequence and gets the same weights).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model.init_weights()
    model.set_activation_checkpointing(cfg.strategy.activation_checkpointing, cfg.strategy.ac_every_k)
    return model


def build_meta_model(cfg: Config) -> Transformer:
    """The model's structure with no storage: nothing is allocated until the strategy shards it."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.set_activation_checkpointing(cfg.strategy.activation_checkpointing, cfg.strategy.ac_every_k)
    return model


def autocast(world: World, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for engines that keep fp32 weights and cast per op (DDP)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(world.device.type, dtype=DTYPES[precision])


def compute_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return loss_fn(model(inputs), targets)


def grad_norm_value(norm: torch.Tensor | float | None) -> float:
    """A plain float from whatever the engine returned (tensor, DTensor, float, None)."""
    if norm is None:
        return float("nan")
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
