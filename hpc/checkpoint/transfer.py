"""Moving step folders between node-local scratch and persistent storage, both ways.

Uploads (after a save) and staging (before a resume) run `streams` files at a time, each retried
with exponential backoff (`with_retries`); a file's checksum is computed while it is copied, unless
it was taken while the file was written (then a mounted filesystem copies it in the kernel).
Checksums are recomputed with the algorithm the manifest names, so older (`crc32:`) steps verify.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from hpc.checkpoint.manifest import step_dir
from hpc.checkpoint.storage import FileEntry, Storage, algorithm_of, file_checksum
from hpc.faults import fault_point

log = logging.getLogger("hpc")
T = TypeVar("T")


def with_retries(what: str, fn: Callable[[], T], *, retries: int, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """fn(), tried 1 + retries times; waits backoff_s * 2**k (with jitter) between attempts. Any
    Exception is retried: fsspec backends raise their own types for transient HTTP errors."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            if attempt == retries:
                raise
            wait = backoff_s * 2 ** attempt * (0.5 + random.random())
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, err, attempt + 1, retries, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def local_files(folder: Path) -> list[str]:
    """Every file under folder, as relative names, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def upload_step(folder: Path, storage: Storage, step: int, *, streams: int, retries: int,
                backoff_s: float, rank: int, prefix: str | None = None,
                written: dict[str, FileEntry] | None = None) -> list[FileEntry]:
    """Copy every file of a scratch step folder to `step-N/` (or `prefix/`) at the persistent location.
    `written`: sizes and checksums taken while files were written, by name in the folder."""
    prefix = prefix or step_dir(step)
    written = written or {}

    def one(name: str) -> FileEntry:
        size = (folder / name).stat().st_size  # once, not per chunk

        def on_bytes(done: int) -> None:
            if done >= (1 << 20) or done == size:  # partway through the file (fault tests)
                fault_point("upload", step=step, rank=rank)

        known = written.get(name)
        entry = with_retries(f"upload {folder / name} -> {storage.url}/{prefix}/{name}",
                             lambda: storage.put(folder / name, f"{prefix}/{name}", on_bytes, known),
                             retries=retries, backoff_s=backoff_s)
        if known is not None and (entry.size, entry.checksum) != (known.size, known.checksum):
            # The scratch file changed after its writer checksummed it: list neither version.
            raise ChecksumMismatch(name, known.checksum, f"{entry.checksum} ({entry.size} bytes, "
                                   f"written {known.size})")
        return FileEntry(name, entry.size, entry.checksum)

    with ThreadPoolExecutor(max(1, streams), thread_name_prefix="hpc-upload") as pool:
        return list(pool.map(one, local_files(folder)))


def stage_view(manifest_files: Iterable[FileEntry], storage: Storage, step: int, view: Path, *,
               retries: int, backoff_s: float, streams: int,
               prefix: str | None = None) -> tuple[dict[str, int], list[str]]:
    """Make `view` a complete copy of a committed step for this node: files already in scratch
    with the listed size and checksum stay; the rest are linked to the persistent copy (mounted
    filesystem) or downloaded (object store, checksummed on the way).

    Returns counts per source and the names of linked files, whose checksums are still unchecked."""
    prefix = prefix or step_dir(step)
    counts = {"local": 0, "linked": 0, "downloaded": 0}
    linked: list[str] = []
    view.mkdir(parents=True, exist_ok=True)

    def one(entry: FileEntry) -> str:
        path = view / entry.name
        algorithm = algorithm_of(entry.checksum)
        if path.is_file() and not path.is_symlink() and path.stat().st_size == entry.size \
                and file_checksum(path, algorithm)[1] == entry.checksum:
            return "local"
        if path.is_symlink() or path.exists():
            path.unlink()
        remote = storage.local_path(f"{prefix}/{entry.name}")
        if remote is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(remote, path)
            return "linked"
        got = with_retries(f"download {storage.url}/{prefix}/{entry.name}",
                           lambda: storage.get(f"{prefix}/{entry.name}", path, algorithm),
                           retries=retries, backoff_s=backoff_s)
        if got.checksum != entry.checksum:
            raise ChecksumMismatch(entry.name, entry.checksum, got.checksum)
        return "downloaded"

    entries = list(manifest_files)
    with ThreadPoolExecutor(max(1, streams), thread_name_prefix="hpc-stage") as pool:
        for entry, source in zip(entries, pool.map(one, entries)):
            counts[source] += 1
            if source == "linked":
                linked.append(entry.name)
    return counts, linked


class ChecksumMismatch(OSError):
    def __init__(self, name: str, expected: str, found: str) -> None:
        super().__init__(f"file {name}: checksum {found}, the manifest says {expected}")


def verify_checksums(storage: Storage, step: int, entries: dict[str, FileEntry], names: Iterable[str], *,
                     streams: int = 1, prefix: str | None = None) -> str | None:
    """Read the named files at the persistent location, `streams` at a time (one read stream is
    slow on a parallel filesystem); the first problem, or None."""
    def one(name: str) -> str | None:
        try:
            algorithm = algorithm_of(entries[name].checksum)
        except ValueError as err:
            return f"file {name}: {err}"
        size, checksum = storage.checksum(f"{prefix or step_dir(step)}/{name}", algorithm)
        if size != entries[name].size:
            return f"file {name} has {size} bytes, the manifest says {entries[name].size}"
        if checksum != entries[name].checksum:
            return f"file {name}: checksum {checksum}, the manifest says {entries[name].checksum}"
        return None

    with ThreadPoolExecutor(max(1, streams), thread_name_prefix="hpc-verify") as pool:
        return next((p for p in pool.map(one, list(names)) if p), None)
