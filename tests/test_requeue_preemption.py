"""Preemption as SLURM reports it, on plain values and a fake SLURM seam (no cluster): the stop's reason
when SLURM says it is preempting the run, the reason for a run SLURM ended itself, and the batch
shell's verdict on a run whose grace time ran out. tests/test_preempt_slurm.py covers the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc import slurm
from hpc.config import compose
from hpc.config.compose import to_yaml
from hpc.requeue import __main__ as verdict
from hpc.requeue import accounting, history, policy, timeline
from hpc.requeue.signals import DEADLINE, TERM, WARNING
from hpc.run_folder import RunFolder


def test_a_stop_slurm_says_is_a_preemption_is_one_even_near_the_time_limit() -> None:
    assert policy.stop_reason(WARNING, remaining_s=30, lead_s=300, preempted=True) == policy.PREEMPTION
    assert policy.stop_reason(TERM | DEADLINE, remaining_s=30, lead_s=300, preempted=True) == policy.PREEMPTION
    assert policy.stop_reason(WARNING, remaining_s=30, lead_s=300) == policy.TIMEOUT


@pytest.mark.parametrize("state, reason", [("PREEMPTED", "preemption"), ("TIMEOUT", "timeout"),
                                           ("NODE_FAIL", "slurm"), ("", "slurm")])
def test_a_run_slurm_ended_itself_takes_its_reason_from_accounting(state: str, reason: str) -> None:
    assert policy.slurm_ending(state) == reason


def test_a_preemption_past_its_grace_time_counts_against_preemptions_not_failures() -> None:
    reason, fields = timeline.slurm_requeue(accounting.RunEnd("PREEMPTED", 1000.0),
                                            {0: {"signalled_at": 970.5}, 1: {"signalled_at": 970.2}, 2: {}})
    assert reason == policy.PREEMPTION and policy.BUDGETS[reason] == "max_preemptions"
    assert fields["at"] == 1000.0 and fields["stop"] == {"signal_at": 970.2} and fields["state"] == "PREEMPTED"
    assert "grace time ran out before the save committed" in fields["detail"] and "GraceTime" in fields["detail"]
    # The restart's timeline counts from the signal, and the queue from the end of the run.
    spans = timeline.restart_timeline({"event": "requeued", **fields}, job_start=1010.0,
                                      restore_window=(1020.0, 1021.0), first_step_at=1022.0)
    assert spans["scheduler_wait"] == 10.0 and spans["total"] == pytest.approx(51.8)


def test_without_accounting_a_slurm_requeue_stays_a_failure() -> None:
    reason, fields = timeline.slurm_requeue(None, {})
    assert reason == policy.SLURM and "at" not in fields and "stop" not in fields
    assert policy.BUDGETS[reason] == "max_failures"


def test_previous_run_is_picked_by_its_restart_number(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(argv: list[str], **kwargs: object) -> str:
        calls.append(argv)
        return "NODE_FAIL|2026-12-04T16:40:00\nPREEMPTED|2026-12-04T16:50:52\nRUNNING|Unknown\n"

    monkeypatch.setattr(slurm, "run", fake_run)
    ended = accounting.previous_run("42", restart=2)
    assert ended is not None and ended.state == "PREEMPTED"
    assert ended.ended_at == slurm.parse_time("2026-12-04T16:50:52")
    assert calls[0][:2] == ["sacct", "-D"] and calls[0][-1] == "42"
    # slurmdbd has not recorded the current run yet: still the right one, not the one before it.
    monkeypatch.setattr(slurm, "run", lambda argv, **kw: "NODE_FAIL|2026-12-04T16:40:00\nPREEMPTED|2026-12-04T16:50:52\n")
    assert accounting.previous_run("42", restart=2).state == "PREEMPTED"
    monkeypatch.setattr(slurm, "run", lambda argv, **kw: "RUNNING|Unknown\n")
    assert accounting.previous_run("42", restart=1) is None
    assert accounting.previous_run("42", restart=0) is None


def test_preemption_reads_preempt_time_and_the_moved_end(monkeypatch: pytest.MonkeyPatch) -> None:
    info = {"PreemptTime": "2026-12-04T16:44:10", "EndTime": "2026-12-04T16:44:40"}
    monkeypatch.setattr(slurm, "job_info", lambda job_id, env=None: info)
    found = accounting.preemption("42")
    assert found is not None and found.grace_s == 30.0
    monkeypatch.setattr(slurm, "job_info", lambda job_id, env=None: {"PreemptTime": "", "EndTime": "x"})
    assert accounting.preemption("42") is None


def _run_folder(tmp_path: Path) -> Path:
    cfg = compose(["exp=tiny_cpu", "cluster=local"], which=lambda name: None, environ={})
    RunFolder(tmp_path).config.write_text(to_yaml(cfg))
    return tmp_path


def test_the_verdict_on_a_run_preempted_past_its_grace_time_records_a_preemption_and_requeues_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _run_folder(tmp_path)
    history.RankRecord(run_dir, "42", 0, 0, "n1").update(status="signalled", signalled_at=100.0)
    requeued: list[str] = []
    monkeypatch.setattr(slurm, "current_state", lambda job_id, env=None: "PREEMPTED")
    monkeypatch.setattr(slurm, "job_info", lambda job_id, env=None: {"Restarts": "1", "JobState": "COMPLETING"})
    monkeypatch.setattr(slurm, "requeue", lambda job_id, exclude=(): requeued.append(job_id))
    assert verdict.after_srun(137, run_dir, {"SLURM_JOB_ID": "42"}) == 0
    [event] = history.read_events(run_dir)
    assert event["event"] == "requeued" and event["reason"] == "preemption" and event["restart"] == 0
    assert event["stop"] == {"signal_at": 100.0} and event["state"] == "PREEMPTED"
    assert requeued == [], "SLURM requeued the job already; a second requeue would end the rerun"


def test_the_verdict_requeues_a_preempted_run_slurm_did_not_requeue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _run_folder(tmp_path)
    requeued: list[str] = []
    monkeypatch.setattr(slurm, "current_state", lambda job_id, env=None: "PREEMPTED")
    monkeypatch.setattr(slurm, "job_info", lambda job_id, env=None: {"Restarts": "0"})
    monkeypatch.setattr(slurm, "requeue", lambda job_id, exclude=(): requeued.append(job_id))
    assert verdict.after_srun(1, run_dir, {"SLURM_JOB_ID": "42"}) == 0
    [event] = history.read_events(run_dir)
    assert event["reason"] == "preemption" and requeued == ["42"]
