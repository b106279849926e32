"""Helpers for tests against the real local SLURM cluster (tools/slurm-cluster up): the client
environment, submitting with `python -m hpc.submit cluster=testcluster`, waiting on sacct, and
reading what a run left in its folder.

Under CI (CI=true) or HPC_REQUIRE_SLURM=1 these tests fail, not skip, when the cluster is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpc import slurm

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "slurm_cluster.py"
SCRATCH = Path("/var/tmp/hpc-slurm/scratch")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def client_env() -> dict[str, str]:
    """Environment for SLURM clients; fails (CI) or skips (a laptop) when the cluster is down.
    (The `cluster_env` fixture in conftest.py.)"""
    status = subprocess.run([sys.executable, str(TOOL), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        message = ("the local SLURM test cluster is not up (tools/slurm-cluster status: "
                   f"{(status.stdout + status.stderr).strip()[-300:]}); start it with tools/slurm-cluster up")
        if os.environ.get("CI") == "true" or os.environ.get("HPC_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    out = subprocess.run([sys.executable, str(TOOL), "env"], capture_output=True, text=True, check=True).stdout
    env = {k: v for k, v in os.environ.items() if k != "HPC_FAULTS"}
    for line in out.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            env[name] = value.strip("'\"")
    return env


def submit(env: dict[str, str], *args: str, faults: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, "HPC_FAULTS": faults} if faults else env
    return subprocess.run([sys.executable, "-m", "hpc.submit", "cluster=testcluster", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def job_id_of(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted job "))
    return line.split()[2]


def wait_done(job_id: str, env: dict[str, str], timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = slurm.job_state(job_id, env=env)
        if state in ENDED:
            return state
        time.sleep(1)
    return state


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 180, every_s: float = 0.5) -> Any:
    """Poll until check() returns something truthy; fail naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Run:
    """A submitted run: its job and what its folder says."""

    def __init__(self, env: dict[str, str], run_dir: Path, proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        self.env, self.dir, self.job_id = env, run_dir, job_id_of(proc.stdout)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.dir / "requeue" / "history.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if kind is None or e["event"] == kind]

    def log(self) -> str:
        path = self.dir / "submitit" / f"{self.job_id}_0_log.out"
        return path.read_text() if path.exists() else ""

    def err(self) -> str:
        path = self.dir / "submitit" / f"{self.job_id}_0_log.err"
        return path.read_text() if path.exists() else ""

    def step(self) -> int:
        path = self.dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def ranks(self, restart: int) -> dict[int, dict[str, Any]]:
        folder = self.dir / "requeue" / "ranks" / f"{self.job_id}.{restart}"
        return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("rank-*.json")}

    def wait(self, timeout_s: float = 300) -> str:
        return wait_done(self.job_id, self.env, timeout_s)

    def runs(self) -> list[str]:
        """sacct's line per run of the job (-D: requeued runs too): 'STATE NODELIST'."""
        out = slurm.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State,NodeList", "-j", self.job_id], env=self.env)
        return [line.replace("|", " ") for line in out.splitlines() if line.strip()]

    def explain(self) -> str:
        return f"job {self.job_id}\n{self.log()[-4000:]}\n{self.err()[-3000:]}"
