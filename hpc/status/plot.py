"""A run's metrics as a picture: loss, tokens/s and step time against step, across every restart
(`python -m hpc.status RUN --plot out.png`). Each start of the job is its own line segment, so the
steps a resumed start runs again (from an older checkpoint) overlap instead of zigzagging, and each
restart is a dashed line at the step it resumed from, coloured by its reason. matplotlib is an
optional dependency (`pip install 'hpc[plot]'`), imported only here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpc.requeue import history
from hpc.run_folder import RunFolder

SIZE_IN, DPI = (10.0, 8.0), 100
"""The PNG is 1000 x 800 pixels."""
REASON_COLOURS = {"timeout": "tab:orange", "preemption": "tab:purple", "slurm": "tab:brown",
                  "failure": "tab:red", "resubmitted": "tab:green"}
SEGMENT_COLOURS = ("tab:blue", "tab:cyan", "tab:olive", "tab:pink", "navy", "teal")
"""One per start of the job, in turn: a replayed step shows as two colours over the same steps."""
PANELS = (("loss", "loss", 1.0), ("tokens_per_s", "tokens/s", 1.0), ("step_time_s", "ms/step", 1e3))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl, in the order written (a torn last line is left out)."""
    records = []
    try:
        lines = RunFolder(run_dir).metrics.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def segments(records: list[dict[str, Any]], starts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records split by the start that wrote them: a record belongs to the latest start before
    its time (and a step that goes backwards begins a new segment even without one on record)."""
    times = sorted(s["at"] for s in starts if s.get("at") is not None)
    out: list[list[dict[str, Any]]] = []
    owner = None
    for record in records:
        mine = sum(1 for t in times if t <= record.get("time", 0))
        if not out or mine != owner or record["step"] <= out[-1][-1]["step"]:
            out.append([])
            owner = mine
        out[-1].append(record)
    return out


def plot_run(run_dir: Path, path: Path) -> dict[str, Any]:
    """Write the PNG; return what it shows (records, segments, restarts by reason)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install 'hpc[plot]')") from None
    matplotlib.use("Agg")  # no display on a login node
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise SystemExit(f"error: {RunFolder(run_dir).metrics} has no records to plot yet")
    starts = [e for e in history.read_events(run_dir) if e["event"] == history.STARTED]
    parts = segments(records, starts)
    restarts = [s for s in starts if s.get("restart", 0) > 0 or s.get("reason") not in (None, "submitted")]

    fig, axes = plt.subplots(len(PANELS), 1, figsize=SIZE_IN, sharex=True)
    for axis, (key, label, scale) in zip(axes, PANELS):
        for i, part in enumerate(parts):
            points = [(r["step"], r[key] * scale) for r in part if r.get(key) is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], color=SEGMENT_COLOURS[i % len(SEGMENT_COLOURS)],
                      marker=".", markersize=3, linewidth=1, label=f"start {i + 1}")
        for start in restarts:
            axis.axvline(start.get("step", 0), color=REASON_COLOURS.get(start.get("reason"), "tab:gray"),
                         linestyle="--", linewidth=1)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    reasons = sorted({s.get("reason", "?") for s in restarts})
    handles = axes[0].get_legend_handles_labels()[0][:10]
    handles += [matplotlib.lines.Line2D([], [], color=REASON_COLOURS.get(r, "tab:gray"), linestyle="--",
                                        label=f"restart: {r}") for r in reasons]
    axes[0].legend(handles=handles, loc="upper right", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {len(records)} records, {len(starts)} start(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    by_reason: dict[str, int] = {}
    for start in restarts:
        by_reason[start.get("reason", "?")] = by_reason.get(start.get("reason", "?"), 0) + 1
    return {"records": len(records), "segments": len(parts), "restarts": by_reason}
