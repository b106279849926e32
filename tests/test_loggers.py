"""Metrics to TensorBoard and Weights & Biases (offline), read back with their own packages; a
logger that cannot start stops the job at start-up, one that fails later is dropped. Across a real
SLURM requeue: tests/test_requeue_slurm.py (the `budget` run logs to both)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards import tensorboard_scalars, wandb_starts
from hpc.config import ConfigError
from hpc.config.loggers import require_logger_packages
from hpc.train.loggers import Loggers, scalars
from hpc.train.metrics import StepMetrics

ROOT = Path(__file__).resolve().parents[1]
LOGGED = ("train.loggers=[jsonl,tensorboard,wandb]", "train.log_every=2")


def _submit(tmp_path: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"run.root={tmp_path}", "run.name=job",
         f"cluster.scratch_dir={tmp_path}/scratch/{{job_id}}", *overrides],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**env, "TMPDIR": str(tmp_path), "HOME": str(tmp_path / "home")})
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The newest record of each step in metrics.jsonl (a resumed run logs replayed steps again)."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_tensorboard_and_wandb_get_every_record_and_a_restart_continues_both(tmp_path: Path) -> None:
    _submit(tmp_path, *LOGGED, "train.max_steps=6", "checkpoint.every_steps=4")
    # A restart from step 4 (not the newest, 6): steps 5 and 6 run again.
    _submit(tmp_path, *LOGGED, "train.max_steps=8", "checkpoint.resume=4")
    run_dir = tmp_path / "job"
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [2, 4, 6, 8]

    board = tensorboard_scalars(run_dir / "tensorboard")  # asserts no step appears twice
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"):
        # Step 6 is the restart's (TensorBoard's purge dropped the first start's step 6).
        assert board[f"train/{key}"] == pytest.approx({s: r[key] for s, r in metrics.items()}, rel=1e-6), key

    starts = wandb_starts(run_dir)
    assert len(starts) == 2, [s.folder for s in starts]
    assert len({s.run_id for s in starts}) == 1 and starts[0].run_id  # one W&B run, continued
    assert (run_dir / "wandb" / "hpc-run-id").read_text().strip() == starts[0].run_id
    for start in starts:
        assert start.project == "hpc" and start.name == "job"
        assert start.config["exp"] == "tiny_cpu" and start.config["train"]["max_steps"] in (6, 8)
        assert start.config["strategy"]["name"] == "ddp"
    logged = [{h["_step"]: h["train/loss"] for h in s.history} for s in starts]
    assert logged == [{s: metrics[s]["loss"] for s in (2, 4)} | {6: logged[0][6]},
                      {s: metrics[s]["loss"] for s in (6, 8)}]


def test_a_logger_that_cannot_start_stops_the_job_before_the_first_step(tmp_path: Path) -> None:
    # Online mode with no API key (and no network): W&B refuses at once.
    proc = _submit(tmp_path, "train.loggers=[wandb]", "train.wandb.mode=online", ok=False)
    assert "train.loggers: wandb could not start: UsageError" in proc.stderr
    # A set-up error: the batch shell's verdict would not requeue it (hpc.requeue.policy).
    (record,) = (tmp_path / "job" / "requeue" / "ranks").glob("*/rank-0.json")
    assert json.loads(record.read_text())["permanent"] is True
    assert not (tmp_path / "job" / "metrics.jsonl").exists()  # no step ran


def test_a_missing_package_is_named_with_the_extra_that_installs_it() -> None:
    with pytest.raises(ConfigError) as err:
        require_logger_packages(["jsonl", "tensorboard", "wandb"], "/opt/py/bin/python", find=lambda name: None)
    assert str(err.value) == ("train.loggers: 'tensorboard' needs the tensorboard package: pip install "
                              "'hpc[tensorboard]'; 'wandb' needs the wandb package: pip install 'hpc[wandb]' "
                              "(not installed for /opt/py/bin/python)")
    require_logger_packages(["jsonl", "tensorboard", "wandb"], sys.executable)  # installed here


class _Sink:
    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at, self.steps, self.closed = name, fail_at, [], False

    def write(self, record: StepMetrics) -> None:
        if record.step == self.fail_at:
            raise OSError("disk quota exceeded")
        self.steps.append(record.step)

    def close(self) -> None:
        self.closed = True


def test_a_logger_failing_mid_run_is_dropped_and_the_others_go_on(caplog) -> None:
    good, bad = _Sink("jsonl"), _Sink("wandb", fail_at=2)
    loggers = Loggers([good, bad])
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            loggers.write(StepMetrics(step=step, loss=1.0, lr=0.1, grad_norm=1.0, tokens_per_s=1.0, step_time_s=1.0,
                                      mfu=0.1, peak_mem_gb=1.0, consumed_samples=step, time=0.0))
    assert good.steps == [1, 2, 3] and bad.steps == [1] and bad.closed
    assert "logger wandb failed at step 2 and is off for the rest of this run: OSError: disk quota exceeded" \
        in caplog.text
    loggers.close()
    assert good.closed


def test_scalars_leave_out_what_a_cpu_record_does_not_have() -> None:
    record = StepMetrics(step=1, loss=2.0, lr=0.1, grad_norm=1.0, tokens_per_s=5.0, step_time_s=0.2, mfu=0.1,
                         peak_mem_gb=1.0, consumed_samples=8, time=0.0)
    assert "train/peak_reserved_gb" not in scalars(record) and scalars(record)["train/loss"] == 2.0
