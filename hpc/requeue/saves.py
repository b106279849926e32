"""What the requeue stage reads of checkpointing, as a protocol it owns (hpc.checkpoint's
`Checkpointer` satisfies it): the step resumed, the newest committed step, how each save went and
when the restore ran. Requeue decides with these; it never reaches into the checkpointer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SaveResult(Protocol):
    """One save's outcome."""

    @property
    def committed(self) -> bool: ...

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase: waited, blocked, write, upload, commit."""


class CheckpointRecord(Protocol):
    """The checkpoint side of one run, as requeue sees it."""

    @property
    def resumed_step(self) -> int | None:
        """The step this run resumed from (None: a fresh start)."""

    @property
    def last_committed(self) -> int | None:
        """The newest step committed by this run or resumed from."""

    @property
    def outcomes(self) -> Sequence[SaveResult]:
        """Every finished save of this run, oldest first."""

    @property
    def restore_window(self) -> tuple[float, float] | None:
        """Wall-clock start and end of the restore (None: not restored yet)."""


class NoCheckpoints:
    """The record before the checkpointer exists (a failure during set-up): nothing saved."""

    resumed_step: int | None = None
    last_committed: int | None = None
    outcomes: Sequence[SaveResult] = ()
    restore_window: tuple[float, float] | None = None
