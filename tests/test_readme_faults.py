"""The README's "What survives what" table names only tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_fault_table_names_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("#### What survives what", 1)[1].split("\n#### ", 1)[0]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    assert len(rows) >= 15 and len(named) >= 15, (len(rows), len(named))
    missing = []
    for file, function in named:
        path = ROOT / "tests" / file
        tree = ast.parse(path.read_text()) if path.is_file() else None
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)} if tree else set()
        if function not in defined:
            missing.append(f"{file}::{function}")
    assert missing == []
