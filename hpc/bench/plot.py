"""The strategy benchmark as a picture: tokens/s and peak memory per strategy, each measured bar with
the planner's prediction beside it (`python -m hpc.bench ... --plot out.png`). matplotlib is an
optional dependency (`pip install -e .[plot]`), imported only here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_strategies(rows: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Two panels of paired bars (measured, planned) per strategy; returns the PNG written."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install -e '.[plot]')") from None
    matplotlib.use("Agg")  # no display on a login or compute node
    import matplotlib.pyplot as plt

    names = [r["strategy"] for r in rows]
    x = range(len(names))
    width = 0.4
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(names)), 8), sharex=True)
    panels = ((speed, "tokens_per_s", "predicted_tokens_per_s", "tokens/s (per job)"),
              (memory, "peak_mem_gb", "predicted_mem_gb", "peak memory per rank, GB"))
    for axis, measured, planned, label in panels:
        axis.bar([i - width / 2 for i in x], [r.get(measured) or 0 for r in rows], width, label="measured")
        axis.bar([i + width / 2 for i in x], [r.get(planned) or 0 for r in rows], width, label="planned",
                 color="tab:orange", alpha=0.7)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
        axis.legend()
    memory.set_xticks(list(x))
    memory.set_xticklabels(names, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
