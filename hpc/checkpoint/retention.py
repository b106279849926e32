"""Retention: which step folders go once a newer step commits, persistent and on scratch.

Cleanup never stops at the first failed delete, and never makes a half-deleted step look committed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hpc.checkpoint.manifest import MANIFEST, Candidate, list_steps, parse_step_dir, step_dir
from hpc.checkpoint.storage import Storage

log = logging.getLogger("hpc")


def steps_to_delete(all_steps: list[int], committed: list[int], *, keep_last: int, keep_every: int,
                    protected: set[int]) -> list[int]:
    """Retention: the newest `keep_last` committed steps, every multiple of `keep_every`, and the
    protected steps (being resumed from or written) stay. Uncommitted folders older than the newest
    committed step are leftovers of interrupted saves and go; newer ones may still be in flight."""
    newest = max(committed, default=-1)
    keep = set(sorted(committed, reverse=True)[:keep_last]) | protected
    if keep_every:
        keep |= {s for s in committed if s % keep_every == 0}
    doomed = [s for s in committed if s not in keep]
    doomed += [s for s in all_steps if s not in committed and s < newest and s not in protected]
    return sorted(doomed)


def clean_persistent(storage: Storage, committed: list[Candidate], *, keep_last: int, keep_every: int,
                     protected: set[int]) -> list[int]:
    """Delete what retention lets go; a failed delete is logged and the rest still go."""
    doomed = steps_to_delete(list_steps(storage), [c.step for c in committed], keep_last=keep_last,
                             keep_every=keep_every, protected=protected)
    deleted = []
    for step in doomed:
        try:
            # The manifest first: a half-deleted step must never look committed.
            storage.remove(f"{step_dir(step)}/{MANIFEST}")
            storage.remove(step_dir(step))
            deleted.append(step)
        except OSError as err:
            log.warning("retention: could not delete %s/%s (%s); continuing", storage.url, step_dir(step), err)
    return deleted


def clean_scratch(scratch: Path, *, keep: set[int]) -> None:
    """Node-local scratch holds only the steps still needed (being written, newest committed)."""
    if not scratch.is_dir():
        return
    for path in scratch.iterdir():
        step = parse_step_dir(path.name)
        if step is None or step in keep:
            continue
        try:
            shutil.rmtree(path)
        except OSError as err:
            log.warning("scratch cleanup: could not delete %s (%s); continuing", path, err)
