"""A torch.save-compatible file written tensor data first-to-last in pieces, never whole.

`torch.save` needs every tensor in memory at once; a rank's flat ZeRO partition can be tens of GB.
Here the object (dicts, lists, numbers, anything picklable) is pickled first with `Slot`s standing
for tensors whose bytes are not known yet; then the slots' bytes are appended in order, piece by
piece, as they arrive. The file is the zip layout torch.save writes (stored entries, data records
64-byte aligned, zip64 where sizes or offsets pass 4 GiB), so `torch.load`, with or without
`mmap=True`, reads it.

    slots = {"w": Slot((1000,), torch.float32)}
    with TorchFileWriter(path, {"weights": slots["w"]}) as out:
        out.append(slots["w"], first_half)
        out.append(slots["w"], second_half)   # a slot's pieces in order; slots in any order
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from hpc.checkpoint.convert.outfile import OutputFile

ALIGNMENT = 64
"""Where each data record starts (a multiple of this), as torch.save aligns them: mmap needs it."""
ZIP64_LIMIT = 0xFFFFFFFF
"""Sizes and offsets from here on need zip64 fields (a test lowers it to exercise them small)."""
_ZERO_CHUNK = 1 << 24
_CRC_BACKLOG = 4
"""Pieces written but not yet in the CRC (their memory is held until they are)."""


class Slot:
    """A tensor in the pickled object whose bytes are appended later: contiguous, on the CPU."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(int(d) for d in shape), dtype
        self.numel = 1
        for d in self.shape:
            self.numel *= d
        self.nbytes = self.numel * dtype.itemsize
        self.key: str | None = None
        self.written = 0

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Exactly what a contiguous tensor pickles to inside torch.save.
        stride, step = [], 1
        for d in reversed(self.shape):
            stride.append(step)
            step *= max(d, 1)
        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(self), 0, self.shape, tuple(reversed(stride)), False, OrderedDict()))


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be extended
    """Pickles as torch.save does, and a class with a `__pickle_as__ = "module.Name"` attribute under
    that name: a checkpoint can name another library's classes (DeepSpeed's) without importing it."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        path = obj.__dict__.get("__pickle_as__") if isinstance(obj, type) else None
        if path is None:
            super().save_global(obj, name)
            return
        module, _, qualname = path.rpartition(".")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        self.memoize(obj)


class _StorageRef:
    def __init__(self, slot: Slot) -> None:
        self.slot = slot


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class TorchFileWriter:
    """Writes `obj` (with `Slot`s inside) to `path`; then `append` fills the slots; `close` ends
    the file. Tensors already in memory may sit in `obj` too: they are written with the pickle."""

    def __init__(self, path: Path | str, obj: Any) -> None:
        self.path = Path(path)
        self.prefix = "archive/"
        self.file = OutputFile(self.path)
        self.entries: list[tuple[str, int, int, int, bool]] = []  # name, offset, size, crc, zip64
        self.slots: list[Slot] = []
        self.open_entry: tuple[str, int, int, int, Slot] | None = None  # name, hdr offset, data offset, crc
        self.crc = 0
        # The CRC-32 of each slot is computed beside the writes, in order, in a thread of its own
        # (zlib releases the GIL): on one core it costs as much as the copy into the file.
        self._crc_pool = ThreadPoolExecutor(1, thread_name_prefix="hpc-torchfile-crc")
        self._crc_pending: deque[Future] = deque()
        self.inline_keys: dict[int, str] = {}
        inline: list[tuple[str, torch.Tensor]] = []
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, protocol=2)
        pickler.persistent_id = lambda o: self._persistent_id(o, inline)  # type: ignore[method-assign]
        pickler.dump(obj)
        self._entry("data.pkl", buffer.getvalue())
        self._entry(".format_version", b"1")
        self._entry(".storage_alignment", str(ALIGNMENT).encode())
        self._entry("byteorder", b"little")
        for key, tensor in inline:
            self._entry(f"data/{key}", _raw(tensor))

    def _persistent_id(self, obj: Any, inline: list[tuple[str, torch.Tensor]]) -> Any:
        if isinstance(obj, _StorageRef):
            slot = obj.slot
            if slot.key is not None:
                raise ValueError("a Slot may appear only once in the object")
            slot.key = str(len(self.slots) + len(inline))
            self.slots.append(slot)
            return ("storage", _storage_type(slot.dtype), slot.key, "cpu", slot.numel)
        if isinstance(obj, torch.storage.TypedStorage):
            if obj._untyped_storage.device.type != "cpu":
                raise ValueError("tensors written inline must be on the CPU")
            known = self.inline_keys.get(obj._cdata)
            if known is None:  # views of one storage share it, as in torch.save
                known = self.inline_keys[obj._cdata] = str(len(self.slots) + len(inline))
                inline.append((known, torch.empty(0, dtype=obj.dtype).set_(obj._untyped_storage, 0, (obj._size(),))))
            return ("storage", _storage_type(obj.dtype), known, "cpu", obj._size())
        return None

    # ---- zip records --------------------------------------------------------------------------

    def _local_header(self, name: str, size: int, crc: int) -> tuple[int, int, bool]:
        """Writes a local header (data aligned); returns (header offset, data offset, zip64)."""
        offset = self.file.tell()
        raw = (self.prefix + name).encode()
        zip64 = size >= ZIP64_LIMIT or offset >= ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        start = offset + 30 + len(raw) + len(extra) + 4  # 4: the padding field's own header
        pad = (-start) % ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB': torch's alignment field
        shown = 0xFFFFFFFF if zip64 else size
        self.file.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0x0800, 0, 0, 0x21,
                                    crc, shown, shown, len(raw), len(extra)) + raw + extra)
        return offset, self.file.tell(), zip64

    def _entry(self, name: str, data: bytes | memoryview) -> None:
        offset, _, zip64 = self._local_header(name, len(data), zlib.crc32(data))
        self.file.write(data)
        self.entries.append((name, offset, len(data), zlib.crc32(data), zip64))

    def append(self, slot: Slot, data: torch.Tensor | None = None, *, zeros: int = 0) -> None:
        """Append `data` (any shape, the slot's dtype) or `zeros` elements to `slot`. A slot is
        filled completely before the next one starts."""
        if self.open_entry is None or self.open_entry[4] is not slot:
            self._close_entry()
            if slot.key is None or slot.written:
                raise ValueError("append to a Slot that is not in this file or was already written")
            header, data_at, _ = self._local_header(f"data/{slot.key}", slot.nbytes, 0)
            self.open_entry, self.crc = (f"data/{slot.key}", header, data_at, 0, slot), 0
        if data is not None:
            if data.dtype != slot.dtype:
                raise TypeError(f"slot is {slot.dtype}, got {data.dtype}")
            self._write(_raw(data), slot)
        while zeros > 0:
            n = min(zeros, _ZERO_CHUNK // slot.dtype.itemsize)
            self._write(memoryview(bytes(n * slot.dtype.itemsize)), slot)
            zeros -= n

    def _write(self, raw: memoryview, slot: Slot) -> None:
        if slot.written + len(raw) > slot.nbytes:
            raise ValueError(f"slot data/{slot.key} overflows: {slot.written + len(raw)} > {slot.nbytes} bytes")
        self.file.write(raw)
        self._crc_pending.append(self._crc_pool.submit(self._crc_update, raw))
        while len(self._crc_pending) > _CRC_BACKLOG:  # bounded: each holds its piece's memory
            self._crc_pending.popleft().result()
        slot.written += len(raw)

    def _crc_update(self, raw: memoryview) -> None:
        self.crc = zlib.crc32(raw, self.crc)

    def _crc_wait(self) -> None:
        while self._crc_pending:
            self._crc_pending.popleft().result()

    def _close_entry(self) -> None:
        if self.open_entry is None:
            return
        name, header, _, _, slot = self.open_entry
        self._crc_wait()
        if slot.written != slot.nbytes:
            raise ValueError(f"slot data/{slot.key} got {slot.written} of {slot.nbytes} bytes")
        end = self.file.tell()
        self.file.seek(header + 14)  # the CRC was unknown when the header was written
        self.file.write(struct.pack("<I", self.crc))
        self.file.seek(end)
        self.entries.append((name, header, slot.nbytes, self.crc, slot.nbytes >= ZIP64_LIMIT or header >= ZIP64_LIMIT))
        self.open_entry = None

    def close(self) -> None:
        """Fill nothing: every slot must have been appended in full. Writes the zip directory."""
        if self.file.closed:
            return
        self._close_entry()
        missing = [s.key for s in self.slots if s.written != s.nbytes]
        if missing:
            raise ValueError(f"{self.path}: slots {missing[:5]} were never filled")
        self._entry("version", b"3\n")
        self._entry(".data/serialization_id", b"0" * 40)
        directory = self.file.tell()
        for name, offset, size, crc, _ in self.entries:
            raw = (self.prefix + name).encode()
            fields, shown_size, shown_offset = b"", size, offset
            if size >= ZIP64_LIMIT:
                fields += struct.pack("<QQ", size, size)
                shown_size = 0xFFFFFFFF
            if offset >= ZIP64_LIMIT:
                fields += struct.pack("<Q", offset)
                shown_offset = 0xFFFFFFFF
            extra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
            self.file.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if fields else 20, 0x0800, 0,
                                        0, 0x21, crc, shown_size, shown_size, len(raw), len(extra), 0, 0, 0,
                                        0, shown_offset) + raw + extra)
        end = self.file.tell()
        count, length = len(self.entries), end - directory
        if directory >= ZIP64_LIMIT or count >= 0xFFFF:
            self.file.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, length, directory))
            self.file.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
            count, directory = min(count, 0xFFFF), min(directory, 0xFFFFFFFF)
        self.file.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, length, directory, 0))
        self.file.close()  # durable
        self._crc_pool.shutdown()

    def abort(self) -> None:
        """Close without finishing (the partial file is removed)."""
        self._crc_pool.shutdown(wait=True, cancel_futures=True)
        self._crc_pending.clear()
        self.file.discard()

    def __enter__(self) -> TorchFileWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _storage_type(dtype: torch.dtype) -> Any:
    # The legacy typed-storage class torch.save names in the pickle, e.g. torch.FloatStorage.
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])
