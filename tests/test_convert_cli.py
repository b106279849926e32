"""tools/ckpt_convert as a user meets it (in-process, no ranks): import a Hugging Face folder,
inspect, reshard, export back and verify, bit for bit; and every bad input is a one-line error
naming the problem and the fix, with nothing committed at the destination."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from checkpoint_jobs import ROOT, MemoryReader

from hpc.bench.harness import local_config
from hpc.checkpoint.convert.__main__ import main
from hpc.checkpoint.convert.hf import export_hf
from hpc.checkpoint.convert.neutral import model_key
from hpc.train.model import Transformer

pytest.importorskip("safetensors")

TINY = local_config(2, []).model


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    model = Transformer(TINY)
    model.init_weights()
    out = tmp_path_factory.mktemp("hf") / "tiny"
    export_hf(MemoryReader({model_key(n): p.detach().clone() for n, p in model.named_parameters()}), out, TINY,
              dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def imported(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF folder as a committed step 0 for fsdp_full_shard at 2 ranks."""
    out = tmp_path_factory.mktemp("imported") / "checkpoints"
    assert main(["import", str(hf_dir), str(out), "--world", "2", "--strategy", "fsdp_full_shard",
                 "--model", "tiny"]) == 0
    return out / "step-0"


def test_import_inspect_reshard_export_verify_round_trip(capsys, hf_dir: Path, imported: Path,
                                                         tmp_path: Path) -> None:
    assert (imported / "manifest.json").is_file()
    code, out, _ = _run(capsys, "inspect", str(imported), "--json")
    info = json.loads(out)
    assert code == 0 and info["step"] == 0 and info["format"] == "dcp" and info["strategy"] == "fsdp"
    assert info["parameters"] == sum(p.numel() for p in Transformer(TINY).parameters())
    assert info["tensors"] == {"model": 21, "optimizer": 0} and info["bytes"]["optimizer"] == 0

    code, out, err = _run(capsys, "reshard", str(imported), str(tmp_path / "z"), "--world", "3", "--strategy", "zero3")
    assert code == 0, err
    assert "model 21/21 bitwise equal" in out and "optimizer" in out  # DeepSpeed's fresh AdamW, not compared
    code, out, err = _run(capsys, "export", str(tmp_path / "z" / "step-0"), str(tmp_path / "back"), "--dtype", "fp32")
    assert code == 0 and "verified: model 21/21 tensors equal" in out, err
    code, out, _ = _run(capsys, "verify", str(hf_dir), str(tmp_path / "back"))
    assert code == 0 and "OK (bitwise)" in out, out
    code, out, _ = _run(capsys, "verify", str(hf_dir), str(imported), "--json")
    assert code == 0 and json.loads(out)["kinds"]["model"]["equal"] == 21


def test_verify_names_the_largest_difference(capsys, hf_dir: Path, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "export", str(hf_dir), str(tmp_path / "x"))  # an HF folder is no step
    assert code == 2 and "has no config.yaml" in err
    torch.manual_seed(4)
    other = Transformer(TINY)
    other.init_weights()
    export_hf(MemoryReader({model_key(n): p.detach().clone() for n, p in other.named_parameters()}),
              tmp_path / "other", TINY, dtype=torch.float32)
    code, out, _ = _run(capsys, "verify", str(hf_dir), str(tmp_path / "other"))
    assert code == 1 and "DIFFERENT" in out and "tensors differ" in out
    code, out, _ = _run(capsys, "verify", str(hf_dir), str(tmp_path / "other"), "--atol", "1")
    assert code == 0 and "within tolerance" in out


def _one_line_error(capsys, *args: str) -> str:
    code, _, err = _run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def _nothing_committed(out: Path) -> None:
    assert not out.exists() or not list(out.rglob("*")), sorted(out.rglob("*"))


def test_bad_inputs_are_one_line_errors_and_commit_nothing(capsys, hf_dir: Path, imported: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    # An uncommitted step (an interrupted save: no manifest).
    partial = tmp_path / "run" / "step-0"
    partial.parent.mkdir()
    subprocess.run(["cp", "-r", str(imported), str(partial)], check=True)
    (partial / "manifest.json").unlink()
    assert "is not a committed checkpoint" in _one_line_error(capsys, "reshard", str(partial), str(out), "--world", "2")
    # A corrupt shard, named.
    corrupt = tmp_path / "corrupt" / "step-0"
    corrupt.parent.mkdir()
    subprocess.run(["cp", "-r", str(imported), str(corrupt)], check=True)
    shard = sorted(corrupt.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = _one_line_error(capsys, "reshard", str(corrupt), str(out), "--world", "2")
    assert "does not verify against its manifest" in line and shard.name in line
    line = _one_line_error(capsys, "export", str(corrupt), str(tmp_path / "hf-out"), "--dtype", "fp32")
    assert "does not verify against its manifest" in line and shard.name in line
    assert not (tmp_path / "hf-out").exists()
    # A world size the target strategy cannot take.
    line = _one_line_error(capsys, "reshard", str(imported), str(out), "--world", "3", "--strategy",
                           "fsdp_hybrid_shard")
    assert "does not divide world size 3" in line and "HINT" in line
    # An unknown strategy, with the near miss.
    line = _one_line_error(capsys, "reshard", str(imported), str(out), "--world", "2", "--strategy", "zero4")
    assert "unknown strategy 'zero4'" in line and "zero3" in line
    # The source itself, and an existing output (kept as it was).
    line = _one_line_error(capsys, "reshard", str(imported), str(imported.parent), "--world", "2")
    assert "is the source itself" in line
    assert main(["reshard", str(imported), str(tmp_path / "done"), "--world", "2", "--no-verify"]) == 0
    kept = (tmp_path / "done" / "step-0" / "manifest.json").read_bytes()
    line = _one_line_error(capsys, "reshard", str(imported), str(tmp_path / "done"), "--world", "4")
    assert "already exists" in line and "--force" in line
    assert (tmp_path / "done" / "step-0" / "manifest.json").read_bytes() == kept
    # An HF folder whose shapes do not match the model preset.
    line = _one_line_error(capsys, "import", str(hf_dir), str(out), "--world", "2", "--strategy", "ddp",
                           "--model", "small")
    assert "pick the model preset that matches config.json" in line
    # An unreachable URL, and a missing path.
    line = _one_line_error(capsys, "reshard", "s3://hpc-no-such-bucket/run/step-10", str(out), "--world", "2")
    assert "cannot be read" in line and "HINT" in line
    line = _one_line_error(capsys, "inspect", str(tmp_path / "nowhere" / "step-5"))
    assert "no such step folder" in line
    _nothing_committed(out)


def test_worker_processes_split_the_tensors_and_the_result_is_the_same(capsys, imported: Path,
                                                                       tmp_path: Path) -> None:
    """--workers 2: two processes (forks of one server that imported torch once) write the parts;
    the default verify compares the output with the source bit for bit."""
    code, out, err = _run(capsys, "reshard", str(imported), str(tmp_path / "w"), "--world", "3", "--strategy",
                          "zero2", "--workers", "2")
    assert code == 0, err
    assert "model 21/21 bitwise equal" in out
    code, out, _ = _run(capsys, "verify", str(imported), str(tmp_path / "w" / "step-0"))
    assert code == 0 and "OK (bitwise)" in out, out


def test_the_tool_runs_from_the_shell(hf_dir: Path) -> None:
    proc = subprocess.run([str(ROOT / "tools" / "ckpt_convert"), "inspect", str(hf_dir), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["format"] == "hf"
