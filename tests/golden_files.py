"""Golden files (tests/golden/): compare a rendered text with its reviewed copy.

Regenerate after an intended change with HPC_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with HPC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"
