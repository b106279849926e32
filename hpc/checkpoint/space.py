"""Will the checkpoints fit? Checked before training starts, not discovered by a crash hours later."""

from __future__ import annotations

from pathlib import Path

from hpc.checkpoint.storage import Storage, free_bytes_at
from hpc.config import Config
# One estimate of a checkpoint's size for the planner (login node) and this check (in the job).
from hpc.estimate.memory import checkpoint_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_space(cfg: Config, storage: Storage, scratch: Path, num_nodes: int, *, drainer: bool,
                rank: int) -> str | None:
    """A clear problem when scratch (checked by each node's first rank) or the persistent location
    (checked by rank 0) has too little room; None when both fit."""
    one = checkpoint_bytes(cfg)
    margin = cfg.checkpoint.space_margin
    if drainer:
        # A node holds its share of the step being written and of the newest committed one; from
        # an object store, a resume first downloads the whole step to every node.
        need = (2 * one / num_nodes + (one if storage.local_path("") is None else 0)) * margin
        free = free_bytes_at(scratch)
        if free < need:
            return (f"node-local scratch {scratch} has {_gb(free)} free; checkpoints need {_gb(need)} "
                    f"there (2 steps x {_gb(one / num_nodes)} per node x margin {margin}). HINT: free "
                    "space there, or point cluster.scratch_dir at a larger disk")
    if rank == 0:
        free_persistent = storage.free_bytes()
        need = (cfg.checkpoint.keep_last + 1) * one * margin
        if free_persistent is not None and free_persistent < need:
            return (f"checkpoint storage {storage.url} has {_gb(free_persistent)} free; keeping "
                    f"checkpoint.keep_last={cfg.checkpoint.keep_last} (+1 being written) checkpoints of "
                    f"{_gb(one)} needs {_gb(need)} (margin {margin}). HINT: free space, lower "
                    "checkpoint.keep_last, or set checkpoint.dir to a larger location")
    return None
