"""How much warning before the time limit a run's saves need, measured by its earlier runs.

The job (hpc.requeue) writes `<run folder>/requeue/lead.json` whenever a committed save shows a
longer lead is needed; the next submission of the same run folder reads it, so SLURM's warning
(`--signal=USR2@lead`) follows what saving this model actually takes on this cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpc.files import write_atomically

LEAD_FILE = Path("requeue") / "lead.json"


def read_measured_lead(run_dir: Path) -> dict[str, Any] | None:
    """{'needed_s': int, 'save_s': float, 'step_s': float, ...} or None (never measured)."""
    try:
        body = json.loads((Path(run_dir) / LEAD_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("needed_s"), int) else None


def write_measured_lead(run_dir: Path, body: dict[str, Any]) -> None:
    write_atomically(Path(run_dir) / LEAD_FILE, json.dumps(body, sort_keys=True))
