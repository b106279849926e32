"""The collectives checkpointing runs, over one gloo group of its own.

Saves finish in a background thread while training's collectives go on; on the default group the
two would interleave and corrupt each other, so every checkpoint collective (and DCP's planning)
runs on this group instead. With one rank, or no process group at all, each is a local no-op.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hpc.checkpoint.manifest import CheckpointError


class Collectives:
    """gather / broadcast from rank 0 / barrier / raise-together over the checkpoint group."""

    def __init__(self, world_size: int, timeout_s: float, barrier_timeout_s: float | None = None) -> None:
        self.world_size = world_size
        self.barrier_timeout = timedelta(seconds=barrier_timeout_s or timeout_s)
        self.group: Any = None
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    @property
    def alone(self) -> bool:
        return self.group is None or self.world_size == 1

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.alone:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass anything, usually None)."""
        if self.alone:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """All ranks here, within the collective timeout (not the group's, which allows for a whole
        save): a rank that hangs is found as soon as a training collective would find it, and
        rank 0's error names it (gloo's monitored barrier)."""
        if not self.alone:
            dist.monitored_barrier(group=self.group, timeout=self.barrier_timeout, wait_all_ranks=True)

    def raise_any(self, problem: str | None) -> None:
        """Every rank raises together (the same message), or none does."""
        problems = [p for p in self.gather(problem) if p]
        if problems:
            raise CheckpointError(problems[0])

    def close(self) -> None:
        """Destroy the group (not after a failed collective: a peer may be gone, and it would hang)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
