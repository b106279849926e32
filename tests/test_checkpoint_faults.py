"""Fault injection on the real job: a rank SIGKILLed while writing a shard, while uploading, or
while writing the manifest; a corrupted or truncated shard; a checkpoint store behind fsspec; too
little disk. The next start resumes from the newest committed step, and never from a partial one."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from checkpoint_jobs import committed_steps, manifest, metrics, ok, rank0_log, submit

pytestmark = pytest.mark.dist

EVERY_5 = ["train.max_steps=20", "checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the same run, never interrupted (committed steps 10, 15 and 20); tests that
    need a finished run start from a copy of it."""
    root = tmp_path_factory.mktemp("straight")
    ok(submit(root, "run", *EVERY_5))
    return root / "run"


@pytest.fixture(scope="module")
def straight(straight_run: Path) -> list[float]:
    """Per-step losses of the same run, never interrupted."""
    return [r["loss"] for r in metrics(straight_run)]


def _finished_run(straight_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    return run


@pytest.mark.parametrize("point,rank", [("shard_write", 1), ("upload", 0), ("manifest_write", 0)])
def test_a_rank_killed_during_a_save_resumes_from_the_previous_commit(
        tmp_path: Path, straight: list[float], point: str, rank: int) -> None:
    killed = submit(tmp_path, "run", *EVERY_5, faults=f"kill@{point}:step=10:rank={rank}")
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert committed_steps(tmp_path / "run") == [5]
    partial = tmp_path / "run" / "checkpoints" / "step-10"
    if point != "shard_write":  # the shard never reached scratch: nothing was uploaded
        assert partial.is_dir() and not (partial / "manifest.json").exists()

    # The next start is the very same job: it must pick step 5, not the partial step 10.
    out = ok(submit(tmp_path, "run", *EVERY_5))
    log = rank0_log(tmp_path / "run")
    assert "(resumed at step 5)" in out and "resumed from step 5" in log
    if partial.exists() and point != "shard_write":
        assert "step-10 skipped: no manifest" in log
    records = metrics(tmp_path / "run")
    resumed = [r for r in records if r["step"] > 5][-15:]
    assert [r["step"] for r in resumed] == list(range(6, 21))
    assert [r["loss"] for r in resumed] == straight[5:]  # nothing lost, nothing changed
    # keep_last=3, and step 5 too: retention never deletes the step this run resumed from.
    assert committed_steps(tmp_path / "run") == [5, 10, 15, 20]
    assert manifest(tmp_path / "run", 20)["data"]["consumed_samples"] == 160


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_corrupt_and_truncated_shards_fall_back_to_an_older_step(tmp_path: Path, straight_run: Path,
                                                                  straight: list[float]) -> None:
    _finished_run(straight_run, tmp_path)
    assert committed_steps(tmp_path / "run") == [10, 15, 20]
    ckpt = tmp_path / "run" / "checkpoints"
    corrupt = _largest_shard(ckpt / "step-20")
    _flip_a_byte(corrupt)  # same size: only the checksum can tell
    truncated = _largest_shard(ckpt / "step-15")
    os.truncate(truncated, truncated.stat().st_size - 1)

    # Asked for explicitly, a step that does not verify is an error, not a silent fallback.
    asked = submit(tmp_path, "run", *EVERY_5, "checkpoint.resume=20")
    assert asked.returncode != 0
    text = asked.stdout + asked.stderr + rank0_log(tmp_path / "run")
    assert f"step-20 does not verify: file {corrupt.name}: checksum" in text, text[-3000:]

    resumed = submit(tmp_path, "run", *EVERY_5)
    out = ok(resumed)
    log = rank0_log(tmp_path / "run")
    assert f"step-15 skipped: file {truncated.name} has" in log
    assert f"step-20 skipped: file {corrupt.name}: checksum" in log and "falling back to the step before" in log
    # The waiting client showed them too, not only the job's log file.
    shown = [line for line in resumed.stderr.splitlines() if re.match(r"job \d+: \S+ \[rank 0 \S+\] WARNING ", line)]
    assert any(f"step-20 skipped: file {corrupt.name}: checksum" in line for line in shown), resumed.stderr[-3000:]
    assert any(f"step-15 skipped: file {truncated.name} has" in line for line in shown), resumed.stderr[-3000:]
    assert "(resumed at step 10)" in out
    records = metrics(tmp_path / "run")
    assert [r["loss"] for r in records[-10:]] == straight[10:]
    # Steps 15 and 20 were written again, whole: they verify now.
    out = ok(submit(tmp_path, "run", *EVERY_5, "checkpoint.resume=20"))
    assert "no steps to run (at step 20 of 20)" in out


def test_checkpoints_through_fsspec_are_downloaded_and_verified_on_resume(
        tmp_path: Path, straight: list[float]) -> None:
    store = f"file://{tmp_path}/object-store/ckpt"
    ok(submit(tmp_path, "run", *EVERY_5, f"checkpoint.dir={store}", faults="stop@step_end:step=10"))
    assert (tmp_path / "object-store" / "ckpt" / "step-10" / "manifest.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    ok(submit(tmp_path, "run", *EVERY_5, f"checkpoint.dir={store}"))
    log = rank0_log(tmp_path / "run")
    assert f"resumed from step 10 ({store}/step-10)" in log
    assert re.search(r"scratch 0, linked 0, downloaded \d+", log)  # every file came through fsspec
    assert [r["loss"] for r in metrics(tmp_path / "run")[-10:]] == straight[10:]


def test_too_little_space_is_an_error_before_training_starts(tmp_path: Path) -> None:
    proc = submit(tmp_path, "run", *EVERY_5, "checkpoint.space_margin=1e9")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr + rank0_log(tmp_path / "run")
    assert "GB free; checkpoints need" in text and "HINT:" in text, text[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was trained


def test_resume_never_refuses_a_store_with_checkpoints_and_an_older_step_starts_a_new_line(
        tmp_path: Path, straight_run: Path, straight: list[float]) -> None:
    _finished_run(straight_run, tmp_path)
    before = {step: manifest(tmp_path / "run", step) for step in (10, 15, 20)}
    never = submit(tmp_path, "run", *EVERY_5, "checkpoint.resume=never")
    assert never.returncode != 0
    text = never.stdout + never.stderr + rank0_log(tmp_path / "run")
    assert "checkpoint.resume=never, but" in text and "already holds committed steps [20, 15, 10]" in text
    assert {step: manifest(tmp_path / "run", step) for step in (10, 15, 20)} == before  # untouched

    out = ok(submit(tmp_path, "run", *EVERY_5, "checkpoint.resume=10"))
    assert "(resumed at step 10)" in out
    log = rank0_log(tmp_path / "run")
    assert "step-15 set aside" in log and "step-20 set aside" in log
    assert [r["loss"] for r in metrics(tmp_path / "run")[-10:]] == straight[10:]
    assert committed_steps(tmp_path / "run") == [10, 15, 20]  # the new line's 15 and 20
    assert manifest(tmp_path / "run", 20)["saved_at"] > before[20]["saved_at"]
