"""The training loop. It knows the config, its place in the world and a stop source; nothing of SLURM.

    for each step:  take this rank's micro-batches -> set the lr -> forward/backward each
                    (gradients reduced on the last only) -> clip + optimizer step
                    -> one small all-reduce: the global loss, which kinds of stop any rank saw,
                       and whether any rank's schedule wants a save (rank 0's clock)
                    -> checkpoint when due, when stopping, and at the end

Checkpointing is reached through the `Checkpoints` protocol (implemented in hpc.checkpoint; the
trainer stage does not import it): restore before the first step, save at step boundaries.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from hpc.config import Config, ConfigError
from hpc.faults import fault_point
from hpc.train.data import GlobalBatches, batches_for
from hpc.train.loggers import Loggers, open_loggers
from hpc.train.metrics import Meter, StepMetrics
from hpc.train.optim import lr_at, set_lr
from hpc.train.rng import seed_rank_streams
from hpc.train.strategies import Engine, World, build_engine

log = logging.getLogger("hpc")


class Checkpoints(Protocol):
    """What the loop asks of checkpointing."""

    def restore(self, engine: Engine, batches: GlobalBatches) -> int:
        """Load the checkpoint to resume from (model, optimizer, data position, RNG); the step to
        start at, 0 when there is none."""

    def due(self, step: int) -> bool:
        """This rank's vote that the regular schedule saves after this step. Asked before the
        step's all-reduce, which ORs the votes: a vote from a clock may come from one rank alone,
        and still every rank saves at the same step."""

    def save(self, step: int, engine: Engine, batches: GlobalBatches) -> None:
        """Save the state after `step` steps; may return before the save is committed."""

    def finish(self, stopped: bool = False) -> None:
        """Wait until the last save committed; raise if it could not (unless the run was stopped:
        whoever stopped it decides what an uncommitted stop save means)."""


@dataclass
class TrainResult:
    steps: int
    """Optimizer steps completed (in total, across restarts)."""
    stopped_early: bool
    """The stop event ended the run before max_steps."""
    losses: list[float] = field(default_factory=list)
    """Global mean loss of every step this run."""
    step_times: list[float] = field(default_factory=list)
    """Seconds of every step this run."""
    records: list[StepMetrics] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    start_step: int = 0
    """The step this run resumed at (0: a fresh start)."""


STOP_BITS = 8
"""Kinds of stop request the loop carries (a bitmask, see hpc.requeue.signals)."""


class StopSource(Protocol):
    """What the loop asks of a stop request (a threading.Event also works: one kind, bit 0)."""

    def poll(self) -> int:
        """Bits of the kinds of stop request this rank has seen; called at every step boundary."""

    def agreed(self, mask: int) -> None:
        """Every rank agreed to stop; `mask` is the OR of all ranks' bits."""


def _poll(stop: StopSource | threading.Event | None) -> int:
    if stop is None:
        return 0
    if isinstance(stop, threading.Event):
        return int(stop.is_set())
    return stop.poll()


def _agree(loss: torch.Tensor, mask: int, world_size: int, save: bool = False) -> tuple[float, int, bool]:
    """Global mean loss, the OR of every rank's stop bits and of their save votes, in one all-reduce."""
    bits = [float(mask >> i & 1) for i in range(STOP_BITS)] + [float(save)]
    packed = torch.cat([loss.float().cpu().reshape(1), torch.tensor(bits)])
    if world_size > 1:
        # gloo reduces CPU tensors; NCCL needs them on the GPU.
        device = loss.device if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
    agreed = sum(1 << i for i in range(STOP_BITS) if packed[1 + i] > 0)
    return float(packed[0]) / world_size, agreed, bool(packed[1 + STOP_BITS] > 0)


def _open_loggers_together(cfg: Config, world: World, run_dir: Path | None, step: int) -> Loggers:
    """Rank 0 opens the run's loggers; when it cannot, every rank raises the same error at once
    (rather than the others waiting in the first step's collectives for rank 0, which is gone)."""
    error = None
    try:
        loggers = open_loggers(cfg, run_dir if world.rank == 0 else None, start_step=step)
    except ConfigError as err:
        error, loggers = err, Loggers([])
    if world.world_size > 1 and set(cfg.train.loggers) - {"jsonl"}:
        failed = [str(error) if error else None]
        dist.broadcast_object_list(failed, src=0)
        error = ConfigError(failed[0]) if failed[0] else None
    if error is not None:
        raise error
    return loggers


def train(cfg: Config, world: World, *, run_dir: Path | None = None,
          stop: StopSource | threading.Event | None = None, engine: Engine | None = None,
          sharded_init: bool | None = None, checkpoints: Checkpoints | None = None) -> TrainResult:
    """Train from the resumed step (or 0) to cfg.train.max_steps, or until any rank's stop source
    asks; every rank returns at the same step."""
    engine = engine or build_engine(cfg, world, sharded_init=sharded_init)
    train_cfg = cfg.train
    batches = batches_for(cfg, world.rank, world.world_size)
    meter = Meter(cfg, world.world_size, world.device)
    result = TrainResult(steps=0, stopped_early=False)
    if world.rank == 0:
        log.info("%s: %.1f M parameters, %.1f MB on this rank; global batch %d x %d tokens",
                 engine.name, sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) / 1e6,
                 engine.local_param_bytes() / 1e6, batches.global_batch_size, train_cfg.seq_len)

    seed_rank_streams(train_cfg.seed, world.rank)
    step = checkpoints.restore(engine, batches) if checkpoints is not None else 0
    result.start_step = step
    # Rank 0's dashboards, opened before the first step: one that cannot start stops the job now.
    loggers = _open_loggers_together(cfg, world, run_dir, step)
    with loggers:
        while step < train_cfg.max_steps:
            started = time.perf_counter()
            micro_batches = batches.next_step()
            lr = lr_at(step, train_cfg)
            set_lr(engine.optimizer, lr)
            loss_sum = torch.zeros((), device=world.device)
            for i, (inputs, targets) in enumerate(micro_batches):
                inputs = inputs.to(world.device, non_blocking=True)
                targets = targets.to(world.device, non_blocking=True)
                loss_sum += engine.forward_backward(inputs, targets, sync=i == len(micro_batches) - 1)
            grad_norm = engine.step()
            # A fault's stop counts as 'other' (bit 3, hpc.requeue.signals.OTHER).
            mask = _poll(stop) | (8 if fault_point("step_end", step=step + 1, rank=world.rank) else 0)
            # Asked before the all-reduce, so that a save on rank 0's clock needs no collective of its own.
            vote = checkpoints is not None and checkpoints.due(step + 1)
            loss, agreed, due = _agree(loss_sum / len(micro_batches), mask, world.world_size, vote)
            stop_now = agreed != 0
            if stop_now and stop is not None and not isinstance(stop, threading.Event):
                stop.agreed(agreed)
            step += 1
            meter.add(time.perf_counter() - started)
            result.losses.append(loss)
            if step % train_cfg.log_every == 0 or step == train_cfg.max_steps or stop_now:
                record = meter.record(step, loss, lr, grad_norm, batches.consumed_samples)
                result.records.append(record)
                if world.rank == 0:
                    loggers.write(record)
                    log.info(record.line(train_cfg.max_steps))
            if checkpoints is not None and (stop_now or step == train_cfg.max_steps or due):
                checkpoints.save(step, engine, batches)
            if stop_now:
                result.stopped_early = step < train_cfg.max_steps
                break
    if checkpoints is not None:
        checkpoints.finish(stopped=result.stopped_early)
    result.steps = step
    result.summary = meter.summary()
    result.step_times = meter.step_times
    return result
