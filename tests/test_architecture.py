"""Data flows one way: a stage imports only from stages to its left (DESIGN.md, STYLE.md habit 1)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpc"
# Left to right. `slurm` is the seam the in-allocation stages read the environment through;
# `job` (hpc/job.py, the entry point a job runs) composes all the in-allocation stages.
ORDER = ["config", "submit", "slurm", "launch", "train", "checkpoint", "requeue", "bench", "status", "job"]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "hpc" and parts[1] in ORDER else None


def test_the_job_entry_point_is_the_last_stage() -> None:
    assert _stage("hpc.job") == "job" and (PACKAGE / "job.py").is_file()


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_import_points_backwards() -> None:
    backwards = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        here = _stage(".".join(rel.parts))
        if here is None:
            continue
        for module in _imports(path):
            there = _stage(module)
            if there is not None and ORDER.index(there) > ORDER.index(here):
                backwards.append(f"{rel} ({here}) imports {module} ({there})")
    assert not backwards, "imports against the data flow:\n" + "\n".join(backwards)


def test_login_node_modules_do_not_import_torch_at_top_level() -> None:
    offenders = []
    for stage in ("config", "submit"):
        for path in (PACKAGE / stage).rglob("*.py"):
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
            offenders += [f"{path.name}: {m}" for m in names if m.split(".")[0] in ("torch", "deepspeed")]
    assert not offenders, offenders
