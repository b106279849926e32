"""The run's own record of its runs, in the run folder (shared by all nodes and the login node;
the file names are hpc.run_folder's):

    history      one JSON line per event, appended: started, requeued, gave_up, finished (rank 0,
                 or the batch shell after a failure)
    ranks(...)   one file per rank of one run: started, signalled, and how it ended; a rank that
                 left no ending died without a trace

Budgets count `requeued` events of one job id: a resubmission (a new job id) starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hpc.files import write_atomically
from hpc.requeue.signals import StopRequest
from hpc.run_folder import RunFolder

STARTED, REQUEUED, GAVE_UP, FINISHED = "started", "requeued", "gave_up", "finished"
ENDINGS = (REQUEUED, GAVE_UP, FINISHED)
"""Events that settle how a run ended: once one is written, nobody else decides for that run."""


def append_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event (with its time) and make it durable before returning."""
    record = {"event": event, "at": round(time.time(), 3), **fields}
    path = RunFolder(run_dir).history
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer died mid-line: start afresh rather than join its torn line
        os.write(fd, line)  # one write of one line: appends from two writers never interleave
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event so far, oldest first; a torn last line (a writer killed mid-write) is skipped."""
    try:
        text = RunFolder(run_dir).history.read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def of_run(events: Iterable[dict[str, Any]], job_id: str, restart: int) -> list[dict[str, Any]]:
    return [e for e in events if e.get("job_id") == job_id and e.get("restart") == restart]


def ending(events: Iterable[dict[str, Any]], job_id: str, restart: int) -> dict[str, Any] | None:
    """How this run ended, if anyone has said so yet (the last word: a requeue that then failed
    is followed by gave_up)."""
    ends = [e for e in of_run(events, job_id, restart) if e["event"] in ENDINGS]
    return ends[-1] if ends else None


# ---- per rank, per run ----

def read_ranks(run_dir: Path, job_id: str, restart: int) -> dict[int, dict[str, Any]]:
    found = {}
    for path in RunFolder(run_dir).ranks(job_id, restart).glob("rank-*.json"):
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found[int(body["rank"])] = body
    return found


RANK_RECORDS_KEPT = 3
"""Runs whose rank records a run folder keeps: this one's, and the two before it (the next start
and the batch shell read the newest two)."""


def prune_rank_records(run_dir: Path, keep: int = RANK_RECORDS_KEPT) -> list[Path]:
    """Delete all but the `keep` newest runs' folders of rank records: a job requeued many times
    with many ranks would otherwise leave ranks x runs small files on the shared file system."""
    folder = RunFolder(run_dir).requeue / "ranks"
    try:
        runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    except OSError:
        return []
    old = runs[:-keep] if keep > 0 else runs
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


class RankRecord:
    """This rank's file for this run. `watch(stop)` starts a thread that writes 'signalled' as soon
    as a signal arrives, even while the main thread is stuck in a collective: after a failure, the
    ranks that left no trace at all are the ones that died."""

    def __init__(self, run_dir: Path, job_id: str, restart: int, rank: int, node: str) -> None:
        self.path = RunFolder(run_dir).ranks(job_id, restart) / f"rank-{rank}.json"
        self.body: dict[str, Any] = {"rank": rank, "node": node, "host": socket.gethostname(),
                                     "pid": os.getpid(), "started_at": round(time.time(), 3),
                                     "status": "running", "phase": "setup"}
        self._lock = threading.Lock()
        self.update()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.body.update(fields, updated_at=round(time.time(), 3))
            try:
                write_atomically(self.path, json.dumps(self.body, sort_keys=True))
            except OSError:
                pass  # a record is evidence, not a reason to fail the job

    def watch(self, stop: StopRequest) -> None:
        """Write 'signalled' when the warning signal or SIGTERM arrives (see the class docstring)."""
        fd = stop.wakeup_fd
        if fd is None:
            return

        def run() -> None:
            while True:
                try:
                    data = os.read(fd, 64)
                except OSError:
                    return
                if not data:
                    return
                if any(signum in stop.signals for signum in data) and self.body["status"] == "running":
                    self.update(status="signalled", signalled_at=round(time.time(), 3))
                    return

        threading.Thread(target=run, name="hpc-rank-record", daemon=True).start()
