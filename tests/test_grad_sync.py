"""Gradient accumulation reduces across replicas only on the last micro-step (real gloo ranks,
collectives counted by the torch profiler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
HERE = Path(__file__).resolve().parent


def _counts(tmp_path: Path, extensions: Path, ranks: int, strategies: list[str]) -> dict[str, list[dict]]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(extensions),
           "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                           "--standalone", str(HERE / "grad_sync_worker.py"), *strategies],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("COUNTS "))
    return json.loads(line[len("COUNTS "):])


@pytest.fixture(scope="module")
def counts(tmp_path_factory, torch_extensions_dir) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("grad_sync")
    two = _counts(tmp, torch_extensions_dir, 2, ["ddp", "fsdp_no_shard", "fsdp_full_shard",
                                                 "fsdp_shard_grad_op", "zero1", "zero2", "zero3"])
    return {**two, **_counts(tmp, torch_extensions_dir, 4, ["fsdp_hybrid_shard"])}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp_no_shard", "zero1"])
def test_replicated_gradients_are_reduced_only_on_the_last_micro_step(counts, strategy) -> None:
    first, last = counts[strategy]
    assert first == {"all_reduce": 0, "reduce_scatter": 0}, counts[strategy]
    assert last["all_reduce"] + last["reduce_scatter"] > 0, counts[strategy]


@pytest.mark.parametrize("strategy", ["fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_hybrid_shard"])
def test_sharded_fsdp_reduce_scatters_every_micro_step_but_never_all_reduces_early(counts, strategy) -> None:
    # Sharded gradients accumulate as shards (else every rank would hold the full fp32 gradient);
    # HSDP's all-reduce across nodes waits for the last micro-step.
    first, last = counts[strategy]
    assert first["all_reduce"] == 0 and first["reduce_scatter"] > 0, counts[strategy]
    assert last["reduce_scatter"] > 0, counts[strategy]
    if strategy == "fsdp_hybrid_shard":
        assert last["all_reduce"] > 0, counts[strategy]


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_2_and_3_reduce_every_micro_step(counts, strategy) -> None:
    # DeepSpeed keeps only a partition of the gradients from stage 2 on, so it reduces each
    # micro-step by design; recorded so that a change in DeepSpeed shows up here.
    first, last = counts[strategy]
    assert first["all_reduce"] + first["reduce_scatter"] > 0, counts[strategy]
