"""Checkpoint seams on real files, fast: storage backends, the commit protocol, transfers and
retention, fault injection, the space check and checkpoint config. No torch.distributed."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from hpc import faults
from hpc.checkpoint import storage as storage_module
from hpc.checkpoint.manifest import (
    MANIFEST,
    Manifest,
    committed,
    list_steps,
    read_manifest,
)
from hpc.checkpoint.retention import clean_persistent, clean_scratch, steps_to_delete
from hpc.checkpoint.space import check_space
from hpc.estimate.memory import STATE_BYTES_PER_PARAM, checkpoint_bytes as estimate_bytes
from hpc.checkpoint.storage import (
    FileEntry,
    FsspecStorage,
    LocalStorage,
    Storage,
    algorithm_of,
    file_checksum,
    open_storage,
)
from hpc.checkpoint.transfer import (
    ChecksumMismatch,
    local_files,
    stage_view,
    upload_step,
    verify_checksums,
    with_retries,
)
from hpc.config import Config
from hpc.config.compose import compose
from hpc.config.diff import changed_keys
from hpc.config.errors import ConfigError
from hpc.estimate.shape import count_params

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("local", "fsspec")


def make_storage(kind: str, root: Path) -> Storage:
    return LocalStorage(root) if kind == "local" else FsspecStorage(f"file://{root}")


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return make_storage(request.param, tmp_path / "persistent")


@pytest.fixture(autouse=True)
def _hpc_log_reaches_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # hpc.job sets propagate=False on the "hpc" logger when a job runs in-process.
    monkeypatch.setattr(logging.getLogger("hpc"), "propagate", True)
    monkeypatch.delenv(faults.ENV, raising=False)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def flip_byte(path: Path, at: int | None = None) -> None:
    """Corrupt one byte in place; the size stays the same."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def make_manifest(step: int, files: list[FileEntry], **changes: object) -> Manifest:
    fields: dict[str, object] = dict(
        step=step, world_size=2, strategy="fsdp", format="dcp", config_hash="0123456789abcdef",
        data={"consumed_samples": 8 * step, "seed": 0, "num_samples": 1000}, files=files,
        zero_stage=0, saved_at=1700000000.5, save_seconds={"blocked": 0.1, "write": 0.5})
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def write_step(storage: Storage, step: int, files: dict[str, bytes], src: Path) -> list[FileEntry]:
    """Upload files as `step-N/<name>` without a manifest (an uncommitted save)."""
    entries = []
    for name, data in files.items():
        local = src / f"step-{step}" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        put = storage.put(local, f"step-{step}/{name}")
        entries.append(FileEntry(name, put.size, put.checksum))
    return entries


def commit_step(storage: Storage, step: int, files: dict[str, bytes], src: Path) -> Manifest:
    manifest = make_manifest(step, write_step(storage, step, files, src))
    storage.write_atomic(f"step-{step}/{MANIFEST}", manifest.to_json())
    return manifest


FEW = {"__1_0.distcp": payload(50_000, 2), "rng/rank-0.pt": payload(3_000, 3)}
SHARDS = {"__0_0.distcp": payload(70_000, 1), "__1_0.distcp": payload(50_000, 2),
          ".metadata": b"dcp metadata", "rng/rank-0.pt": payload(3_000, 3)}


# --- storage ----------------------------------------------------------------------------------

def test_file_checksum_is_xxh3_of_the_bytes_across_chunks(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_module, "CHUNK", 4096)
    data = payload(3 * 4096 + 3, 7)  # the hash carries across chunk boundaries
    path = tmp_path / "big"
    path.write_bytes(data)
    assert file_checksum(path) == (len(data), f"xxh3:{xxhash.xxh3_64(data).hexdigest()}")
    assert file_checksum(path, "crc32") == (len(data), f"crc32:{zlib.crc32(data):08x}")


def test_unknown_checksum_algorithm_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'; this code reads xxh3 and crc32"):
        algorithm_of("md5:0123")


@pytest.mark.parametrize("at", [0, 4096, -1])
def test_checksum_detects_a_single_flipped_byte(tmp_path: Path, at: int) -> None:
    path = tmp_path / "shard"
    path.write_bytes(payload(10_000))
    size, before = file_checksum(path)
    flip_byte(path, at if at >= 0 else size - 1)
    after_size, after = file_checksum(path)
    assert after_size == size and after != before


