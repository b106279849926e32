"""The files a conversion writes: written back to disk while they are still being written.

A plain `open(path, "wb")` leaves every byte in the page cache until the fsync at the end (the
kernel starts writing back only past its dirty threshold, gigabytes on a large node), so a
converter alternates: compute while the disk idles, then fsync while the CPU idles. `OutputFile`
asks the kernel to start writing back each `WRITEBACK_BYTES` as soon as they are written
(`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so the disk works while the next
tensor is cut and the final fsync finds little left. Where sync_file_range is missing (not Linux),
it is a plain buffered file with the same fsync at close.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    try:
        # The interpreter's own symbols (libc among them): ctypes.util.find_library would run
        # ldconfig and a compiler to find libc, 0.8 s of every conversion's start-up.
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC = _sync_file_range()


class OutputFile:
    """A binary file opened for writing (buffered, seekable) whose bytes go to disk as they come;
    `close()` fsyncs it. Use it where `open(path, "wb")` would be: write, tell, seek, flush, fileno."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._started = 0  # writeback was started for the bytes before this offset

    def write(self, data: Any) -> int:
        n = self.file.write(data)
        end = self.file.tell()
        if _SYNC is not None and end - self._started >= WRITEBACK_BYTES:
            self.file.flush()
            # Errors here only lose the head start: close()'s fsync still reports them.
            _SYNC(self.file.fileno(), self._started, end - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = end
        return n

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, *args: Any) -> int:
        return self.file.seek(*args)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    @property
    def closed(self) -> bool:
        return self.file.closed

    def close(self) -> None:
        """Durable on return (flush + fsync); closing twice is a no-op."""
        if self.file.closed:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()

    def discard(self) -> None:
        """Close without syncing and remove the file (a failed conversion)."""
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
