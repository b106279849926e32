"""Fault matrix, storage: node-local scratch that fills up during a save, and a checkpoint store that
turns read-only mid-run, each on a real small filesystem the test mounts (tmpfs; needs root, as
the suite has under CI). Real local jobs, 2 ranks over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpoint_jobs import ROOT, rank0_log
from hpc.checkpoint.manifest import MANIFEST, Manifest
from hpc.checkpoint.storage import file_checksum

MB = 1 << 20


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator:
    """mount_tmpfs(name, size_mb) -> a tmpfs of that size at tmp_path/name, unmounted afterwards."""
    if os.geteuid() != 0:
        if os.environ.get("CI") or os.environ.get("HPC_REQUIRE_SLURM"):
            pytest.fail("these tests mount a tmpfs and need root (tools/test.sh runs them as root)")
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(name: str, size_mb: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _start(tmp_path: Path, *overrides: str, faults: str = "slow@step_end:ms=700") -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), "HPC_FAULTS": faults}
    return subprocess.Popen(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"run.root={tmp_path}", "run.name=run",
         "train.max_steps=10", "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_last=10", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_log(run_dir: Path, text: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "submitit").is_dir() and text in rank0_log(run_dir):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60) if proc.poll() is None else proc.communicate()
    pytest.fail(f"no '{text}' in the job's log:\n{rank0_log(run_dir)[-3000:]}\n{out[-2000:]}\n{err[-2000:]}")


def _fill(folder: Path, leave: int) -> Path:
    """A file that takes all of `folder`'s filesystem but `leave` bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = folder / "filler"
    with filler.open("wb") as f:
        f.truncate(0)
        for _ in range(max(0, free - leave) // MB):
            f.write(b"\1" * MB)
    return filler


def _committed(store: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in store.glob(f"step-*/{MANIFEST}"))


def _intact(step: Path) -> bool:
    """Every file of the step's manifest is there with its size and checksum."""
    manifest = Manifest.from_json((step / MANIFEST).read_bytes())
    return all(file_checksum(step / e.name) == (e.size, e.checksum) for e in manifest.files)


def test_scratch_full_during_a_save_commits_nothing_partial_and_the_save_after_space_returns_commits(
        tmp_path: Path, mount_tmpfs) -> None:
    # A tiny_cpu checkpoint is about 5.3 MB. Once step 2 is committed, the scratch fills up (all but
    # 1 MB): step 4's save runs out of space; once the filler goes, the saves commit again.
    scratch = mount_tmpfs("scratch", 40)
    proc = _start(tmp_path, f"cluster.scratch_dir={scratch}/{{job_id}}")
    run = tmp_path / "run"
    _wait_for_log(run, "checkpoint step 2 committed", proc)
    filler = _fill(scratch, leave=1 * MB)
    _wait_for_log(run, "checkpoint step 4 not committed", proc)
    filler.unlink()  # space returns
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    log = rank0_log(run)
    assert "No space left on device" in log
    store = run / "checkpoints"
    assert _committed(store) == [2, 6, 8, 10]  # 4 not: nothing partial is committed
    assert not (store / "step-4" / MANIFEST).exists() and _intact(store / "step-2")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # training went on through the failed save
    # The waiting client showed the failure as it happened.
    assert "ERROR checkpoint step 4 not committed" in err


def test_with_on_failure_stop_a_save_that_cannot_commit_ends_the_job_naming_the_step(
        tmp_path: Path, mount_tmpfs) -> None:
    scratch = mount_tmpfs("scratch", 40)
    proc = _start(tmp_path, f"cluster.scratch_dir={scratch}/{{job_id}}", "checkpoint.on_failure=stop")
    _wait_for_log(tmp_path / "run", "checkpoint step 2 committed", proc)
    _fill(scratch, leave=1 * MB)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    text = out + err + rank0_log(tmp_path / "run")
    assert "checkpoint step 4 was not committed" in text and "checkpoint.on_failure=stop; the newest " \
        "committed step is 2" in text, text[-3000:]
    assert _committed(tmp_path / "run" / "checkpoints") == [2]


def test_a_store_that_turns_read_only_mid_run_retries_commits_nothing_and_later_steps_commit(
        tmp_path: Path, mount_tmpfs) -> None:
    store = mount_tmpfs("store", 64)
    # An fsspec URL: the errors are those of fsspec's local backend.
    proc = _start(tmp_path, f"checkpoint.dir=file://{store}", "checkpoint.retries=2", "checkpoint.backoff_s=0.2")
    run = tmp_path / "run"
    _wait_for_log(run, "checkpoint step 2 committed", proc)
    subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
    try:
        _wait_for_log(run, "not committed", proc)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    log = rank0_log(run)
    failed = sorted({int(s) for s in __import__("re").findall(r"checkpoint step (\d+) not committed", log)})
    assert failed and "Read-only file system" in log, log[-3000:]
    assert "retry" in log.lower()  # the upload was retried with backoff before the step was given up
    committed = _committed(store)
    assert committed[0] == 2 and committed[-1] == 10 and not set(failed) & set(committed), (failed, committed)
    assert _intact(store / "step-2")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