def test_put_reports_size_and_checksum_and_the_bytes_arrive(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "shard.distcp"
    src.write_bytes(payload(123_457))
    progress: list[int] = []
    entry = storage.put(src, "step-3/rng/rank-0.pt", progress.append)
    assert entry == FileEntry("step-3/rng/rank-0.pt", *file_checksum(src))
    assert storage.read_bytes("step-3/rng/rank-0.pt") == src.read_bytes()
    assert storage.size("step-3/rng/rank-0.pt") == 123_457
    assert storage.checksum("step-3/rng/rank-0.pt") == file_checksum(src)
    assert progress and progress[-1] == 123_457


def test_get_round_trips(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(payload(40_000, 5))
    put = storage.put(src, "step-1/a.bin")
    dst = tmp_path / "elsewhere" / "deep" / "a.bin"  # parents are created
    got = storage.get("step-1/a.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert (got.size, got.checksum) == (put.size, put.checksum)


def test_write_atomic_replaces_and_leaves_no_temp_file(storage: Storage) -> None:
    storage.write_atomic("step-2/manifest.json", b"old")
    storage.write_atomic("step-2/manifest.json", b"new content")
    assert storage.read_bytes("step-2/manifest.json") == b"new content"
    assert storage.listdir("step-2") == ["manifest.json"]


def test_write_atomic_readers_see_old_or_new_only(storage: Storage) -> None:
    old, new = b"A" * 300_000, b"B" * 200_000
    storage.write_atomic("step-1/manifest.json", old)
    seen: set[bytes] = set()
    done = threading.Event()

    def reader() -> None:
        while True:
            data = storage.read_bytes("step-1/manifest.json")
            seen.add(data if data in (old, new) else b"torn read of %d bytes" % len(data or b""))
            if done.is_set():
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            storage.write_atomic("step-1/manifest.json", new if i % 2 == 0 else old)
    finally:
        done.set()
        thread.join()
    assert seen and seen <= {old, new}, [s[:40] for s in seen - {old, new}]


class Crash(Exception):
    pass


def crash() -> None:
    raise Crash("killed between temp write and rename")


def test_crash_before_rename_keeps_the_previous_manifest(storage: Storage, tmp_path: Path) -> None:
    first = commit_step(storage, 5, {"a": b"xyz"}, tmp_path / "src")
    second = make_manifest(5, first.files, world_size=64)
    with pytest.raises(Crash):
        storage.write_atomic(f"step-5/{MANIFEST}", second.to_json(), before_rename=crash)
    assert storage.read_bytes(f"step-5/{MANIFEST}") == first.to_json()
    assert [c.manifest for c in committed(storage)] == [first]
    assert any(".tmp-" in name for name in storage.listdir("step-5"))  # the crash left it behind


def test_local_crash_leaves_a_dotfile_that_never_reads_as_the_manifest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "persistent")
    entries = write_step(storage, 7, {"a": b"xyz"}, tmp_path / "src")
    with pytest.raises(Crash):
        storage.write_atomic(f"step-7/{MANIFEST}", make_manifest(7, entries).to_json(),
                             before_rename=crash)
    assert storage.listdir("step-7") == [f".{MANIFEST}.tmp-{os.getpid()}", "a"]
    assert storage.read_bytes(f"step-7/{MANIFEST}") is None
    candidate = read_manifest(storage, 7)
    assert candidate.manifest is None and "no manifest" in (candidate.problem or "")
    assert committed(storage, warn=False) == []


def test_missing_paths_read_as_empty(storage: Storage) -> None:
    assert storage.listdir() == []
    assert storage.listdir("step-9") == []
    assert storage.size("step-9/a") is None
    assert storage.read_bytes("step-9/manifest.json") is None
    storage.remove("step-9")  # nothing there: no error


def test_remove_a_folder_with_everything_in_it(storage: Storage, tmp_path: Path) -> None:
    write_step(storage, 1, {"a": b"1", "rng/rank-0.pt": b"2"}, tmp_path / "src")
    write_step(storage, 2, {"a": b"1"}, tmp_path / "src")
    storage.remove("step-1")
    assert storage.listdir() == ["step-2"]
    assert storage.size("step-1/rng/rank-0.pt") is None
    storage.remove("step-2/a")
    assert storage.listdir("step-2") == []


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    local = open_storage(str(tmp_path / "ckpt"))
    assert isinstance(local, LocalStorage)
    assert local.local_path("step-1/a") == tmp_path / "ckpt" / "step-1" / "a"
    assert isinstance(local.free_bytes(), int) and local.free_bytes() > 0  # root not created yet
    remote = open_storage(f"file://{tmp_path}/ckpt/")
    assert isinstance(remote, FsspecStorage)
    assert remote.url == f"file://{tmp_path}/ckpt"
    assert remote.local_path("step-1/a") is None
    assert remote.free_bytes() is None


# --- manifest ---------------------------------------------------------------------------------

def test_manifest_json_round_trips() -> None:
    manifest = make_manifest(40, [FileEntry("__0_0.distcp", 10, "crc32:0000abcd"),
                                  FileEntry("rng/rank-0.pt", 3, "crc32:ffff0000")])
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.total_bytes == 13
    assert isinstance(again.files[0], FileEntry)


def test_wrong_manifest_version_is_a_problem(storage: Storage, tmp_path: Path) -> None:
    entries = write_step(storage, 3, {"a": b"x"}, tmp_path / "src")
    storage.write_atomic(f"step-3/{MANIFEST}", make_manifest(3, entries, version=99).to_json())
    candidate = read_manifest(storage, 3)
    assert candidate.manifest is None
    assert "version 99" in (candidate.problem or "")
    assert committed(storage, warn=False) == []


def test_committed_keeps_good_steps_newest_first_and_names_the_rest(
        storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "src"
    good = {6: commit_step(storage, 6, FEW, src), 10: commit_step(storage, 10, FEW, src)}
    write_step(storage, 12, FEW, src)  # no manifest
    commit_step(storage, 14, FEW, src)
    storage.remove("step-14/rng/rank-0.pt")  # a file missing
    commit_step(storage, 16, FEW, src)
    write_step(storage, 16, {"__1_0.distcp": payload(50_001, 2)}, src)  # wrong size
    write_step(storage, 18, FEW, src)
    storage.write_atomic(f"step-18/{MANIFEST}", b'{"step": 18, "files": [')  # garbage
    write_step(storage, 20, FEW, src)
    storage.write_atomic(f"step-20/{MANIFEST}", good[6].to_json())  # says step 6
    storage.write_atomic("latest.txt", b"10")  # stray files and folders at the root are ignored
    storage.write_atomic("step-x/a", b"x")

    caplog.set_level(logging.WARNING, logger="hpc")
    found = committed(storage)

    assert [c.step for c in found] == [10, 6]
    assert [c.manifest for c in found] == [good[10], good[6]]
    assert all(c.problem is None for c in found)
    messages = [r.getMessage() for r in caplog.records if r.name == "hpc"]
    expected = {12: "no manifest", 14: "file rng/rank-0.pt is missing",
                16: "file __1_0.distcp has 50001 bytes, the manifest says 50000",
                18: "unreadable manifest", 20: "manifest says step 6"}
    for step, reason in expected.items():
        assert [m for m in messages if f"step-{step} skipped" in m and reason in m], (step, messages)
    assert len(messages) == len(expected)
    assert not [m for m in messages if "step-10 " in m or "step-6 " in m]

    caplog.clear()
    assert [c.step for c in committed(storage, warn=False)] == [10, 6]
    assert not caplog.records
    assert list_steps(storage) == [20, 18, 16, 14, 12, 10, 6]


@pytest.mark.parametrize("raw", [b"null", b"[]", b'"manifest"'])
def test_manifest_that_is_json_but_not_an_object_is_skipped(tmp_path: Path, raw: bytes) -> None:
    storage = LocalStorage(tmp_path / "persistent")
    storage.write_atomic(f"step-4/{MANIFEST}", raw)
    candidate = read_manifest(storage, 4)
    assert "unreadable manifest" in (candidate.problem or "")


def test_changed_keys_on_nested_dicts() -> None:
    old = {"exp": "tiny", "train": {"lr": 1e-3, "max_steps": 20, "sched": {"warmup": 2}},
           "model": {"dim": 64}, "data": {"seed": 0}, "gone": 1}
    new = {"exp": "tiny", "train": {"lr": 3e-4, "max_steps": 20, "sched": {"warmup": 5}},
           "model": {"dim": 64, "n_layers": 2}, "data": 7, "checkpoint": {"dir": "x"}}
    assert changed_keys(old, new) == ["checkpoint", "data", "gone", "model.n_layers", "train.lr",
                                      "train.sched.warmup"]
    assert changed_keys(old, old) == []


# --- transfer: retries ---------------------------------------------------------------------------

def flaky(failures: int, error: type[BaseException] = OSError) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(len(calls) + 1)
        if len(calls) <= failures:
            raise error(f"attempt {len(calls)} failed")
        return "done"
    return fn, calls


def test_with_retries_backs_off_doubling_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "random", lambda: 0.5)  # jitter factor exactly 1
    sleeps: list[float] = []
    fn, calls = flaky(2)
    assert with_retries("upload x", fn, retries=4, backoff_s=0.25, sleep=sleeps.append) == "done"
    assert calls == [1, 2, 3]
    assert sleeps == [0.25, 0.5]


def test_with_retries_jitter_stays_within_half_to_one_and_a_half() -> None:
    factors = []
    for _ in range(100):
        sleeps: list[float] = []
        fn, _calls = flaky(3)
        with_retries("upload x", fn, retries=3, backoff_s=2.0, sleep=sleeps.append)
        assert len(sleeps) == 3
        factors += [wait / (2.0 * 2 ** k) for k, wait in enumerate(sleeps)]
    assert all(0.5 <= f < 1.5 for f in factors)
    assert max(factors) - min(factors) > 0.5  # it is jittered, not constant


def test_with_retries_gives_up_with_the_last_error() -> None:
    sleeps: list[float] = []
    fn, calls = flaky(100)
    with pytest.raises(OSError, match="attempt 3 failed"):
        with_retries("upload x", fn, retries=2, backoff_s=0.0, sleep=sleeps.append)
    assert calls == [1, 2, 3]
    assert len(sleeps) == 2


class TransientHttpError(Exception):
    """What an fsspec backend raises for a 503: not an OSError."""


def test_with_retries_also_retries_errors_of_fsspec_backends() -> None:
    sleeps: list[float] = []
    fn, calls = flaky(1, TransientHttpError)
    assert with_retries("upload x", fn, retries=5, backoff_s=0.0, sleep=sleeps.append) == "done"
    assert calls == [1, 2]
    assert len(sleeps) == 1


# --- transfer: upload and staging ----------------------------------------------------------------

def scratch_step(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_upload_step_copies_every_file_and_commits(storage: Storage, tmp_path: Path) -> None:
    files = {**SHARDS, "rng/rank-1.pt": payload(3_000, 4)}
    folder = scratch_step(tmp_path / "scratch" / "step-7", files)
    entries = upload_step(folder, storage, 7, streams=3, retries=0, backoff_s=0.0, rank=0)
    assert sorted(e.name for e in entries) == sorted(files) == local_files(folder)
    for entry in entries:
        assert entry == FileEntry(entry.name, *file_checksum(folder / entry.name))
        assert storage.read_bytes(f"step-7/{entry.name}") == files[entry.name]
    storage.write_atomic(f"step-7/{MANIFEST}", make_manifest(7, entries).to_json())
    assert [c.step for c in committed(storage)] == [7]


def test_upload_step_runs_streams_in_parallel(tmp_path: Path) -> None:
    both_in_put = threading.Barrier(2, timeout=5)  # breaks unless two puts overlap

    class Rendezvous(LocalStorage):
        def put(self, local, name, on_bytes=None, written=None):  # type: ignore[no-untyped-def]
            both_in_put.wait()
            return super().put(local, name, on_bytes, written)

    folder = scratch_step(tmp_path / "scratch" / "step-3", SHARDS)
    entries = upload_step(folder, Rendezvous(tmp_path / "persistent"), 3, streams=2, retries=0,
                          backoff_s=0.0, rank=0)
    assert len(entries) == len(SHARDS)


def test_upload_step_retries_a_failed_put(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failed: list[str] = []

    class Flaky(LocalStorage):
        def put(self, local, name, on_bytes=None, written=None):  # type: ignore[no-untyped-def]
            if name.endswith("rank-0.pt") and not failed:
                failed.append(name)
                raise ConnectionResetError("connection reset by peer")
            return super().put(local, name, on_bytes, written)

    storage = Flaky(tmp_path / "persistent")
    folder = scratch_step(tmp_path / "scratch" / "step-3", SHARDS)
    caplog.set_level(logging.WARNING, logger="hpc")
    entries = upload_step(folder, storage, 3, streams=2, retries=1, backoff_s=0.0, rank=0)
    assert failed == ["step-3/rng/rank-0.pt"]
    assert storage.read_bytes("step-3/rng/rank-0.pt") == SHARDS["rng/rank-0.pt"]
    assert {e.name for e in entries} == set(SHARDS)
    assert any("connection reset" in r.getMessage() for r in caplog.records)


def written_entries(folder: Path) -> dict[str, FileEntry]:
    """What the shard writer would have recorded: each file's size and checksum."""
    return {name: FileEntry(name, *file_checksum(folder / name)) for name in local_files(folder)}


def test_put_of_a_file_checksummed_as_written_copies_in_the_kernel(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "__0_0.distcp"
    src.write_bytes(payload(3 * 4096 + 5))
    written = FileEntry("__0_0.distcp", *file_checksum(src, "xxh3"))
    monkeypatch.setattr(storage_module, "KERNEL_CHUNK", 4096)  # several calls, progress partway
    monkeypatch.setattr(storage_module, "copy_stream", None)  # no userspace pass may run
    progress: list[int] = []
    entry = LocalStorage(tmp_path / "persistent").put(src, "step-1/__0_0.distcp", progress.append, written)
    assert entry == FileEntry("step-1/__0_0.distcp", written.size, written.checksum)
    assert (tmp_path / "persistent" / "step-1" / "__0_0.distcp").read_bytes() == src.read_bytes()
    assert progress == [4096, 8192, 12288, 3 * 4096 + 5]


def test_kernel_copy_without_copy_file_range_falls_back_to_sendfile(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    src = tmp_path / "a"
    src.write_bytes(payload(100_000))
    with open(src, "rb") as fin, open(tmp_path / "b", "wb") as fout:
        assert storage_module.kernel_copy(fin.fileno(), fout.fileno(), 100_000) == 100_000
    assert (tmp_path / "b").read_bytes() == src.read_bytes()


def test_kernel_copy_of_a_source_shorter_than_promised_is_a_short_copy(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(payload(10_000))
    with open(src, "rb") as fin, open(tmp_path / "b", "wb") as fout, \
            pytest.raises(storage_module.ShortCopy, match="copied 10000 of 20000 bytes"):
        storage_module.kernel_copy(fin.fileno(), fout.fileno(), 20_000)


def test_put_detects_a_copy_that_came_out_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def copies_half(src: int, dst: int, size: int, on_bytes: object = None) -> int:
        os.write(dst, os.pread(src, size // 2, 0))
        return size  # claims all of it: the destination's size gives it away

    monkeypatch.setattr(storage_module, "kernel_copy", copies_half)
    src = tmp_path / "shard"
    src.write_bytes(payload(10_000))
    with pytest.raises(storage_module.ShortCopy, match="has 5000 bytes after copying 10000"):
        LocalStorage(tmp_path / "p").put(src, "step-1/shard", None, FileEntry("shard", *file_checksum(src)))


def test_put_of_a_file_whose_size_changed_since_written_hashes_it_again(tmp_path: Path) -> None:
    src = tmp_path / "shard"
    src.write_bytes(payload(10_000))
    stale = FileEntry("shard", 9_999, "xxh3:0000000000000000")
    assert LocalStorage(tmp_path / "p").put(src, "step-1/shard", None, stale).checksum == file_checksum(src)[1]


def test_upload_step_trusts_written_checksums_and_catches_a_file_changed_since(
        storage: Storage, tmp_path: Path) -> None:
    folder = scratch_step(tmp_path / "scratch" / "step-7", SHARDS)
    written = written_entries(folder)
    entries = upload_step(folder, storage, 7, streams=2, retries=0, backoff_s=0.0, rank=0, written=written)
    assert {e.name: e for e in entries} == written
    storage.write_atomic(f"step-7/{MANIFEST}", make_manifest(7, entries).to_json())
    assert verify_checksums(storage, 7, written, written) is None  # the persistent copies match

    flip_byte(folder / "__0_0.distcp", 100)  # same size: only the fsspec path (which reads) can tell
    if isinstance(storage, FsspecStorage):
        with pytest.raises(ChecksumMismatch, match="__0_0.distcp"):
            upload_step(folder, storage, 8, streams=2, retries=0, backoff_s=0.0, rank=0, written=written)
    else:  # the kernel copy trusts the writer's checksum; the restore's verification catches the copy
        upload_step(folder, storage, 8, streams=2, retries=0, backoff_s=0.0, rank=0, written=written)
        problem = verify_checksums(storage, 8, written, ["__0_0.distcp"])
        assert problem is not None and "__0_0.distcp: checksum xxh3:" in problem


def test_a_step_committed_with_crc32_checksums_still_verifies(storage: Storage, tmp_path: Path) -> None:
    src = scratch_step(tmp_path / "src", SHARDS)
    for name in SHARDS:
        storage.put(src / name, f"step-4/{name}")
    # As versions before xxh3 listed them:
    entries = [FileEntry(name, len(data), f"crc32:{zlib.crc32(data):08x}") for name, data in SHARDS.items()]
    manifest = make_manifest(4, entries)
    storage.write_atomic(f"step-4/{MANIFEST}", manifest.to_json())
    by_name = {e.name: e for e in entries}
    assert verify_checksums(storage, 4, by_name, by_name) is None
    view = scratch_step(tmp_path / "scratch" / "step-4", {"__0_0.distcp": SHARDS["__0_0.distcp"]})
    assert stage(storage, manifest, view)[0]["local"] == 1  # the scratch copy matches its crc32

    flip_byte(tmp_path / "persistent" / "step-4" / "__1_0.distcp", 7)
    problem = verify_checksums(storage, 4, by_name, by_name)
    assert problem is not None and problem.startswith("file __1_0.distcp: checksum crc32:")


def stage(storage: Storage, manifest: Manifest, view: Path) -> tuple[dict[str, int], list[str]]:
    return stage_view(manifest.files, storage, manifest.step, view, retries=0, backoff_s=0.0,
                      streams=2)


def test_stage_view_keeps_a_matching_scratch_file(storage: Storage, tmp_path: Path) -> None:
    manifest = commit_step(storage, 5, SHARDS, tmp_path / "src")
    view = scratch_step(tmp_path / "scratch" / "step-5", {"__0_0.distcp": SHARDS["__0_0.distcp"]})
    inode = (view / "__0_0.distcp").stat().st_ino
    counts, linked = stage(storage, manifest, view)
    assert (view / "__0_0.distcp").stat().st_ino == inode
    assert not (view / "__0_0.distcp").is_symlink()
    if isinstance(storage, LocalStorage):
        assert counts == {"local": 1, "linked": 3, "downloaded": 0}
        assert sorted(linked) == sorted(set(SHARDS) - {"__0_0.distcp"})
    else:
        assert counts == {"local": 1, "linked": 0, "downloaded": 3}
        assert linked == []
    assert {name: (view / name).read_bytes() for name in SHARDS} == SHARDS


def test_stage_view_replaces_a_corrupt_scratch_file(storage: Storage, tmp_path: Path) -> None:
    manifest = commit_step(storage, 5, SHARDS, tmp_path / "src")
    view = scratch_step(tmp_path / "scratch" / "step-5", SHARDS)
    flip_byte(view / "rng" / "rank-0.pt")  # same size, one byte off
    counts, linked = stage(storage, manifest, view)
    staged = view / "rng" / "rank-0.pt"
    if isinstance(storage, LocalStorage):
        assert counts == {"local": 3, "linked": 1, "downloaded": 0}
        assert linked == ["rng/rank-0.pt"]
        assert staged.is_symlink()
        assert Path(os.readlink(staged)) == storage.local_path("step-5/rng/rank-0.pt")
    else:
        assert counts == {"local": 3, "linked": 0, "downloaded": 1}
        assert not staged.is_symlink()
    assert staged.read_bytes() == SHARDS["rng/rank-0.pt"]


def test_stage_view_download_rejects_a_corrupt_persistent_file(tmp_path: Path) -> None:
    storage = FsspecStorage(f"file://{tmp_path}/persistent")
    manifest = commit_step(storage, 5, SHARDS, tmp_path / "src")
    flip_byte(tmp_path / "persistent" / "step-5" / "__1_0.distcp")
    with pytest.raises(ChecksumMismatch, match="__1_0.distcp"):
        stage(storage, manifest, tmp_path / "scratch" / "step-5")


def test_verify_checksums_names_the_corrupt_file(storage: Storage, tmp_path: Path) -> None:
    manifest = commit_step(storage, 5, SHARDS, tmp_path / "src")
    entries = {e.name: e for e in manifest.files}
    assert verify_checksums(storage, 5, entries, sorted(entries)) is None
    flip_byte(tmp_path / "persistent" / "step-5" / "rng" / "rank-0.pt")
    problem = verify_checksums(storage, 5, entries, sorted(entries))
    assert problem is not None and problem.startswith("file rng/rank-0.pt:")
    assert verify_checksums(storage, 5, entries, ["__0_0.distcp", ".metadata"]) is None


# --- retention -------------------------------------------------------------------------

def test_steps_to_delete_keeps_the_newest() -> None:
    steps = [10, 20, 30, 40, 50]
    assert steps_to_delete(steps, steps, keep_last=2, keep_every=0, protected=set()) == [10, 20, 30]
    assert steps_to_delete(steps, steps, keep_last=5, keep_every=0, protected=set()) == []


def test_steps_to_delete_keeps_every_multiple() -> None:
    steps = [10, 20, 30, 40, 50]
    assert steps_to_delete(steps, steps, keep_last=1, keep_every=20, protected=set()) == [10, 30]


def test_steps_to_delete_keeps_protected_steps() -> None:
    steps = [10, 20, 30, 40, 50]
    assert steps_to_delete(steps, steps, keep_last=2, keep_every=0, protected={10}) == [20, 30]


def test_steps_to_delete_uncommitted_older_go_newer_stay() -> None:
    all_steps = [5, 10, 15, 20, 25, 30, 35]
    doomed = steps_to_delete(all_steps, [10, 20, 30], keep_last=1, keep_every=0, protected={25})
    assert doomed == [5, 10, 15, 20]  # 25 is being written, 35 may still be in flight
    assert steps_to_delete([5, 10], [], keep_last=1, keep_every=0, protected=set()) == []


def stubborn(kind: str, root: Path, refuse: str) -> Storage:
    """A real storage whose `remove(refuse)` fails, as a permission error or a flaky mount would."""
    base = LocalStorage if kind == "local" else FsspecStorage

    class Stubborn(base):  # type: ignore[valid-type, misc]
        def remove(self, name: str) -> None:
            if name == refuse:
                raise PermissionError(13, "Permission denied", name)
            super().remove(name)

    return Stubborn(root if kind == "local" else f"file://{root}")


@pytest.mark.parametrize("kind", BACKENDS)
def test_clean_persistent_continues_after_a_failed_delete(
        kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = stubborn(kind, tmp_path / "persistent", refuse="step-20")
    for step in (10, 20, 30, 40):
        commit_step(storage, step, {"a": b"shard", "rng/rank-0.pt": b"rng"}, tmp_path / "src")
    write_step(storage, 15, {"a": b"half"}, tmp_path / "src")  # interrupted save
    write_step(storage, 50, {"a": b"half"}, tmp_path / "src")  # in flight
    caplog.set_level(logging.WARNING, logger="hpc")

    deleted = clean_persistent(storage, committed(storage), keep_last=2, keep_every=0, protected=set())

    assert deleted == [10, 15]
    assert storage.listdir() == ["step-20", "step-30", "step-40", "step-50"]
    # The manifest went first, so the half-deleted step no longer looks committed.
    assert storage.read_bytes(f"step-20/{MANIFEST}") is None
    assert [c.step for c in committed(storage, warn=False)] == [40, 30]
    assert [r for r in caplog.records if "could not delete" in r.getMessage()
            and "step-20" in r.getMessage() and "Permission denied" in r.getMessage()]


def test_clean_scratch_keeps_given_steps_and_other_folders(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    for name in ("step-5", "step-10", "step-15", "step-20", "data-cache"):
        scratch_step(scratch / name, {"a": b"x", "rng/rank-0.pt": b"y"})
    (scratch / "notes.txt").write_text("keep me")
    clean_scratch(scratch, keep={10, 20})
    assert sorted(p.name for p in scratch.iterdir()) == ["data-cache", "notes.txt", "step-10", "step-20"]
    assert (scratch / "step-10" / "rng" / "rank-0.pt").read_bytes() == b"y"
    clean_scratch(tmp_path / "absent", keep=set())  # nothing there yet: no error


# --- faults -----------------------------------------------------------------------------------

def test_faults_parse_the_documented_example() -> None:
    parsed = faults.parse("kill@shard_write:step=6:rank=1, stop@step_end:step=10")
    assert parsed == [faults.Fault("kill", "shard_write", {"step": 6, "rank": 1}),
                      faults.Fault("stop", "step_end", {"step": 10})]
    assert faults.parse("") == []


@pytest.mark.parametrize("text, says", [
    ("crash@upload", "action in ('kill', 'stop', 'slow')"),
    ("kill@nowhere", "point in ('shard_write', 'upload', 'manifest_write', 'step_end', 'restore')"),
    ("kill", "is not action@point"),
    ("stop@upload:node=1", "filter 'node=1' in 'stop@upload:node=1': use step=N, rank=N or ms=N"),
    ("stop@upload:step=six", "use step=N, rank=N or ms=N"),
])
def test_faults_parse_rejects_with_the_rule(text: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        faults.parse(text)
    assert str(err.value).startswith(f"{faults.ENV}: ")
    assert says in str(err.value)


def test_fault_point_asks_to_stop_only_where_it_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    assert faults.fault_point("step_end", step=10, rank=0) is False  # unset
    monkeypatch.setenv(faults.ENV, "stop@step_end:step=10:rank=1")
    assert faults.fault_point("step_end", step=10, rank=1) is True
    assert faults.fault_point("step_end", step=10, rank=0) is False
    assert faults.fault_point("step_end", step=11, rank=1) is False
    assert faults.fault_point("upload", step=10, rank=1) is False
    assert faults.fault_point("step_end", step=10) is False  # a filter the caller cannot match


def test_fault_point_kill_is_a_sigkill() -> None:
    code = ("from hpc.faults import fault_point\n"
            "fault_point('upload', step=2, rank=0)\n"
            "print('before', flush=True)\n"
            "fault_point('upload', step=3, rank=0)\n"
            "print('survived', flush=True)\n")
    env = {**os.environ, faults.ENV: "kill@upload:step=3"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout == "before\n"
    assert "HPC_FAULTS: SIGKILL at upload" in proc.stderr


# --- space ------------------------------------------------------------------------------------

def tiny_config(*overrides: str) -> Config:
    return compose(["exp=tiny_cpu", "cluster=local", *overrides], which=lambda name: None, environ={})


@pytest.fixture(scope="module")
def default_cfg() -> Config:
    return tiny_config()


@pytest.fixture(scope="module")
def cramped_cfg() -> Config:
    """Asks for 10^12 times the estimate: no disk has that much room."""
    return tiny_config("checkpoint.space_margin=1e12")


def test_estimate_is_about_twelve_bytes_per_param(default_cfg: Config) -> None:
    cfg = default_cfg
    params = count_params(cfg.model)
    assert STATE_BYTES_PER_PARAM == 12
    assert estimate_bytes(cfg) == 12 * params + (1 << 20)
    assert 12 * params <= estimate_bytes(cfg) <= 12 * params + (2 << 20)


def test_check_space_names_scratch_and_the_numbers(cramped_cfg: Config, tmp_path: Path) -> None:
    cfg = cramped_cfg
    scratch = tmp_path / "scratch" / "job-1"  # not created yet
    storage = LocalStorage(tmp_path / "persistent")
    problem = check_space(cfg, storage, scratch, 2, drainer=True, rank=1)
    assert problem is not None
    one = estimate_bytes(cfg)
    assert f"node-local scratch {scratch} has " in problem
    assert f"need {2 * one / 2 * 1e12 / 1e9:.2f} GB there" in problem
    assert f"2 steps x {one / 2 / 1e9:.2f} GB per node x margin 1000000000000.0" in problem
    assert "cluster.scratch_dir" in problem


def test_check_space_names_the_persistent_location_for_rank_0(cramped_cfg: Config,
                                                             tmp_path: Path) -> None:
    cfg = cramped_cfg
    storage = LocalStorage(tmp_path / "persistent")
    problem = check_space(cfg, storage, tmp_path / "scratch", 1, drainer=False, rank=0)
    assert problem is not None
    need = (cfg.checkpoint.keep_last + 1) * estimate_bytes(cfg) * 1e12
    assert problem.startswith(f"checkpoint storage {storage.url} has ")
    assert f"checkpoint.keep_last={cfg.checkpoint.keep_last} (+1 being written)" in problem
    assert f"needs {need / 1e9:.2f} GB" in problem
    # Other ranks do not check it, and an object store cannot tell.
    assert check_space(cfg, storage, tmp_path / "scratch", 1, drainer=False, rank=1) is None
    remote = FsspecStorage(f"file://{tmp_path}/persistent")
    assert check_space(cfg, remote, tmp_path / "scratch", 1, drainer=False, rank=0) is None


def test_check_space_passes_with_the_default_margin(default_cfg: Config, tmp_path: Path) -> None:
    cfg = default_cfg
    assert cfg.checkpoint.space_margin == 1.25
    storage = LocalStorage(tmp_path / "persistent")
    assert check_space(cfg, storage, tmp_path / "scratch", 1, drainer=True, rank=0) is None


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["auto", "never", "40", "/lustre/run/checkpoints/step-40"])
def test_checkpoint_resume_accepts(value: str) -> None:
    assert tiny_config(f"checkpoint.resume={value}").checkpoint.resume == value


def test_checkpoint_resume_rejects_latest_listing_the_options() -> None:
    with pytest.raises(ConfigError) as err:
        tiny_config("checkpoint.resume=latest")
    message = str(err.value)
    assert "checkpoint.resume=latest" in message
    for option in ("auto", "never", "a step number", "path of a step folder"):
        assert option in message


def test_checkpoint_keep_last_zero_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=0: must be at least 1"):
        tiny_config("checkpoint.keep_last=0")


def test_checkpoint_key_typo_gets_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'checkpoint\.every_step'.*did you mean 'every_steps'"):
        tiny_config("checkpoint.every_step=5")


# --- collectives ------------------------------------------------------------------------------

def test_collectives_without_a_process_group_are_local_and_still_raise() -> None:
    from hpc.checkpoint.collectives import Collectives
    from hpc.checkpoint.manifest import CheckpointError

    alone = Collectives(world_size=1, timeout_s=5)
    assert alone.alone and alone.gather("x") == ["x"] and alone.broadcast({"a": 1}) == {"a": 1}
    alone.barrier()
    alone.raise_any(None)
    with pytest.raises(CheckpointError, match="disk full"):
        alone.raise_any("disk full")
    alone.close()
