"""Resuming at another world size or strategy: when a job must convert the step it resumes, and
where the converted copy lives.

The copy is committed inside the step it was made from, `step-40/converted/<target>/` with its own
manifest, so that
  - the original stays as it was (a later resume at the old size or strategy uses it directly),
  - the next resume at the new size finds the copy and converts nothing,
  - retention keeps or deletes the two together (they are one step).
The work itself is split over the job's ranks (each writes its part of the target's files on its
node's scratch; the nodes upload them; rank 0 writes the index files and the manifest last).
"""

from __future__ import annotations

from hpc.checkpoint.convert.steps import Target, format_of_strategy
from hpc.checkpoint.manifest import Manifest, step_dir

CONVERTED_DIR = "converted"


def conversion_reason(manifest: Manifest, target: Target) -> str | None:
    """Why this job cannot load the step as saved, or None when it can (DCP reshards on load
    between any world sizes, DDP and every FSDP sharding)."""
    if manifest.format != target.format:
        return (f"saved by {_saved_by(manifest)} ({manifest.format} format); this job runs "
                f"{target.describe()}")
    if manifest.format == "deepspeed":
        if manifest.zero_stage != target.strategy.zero_stage:
            return f"saved by {_saved_by(manifest)}; this job runs {target.describe()}"
        if manifest.world_size != target.world_size:
            return (f"saved by {_saved_by(manifest)}, and DeepSpeed checkpoints are bound to their world "
                    f"size; this job runs {target.describe()}")
    return None


def _saved_by(manifest: Manifest) -> str:
    what = manifest.strategy + (f" ZeRO-{manifest.zero_stage}" if manifest.zero_stage else "")
    return f"{what} at world size {manifest.world_size}"


def converted_folder(step: int, target: Target) -> str:
    """Where the converted copy of `step` for `target` lives, relative to the checkpoint folder."""
    return f"{step_dir(step)}/{CONVERTED_DIR}/{target.key}"


__all__ = ["CONVERTED_DIR", "conversion_reason", "converted_folder", "format_of_strategy"]
