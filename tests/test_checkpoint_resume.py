"""Resume is exact: stop at step N, start again, and the run ends where an uninterrupted one does,
bit for bit (CPU fp32) — for DDP, FSDP and ZeRO-3. All through the real job (`python -m hpc.submit`,
2 local ranks). Resuming at another world size or strategy: test_convert_resume.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from checkpoint_jobs import (
    GLOBAL_BATCH,
    REFERENCE_RUN,
    assert_bitwise_equal,
    manifest,
    metrics,
    ok,
    rank0_log,
    saved_state,
    submit,
)

pytestmark = pytest.mark.dist

STOP_AT_10 = "stop@step_end:step=10"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp_full_shard", "zero3"])
def test_stop_and_resume_matches_an_uninterrupted_run_bitwise(tmp_path: Path, strategy: str, uninterrupted_run: Any,
                                                             torch_extensions_dir: Path) -> None:
    run = [*REFERENCE_RUN, f"strategy={strategy}"]  # the uninterrupted run's settings
    straight_dir = uninterrupted_run(strategy)
    first = ok(submit(tmp_path, "split", *run, faults=STOP_AT_10, extensions=torch_extensions_dir))
    assert ": 10 steps, loss" in first
    saved = manifest(tmp_path / "split", 10)
    assert saved["step"] == 10 and saved["world_size"] == 2
    assert saved["data"]["consumed_samples"] == 10 * GLOBAL_BATCH
    second = ok(submit(tmp_path, "split", *run, extensions=torch_extensions_dir))
    assert "(resumed at step 10)" in second
    assert "resumed from step 10" in rank0_log(tmp_path / "split")

    straight, split = metrics(straight_dir), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 21)) == [r["step"] for r in straight]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r["consumed_samples"] for r in split] == [r["consumed_samples"] for r in straight]
    assert_bitwise_equal(saved_state(straight_dir / "checkpoints" / "step-20", tmp_path),
                         saved_state(tmp_path / "split" / "checkpoints" / "step-20", tmp_path))

    if strategy == "zero3":
        # DeepSpeed checkpoints are bound to their world size: with conversion off, a clear
        # refusal, nothing touched (test_convert_resume.py shows the default, converting).
        shutil.copytree(tmp_path / "split", tmp_path / "one")
        proc = submit(tmp_path, "one", *run, "gpus_per_node=1", f"train.micro_batch_size={GLOBAL_BATCH}",
                      "checkpoint.convert=never", extensions=torch_extensions_dir)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr + rank0_log(tmp_path / "one")
        assert "saved by deepspeed ZeRO-3 at world size 2, and DeepSpeed checkpoints are bound to their " \
               "world size; this job runs deepspeed zero3 at world size 1" in text, text[-3000:]
        assert "checkpoint.convert=auto" in text and "tools/ckpt_convert reshard" in text
        assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == \
            sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
