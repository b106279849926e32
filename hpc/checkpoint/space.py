"""Will the checkpoints fit? Checked before training starts, not discovered by a crash hours later."""

from __future__ import annotations

from pathlib import Path

from hpc.checkpoint.storage import Storage, free_bytes_at
from hpc.config import Config
from hpc.train.model import count_params

# Bytes per parameter in a checkpoint: fp32 weights (or fp32 master copy) + AdamW's two fp32 moments.
STATE_BYTES_PER_PARAM = 12


def estimate_bytes(cfg: Config) -> int:
    """Size of one checkpoint, all ranks together."""
    per_param = STATE_BYTES_PER_PARAM
    if cfg.strategy.name == "deepspeed" and cfg.strategy.mixed_precision != "fp32":
        per_param += 2  # DeepSpeed also saves the half-precision module weights
    return count_params(cfg.model) * per_param + (1 << 20)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_space(cfg: Config, storage: Storage, scratch: Path, num_nodes: int, *, drainer: bool,
                rank: int) -> str | None:
    """A clear problem when scratch (checked by each node's first rank) or the persistent location
    (checked by rank 0) has too little room; None when both fit."""
    one = estimate_bytes(cfg)
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
