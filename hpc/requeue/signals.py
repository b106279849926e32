"""Stop requests: signal handlers that only record (saving inside a handler fails intermittently
in other tools: the handler can run in the middle of a collective or of a save), and the job's own
deadline, raised from measured save times when SLURM's warning would come too late.

The loop polls `StopRequest.poll()` at every step boundary and all-reduces the bits, so every rank
learns every kind of request any rank saw; then it calls `agreed(mask)` once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Kinds of stop request, one bit each (the loop ORs them across ranks).
WARNING = 1
"""SLURM's warning signal (USR2 or USR1): the time limit is near, a preemption on a cluster with
preempt_send_user_signal, or someone asked with scancel."""
TERM = 2
"""SIGTERM: preemption (or the time limit itself, when the warning came too late)."""
DEADLINE = 4
"""The job's own deadline: end time minus the lead time measured saves need."""
OTHER = 8
"""Anything else (a fault injected by a test, a library caller's event)."""

NAMES = {WARNING: "warning signal", TERM: "SIGTERM", DEADLINE: "deadline", OTHER: "stop request"}


def describe(mask: int) -> str:
    return ", ".join(name for bit, name in NAMES.items() if mask & bit) or "none"


@dataclass
class StopRequest:
    """One per rank. `install()` takes over the warning signal and SIGTERM from whoever had them
    (submitit installs handlers that checkpoint and requeue from inside the handler)."""

    warning_signal: str = "USR2"
    deadline: float | None = None
    """Wall-clock time (time.time()) after which this rank asks to stop; rank 0 sets it."""
    seen: dict[int, float] = field(default_factory=dict)
    """First time each kind was seen on this rank."""
    agreed_mask: int = 0
    agreed_at: float | None = None
    on_poll: Callable[[], None] | None = None
    """Called at every poll (rank 0: recompute the deadline from new save measurements)."""
    _mask: int = 0
    signals: tuple[int, ...] = ()

    wakeup_fd: int | None = None
    """Read end of a pipe the interpreter writes each caught signal's number to at once, from C,
    even while the main thread is stuck in a collective (Python handlers wait for it to return)."""

    def install(self) -> StopRequest:
        self.signals = (getattr(signal, "SIG" + self.warning_signal), signal.SIGTERM)
        for signum in self.signals:
            signal.signal(signum, self._on_signal)
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self.wakeup_fd = read
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record: no logging (its lock may be held by the interrupted code), no I/O.
        kind = TERM if signum == signal.SIGTERM else WARNING
        self._mask |= kind
        self.seen.setdefault(kind, time.time())

    def set(self, kind: int = OTHER) -> None:
        self._mask |= kind
        self.seen.setdefault(kind, time.time())

    def is_set(self) -> bool:
        return bool(self.poll())

    def poll(self) -> int:
        """The kinds of stop request this rank has seen (bits), checking the deadline."""
        if self.on_poll is not None:
            self.on_poll()
        if self.deadline is not None and time.time() >= self.deadline and not self._mask & DEADLINE:
            self.set(DEADLINE)
        return self._mask

    def agreed(self, mask: int) -> None:
        """All ranks agreed to stop for these kinds (the OR over ranks)."""
        self.agreed_mask, self.agreed_at = mask, time.time()

    @property
    def first_seen(self) -> float | None:
        return min(self.seen.values()) if self.seen else None
