"""Fault injection for tests: kill this process (SIGKILL, no cleanup) or ask the loop to stop, at a
named point of the real code path, chosen by the `HPC_FAULTS` environment variable.

    HPC_FAULTS="kill@shard_write:step=6:rank=1,stop@step_end:step=10"

Each entry is `action@point` with optional `:key=value` filters (`step`, `rank`); an entry fires
when every filter matches. Actions: `kill` (SIGKILL, as from the OOM killer or a dead node),
`stop` (the caller treats it like a stop request) and `slow` (sleep `ms` milliseconds: a straggler,
or a test's way to make a tiny run outlast a time limit without burning CPU), e.g.
`slow@step_end:ms=500`. Points: shard_write, upload, manifest_write (a save's phases), step_end,
restore (before a resume loads its step). Unset (always, outside tests) it costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

ENV = "HPC_FAULTS"
POINTS = ("shard_write", "upload", "manifest_write", "step_end", "restore")
ACTIONS = ("kill", "stop", "slow")


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    filters: dict[str, int] = field(default_factory=dict)
    ms: int = 0

    def matches(self, point: str, **context: int) -> bool:
        return point == self.point and all(context.get(k) == v for k, v in self.filters.items())


def parse(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        head, *filters = entry.split(":")
        action, _, point = head.partition("@")
        if action not in ACTIONS or point not in POINTS:
            raise ValueError(f"{ENV}: '{entry}' is not action@point with action in {ACTIONS} and "
                             f"point in {POINTS}")
        parsed, ms = {}, 0
        for item in filters:
            key, _, value = item.partition("=")
            if key not in ("step", "rank", "ms") or not value.isdigit():
                raise ValueError(f"{ENV}: filter '{item}' in '{entry}': use step=N, rank=N or ms=N")
            if key == "ms":
                ms = int(value)
            else:
                parsed[key] = int(value)
        faults.append(Fault(action, point, parsed, ms))
    return faults


def fault_point(point: str, **context: int) -> bool:
    """Act on any fault configured for this point; True when one asks the caller to stop."""
    text = os.environ.get(ENV)
    if not text:
        return False
    stop = False
    for fault in parse(text):
        if fault.matches(point, **context):
            if fault.action == "kill":
                print(f"HPC_FAULTS: SIGKILL at {point} {context}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.action == "slow":
                time.sleep(fault.ms / 1000)
                continue
            stop = True
    return stop
