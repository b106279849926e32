"""The supervisor's pure parts: why a run started, its restart timeline and start line, the lead
and deadline arithmetic, and how a failure is recorded. Plain values, no processes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pytest

from hpc.checkpoint.manifest import CheckpointError
from hpc.config import ConfigError
from hpc.launch.preflight import PreflightError
from hpc.requeue import deadline, policy, timeline
from hpc.requeue.saves import NoCheckpoints


def _ending(restart: int, reason: str, **extra: object) -> dict[str, object]:
    return {"event": "requeued", "job_id": "7", "restart": restart, "reason": reason, "at": 100.0, **extra}


def test_a_first_run_was_submitted_and_a_new_job_id_is_a_resubmission() -> None:
    assert timeline.why_started([], "7", 0) == ("submitted", None)
    assert timeline.why_started([_ending(0, "timeout") | {"job_id": "6"}], "7", 0) == ("resubmitted", None)


def test_a_restart_takes_the_reason_of_the_previous_runs_ending() -> None:
    events = [_ending(0, "preemption"), _ending(1, "timeout")]
    assert timeline.why_started(events, "7", 2) == ("timeout", events[1])
    assert timeline.why_started(events, "7", 1) == ("preemption", events[0])


def test_a_restart_no_one_recorded_was_slurms_doing() -> None:
    assert timeline.why_started([_ending(0, "timeout")], "7", 2) == (policy.SLURM, None)


def test_the_timeline_splits_signal_to_first_step_into_phases() -> None:
    previous = _ending(0, "timeout", at=110.0, stop={"signal_at": 100.0, "agreed_at": 101.5, "save_phases": {
        "waited": 0.5, "blocked": 1.0, "write": 2.0, "upload": 3.0, "commit": 0.25}})
    spans = timeline.restart_timeline(previous, job_start=130.0, restore_window=(140.0, 145.0), first_step_at=150.0)
    assert spans == {"stop": 1.5, "save": 3.5, "commit": 3.25, "scheduler_wait": 20.0, "start_up": 10.0,
                     "load": 5.0, "first_step": 5.0, "total": 50.0}
    line = timeline.start_line(40, 1, "timeout", spans)
    assert line.startswith("resumed from step 40, restart 1, reason: timeout; signal -> training again 50.0 s")
    assert "scheduler wait 20.0" in line


def test_a_first_start_has_no_total_and_a_short_line() -> None:
    spans = timeline.restart_timeline(None, job_start=None, restore_window=None, first_step_at=5.0)
    assert spans["total"] is None and set(v for k, v in spans.items()) == {None}
    assert timeline.start_line(0, 0, "submitted", spans) == "started at step 0, restart 0, reason: submitted"


def test_the_asked_lead_comes_from_the_setup_else_the_config() -> None:
    assert deadline.asked_lead(300, {deadline.LEAD_ENV: "90"}) == 90
    assert deadline.asked_lead(300, {deadline.LEAD_ENV: "x"}) == 300
    assert deadline.asked_lead(300, {}) == 300


def test_the_job_keeps_its_own_deadline_only_when_slurms_warning_is_too_short() -> None:
    assert deadline.deadline_for(60, asked_s=90, end=1000.0, now=0.0, step_s=1.0) == (None, "")
    assert deadline.deadline_for(120, asked_s=90, end=None, now=0.0, step_s=1.0) == (None, "")
    assert deadline.deadline_for(120, asked_s=90, end=1000.0, now=0.0, step_s=1.0) == (880.0, "")
    assert deadline.deadline_for(120, asked_s=90, end=1000.0, now=875.0, step_s=5.0) == (None, "too late")


@dataclass
class _Outcome:
    committed: bool
    seconds: dict[str, float] = field(default_factory=dict)


def test_save_times_count_committed_saves_once_and_the_median_step() -> None:
    times = deadline.SaveTimes()
    for seconds in (1.0, 1.2, 9.0, 1.1):  # one interval holds a blocking save: the median ignores it
        times.step_interval(seconds)
    assert times.step_s == 1.2
    outcomes = [_Outcome(True, {"write": 4.0, "upload": 6.0}), _Outcome(False, {"write": 99.0})]
    assert times.take(outcomes) and times.save_s == [10.0]
    assert not times.take(outcomes) and times.save_s == [10.0]  # nothing new
    assert times.needed_lead() == policy.needed_lead([10.0], 1.2)
    record = times.record("7")
    assert record["needed_s"] == times.needed_lead() and record["save_s"] == 10.0 and record["job_id"] == "7"


def test_a_failure_record_says_permanent_peer_and_bad_nodes() -> None:
    assert policy.failure_record(ConfigError("bad key"), "setup")["permanent"] is True
    assert policy.failure_record(CheckpointError("corrupt"), "train")["permanent"] is False
    peer = policy.failure_record(RuntimeError("Connection reset by peer"), "train")
    assert peer["peer_failure"] is True and peer["status"] == "error" and peer["phase"] == "train"
    assert policy.failure_record(PreflightError("n3 has no GPU", nodes=("n3",)), "setup")["bad_nodes"] == ["n3"]
    assert policy.failure_record(ValueError("x"), "setup")["error"] == "ValueError: x"


def test_before_the_checkpointer_exists_nothing_is_committed() -> None:
    record = NoCheckpoints()
    assert (record.resumed_step, record.last_committed, list(record.outcomes), record.restore_window) == (
        None, None, [], None)


def test_an_armed_deadline_stays_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    times = deadline.SaveTimes(step_s=5.0, save_s=[20.0])
    end = time.time() + times.needed_lead() + 5.0  # armed 5 s from now: less than 2 steps away
    armed = end - times.needed_lead()
    with caplog.at_level(logging.INFO, logger="hpc"):
        assert deadline.keep_deadline(times, asked_s=10, end=end, current=armed) == armed
        assert deadline.keep_deadline(times, asked_s=10, end=end + 1000, current=None) == end + 1000 - times.needed_lead()
    assert [r.levelname for r in caplog.records] == ["INFO"]  # moved once; never "too late" for the armed one
