"""Small local-file helpers shared by the stages (not a stage itself: no hpc imports)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a half-written one (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def deny_world_write() -> None:
    """From now on this process creates nothing others can write to: the umask gains the
    world-write bit (group write, which sites use to share run folders, stays as the user's umask
    has it). Run folders, checkpoint stores and scratch folders hold what a resume will load."""
    os.umask(os.umask(0o022) | 0o002)
