"""One job per run folder: a submit into a folder whose last job SLURM still queues is refused
(the real refusal is in test_fault_matrix_slurm); here the seam's decisions, with squeue's answers
played back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc import slurm
from hpc.submit.backend import SubmitError, refuse_a_live_job


def _run_folder(tmp_path: Path, *jobs: str) -> SimpleNamespace:
    (tmp_path / "submitit").mkdir()
    for job in jobs:  # submitit's record of each submission, newest last
        (tmp_path / "submitit" / f"{job}_submitted.pkl").write_bytes(b"")
    return SimpleNamespace(executor="slurm", run_dir=tmp_path)


def _squeue(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> list[str]:
    asked: list[str] = []

    def queue_state(job_id: str, env=None) -> str:
        asked.append(job_id)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    monkeypatch.setattr(slurm, "queue_state", queue_state)
    return asked


def test_a_running_job_refuses_a_second_one_naming_it_and_the_ways_out(tmp_path, monkeypatch) -> None:
    import os
    import time

    plan = _run_folder(tmp_path, "41")
    newer = tmp_path / "submitit" / "42_submitted.pkl"
    newer.write_bytes(b"")
    os.utime(newer, (time.time() + 5, time.time() + 5))
    asked = _squeue(monkeypatch, ["RUNNING"])
    with pytest.raises(SubmitError) as err:
        refuse_a_live_job(plan, sleep=lambda s: None)
    assert asked == ["42"]  # the newest submission is the one that counts
    text = str(err.value)
    assert "job 42, which is still RUNNING" in text and "scancel 42" in text and "run.name" in text


def test_a_completing_job_is_waited_for_and_then_the_submit_goes_on(tmp_path, monkeypatch) -> None:
    plan = _run_folder(tmp_path, "7")
    _squeue(monkeypatch, ["COMPLETING", "COMPLETING", ""])
    sleeps: list[float] = []
    refuse_a_live_job(plan, sleep=sleeps.append)
    assert sleeps == [1.0, 1.0]


def test_a_completing_job_that_requeues_itself_refuses(tmp_path, monkeypatch) -> None:
    plan = _run_folder(tmp_path, "7")
    _squeue(monkeypatch, ["COMPLETING", "PENDING"])
    with pytest.raises(SubmitError, match="still PENDING"):
        refuse_a_live_job(plan, sleep=lambda s: None)
    _squeue(monkeypatch, ["COMPLETING"])
    with pytest.raises(SubmitError, match="still COMPLETING"):
        refuse_a_live_job(plan, wait_s=0.0, sleep=lambda s: None)


def test_nothing_is_asked_of_a_fresh_folder_a_finished_job_or_a_local_run(tmp_path, monkeypatch) -> None:
    asked = _squeue(monkeypatch, [""])
    refuse_a_live_job(SimpleNamespace(executor="slurm", run_dir=tmp_path / "new"))
    assert asked == []
    refuse_a_live_job(_run_folder(tmp_path, "9"))
    assert asked == ["9"]
    refuse_a_live_job(SimpleNamespace(executor="local", run_dir=tmp_path))
    assert asked == ["9"]
