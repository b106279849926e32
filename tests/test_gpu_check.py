"""The GPU smoke test's own machinery, exercised on CPU: its CPU mode runs the cheap checks on real gloo
ranks and prints the table and JSON a GPU session reads; a failing, skipped or hanging check is one row
and never stops the next; the 7B memory check's layer estimate; the shell entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.bench import gpu_check
from hpc.bench.gpu_checks import Check, Context, Finding, Skipped, fitting_layers
from hpc.bench.harness import local_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("devices", "nccl_gloo", "parity")


@pytest.mark.dist
def test_cpu_mode_prints_one_table_and_writes_json_with_every_row_ok(tmp_path: Path) -> None:
    out = tmp_path / "out" / "gpu_check.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.bench.gpu_check", "--cpu", "--checks", ",".join(QUICK),
         "--strategies", "ddp,fsdp_full_shard", "--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("\n\n")[-1]  # the final table (rows are also printed as they end)
    rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0] in QUICK]
    assert [(r[0], r[1]) for r in rows] == [(name, "ok") for name in QUICK], proc.stdout
    assert "FAILED" not in proc.stdout

    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["world"] == 2
    assert [(c["check"], c["result"]) for c in report["checks"]] == [(name, "ok") for name in QUICK]
    devices, groups, parity = (c["details"] for c in report["checks"])
    assert [r["device"] for r in devices["ranks"]] == ["cpu", "cpu"]
    assert all(r["ncpus"] >= 1 for r in devices["ranks"])
    assert [r["gloo_sum"] for r in groups["ranks"]] == [3.0, 3.0]
    assert all(r["gloo_connections"] for r in groups["ranks"])  # two ranks: gloo really connected
    assert set(parity["step1"]) == {"ddp", "fsdp_full_shard"}
    assert not (tmp_path / "work").exists()  # the scratch folder goes unless --keep
    assert seconds < 120, f"the quick CPU subset took {seconds:.0f} s"


def _ctx(tmp_path: Path) -> Context:
    return Context(cuda=False, world=2, work=tmp_path, strategies=("ddp",))


def test_a_failing_skipped_or_hanging_check_is_its_row_and_the_next_still_runs(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.2)
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.1)

    def boom(ctx: Context, timeout_s: float) -> Finding:
        raise RuntimeError("NCCL error: unhandled system error\nlong log tail")

    def skip(ctx: Context, timeout_s: float) -> Finding:
        raise Skipped("needs a GPU")

    def hang(ctx: Context, timeout_s: float) -> Finding:
        time.sleep(5)
        return Finding(True, "too late")

    def wrong(ctx: Context, timeout_s: float) -> Finding:
        return Finding(False, "losses differ", {"step1": {"ddp": 1.0}})

    def fine(ctx: Context, timeout_s: float) -> Finding:
        return Finding(True, f"{ctx.world} ranks, timeout {timeout_s:.0f} s")

    seen = []
    rows = gpu_check.run_checks([Check("boom", boom, 9), Check("skip", skip, 9), Check("hang", hang, 0.2),
                                 Check("wrong", wrong, 9), Check("fine", fine, 9)],
                                _ctx(tmp_path), budget_s=60, on_row=seen.append)
    assert seen == rows
    assert [(r["check"], r["result"]) for r in rows] == [
        ("boom", "FAILED"), ("skip", "skipped"), ("hang", "FAILED"), ("wrong", "FAILED"), ("fine", "ok")]
    assert rows[0]["value"] == "RuntimeError: NCCL error: unhandled system error"
    assert "long log tail" in rows[0]["details"]["error"]
    assert rows[1]["value"] == "needs a GPU"
    assert rows[2]["value"].startswith("did not return within")
    assert rows[3]["details"] == {"step1": {"ddp": 1.0}}
    assert rows[4]["value"] == "2 ranks, timeout 9 s"
    table = gpu_check.format_table(rows)
    assert table.splitlines()[0].split() == ["check", "result", "value", "[seconds]"]
    assert [line.split()[:2] for line in table.splitlines()[2:]] == [[r["check"], r["result"]] for r in rows]


def test_checks_share_one_budget_and_those_it_cannot_fit_are_skipped(tmp_path: Path) -> None:
    now = [0.0]
    timeouts = []

    def slow(ctx: Context, timeout_s: float) -> Finding:
        timeouts.append(timeout_s)
        now[0] += 200  # a fake clock: this check took 200 s
        return Finding(True, "done")

    rows = gpu_check.run_checks([Check(f"c{i}", slow, 180) for i in range(3)], _ctx(tmp_path), budget_s=450,
                                clock=lambda: now[0])
    # 450 s less the grace a timed-out check gets: 180 s, then what is left (420 - 200 = 220 -> 180), then 20 s.
    assert timeouts == [180, 180, 20]
    now[0] = 0.0
    rows = gpu_check.run_checks([Check("a", slow, 180), Check("b", slow, 180)], _ctx(tmp_path), budget_s=240,
                                clock=lambda: now[0])
    assert [r["result"] for r in rows] == ["ok", "skipped"]
    assert rows[1]["value"] == "not started: 40 s left of the 240 s budget"


def test_json_goes_to_OUT_when_set(tmp_path: Path) -> None:
    assert gpu_check.default_out({"OUT": str(tmp_path)}) == tmp_path / "gpu_check.json"
    assert gpu_check.default_out({}) == Path("gpu_check.json")


def test_the_7b_check_uses_the_whole_model_on_an_h200_and_fewer_layers_on_an_80_gb_gpu() -> None:
    model = local_config(1, ["model=llama2_7b"]).model
    assert model.n_layers == 32
    assert fitting_layers(model, 143771 << 20) == 32  # H200: 140 GiB; the estimate is ~131 GiB
    assert fitting_layers(model, 81559 << 20) == 18   # H100 80 GB
    assert fitting_layers(model, 8 << 30) == 0


def test_the_shell_entry_point_passes_its_arguments_on() -> None:
    script = ROOT / "tools" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    proc = subprocess.run([str(script), "--checks", "devices,nope"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "unknown checks ['nope']" in proc.stderr and "memory_7b" in proc.stderr


def test_on_a_machine_without_a_gpu_it_says_so_and_exits_0(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the check would run")
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU visible here" in proc.stdout and "--cpu" in proc.stdout
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_gpu_throughput_check_knows_the_peak_of_the_usual_gpus() -> None:
    from hpc.bench.gpu_checks import peak_tflops

    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None
