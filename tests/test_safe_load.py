"""No code from the checkpoint store runs: a pickle planted in a step folder (with a manifest that
vouches for it, as someone who can write the store could make) is never rebuilt, by the job's own
resume (DCP and DeepSpeed) or by tools/ckpt_convert; and what a run creates is not world-writable."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_jobs import ROOT, metrics, ok, rank0_log, submit
from hpc.checkpoint.manifest import MANIFEST, Manifest
from hpc.checkpoint.safe_load import UnsafeCheckpoint, load_dcp_metadata, safe_torch_load
from hpc.checkpoint.storage import FileEntry, file_checksum


class _Payload:
    """Unpickled, it runs a shell command (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(step_dir: Path, name: str, marker: Path, *, as_torch: bool) -> None:
    """Replace `name` in a committed step with a payload, and the manifest's entry to match."""
    path = step_dir / name
    if as_torch:
        torch.save({"state": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    manifest = Manifest.from_json((step_dir / MANIFEST).read_bytes())
    size, checksum = file_checksum(path)
    files = [FileEntry(e.name, size, checksum) if e.name == name else e for e in manifest.files]
    (step_dir / MANIFEST).write_bytes(dataclasses.replace(manifest, files=files).to_json())


def _calls(text: str, name: str) -> list[str]:
    """Every `name(...)` call in `text`, with its arguments (parentheses balanced)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        calls.append(text[match.start():end + 1])
    return calls


def test_no_code_path_loads_a_checkpoint_with_the_full_unpickler() -> None:
    offenders = []
    for path in [*(ROOT / "hpc").rglob("*.py"), *(ROOT / "tools").glob("*.py"), ROOT / "tools" / "ckpt_convert"]:
        text = path.read_text()
        where = path.relative_to(ROOT)
        offenders += [f"{where}: {m.group(0)}" for m in re.finditer(r"weights_only\s*=\s*False", text)]
        offenders += [f"{where}: {call}" for call in _calls(text, "pickle.load") + _calls(text, "pickle.loads")]
        offenders += [f"{where}: {call}" for call in _calls(text, "torch.load") if "weights_only=True" not in call]
    assert offenders == []


def test_the_metadata_reader_refuses_a_payload_before_building_anything(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(UnsafeCheckpoint, match=r"x/.metadata: refused: it names posix.system"):
        load_dcp_metadata(io.BytesIO(pickle.dumps(_Payload(marker))), "x/.metadata")
    buf = io.BytesIO()
    torch.save({"rng": _Payload(marker)}, buf)
    (tmp_path / "f.pt").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeCheckpoint, match=r"f.pt: refused: it holds more than tensors"):
        safe_torch_load(tmp_path / "f.pt")
    assert not marker.exists()


def test_a_planted_pickle_in_a_dcp_step_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ok(submit(tmp_path, "run", "train.max_steps=6", "checkpoint.every_steps=3"))
    steps = tmp_path / "run" / "checkpoints"

    # The RNG states of step 6: not loaded (seeded afresh, said in the log); training goes on.
    _plant(steps / "step-6", "rng/rank-0.pt", marker, as_torch=True)
    ok(submit(tmp_path, "run", "train.max_steps=9", "checkpoint.every_steps=3"))
    assert "rng/rank-0.pt holds pickled objects, which are never loaded" in rank0_log(tmp_path / "run")
    assert metrics(tmp_path / "run")[-1]["step"] == 9 and not marker.exists()

    # DCP's metadata of step 9: the resume refuses the step, names the file, and is not requeued.
    _plant(steps / "step-9", ".metadata", marker, as_torch=False)
    refused = submit(tmp_path, "run", "train.max_steps=12", "checkpoint.every_steps=3")
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr + rank0_log(tmp_path / "run")
    assert re.search(r"step-9/\.metadata: refused: it names posix\.system", text), text[-3000:]
    assert not marker.exists()

    # Nor does the converter run it.
    tool = subprocess.run([sys.executable, "-m", "hpc.checkpoint.convert", "reshard", str(steps / "step-9"),
                           str(tmp_path / "out"), "--world", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert tool.returncode != 0 and "refused: it names posix.system" in tool.stderr, tool.stderr[-2000:]
    assert not marker.exists()


def test_a_planted_pickle_in_a_deepspeed_step_never_runs(tmp_path: Path, torch_extensions_dir: Path) -> None:
    marker = tmp_path / "ran"
    ok(submit(tmp_path, "run", "strategy=zero2", "train.max_steps=3", extensions=torch_extensions_dir))
    step = tmp_path / "run" / "checkpoints" / "step-3"
    (model_states,) = [p.relative_to(step).as_posix() for p in step.rglob("*model_states.pt")][:1]
    _plant(step, model_states, marker, as_torch=True)
    refused = submit(tmp_path, "run", "strategy=zero2", "train.max_steps=6", extensions=torch_extensions_dir)
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr + rank0_log(tmp_path / "run")
    assert f"{model_states}: refused: it holds more than tensors" in text, text[-3000:]
    assert not marker.exists()


def test_a_run_creates_nothing_others_can_write_even_under_umask_000(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"run.root={tmp_path}", "run.name=run",
         f"cluster.scratch_dir={scratch}/{{job_id}}", "train.max_steps=4", "checkpoint.every_steps=2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
        preexec_fn=lambda: os.umask(0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked, writable = 0, []
    for top in (tmp_path / "run", scratch):
        for path in [top, *top.rglob("*")]:
            checked += 1
            if path.lstat().st_mode & stat.S_IWOTH and not path.is_symlink():
                writable.append(str(path.relative_to(tmp_path)))
    assert checked > 20 and writable == []
    assert (tmp_path / "run" / "checkpoints" / "step-4" / MANIFEST).is_file()
