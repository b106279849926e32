"""A run resubmitted on the real local SLURM cluster with fewer nodes, then with another strategy,
goes on from its checkpoint with no manual step: the job converts the step it resumes.

  zero3, nodes=2 x 2 ranks      trains to step 10 and stops (saving step 10)
  zero3, nodes=1 x 2 ranks      converts step 10 (ZeRO-3 at 4 ranks -> 2), trains to 20, stops
  fsdp_full_shard, nodes=2 x 2  converts step 20 (ZeRO-3 -> DCP), trains to 30
and every loss is within 1e-5 (relative) of an uninterrupted zero3 run at 4 ranks, which runs on
the other two nodes meanwhile. The global batch stays 12 sequences (micro-batch x ranks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_jobs import Run, submit

pytestmark = pytest.mark.slurm

STEPS = 30
BASE = ["exp=tiny_cpu", f"train.max_steps={STEPS}", "train.log_every=1", "time=10", "run.name=moved",
        "requeue.max_preemptions=0"]  # a stop ends the job instead of requeueing it


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def test_resubmitting_with_fewer_nodes_then_another_strategy_continues_the_run(
        cluster_env: dict[str, str], tmp_path: Path, torch_extensions_dir: Path) -> None:
    # DeepSpeed's CPU ops built once for the suite, not once per job in its node-local scratch.
    cluster_env = {**cluster_env, "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir)}
    straight = Run(cluster_env, tmp_path / "straight",
                   submit(cluster_env, *BASE, "run.name=straight", "strategy=zero3", "nodes=2", "gpus_per_node=2",
                          "train.micro_batch_size=3", f"run.root={tmp_path}", "--no-wait"))
    moved = tmp_path / "moved"
    legs = [("zero3", 2, 3, 10), ("zero3", 1, 6, 20), ("fsdp_full_shard", 2, 3, None)]
    runs = []
    for strategy, nodes, mbs, stop_at in legs:
        run = Run(cluster_env, moved, submit(
            cluster_env, *BASE, f"strategy={strategy}", f"nodes={nodes}", "gpus_per_node=2",
            f"train.micro_batch_size={mbs}", f"run.root={tmp_path}", "--no-wait",
            faults=f"stop@step_end:step={stop_at}" if stop_at else None))
        run.wait(300)
        runs.append(run)
        committed = sorted(int(p.parent.name[5:]) for p in (moved / "checkpoints").glob("step-*/manifest.json"))
        assert committed and committed[-1] == (stop_at or STEPS), run.explain()
    first, fewer, other = runs
    assert "converting it" not in first.log()
    assert "step 10 was saved by deepspeed ZeRO-3 at world size 4, and DeepSpeed checkpoints are bound to " \
           "their world size; this job runs deepspeed zero3 at world size 2: converting it" in fewer.log(), fewer.explain()
    assert "converted step 10 for deepspeed zero3 at world size 2" in fewer.log()
    assert "step 20 was saved by deepspeed ZeRO-3 at world size 2 (deepspeed format); this job runs fsdp " \
           "full_shard at world size 4: converting it" in other.log(), other.explain()
    assert (moved / "checkpoints" / "step-20" / "converted" / "dcp" / "manifest.json").is_file()

    assert straight.wait(300) == "COMPLETED", straight.explain()
    reference, continued = _losses(straight.dir), _losses(moved)
    assert sorted(continued) == list(range(1, STEPS + 1))
    worst = max(abs(continued[s] - reference[s]) / abs(reference[s]) for s in reference)
    print(f"zero3@4 -> zero3@2 -> fsdp_full_shard@4 on SLURM: largest relative loss difference {worst:.2e}")
    assert worst < 1e-5, f"losses drift {worst:.2e} from the uninterrupted run"
