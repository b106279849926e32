"""The login-node path: no torch/deepspeed import (dry run or real submission), and the README demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "deepspeed")

CHECK = """
import sys
from hpc.submit.__main__ import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print("HEAVY", heavy)
sys.exit(code)
"""


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK.format(heavy=set(HEAVY)), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path), **env})


def test_dry_run_imports_neither_torch_nor_deepspeed(tmp_path: Path) -> None:
    proc = _run(["exp=70b_zero3", "nodes=4", "cluster=slurm", "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=4" in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_real_local_submission_imports_neither_and_the_job_passes_preflight(tmp_path: Path) -> None:
    # --wait: the login-node process waits for the job and reads its result, still without torch.
    proc = _run(["exp=tiny_cpu", "cluster=local", f"run.root={tmp_path}", "run.name=demo",
                 f"cluster.scratch_dir={tmp_path}/scratch/{{job_id}}", "--wait"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "submitted job" in proc.stdout and f"run folder: {tmp_path}/demo" in proc.stdout
    assert "follow the log: tail -f" in proc.stdout
    assert "preflight ok: 2 rank(s) on 1 node(s)" in proc.stdout
    saved = (tmp_path / "demo" / "config.yaml").read_text()
    assert "exp: tiny_cpu" in saved and "name: demo" in saved


def test_readme_demo_command_runs(tmp_path: Path) -> None:
    """The README's first command, as a user types it (tools/demo.sh), in a scratch run root."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "tools" / "demo.sh"), f"run.root={tmp_path}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank  local  node" in proc.stdout
    assert "preflight ok: 2 rank(s)" in proc.stdout


def test_the_login_benchmark_times_every_shipped_experiment(tmp_path: Path) -> None:
    """`python -m hpc.bench.login` (the figures are for its reader; here: it runs, every shipped
    experiment is a row, the JSON holds what the table shows)."""
    import json

    from hpc.config import available

    out = tmp_path / "login.json"
    proc = subprocess.run([sys.executable, "-m", "hpc.bench.login", "--repeat", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["exp"] for r in rows] == available("exp")
    assert {r["exp"] for r in rows if r["deepspeed"]} == {"70b_zero3", "70b_zero3_offload", "7b_zero1"}
    for row in rows:
        assert row["median_s"] > 0 and row["baseline_s"] > 0 and len(row["runs_s"]) == 1
        assert f"{row['exp']:20}" in proc.stdout
