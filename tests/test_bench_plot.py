"""`python -m hpc.bench --plot`: the strategy benchmark writes its PNG (measured beside planned) and
counts collectives, enough to compare FSDP's units of sharding (--fsdp-wrap)."""

from __future__ import annotations

import json
from pathlib import Path

from hpc.bench.strategies import main


def test_the_benchmark_draws_measured_beside_planned_and_counts_collectives(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "strategies.json", tmp_path / "strategies.png"
    code = main(["--world", "2", "--steps", "2", "--warmup", "1", "--strategies", "fsdp_full_shard", "--fsdp-wrap",
                 "--out", str(out), "--plot", str(png), "model=tiny", "train.seq_len=32"])
    printed = capsys.readouterr().out
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["fsdp_full_shard", "fsdp_full_shard wrap=model", "fsdp_full_shard wrap=2blocks"]
    assert rows["fsdp_full_shard"]["predicted_mem_gb"] > 0 and rows["fsdp_full_shard"]["predicted_tokens_per_s"] > 0
    # Per step, each unit all-gathers twice (forward, backward) and reduce-scatters once; the root
    # (kept gathered) once each; the loop all-reduces the loss: 2 blocks + root = 9, one unit of two
    # blocks + root = 6, the whole model as one unit = 3.
    counts = [rows[name]["collectives_per_step"] for name in rows]
    assert counts == [9, 3, 6], counts
    assert "plan GB" in printed and "coll/step" in printed
