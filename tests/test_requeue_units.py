"""Fast unit tests of the requeue building blocks: policy decisions, the run's history files, stop
requests, fault injection and the submit-time lead. No SLURM, no torch, no subprocesses."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from hpc import faults
from hpc.config import ConfigError, compose
from hpc.requeue import history, policy
from hpc.requeue.signals import DEADLINE, OTHER, TERM, WARNING, StopRequest, describe
from hpc.run_folder import RunFolder
from hpc.submit.plan import build_plan, lead_time

LIMITS = {"max_requeues": 1, "max_preemptions": 2, "max_failures": 1}


def _requeued(reason: str, job_id: str = "7") -> dict[str, Any]:
    return {"event": history.REQUEUED, "job_id": job_id, "reason": reason}


def _cfg(*overrides: str):
    """tiny_cpu on the test cluster: 2 nodes, a 2-minute limit (120 s), requeue.lead_s=30."""
    return compose(["exp=tiny_cpu", "cluster=testcluster", "nodes=2", "time=2", "requeue.lead_s=30",
                    *overrides], which=lambda name: "/x", environ={})


# ---- policy.stop_reason ----

def test_deadline_bit_means_timeout_even_far_from_the_limit() -> None:
    assert policy.stop_reason(DEADLINE, remaining_s=10_000, lead_s=300) == policy.TIMEOUT


def test_signal_within_lead_plus_jitter_of_the_limit_is_a_timeout() -> None:
    assert policy.stop_reason(WARNING, remaining_s=360, lead_s=300) == policy.TIMEOUT


def test_signal_well_before_the_limit_is_a_preemption() -> None:
    assert policy.stop_reason(TERM, remaining_s=361, lead_s=300) == policy.PREEMPTION


def test_signal_with_unknown_remaining_time_is_a_preemption() -> None:
    assert policy.stop_reason(WARNING, remaining_s=None, lead_s=300) == policy.PREEMPTION


# ---- policy.used / decide ----

def test_each_reason_counts_against_its_own_budget() -> None:
    events = [_requeued("timeout"), _requeued("preemption"), _requeued("preemption"),
              _requeued("failure"), _requeued("slurm")]
    assert policy.used(events, "7", "max_requeues") == 1
    assert policy.used(events, "7", "max_preemptions") == 2
    assert policy.used(events, "7", "max_failures") == 2  # failure and slurm share it


def test_requeues_of_another_job_id_do_not_count() -> None:
    assert policy.used([_requeued("timeout", job_id="6")], "7", "max_requeues") == 0


def test_only_requeued_events_count() -> None:
    events = [{"event": history.GAVE_UP, "job_id": "7", "reason": "timeout"},
              {"event": history.STARTED, "job_id": "7", "reason": "timeout"}]
    assert policy.used(events, "7", "max_requeues") == 0


def test_decide_requeues_while_the_budget_lasts() -> None:
    decision = policy.decide("timeout", [], "7", LIMITS, step=40)
    assert decision.requeue
    assert (decision.budget, decision.used, decision.limit) == ("max_requeues", 0, 1)
    assert "step 40" in decision.message


def test_decide_gives_up_when_the_budget_is_spent_and_says_why() -> None:
    decision = policy.decide("timeout", [_requeued("timeout")], "7", LIMITS, step=40)
    assert not decision.requeue
    assert decision.used == 1
    assert "requeue.max_requeues=1" in decision.message
    assert "timeout" in decision.message
    assert "step 40" in decision.message
    assert "submit the same command again" in decision.message


def test_spent_timeout_budget_does_not_stop_a_preemption_requeue() -> None:
    decision = policy.decide("preemption", [_requeued("timeout")], "7", LIMITS, step=40)
    assert decision.requeue and decision.budget == "max_preemptions"


def test_slurm_requeues_use_up_the_failure_budget() -> None:
    decision = policy.decide("failure", [_requeued("slurm")], "7", LIMITS, step=3)
    assert not decision.requeue
    assert "requeue.max_failures=1" in decision.message


def test_budget_spent_by_another_job_id_still_allows_a_requeue() -> None:
    assert policy.decide("timeout", [_requeued("timeout", job_id="6")], "7", LIMITS, step=40).requeue


def test_give_up_message_without_a_checkpoint_says_none_was_committed() -> None:
    decision = policy.decide("failure", [_requeued("failure")], "7", LIMITS, step=None)
    assert not decision.requeue
    assert "No checkpoint was committed" in decision.message


# ---- policy.needed_lead ----

def test_needed_lead_is_margin_plus_step_plus_twice_the_worst_save() -> None:
    # 15 s margin + 10 s step + 2 x 20 s (a save in flight, then the final one) = 65 -> 70
    assert policy.needed_lead([5.0, 20.0, 10.0], step_s=10.0) == 70


def test_needed_lead_rounds_up_to_ten_seconds() -> None:
    assert policy.needed_lead([0.5], step_s=0.2) == 20  # 15 + 0.2 + 1.0 = 16.2


def test_needed_lead_without_saves_is_margin_plus_step() -> None:
    assert policy.needed_lead([], step_s=0.0) == 20  # the 15 s margin, rounded up


# ---- policy.diagnose ----

def _rec(rank: int, node: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"rank": rank, "node": node, "status": status, "updated_at": 100.0 + rank, **fields}


def test_a_permanent_error_wins_over_everything_else() -> None:
    records = {0: _rec(0, "n1", "running"),
               1: _rec(1, "n2", "error", bad_nodes=["n2"]),
               2: _rec(2, "n3", "error", permanent=True, error="ConfigError: bad key\ntraceback")}
    failure = policy.diagnose(records, 1)
    assert failure.kind == "permanent"
    assert failure.detail == "ConfigError: bad key"
    assert failure.suspects == ()


def test_failed_preflight_names_its_bad_nodes_as_suspects() -> None:
    records = {0: _rec(0, "n1", "error", bad_nodes=["n2", "n1"]), 1: _rec(1, "n2", "running"),
               2: _rec(2, "n3", "error", bad_nodes=["n2", "n1"])}
    failure = policy.diagnose(records, 1)
    assert failure.kind == "preflight"
    assert failure.suspects == ("n1", "n2")


def test_a_preflight_failing_on_every_node_excludes_none() -> None:
    # Every node failing alike points at the config (scratch_dir), not at the nodes.
    records = {0: _rec(0, "n1", "error", bad_nodes=["n1", "n2"]), 1: _rec(1, "n2", "error", bad_nodes=["n1", "n2"])}
    failure = policy.diagnose(records, 1)
    assert failure.kind == "preflight" and failure.suspects == ()


def test_ranks_that_left_no_trace_make_their_nodes_suspects() -> None:
    records = {0: _rec(0, "n1", "signalled"), 1: _rec(1, "n2", "running"),
               2: _rec(2, "n1", "error", peer_failure=True, error="connection reset by peer")}
    failure = policy.diagnose(records, 137)
    assert failure.kind == "crash"
    assert failure.suspects == ("n2",)
    assert "n2" in failure.detail


def test_when_every_node_lost_a_rank_nobody_is_suspected() -> None:
    records = {0: _rec(0, "n1", "running"), 1: _rec(1, "n2", "running"), 2: _rec(2, "n2", "ok")}
    failure = policy.diagnose(records, 137)
    assert failure.kind == "crash"
    assert failure.suspects == ()


def test_the_earliest_own_error_is_reported_and_peer_failures_are_not() -> None:
    records = {0: _rec(0, "n1", "error", peer_failure=True, error="broken pipe", updated_at=1.0),
               1: _rec(1, "n2", "error", error="ValueError: late", updated_at=30.0),
               2: _rec(2, "n2", "error", error="KeyError: early", updated_at=20.0)}
    failure = policy.diagnose(records, 1)
    assert failure.kind == "error"
    assert "rank 2 on n2" in failure.detail and "KeyError: early" in failure.detail
    assert failure.suspects == ()


def test_no_records_is_an_error_that_mentions_the_exit_status() -> None:
    failure = policy.diagnose({}, 42)
    assert failure.kind == "error"
    assert "42" in failure.detail
    assert failure.suspects == ()


# ---- policy.is_peer_failure / excludable ----

def test_connection_closed_by_peer_is_a_peer_failure() -> None:
    error = RuntimeError("[Gloo] recv failed: Connection closed by peer [127.0.0.1]:123")
    assert policy.is_peer_failure(error)


def test_an_ordinary_error_is_not_a_peer_failure() -> None:
    assert not policy.is_peer_failure(ValueError("bad"))


def test_excludable_returns_the_new_suspects_when_enough_nodes_remain() -> None:
    assert policy.excludable(["n2"], [], ["n1", "n2", "n3"], nodes_needed=2) == ("n2",)


def test_excludable_returns_nothing_when_too_few_nodes_would_remain() -> None:
    assert policy.excludable(["n2", "n3"], [], ["n1", "n2", "n3"], nodes_needed=2) == ()


def test_excludable_counts_earlier_exclusions_against_the_usable_nodes() -> None:
    assert policy.excludable(["n3"], ["n1"], ["n1", "n2", "n3", "n4"], nodes_needed=3) == ()


def test_excludable_never_returns_already_excluded_nodes() -> None:
    assert policy.excludable(["n1", "n3"], ["n1"], ["n1", "n2", "n3", "n4"], nodes_needed=2) == ("n3",)
    assert policy.excludable(["n1"], ["n1"], ["n1", "n2", "n3"], nodes_needed=1) == ()


# ---- history ----

def test_events_round_trip_in_order(tmp_path: Path) -> None:
    history.append_event(tmp_path, history.STARTED, job_id="7", restart=0)
    history.append_event(tmp_path, history.REQUEUED, job_id="7", restart=0, reason="timeout")
    events = history.read_events(tmp_path)
    assert [e["event"] for e in events] == ["started", "requeued"]
    assert events[1]["reason"] == "timeout" and "at" in events[1]


def test_reading_a_run_folder_without_history_gives_no_events(tmp_path: Path) -> None:
    assert history.read_events(tmp_path) == []


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    history.append_event(tmp_path, history.STARTED, job_id="7", restart=0)
    with open(RunFolder(tmp_path).history, "a") as file:
        file.write('{"event": "requ')
    assert [e["event"] for e in history.read_events(tmp_path)] == ["started"]


def test_ending_finds_how_a_run_ended_and_ignores_started(tmp_path: Path) -> None:
    history.append_event(tmp_path, history.STARTED, job_id="7", restart=0)
    history.append_event(tmp_path, history.STARTED, job_id="7", restart=1)
    history.append_event(tmp_path, history.GAVE_UP, job_id="7", restart=1)
    events = history.read_events(tmp_path)
    assert history.ending(events, "7", 0) is None
    assert history.ending(events, "7", 1)["event"] == history.GAVE_UP
    assert history.ending(events, "8", 1) is None


@pytest.mark.parametrize("event", [history.REQUEUED, history.GAVE_UP, history.FINISHED])
def test_every_ending_event_settles_its_run(tmp_path: Path, event: str) -> None:
    history.append_event(tmp_path, event, job_id="7", restart=2)
    assert history.ending(history.read_events(tmp_path), "7", 2)["event"] == event


def test_rank_record_writes_its_file_on_creation(tmp_path: Path) -> None:
    record = history.RankRecord(tmp_path, "7", 0, rank=3, node="n1")
    body = json.loads(record.path.read_text())
    assert (body["rank"], body["node"], body["status"]) == (3, "n1", "running")


def test_rank_record_update_merges_fields(tmp_path: Path) -> None:
    record = history.RankRecord(tmp_path, "7", 0, rank=0, node="n1")
    record.update(phase="train")
    record.update(status="error", error="boom")
    body = json.loads(record.path.read_text())
    assert (body["phase"], body["status"], body["error"], body["node"]) == ("train", "error", "boom", "n1")


def test_read_ranks_returns_the_records_of_one_run_keyed_by_rank(tmp_path: Path) -> None:
    history.RankRecord(tmp_path, "7", 0, rank=0, node="n1").update(status="ok")
    history.RankRecord(tmp_path, "7", 0, rank=1, node="n2")
    history.RankRecord(tmp_path, "7", 1, rank=0, node="n3")
    ranks = history.read_ranks(tmp_path, "7", 0)
    assert sorted(ranks) == [0, 1]
    assert (ranks[0]["status"], ranks[1]["node"]) == ("ok", "n2")


def _wait_for_status(path: Path, status: str, timeout_s: float = 2.0) -> str:
    deadline = time.monotonic() + timeout_s
    current = ""
    while time.monotonic() < deadline:
        current = json.loads(path.read_text())["status"]
        if current == status:
            break
        time.sleep(0.02)
    return current


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_watch_marks_the_rank_signalled_as_soon_as_a_signal_arrives(tmp_path: Path, restore_handlers) -> None:
    record = history.RankRecord(tmp_path, "7", 0, rank=0, node="n1")
    stop = StopRequest().install()
    record.watch(stop)  # reads the wakeup pipe: works even while the main thread is busy in C
    before = time.time()
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for_status(record.path, "signalled") == "signalled"
    assert json.loads(record.path.read_text())["signalled_at"] >= round(before, 3) - 0.001
    assert stop.poll() & TERM


# ---- signals ----



def test_poll_returns_the_bits_seen() -> None:
    stop = StopRequest()
    assert stop.poll() == 0 and not stop.is_set()
    stop.set(TERM)
    stop.set(OTHER)
    assert stop.poll() == TERM | OTHER


def test_a_past_deadline_sets_the_deadline_bit_once() -> None:
    stop = StopRequest(deadline=time.time() - 1)
    assert stop.poll() == DEADLINE
    first = stop.seen[DEADLINE]
    time.sleep(0.01)
    assert stop.poll() == DEADLINE
    assert stop.seen[DEADLINE] == first


def test_a_future_deadline_sets_nothing() -> None:
    assert StopRequest(deadline=time.time() + 3600).poll() == 0


def test_installed_handler_records_the_warning_signal_and_keeps_the_process(restore_handlers) -> None:
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 2
    while not stop.poll() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.poll() == WARNING
    assert stop.first_seen is not None


def test_describe_names_every_bit() -> None:
    assert describe(0) == "none"
    assert describe(WARNING | DEADLINE) == "warning signal, deadline"


# ---- faults ----

def test_parse_reads_the_sleep_and_the_filters() -> None:
    (fault,) = faults.parse("slow@step_end:ms=250:rank=1")
    assert (fault.action, fault.point, fault.ms, fault.filters) == ("slow", "step_end", 250, {"rank": 1})


def test_a_slow_fault_sleeps_and_does_not_ask_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "slow@step_end:ms=250")
    start = time.monotonic()
    assert faults.fault_point("step_end", step=1, rank=0) is False
    assert time.monotonic() - start >= 0.2


def test_a_stop_fault_fires_only_where_its_filters_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "stop@step_end:rank=1:step=3")
    assert faults.fault_point("step_end", step=3, rank=1) is True
    assert faults.fault_point("step_end", step=3, rank=0) is False
    assert faults.fault_point("upload", step=3, rank=1) is False


def test_no_faults_configured_means_no_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.fault_point("step_end", step=1, rank=0) is False


@pytest.mark.parametrize("text", ["slow@step_end:node=1", "slow@step_end:ms=fast", "boom@step_end",
                                  "kill@nowhere"])
def test_a_malformed_fault_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        faults.parse(text)


# ---- submit: lead time ----

def test_without_a_measurement_the_configured_lead_is_used() -> None:
    assert lead_time(_cfg(), None) == (30, "")


def test_a_smaller_measured_need_keeps_the_configured_lead_with_a_note() -> None:
    lead, note = lead_time(_cfg(), {"needed_s": 20, "save_s": 1.0, "step_s": 0.5})
    assert lead == 30
    assert "20 s" in note


def test_a_larger_measured_need_raises_the_lead_and_says_so() -> None:
    lead, note = lead_time(_cfg(), {"needed_s": 90, "save_s": 10.0, "step_s": 1.0})
    assert lead == 90
    assert "requeue.lead_s" in note


def test_a_measured_need_beyond_the_time_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="time"):
        lead_time(_cfg(), {"needed_s": 600})


def test_auto_lead_off_ignores_the_measurement() -> None:
    assert lead_time(_cfg("requeue.auto_lead=false"), {"needed_s": 90}) == (30, "")


def test_the_plan_asks_slurm_for_the_measured_lead(tmp_path: Path) -> None:
    plan = build_plan(_cfg(), cwd=tmp_path, measured_lead={"needed_s": 90, "save_s": 10.0, "step_s": 1.0})
    assert plan.parameters["additional_parameters"]["signal"] == "USR2@90"
    assert plan.lead_s == 90
    assert "USR2 90 s before the time limit" in plan.describe()


def test_a_missing_lead_file_reads_as_none(tmp_path: Path) -> None:
    assert RunFolder(tmp_path).read_measured_lead() is None


def test_an_invalid_lead_file_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "requeue" / "lead.json"
    path.parent.mkdir()
    path.write_text("{not json")
    assert RunFolder(tmp_path).read_measured_lead() is None


def test_a_written_lead_reads_back(tmp_path: Path) -> None:
    body = {"needed_s": 120, "save_s": 25.5, "step_s": 3.0}
    RunFolder(tmp_path).write_measured_lead(body)
    assert RunFolder(tmp_path).read_measured_lead() == body


def test_a_stop_whose_save_did_not_commit_at_the_time_limit_is_not_requeued() -> None:
    requeue = policy.decide(policy.TIMEOUT, [], "7", {"max_requeues": 20, "max_preemptions": 50, "max_failures": 3},
                            step=30)
    stopped = policy.unsaved_stop(requeue, failed_step=40, error="upload failed: Read-only file system", step=30)
    assert not stopped.requeue and stopped.reason == policy.TIMEOUT
    assert stopped.message.startswith("not requeued: the save of step 40 at the time limit did not commit "
                                      "(upload failed: Read-only file system)")
    assert "last committed checkpoint (step 30, intact)" in stopped.message
    assert "submit the same command" in stopped.message
    # A preemption is not the store's fault: it still requeues.
    preempted = policy.decide(policy.PREEMPTION, [], "7", {"max_requeues": 20, "max_preemptions": 50,
                                                          "max_failures": 3}, step=30)
    assert policy.unsaved_stop(preempted, failed_step=40, error="x", step=30) is preempted


def test_ranks_the_others_timed_out_waiting_for_are_the_suspects() -> None:
    records = {0: {"rank": 0, "node": "n1", "status": "error", "peer_failure": True,
                   "error": "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms "
                            "for recv"},
               1: {"rank": 1, "node": "n2", "status": "error", "peer_failure": True,  # woken by SLURM's SIGCONT
                   "error": "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer"},
               2: {"rank": 2, "node": "n3", "status": "error", "peer_failure": False,
                   "error": "RuntimeError: Rank 1 failed to pass monitoredBarrier in 15000 ms"}}
    failure = policy.diagnose(records, 1)
    assert failure.kind == "hung" and failure.suspects == ("n2",)
    assert failure.detail == ("rank(s) 1 on n2 stopped answering: rank(s) 0, 2 timed out waiting for them "
                              "in a collective")
    # Every rank timed out (the network between them): nobody is singled out.
    everyone = {r: {**rec, "error": "RuntimeError: Timed out waiting 15000ms for recv"} for r, rec in records.items()}
    assert policy.diagnose(everyone, 1).kind != "hung"


def test_only_the_newest_runs_rank_records_are_kept(tmp_path: Path) -> None:
    import os

    for n, name in enumerate(["7.0", "7.1", "7.2", "9.0", "9.1"]):
        folder = tmp_path / "requeue" / "ranks" / name
        folder.mkdir(parents=True)
        (folder / "rank-0.json").write_text("{}")
        os.utime(folder, (1000 + n, 1000 + n))
    deleted = history.prune_rank_records(tmp_path)
    assert sorted(p.name for p in deleted) == ["7.0", "7.1"]
    assert sorted(p.name for p in (tmp_path / "requeue" / "ranks").iterdir()) == ["7.2", "9.0", "9.1"]
    assert history.prune_rank_records(tmp_path / "nowhere") == []
