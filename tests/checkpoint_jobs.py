"""Helpers for the checkpoint tests: run the real job (`python -m hpc.submit ... cluster=local`),
read what it left behind, and compare saved training states bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from hpc.checkpoint.convert.neutral import StepState, TensorInfo

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 12  # divides over 1, 2, 3 and 4 ranks: the data order is the same at every size
RUN_20_STEPS = ("train.max_steps=20", "checkpoint.every_steps=10")
REFERENCE_RUN = (*RUN_20_STEPS, f"train.micro_batch_size={GLOBAL_BATCH // 2}")
"""The uninterrupted run (conftest.uninterrupted_run) at 2 ranks; a run compared against it keeps these
(at another world size: RUN_20_STEPS and GLOBAL_BATCH // world sequences per rank)."""


def submit(root: Path, name: str, *overrides: str, faults: str | None = None,
           extensions: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """One local job in run folder root/name (a second call with the same name resumes it)."""
    env = {k: v for k, v in os.environ.items() if k != "HPC_FAULTS"}
    env["TMPDIR"] = str(root)
    if extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    if faults:
        env["HPC_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"run.root={root}",
         f"run.name={name}", f"cluster.scratch_dir={root}/scratch/{{job_id}}", "train.log_every=1",
         *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rank0_log(run_dir: Path) -> str:
    """Rank 0's log of every attempt in this run folder, oldest first."""
    logs = sorted((run_dir / "submitit").glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    return "".join(p.read_text() for p in logs)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def manifest(run_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((run_dir / "checkpoints" / f"step-{step}" / "manifest.json").read_text())


def committed_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / "manifest.json").exists())


def saved_state(step_dir: Path, scratch: Path) -> dict[str, Any]:
    """Everything a step folder holds, as tensors and plain values: the DCP state (model and
    optimizer) converted to one torch.save file, or DeepSpeed's own files; RNG states either way."""
    state: dict[str, Any] = {}
    if (step_dir / ".metadata").exists():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = scratch / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
        dcp_to_torch_save(str(step_dir), str(out))
        state["dcp"] = torch.load(out, weights_only=False)
    for path in sorted(step_dir.rglob("*.pt")):
        state[str(path.relative_to(step_dir))] = torch.load(path, weights_only=False)
    assert state, f"nothing saved in {step_dir}"
    return state


def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs (max abs {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif hasattr(a, "__array__") and not isinstance(a, (str, bytes)):
        import numpy as np

        assert np.array_equal(np.asarray(a), np.asarray(b)), where
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), where
        assert_bitwise_equal(vars(a), vars(b), f"{where}({type(a).__name__})")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class MemoryReader:
    """A Reader over tensors in memory (the neutral interface every format implements)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.state = tensors, StepState(step=0, world_size=1, strategy="ddp")

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, tuple(t.shape), t.dtype) for k, t in self.tensors.items()]

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone()

    def close(self) -> None:
        pass
