"""When the regular schedule saves: every N steps, and on a clock (pure arithmetic, injectable clock).

    every_steps     step % every_steps == 0                  the same on every rank
    interval=fixed  checkpoint.every_minutes since the last save began
    interval=auto   Young/Daly: sqrt(2 x save x MTBF)        the first-order optimum (Young 1974,
                                                             Daly 2006) between time lost to saves
                                                             and work lost to a failure
                    at least save / 1%                       saves cost under 1% of training
                    within FLOOR_S .. CEILING_S              the ceiling wins: it bounds lost work
                    START_S until a save was measured
                    save: one save's start to its commit (save_duration), the lower median of the
                    newest RECENT; the resumed step's manifest gives the first after a requeue
    interval=never  no clock: every_steps, stops and the end only

The clock starts when training starts (after the restore) and restarts whenever a save begins, be
it regular, a stop's or the last one. Only rank 0 consults its clock; the loop carries rank 0's vote
to the others in the step's one all-reduce (hpc.train.loop), so every rank saves at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hpc.config.schema import CheckpointConfig

START_S = 30 * 60.0
"""Auto mode's interval before any save was measured: Young/Daly's value for a ~20 s save at a
24 h MTBF, and long enough that minute-long test runs never save on the clock."""
FLOOR_S = 5 * 60.0
"""Auto mode never saves more often: below this the saving itself (and the log) gets in the way."""
CEILING_S = 120 * 60.0
"""Auto mode never saves less often: an unannounced failure loses at most two hours of training,
even when the 1% overhead cap would allow longer."""
MAX_OVERHEAD = 0.01
"""Auto mode keeps saves under this fraction of training time."""
MATERIAL_CHANGE = 0.2
"""Auto mode logs a new interval only when it moved by more than this fraction of the logged one."""
RECENT = 5
"""Auto mode uses the median of this many newest measured saves: one slow upload does not swing it."""


def save_duration(seconds: Mapping[str, float]) -> float:
    """One save from its start to its commit, from a SaveOutcome's (or a manifest's) phases.

    The saver measures `write` from the moment save() was called, so it already holds `waited`
    (for the previous save) and `blocked`; waiting for the previous save is not this save's cost."""
    if "write" not in seconds:
        return sum(seconds.values())
    total = seconds["write"] + seconds.get("upload", 0.0) + seconds.get("commit", 0.0)
    return max(total - seconds.get("waited", 0.0), 0.0)


@dataclass(frozen=True)
class Interval:
    """A chosen time between saves and the reason, as one log line says it."""

    seconds: float | None
    """None: no saves on the clock."""
    why: str

    def line(self, every_steps: int) -> str:
        steps = f"every {every_steps} steps" if every_steps else ""
        if self.seconds is None:
            return (f"checkpoint {steps or 'only when stopping and at the end'} ({self.why})")
        also = f"; also {steps}" if steps else ""
        return f"checkpoint every {_span(self.seconds)} ({self.why}){also}"


def _span(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def auto_interval(save_s: float | None, mtbf_hours: float) -> Interval:
    """Young/Daly's interval for saves of `save_s` seconds and a failure every `mtbf_hours`, raised
    to keep saves under 1% of training, within FLOOR_S..CEILING_S; START_S before any measurement."""
    if save_s is None:
        return Interval(START_S, f"auto: no save measured yet, the starting interval; then Young/Daly "
                                 f"with MTBF {mtbf_hours:g} h")
    young = math.sqrt(2 * save_s * mtbf_hours * 3600)
    cap = save_s / MAX_OVERHEAD
    seconds, rule = (young, "Young/Daly") if young >= cap else (cap, f"the {MAX_OVERHEAD:.0%} overhead cap")
    if seconds < FLOOR_S:
        seconds, rule = FLOOR_S, "the floor"
    if seconds > CEILING_S:
        seconds, rule = CEILING_S, "the ceiling"
    return Interval(seconds, f"auto, set by {rule}: save {save_s:.1f} s and MTBF {mtbf_hours:g} h give "
                             f"Young/Daly {_span(young)}, {MAX_OVERHEAD:.0%} overhead cap {_span(cap)}, "
                             f"bounds {FLOOR_S / 60:g}-{CEILING_S / 60:g} min")


class Cadence:
    """One rank's schedule: step_due() for every_steps, time_due() for the clock (rank 0 asks it)."""

    def __init__(self, ckpt: CheckpointConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps, self.mtbf_hours, self.clock = ckpt.every_steps, ckpt.mtbf_hours, clock
        # Config resolves an unset interval by cluster kind; a bare CheckpointConfig means no clock.
        self.mode = ckpt.interval or "never"
        self.every_minutes = ckpt.every_minutes
        self.save_s: list[float] = []
        self.since = clock()
        self.interval = self._choose()
        self.logged = self.interval.seconds

    @property
    def auto(self) -> bool:
        return self.mode == "auto"

    def _choose(self) -> Interval:
        if self.mode == "fixed":
            return Interval(self.every_minutes * 60, f"fixed: checkpoint.every_minutes={self.every_minutes:g}")
        if self.mode == "auto":
            recent = sorted(self.save_s[-RECENT:])
            # The lower median: with two saves, the slower one alone does not lengthen the interval.
            return auto_interval(recent[(len(recent) - 1) // 2] if recent else None, self.mtbf_hours)
        return Interval(None, "checkpoint.interval=never: no saves on the clock")

    def start(self, measured_s: float | None = None) -> str:
        """Training starts now: the clock starts. `measured_s`: a save time measured by an earlier
        run (auto mode). Returns the line to log."""
        if measured_s is not None and self.auto:
            self.save_s.append(measured_s)
            self.interval = self._choose()
        self.since, self.logged = self.clock(), self.interval.seconds
        return self.interval.line(self.every_steps)

    def measured(self, save_s: float) -> str | None:
        """A save committed after `save_s` seconds; the line to log when auto mode's interval moved
        materially, else None."""
        if not self.auto:
            return None
        self.save_s.append(save_s)
        self.interval = self._choose()
        new, old = self.interval.seconds, self.logged
        if new is None or (old is not None and abs(new - old) <= MATERIAL_CHANGE * old):
            return None
        self.logged = new
        return self.interval.line(self.every_steps)

    def saved(self) -> None:
        """A save begins now (regular, a stop's or the last): the clock restarts."""
        self.since = self.clock()

    def step_due(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0

    def time_due(self) -> bool:
        seconds = self.interval.seconds
        return seconds is not None and self.clock() - self.since >= seconds
