"""Resume is exact: stop at step N, start again, and the run ends where an uninterrupted one does,
bit for bit (CPU fp32) — for DDP, FSDP and ZeRO-3 — and a DCP checkpoint resumes at another world
size on the same trajectory. All through the real job (`python -m hpc.submit`, 2 local ranks)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from checkpoint_jobs import (
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
def test_stop_and_resume_matches_an_uninterrupted_run_bitwise(tmp_path: Path, strategy: str,
                                                             torch_extensions_dir: Path) -> None:
    run = ["train.max_steps=20", f"strategy={strategy}"]
    ok(submit(tmp_path, "straight", *run, extensions=torch_extensions_dir))
    first = ok(submit(tmp_path, "split", *run, faults=STOP_AT_10, extensions=torch_extensions_dir))
    assert ": 10 steps, loss" in first
    saved = manifest(tmp_path / "split", 10)
    assert saved["step"] == 10 and saved["world_size"] == 2
    assert saved["data"]["consumed_samples"] == 10 * 8  # 2 ranks x 4 sequences per step
    second = ok(submit(tmp_path, "split", *run, extensions=torch_extensions_dir))
    assert "(resumed at step 10)" in second
    assert "resumed from step 10" in rank0_log(tmp_path / "split")

    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 21)) == [r["step"] for r in straight]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r["consumed_samples"] for r in split] == [r["consumed_samples"] for r in straight]
    assert_bitwise_equal(saved_state(tmp_path / "straight" / "checkpoints" / "step-20", tmp_path),
                         saved_state(tmp_path / "split" / "checkpoints" / "step-20", tmp_path))

    if strategy == "zero3":
        # DeepSpeed checkpoints are bound to their world size: with conversion off, a clear
        # refusal, nothing touched (test_convert_resume.py shows the default, converting).
        shutil.copytree(tmp_path / "split", tmp_path / "one")
        proc = submit(tmp_path, "one", *run, "gpus_per_node=1", "train.micro_batch_size=8",
                      "checkpoint.convert=never", extensions=torch_extensions_dir)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr + rank0_log(tmp_path / "one")
        assert "saved by deepspeed ZeRO-3 at world size 2, and DeepSpeed checkpoints are bound to their " \
               "world size; this job runs deepspeed zero3 at world size 1" in text, text[-3000:]
        assert "checkpoint.convert=auto" in text and "tools/ckpt_convert reshard" in text
        assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == \
            sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp_full_shard"])
def test_dcp_checkpoint_from_world_2_resumes_at_world_1_and_3(tmp_path: Path, strategy: str) -> None:
    # A global batch of 12 splits over 1, 2 and 3 ranks alike: the data order stays the same.
    run = ["train.max_steps=20", f"strategy={strategy}"]
    ok(submit(tmp_path, "straight", *run, "train.micro_batch_size=6"))
    ok(submit(tmp_path, "split", *run, "train.micro_batch_size=6", faults=STOP_AT_10))
    straight = [r["loss"] for r in metrics(tmp_path / "straight")]
    for world, mbs in ((1, 12), (3, 4)):
        name = f"world{world}"
        shutil.copytree(tmp_path / "split", tmp_path / name)
        ok(submit(tmp_path, name, *run, f"gpus_per_node={world}", f"train.micro_batch_size={mbs}"))
        log = rank0_log(tmp_path / name)
        assert "resumed from step 10" in log and f"saved at world size 2, now {world}" in log
        assert "config changed since this checkpoint was saved: slurm.gpus_per_node, " \
               "train.micro_batch_size" in log
        records = metrics(tmp_path / name)
        assert [r["step"] for r in records] == list(range(1, 21))
        assert records[-1]["consumed_samples"] == 20 * 12
        resumed = [r["loss"] for r in records]
        assert resumed[:10] == straight[:10]
        worst = max(abs(a - b) / abs(b) for a, b in zip(resumed[10:], straight[10:]))
        print(f"{strategy} world 2 -> {world}: largest relative loss difference {worst:.2e}")
        assert worst < 1e-5, f"world {world}: losses drift {worst:.2e} from the world-2 run"
        assert not math.isclose(resumed[-1], resumed[10], rel_tol=1e-3)  # it did train
