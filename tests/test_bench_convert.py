"""`python -m hpc.bench.convert --tiny` end to end: the real job makes both sources, every measured
command runs, and the JSON holds a row per operation with the numbers the table is made of. No
timing is asserted: a benchmark reports, it does not judge (that is the reader's job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.bench.convert import plan

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_writes_every_row(tmp_path: Path, torch_extensions_dir: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hpc.bench.convert", "--tiny", "--workdir", str(work), "--out", str(out), "--clean"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads(out.read_text())
    expected = [op.name for op in plan(work, Path("zero"), Path("dcp"), 2)]
    rows = {row["operation"]: row for row in result["rows"]}
    assert list(rows) == expected
    kinds = {row["kind"] for row in rows.values()}
    assert kinds == {"copy", "reshard", "verify", "export", "ds_to_universal"}
    for name, row in rows.items():
        assert row["ok"], f"{name}: {row['error']}"
        assert row["bytes"] > 0 and row["seconds"] > 0 and row["peak_rss_gb"] > 0, name
        if row["kind"] != "copy":  # the copy is the yardstick: its own ratio says nothing
            assert row["x_copy"] is not None, name
        assert row["checkpoint_gb"] > 0 and row["largest_tensor_gb"] > 0, name
    for kind in ("reshard", "export"):  # both goals are stated (met or not) on every conversion row
        for row in (r for r in rows.values() if r["kind"] == kind):
            assert [g["goal"] for g in row["goals"]] == ["x copy", "RSS GB"], row["operation"]
            assert all(g["met"] is not None for g in row["goals"]), row["operation"]
    for ds in (r for r in rows.values() if r["kind"] == "ds_to_universal"):  # as it ships, and then fsynced
        assert ds["goals"][0]["value"] is not None and ds["peak_disk_gb"] > 0, ds["operation"]
    assert "| operation" in proc.stdout and all(name in proc.stdout for name in expected)
    assert out.exists() and not work.exists()  # --clean removes all but the JSON
