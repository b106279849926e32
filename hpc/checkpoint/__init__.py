"""Sharded checkpoints: staged on node-local scratch, drained to persistent storage, committed by a
manifest written last, resumed from the newest step that verifies."""

from hpc.checkpoint.checkpointer import Checkpointer, SaveOutcome
from hpc.checkpoint.manifest import CheckpointError, Manifest

__all__ = ["Checkpointer", "CheckpointError", "Manifest", "SaveOutcome"]
