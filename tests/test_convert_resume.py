"""A run goes on from its checkpoint at another world size and with another strategy, through the
real job (`python -m hpc.submit`, local ranks, gloo, fp32): either converted beforehand by
`tools/ckpt_convert reshard` (which verifies its output bitwise against the source) or converted by
the job itself when it resumes (checkpoint.convert=auto). Each cell trains 10 steps, converts,
resumes and trains 10 more; those 10 losses match the uninterrupted 20-step run to 1e-5 relative.
A DCP step needs no conversion at another world size, nor between DDP and FSDP (DCP reshards on
load, and both save whole tensors by name): those cells are "native".

CI runs a covering subset (every direction between the DCP and DeepSpeed families, a ZeRO world
size change and a ZeRO stage change, both conversion paths); HPC_CONVERT_MATRIX=full runs all 30
cells: each of {ddp, fsdp_full_shard, zero1, zero2, zero3} at world 2 to itself at world 1 and 3
and to every other strategy at world 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from checkpoint_jobs import GLOBAL_BATCH, ROOT, RUN_20_STEPS, metrics, ok, rank0_log, submit

pytestmark = pytest.mark.dist

SOURCES = ("ddp", "fsdp_full_shard", "zero1", "zero2", "zero3")
RUN = RUN_20_STEPS  # as the uninterrupted runs

DCP = {"ddp", "fsdp_full_shard"}  # one family: DCP loads either's step into the other as saved
FULL = [(s, s, w, "tool") for s in SOURCES for w in (1, 3)] + \
       [(s, t, 2, "native" if {s, t} <= DCP else "tool" if i % 2 else "auto") for i, (s, t) in
        enumerate((s, t) for s in SOURCES for t in SOURCES if t != s)]
COVERING = [
    ("fsdp_full_shard", "fsdp_full_shard", 3, "native"),  # DCP reshards on load: nothing to convert
    ("fsdp_full_shard", "zero3", 2, "tool"),  # DCP -> ZeRO-3
    ("zero2", "zero2", 1, "tool"),            # a ZeRO step at another world size
    ("zero2", "ddp", 2, "auto"),              # ZeRO -> DCP, by the job
    ("zero2", "zero1", 2, "auto"),            # another ZeRO stage, by the job
]
CELLS = FULL if os.environ.get("HPC_CONVERT_MATRIX") == "full" else COVERING


def _mbs(world: int) -> str:
    return f"train.micro_batch_size={GLOBAL_BATCH // world}"


@pytest.fixture(scope="module")
def references(uninterrupted_run: Any) -> dict[str, Path]:
    """One uninterrupted 20-step run per source strategy used, saving step 10 on the way (shared
    with test_checkpoint_resume.py)."""
    return {strategy: uninterrupted_run(strategy) for strategy in sorted({cell[0] for cell in CELLS})}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "tools" / "ckpt_convert"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})


@pytest.mark.parametrize(("source", "target", "world", "via"), CELLS,
                         ids=[f"{s}@2-{t}@{w}-{v}" for s, t, w, v in CELLS])
def test_converted_step_resumes_on_the_uninterrupted_trajectory(
        references: dict[str, Path], tmp_path: Path, torch_extensions_dir: Path,
        source: str, target: str, world: int, via: str) -> None:
    reference = references[source]
    step10 = reference / "checkpoints" / "step-10"
    before = _tree_digest(step10)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    if via == "tool":
        proc = _tool("reshard", str(step10), str(checkpoints), "--world", str(world), "--strategy", target, "--json")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        for kind in ("model", "optimizer"):
            stats = report["verified"]["kinds"][kind]
            assert stats["tensors"] > 0 and stats["equal"] == stats["tensors"], report["verified"]
        if world != 2:
            assert any("seeds them afresh" in note for note in report["notes"]), report["notes"]
    else:  # the job finds the step as saved
        shutil.copytree(step10, checkpoints / "step-10")

    ok(submit(tmp_path, "resumed", *RUN, f"strategy={target}", f"gpus_per_node={world}", _mbs(world),
              extensions=torch_extensions_dir))
    log = rank0_log(tmp_path / "resumed")
    assert "resumed from step 10" in log, log[-3000:]
    if via == "native":
        assert "converting it" not in log, log[-3000:]
        changed = log.split("config changed since this checkpoint was saved: ")[1].split("\n")[0]
        if world != 2:
            assert f"saved at world size 2, now {world}" in log, log[-3000:]
            assert "slurm.gpus_per_node" in changed and "train.micro_batch_size" in changed, changed
        else:  # DDP <-> FSDP at the same size
            assert "strategy.name" in changed, changed
    if via == "auto":
        assert "converting it (checkpoint.convert=auto)" in log and "converted step 10 for" in log, log[-3000:]
        copies = list((checkpoints / "step-10" / "converted").iterdir())
        assert len(copies) == 1 and (copies[0] / "manifest.json").is_file()
        proc = _tool("verify", str(checkpoints / "step-10"), str(copies[0]), "--json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        kinds = json.loads(proc.stdout)["kinds"]
        assert all(kinds[k]["equal"] == kinds[k]["tensors"] > 0 for k in ("model", "optimizer")), kinds
    assert _tree_digest(step10) == before, "the source step changed"
    if (source, target, via) == ("zero2", "ddp", "auto"):
        # Resuming step 10 again at this size finds the committed copy: nothing is converted twice.
        ok(submit(tmp_path, "resumed", "train.max_steps=11", "checkpoint.resume=10", f"strategy={target}",
                  f"gpus_per_node={world}", _mbs(world), extensions=torch_extensions_dir))
        log = rank0_log(tmp_path / "resumed")
        assert log.count("converting it (checkpoint.convert=auto)") == 1, log[-3000:]
        assert log.count("resumed from step 10 (") == 2 and "step-10/converted/dcp" in log.split("resumed from step 10 (")[-1]

    straight = [r["loss"] for r in metrics(reference)]
    resumed = {r["step"]: r["loss"] for r in metrics(tmp_path / "resumed")}
    assert sorted(resumed) == list(range(11, 21))
    worst = max(abs(resumed[s] - straight[s - 1]) / abs(straight[s - 1]) for s in range(11, 21))
    print(f"{source}@2 -> {target}@{world} ({via}): largest relative loss difference {worst:.2e}")
    assert worst < 1e-5, f"losses drift {worst:.2e} from the uninterrupted run"
