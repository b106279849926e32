"""Where DeepSpeed's JIT-built ops (CPU Adam, async I/O) are compiled, and the locks killed builds leave.

torch.utils.cpp_extension builds into $TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions:
on a cluster, the shared home, one folder for every node of every job. A build takes
`<folder>/<op>/lock` (created with O_EXCL and held open by the builder until it removes it at the
end); a build killed part-way (node failure, scancel, time limit) leaves the file behind, and every
later load waits on it forever, so each requeue hangs before its first step. The job therefore
builds under its node-local scratch unless the user chose a folder (a prebuilt one, say; DeepSpeed
installed with DS_BUILD_OPS=1 loads its ops without building at all), and removes the locks no live
build holds before DeepSpeed starts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from importlib import metadata
from pathlib import Path

log = logging.getLogger("hpc")

EXTENSIONS_VAR = "TORCH_EXTENSIONS_DIR"
LOCAL_STALE_S = 30.0
"""Node-local folder: every build there is a process of this node, so /proc shows whether one holds
the lock; the grace only covers the instant between a finished build closing its lock and removing it."""
SHARED_STALE_S = 15 * 60.0
"""A folder the user chose may be shared with other nodes, whose builders /proc cannot show: their
lock is stale only once nothing in its build folder changed for this long (a compile step writes
its object file within minutes)."""


def build_tag() -> str:
    """`py311_torch2.13.0+cu124`: a built op only loads into the Python and torch that built it."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "unknown"
    return f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch_version}"


def extensions_dir(scratch: Path, environ: MutableMapping[str, str]) -> tuple[Path, bool]:
    """The folder JIT builds go to, and whether the user chose it ($TORCH_EXTENSIONS_DIR), else
    `<node-local scratch>/torch_extensions/<tag>`."""
    ours = scratch / "torch_extensions" / build_tag()
    chosen = environ.get(EXTENSIONS_VAR)
    if chosen and Path(chosen) != ours:
        return Path(chosen), True
    return ours, False


def prepare_extension_builds(scratch: Path, environ: MutableMapping[str, str] = os.environ, *,
                             now: Callable[[], float] = time.time,
                             held: Callable[[Iterable[Path]], set[Path]] | None = None) -> Path:
    """Point torch's JIT builds at node-local scratch (unless the user set $TORCH_EXTENSIONS_DIR)
    and remove stale locks there. Call on every rank before DeepSpeed builds an op."""
    folder, chosen = extensions_dir(scratch, environ)
    if not chosen:
        environ[EXTENSIONS_VAR] = str(folder)
    remove_stale_locks(folder, stale_after_s=SHARED_STALE_S if chosen else LOCAL_STALE_S, now=now,
                       held=held or locks_held_open)
    return folder


def remove_stale_locks(folder: Path, *, stale_after_s: float, now: Callable[[], float] = time.time,
                       held: Callable[[Iterable[Path]], set[Path]] | None = None) -> list[Path]:
    """Remove every `lock` under `folder` that no process of this node holds open and whose build
    folder has not changed for `stale_after_s`; returns the removed paths."""
    locks = sorted(folder.rglob("lock")) if folder.is_dir() else []
    if not locks:
        return []
    live = (held or locks_held_open)(locks)
    removed = []
    for lock in locks:
        idle = now() - _last_change(lock.parent)
        if lock in live or idle < stale_after_s:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue  # another rank of this node removed it first
        log.warning("removed the stale build lock %s: no process holds it and its build folder has not "
                    "changed for %.0f s (a killed build left it; every load would wait on it forever)",
                    lock, idle)
        removed.append(lock)
    return removed


def _last_change(folder: Path) -> float:
    """Newest modification time of the build folder's files (the lock, build.ninja, objects)."""
    times = []
    for entry in os.scandir(folder):
        try:
            times.append(entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            pass  # removed while we looked
    return max(times, default=float("inf"))  # nothing left to judge: leave it


def locks_held_open(paths: Iterable[Path]) -> set[Path]:
    """The paths some process of this node holds open, read from /proc/<pid>/fd (torch's builder
    keeps its lock open while it builds). Other users' processes cannot be read, and need not be:
    they cannot build in this user's folder."""
    wanted = {os.path.realpath(p): p for p in paths}
    found: set[Path] = set()
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            entries = os.listdir(fds)
        except OSError:
            continue  # exited, or another user's
        for entry in entries:
            try:
                target = os.readlink(fds / entry)
            except OSError:
                continue
            if target in wanted:
                found.add(wanted[target])
    return found
