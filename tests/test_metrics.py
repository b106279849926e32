"""Memory in the metrics: CUDA logs the reserved peak beside the allocated one; CPU records keep
exactly the keys and line they had (the JSONL readers and tests/test_train_job.py depend on them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hpc.config import compose
from hpc.train.metrics import Meter, MetricsLog

NO_SBATCH = {"which": lambda name: None, "environ": {}}
CPU_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "peak_mem_gb",
            "consumed_samples", "time"}
CPU_LINE = r"step 5/20 loss [\d.]+ lr \S+ gnorm [\d.]+ \| [\d,]+ tok/s [\d.]+ ms/step MFU [\d.]+% \| mem [\d.]+ GB$"


def _one_record(device: torch.device, path: Path):
    meter = Meter(compose(["exp=tiny_cpu"], **NO_SBATCH), 2, device)
    meter.add(0.5)
    record = meter.record(step=5, loss=2.0, lr=1e-3, grad_norm=1.0, consumed=40)
    MetricsLog(path).write(record)
    return record, json.loads(path.read_text()), meter.summary(skip_first=0)


def test_cpu_metrics_are_unchanged(tmp_path: Path) -> None:
    record, written, summary = _one_record(torch.device("cpu"), tmp_path / "metrics.jsonl")
    assert set(written) == CPU_KEYS and written["peak_mem_gb"] > 0
    assert re.fullmatch(CPU_LINE, record.line(20)), record.line(20)
    assert "peak_reserved_gb" not in summary


def test_cuda_metrics_log_the_reserved_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The allocator's answers, faked: this test runs where no GPU is.
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 34 * 2**30)
    record, written, summary = _one_record(torch.device("cuda", 0), tmp_path / "metrics.jsonl")
    assert set(written) == CPU_KEYS | {"peak_reserved_gb"}
    assert (written["peak_mem_gb"], written["peak_reserved_gb"]) == (30.0, 34.0)
    assert record.line(20).endswith("| mem 30.00 GB (reserved 34.00 GB)")
    assert (summary["peak_mem_gb"], summary["peak_reserved_gb"]) == (30.0, 34.0)
