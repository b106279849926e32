"""`python -m hpc.submit exp=tiny_cpu` trains with every strategy: through submitit's local executor
here, and on two nodes of the real local SLURM cluster in test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_no_shard", "fsdp_hybrid_shard",
              "zero1", "zero2", "zero3", "zero3_offload"]
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "peak_mem_gb",
               "consumed_samples", "time"}


def check_trained(stdout: str, run_dir: Path, world: int = 2, steps: int = 20, log_every: int = 5) -> None:
    """The job ran every step, its loss fell, and the metrics are in the log and in metrics.jsonl."""
    summary = re.search(r"(\d+) steps, loss ([\d.]+) -> ([\d.]+), ([\d,]+) tok/s", stdout)
    assert summary, stdout[-3000:]
    assert int(summary[1]) == steps
    first, last = float(summary[2]), float(summary[3])
    assert last < first - 0.5, f"loss did not fall: {first} -> {last}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(log_every, steps + 1, log_every))
    assert all(set(r) == METRIC_KEYS for r in records)
    assert records[-1]["consumed_samples"] == steps * world * 4  # tiny_cpu: 4 sequences per rank and step
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gb"] > 0 for r in records)
    log = next((run_dir / "submitit").glob("*_0_log.out")).read_text()
    assert re.search(rf"step {steps}/{steps} loss [\d.]+ lr \S+ gnorm [\d.]+ \| [\d,]+ tok/s [\d.]+ ms/step "
                     r"MFU [\d.]+% \| mem [\d.]+ GB", log), log[-2000:]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_local_job_trains_with_each_strategy(tmp_path: Path, strategy: str, torch_extensions_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"strategy={strategy}",
         f"run.root={tmp_path}", "run.name=job", f"cluster.scratch_dir={tmp_path}/scratch/{{job_id}}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_trained(proc.stdout, tmp_path / "job")


def test_local_job_trains_on_a_token_file_written_by_make_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "corpus.bin"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tokens.py"), str(tokens),
                           str(ROOT / "hpc"), str(ROOT / "README.md")], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", "data.source=tokens",
         f"data.path={tokens}", f"run.root={tmp_path}", "run.name=job",
         f"cluster.scratch_dir={tmp_path}/scratch/{{job_id}}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_trained(proc.stdout, tmp_path / "job")
