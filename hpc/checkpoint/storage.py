"""Persistent checkpoint storage behind one small protocol: a path goes through `os`, a
`scheme://` URL through fsspec (imported only then). Every byte moved is checksummed on the way.

Files are named by their path relative to the storage root (`step-40/__0_0.distcp`).
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

CHUNK = 1 << 20  # stays in a core's L2 cache while crc32 and write() both read it


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as the manifest lists it."""

    name: str
    size: int
    checksum: str


def _crc_hex(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def copy_stream(src: IO[bytes], dst: IO[bytes] | None, on_bytes: Any = None) -> tuple[int, str]:
    """Copy src to dst (or only read it, when dst is None) in chunks; returns (bytes, checksum).
    crc32 (~3.5 GB/s on one core here) is computed in the same pass, so the bytes are read once;
    it still costs ~0.14 s of CPU per 428 MB, about 1.2-1.3x a kernel-side copy (sendfile)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    crc, size = 0, 0
    while True:
        n = src.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        crc = zlib.crc32(view[:n], crc)
        if dst is not None:
            dst.write(view[:n])
        size += n
        if on_bytes is not None:
            on_bytes(size)
    return size, _crc_hex(crc)


def file_checksum(path: Path) -> tuple[int, str]:
    with open(path, "rb", buffering=0) as f:
        return copy_stream(f, None)


class Storage(Protocol):
    url: str

    def put(self, local: Path, name: str, on_bytes: Any = None) -> FileEntry:
        """Upload a local file; durable when it returns."""

    def get(self, name: str, local: Path) -> FileEntry:
        """Download to a local file."""

    def read_bytes(self, name: str) -> bytes | None:
        """A small file's content, or None when it does not exist."""

    def write_atomic(self, name: str, data: bytes, before_rename: Any = None) -> None:
        """Write a small file so that readers see all of it or nothing (temp + rename)."""

    def listdir(self, name: str = "") -> list[str]:
        """Entry names in a folder (empty when it does not exist)."""

    def size(self, name: str) -> int | None:
        """A file's size, or None when it does not exist."""

    def checksum(self, name: str) -> tuple[int, str]:
        """Read a file through and return (size, checksum)."""

    def remove(self, name: str) -> None:
        """Delete a file or a folder with everything in it."""

    def local_path(self, name: str) -> Path | None:
        """The file as a local path when this storage is a mounted filesystem, else None."""

    def free_bytes(self) -> int | None:
        """Free space at the root, or None when the storage cannot tell (object stores)."""


class LocalStorage:
    """A mounted filesystem: node-local disk, NFS, Lustre, GPFS."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def put(self, local: Path, name: str, on_bytes: Any = None) -> FileEntry:
        dst = self._path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb", buffering=0) as src, open(dst, "wb", buffering=0) as out:
            size, checksum = copy_stream(src, out, on_bytes)
            os.fsync(out.fileno())  # the manifest may only promise bytes that are on disk
        _fsync_dir(dst.parent)  # and the file's name in its (maybe new) folder
        return FileEntry(name, size, checksum)

    def get(self, name: str, local: Path) -> FileEntry:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path(name), "rb", buffering=0) as src, open(local, "wb", buffering=0) as out:
            size, checksum = copy_stream(src, out)
        return FileEntry(name, size, checksum)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_atomic(self, name: str, data: bytes, before_rename: Any = None) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself must survive a crash

    def listdir(self, name: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, name: str) -> int | None:
        try:
            return self._path(name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def checksum(self, name: str) -> tuple[int, str]:
        return file_checksum(self._path(name))

    def remove(self, name: str) -> None:
        path = self._path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def local_path(self, name: str) -> Path | None:
        return self._path(name)

    def free_bytes(self) -> int | None:
        return free_bytes_at(self.root)


def free_bytes_at(path: Path) -> int:
    """Free space on the filesystem `path` is (or, when it does not exist yet, will be) on."""
    import psutil

    while not path.exists() and path != path.parent:
        path = path.parent
    return psutil.disk_usage(str(path)).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecStorage:
    """Any fsspec URL (s3://, gs://, file://, ...). Object stores have no rename: a single PUT is
    already all-or-nothing there, and fsspec's `mv` is a copy + delete of a finished object."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def put(self, local: Path, name: str, on_bytes: Any = None) -> FileEntry:
        path = self._path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with open(local, "rb", buffering=0) as src, self.fs.open(path, "wb") as out:
            size, checksum = copy_stream(src, out, on_bytes)
        return FileEntry(name, size, checksum)

    def get(self, name: str, local: Path) -> FileEntry:
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open(self._path(name), "rb") as src, open(local, "wb", buffering=0) as out:
            size, checksum = copy_stream(_Readinto(src), out)
        return FileEntry(name, size, checksum)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_atomic(self, name: str, data: bytes, before_rename: Any = None) -> None:
        path = self._path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        self.fs.pipe_file(tmp, data)
        if before_rename is not None:
            before_rename()
        self.fs.mv(tmp, path)

    def listdir(self, name: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._path(name), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self._path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def checksum(self, name: str) -> tuple[int, str]:
        with self.fs.open(self._path(name), "rb") as src:
            return copy_stream(_Readinto(src), None)

    def remove(self, name: str) -> None:
        path = self._path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def local_path(self, name: str) -> Path | None:
        return None

    def free_bytes(self) -> int | None:
        return None


class _Readinto:
    """fsspec file objects do not all implement readinto."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def readinto(self, view: memoryview) -> int:
        data = self.f.read(len(view))
        view[:len(data)] = data
        return len(data)


def open_storage(location: str) -> Storage:
    """A path → LocalStorage; `scheme://...` → FsspecStorage (s3://, gs://, file://, ...)."""
    if "://" in location:
        return FsspecStorage(location)
    return LocalStorage(location)
