"""Strategies: one file per engine, one interface (`Engine`), chosen by `strategy.name`."""

from __future__ import annotations

from hpc.config import Config
from hpc.train.strategies.base import Engine, World


def build_engine(cfg: Config, world: World, *, sharded_init: bool | None = None, wrap: str = "block") -> Engine:
    """The engine `cfg.strategy.name` names; engines are imported only when chosen (DeepSpeed is slow
    to import). `wrap`: FSDP's units of sharding (the benchmark compares them)."""
    name = cfg.strategy.name
    if name == "ddp":
        from hpc.train.strategies.ddp import DDPEngine

        return DDPEngine(cfg, world)
    if name == "fsdp":
        from hpc.train.strategies.fsdp import FSDPEngine

        return FSDPEngine(cfg, world, sharded_init=sharded_init, wrap=wrap)
    if name == "deepspeed":
        from hpc.train.strategies.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, world, sharded_init=sharded_init)
    raise ValueError(f"strategy.name={name!r}: no such engine")


__all__ = ["Engine", "World", "build_engine"]
