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
