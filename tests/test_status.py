"""`python -m hpc.status`: what a run folder says about a run (a real local run, plus the ETA
arithmetic on plain values). On the SLURM cluster it is exercised by test_requeue_slurm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_jobs import ROOT, ok, submit
from hpc import status
from hpc.config import compose


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("status")
    ok(submit(root, "done", "train.max_steps=6", "checkpoint.every_steps=3"))
    return root / "done"


def test_status_of_a_finished_run_shows_its_checkpoint_progress_and_no_eta(finished_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(finished_run)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "checkpoint  step 6, committed" in out
    assert "progress    step 6 of 6" in out and "tokens/s" in out
    assert "eta         done" in out
    assert "restarts    0 (none)" in out


def test_status_json_carries_the_same_facts(finished_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(finished_run), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    body = json.loads(proc.stdout)
    assert body["checkpoint"]["step"] == 6 and body["step"] == 6 and body["max_steps"] == 6
    assert body["tokens_per_s"] > 0 and body["eta"] is None
    assert body["budgets"]["max_failures"] == {"used": 0, "limit": 3}


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "is not a run folder (no config.yaml)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hpc.status", "no-such-run"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "neither a run folder nor a SLURM job id" in proc.stderr


def _state(**fields: object) -> dict:
    base = {"run_dir": "/nonexistent", "step": 100, "max_steps": 1000, "step_time_s": 0.5,
            "restart_s": 20.0, "ends_at": None}
    return {**base, **fields}


def test_eta_counts_the_requeues_the_time_limit_forces() -> None:
    cfg = compose(["exp=tiny_cpu", "cluster=local", "time=10", "requeue.lead_s=60"], which=lambda n: None, environ={})
    # 900 steps x 0.5 s = 450 s of training; each run trains 600 - 60 - 20 = 520 s at most, and the
    # current one has 100 s left before its warning: 450 - 100 = 350 s more -> one requeue.
    eta = status._eta(cfg, _state(ends_at=1000.0 + 160), now=1000.0)
    assert eta == {"seconds": 470.0, "train_s": 450.0, "requeues": 1, "restart_s": 20.0, "at": 1470.0}
    # Enough time left in this run: no requeue.
    assert status._eta(cfg, _state(ends_at=1000.0 + 600), now=1000.0)["requeues"] == 0
    assert status._eta(cfg, _state(step=1000), now=1000.0) is None


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is cut short"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_every_start_of_a_run_with_restarts(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "done"
    shutil.copytree(finished_run, run)
    # A resubmission that resumes from step 3 (not the newest, 6) and trains on to 9: steps 4-6 twice.
    ok(submit(tmp_path, "done", "train.max_steps=9", "checkpoint.every_steps=3", "checkpoint.resume=3"))
    png = tmp_path / "pictures" / "run.png"
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(run), "--plot", str(png)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {png}: 12 records in 2 segment(s), restarts: resubmitted 1" in proc.stderr
    assert "progress    step 9 of 9" in proc.stdout  # the text view as well
    assert _png_size(png) == (1000, 800)


def test_plot_of_a_run_with_no_metrics_yet_says_so(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "empty"
    shutil.copytree(finished_run, run)
    (run / "metrics.jsonl").unlink()
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(run), "--plot", str(tmp_path / "x.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "has no records to plot yet" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_segments_follow_the_starts_and_steps_that_go_back() -> None:
    from hpc.status.plot import segments

    records = [{"step": s, "time": t} for s, t in ((1, 10), (2, 11), (3, 12), (2, 30), (3, 31), (4, 50))]
    starts = [{"at": 5}, {"at": 25}]
    assert [[r["step"] for r in part] for part in segments(records, starts)] == [[1, 2, 3], [2, 3, 4]]
    # No start on record between them (a history lost): a step going back still splits.
    assert [[r["step"] for r in part] for part in segments(records, [])] == [[1, 2, 3], [2, 3, 4]]


def test_watch_shows_the_view_until_the_job_ends(finished_run: Path) -> None:
    import io

    from hpc.status.__main__ import watch

    states = iter(["PENDING", "RUNNING", "REQUEUED", "RUNNING", "COMPLETED"])
    real = status.gather(finished_run)
    sleeps: list[float] = []
    out = io.StringIO()
    final = watch(finished_run, 2.5, out, look=lambda run: {**real, "state": next(states)}, sleep=sleeps.append,
                  clear=False)
    assert final["state"] == "COMPLETED" and sleeps == [2.5] * 4
    views = out.getvalue().split("\n\n")
    assert len(views) == 5 and all(v.startswith("run ") for v in views)
    assert "every 2.5 s, Ctrl-C to leave" in views[0] and "Ctrl-C" not in views[-1]
    # On a finished run the command shows one view and returns.
    proc = subprocess.run([sys.executable, "-m", "hpc.status", str(finished_run), "--watch", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("run         ") == 1, proc.stdout


def test_a_job_that_lost_its_batch_shell_is_told_apart_while_slurm_still_ends_it(finished_run: Path) -> None:
    """COMPLETING without a verdict: the ranks may still save and requeue the job (SLURM's SIGTERM
    reads as a preemption to them), so status must not yet tell the user to submit again."""
    real = status.gather(finished_run)
    ending = status.render({**real, "state": "COMPLETING", "unexplained_end": "COMPLETING"})
    assert "ending      without the batch shell's verdict (COMPLETING)" in ending
    assert "last committed step 6 so far" in ending and "submit again only once it has left the queue" in ending
    ended = status.render({**real, "state": "FAILED", "unexplained_end": "FAILED"})
    assert "ended       without the batch shell's verdict (FAILED)" in ended
    assert "last committed step 6; submit the same command again to resume" in ended
    # The state alone decides nothing: a run whose last start wrote its ending is explained.
    events = [{"event": "started", "job_id": "7", "restart": 0}, {"event": "finished", "job_id": "7", "restart": 0}]
    assert status.report._unexplained_end("COMPLETING", "7", events) is None
    assert status.report._unexplained_end("COMPLETING", "7", events[:1]) == "COMPLETING"


def test_a_job_that_has_ended_short_of_its_steps_shows_no_eta(finished_run: Path, monkeypatch) -> None:
    halfway = {"step": 3, "time": 0.0, "tokens_per_s": 100.0, "step_time_s": 0.5}
    monkeypatch.setattr(status.report, "_last_metrics", lambda run_dir: halfway)
    for state, has_eta in (("RUNNING", True), ("PENDING", True), ("FAILED", False), ("CANCELLED by 0", False),
                           ("NODE_FAIL", False)):
        monkeypatch.setattr(status.report, "_job", lambda job_id, events, s=state: (s, None))
        assert (status.gather(finished_run)["eta"] is not None) is has_eta, state
