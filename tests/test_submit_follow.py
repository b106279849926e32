"""The waiting client's view of a job's warnings: only the job's own WARNING/ERROR lines, each
once, a line still being written only when it is whole, every task's log."""

from __future__ import annotations

from pathlib import Path

from hpc.submit.follow import LogFollower


def test_new_warning_and_error_lines_of_every_task_once(tmp_path: Path) -> None:
    folder = tmp_path / "submitit"
    folder.mkdir()
    rank0, rank1 = folder / "77_0_log.out", folder / "77_1_log.out"
    (folder / "76_0_log.out").write_text("10:00:00 [rank 0 n1] WARNING an older job's\n")
    rank0.write_text("10:00:01 [rank 0 n1] INFO started\n"
                     "10:00:02 [rank 0 n1] WARNING checkpoint step-20 skipped: checksum\n"
                     "/x/ddp.py:22: FutureWarning: not ours\n"
                     "10:00:03 [rank 0 n1] ERROR upload failed, retrying")  # not yet whole
    follower = LogFollower(tmp_path, "77")
    assert follower.new_lines() == ["10:00:02 [rank 0 n1] WARNING checkpoint step-20 skipped: checksum"]
    with rank0.open("a") as f:
        f.write(" in 2 s\n10:00:04 [rank 0 n1] INFO step 5\n")
    rank1.write_text("10:00:05 [rank 1 n2] CRITICAL rank 1 lost its GPU\n")
    assert follower.new_lines() == ["10:00:03 [rank 0 n1] ERROR upload failed, retrying in 2 s",
                                    "10:00:05 [rank 1 n2] CRITICAL rank 1 lost its GPU"]
    assert follower.new_lines() == []
