"""Data flows one way: a stage imports only from stages to its left (or from its own stage).

Every room of the package (a top-level module or sub-package of hpc/) is assigned to a stage in
ROOMS, the same table hpc/__init__.py's docstring shows a newcomer; a room missing from it fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import hpc

PACKAGE = Path(__file__).resolve().parents[1] / "hpc"

# Left to right: a module may import from its own stage and from stages to its left.
STAGES = ["base", "config", "estimate", "slurm", "submit", "launch", "train", "checkpoint", "requeue", "bench", "status",
          "job"]
ROOMS = {
    # base: named once, usable by every stage (they import nothing of hpc but each other)
    "__init__": "base", "files": "base", "faults": "base", "run_folder": "base",
    "config": "config",
    # the planner: pure arithmetic on a Config (the trainer takes the model's shape from it)
    "estimate": "estimate",
    # `slurm` is the seam every stage reaches SLURM through (commands, environment); it imports
    # nothing of hpc. Submit asks it whether a run's last job is still queued.
    "slurm": "slurm",
    "submit": "submit",
    "launch": "launch",
    "train": "train",
    "checkpoint": "checkpoint",
    "requeue": "requeue",
    "bench": "bench",
    "status": "status",
    # hpc/job.py, the entry point a job runs, composes all the in-allocation stages
    "job": "job",
}


def _room(module: str) -> str | None:
    """The room of a dotted module name inside hpc (None: not ours)."""
    parts = module.split(".")
    if parts[0] != "hpc":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in sorted(PACKAGE.rglob("*.py"))]


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module.removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_every_room_of_the_package_has_a_stage() -> None:
    rooms = {_room(module) for module, _ in _modules()}
    missing = sorted(r for r in rooms if r not in ROOMS)
    assert not missing, f"rooms with no stage in ROOMS (add them): {missing}"
    gone = sorted(r for r in ROOMS if r not in rooms)
    assert not gone, f"ROOMS lists rooms that no longer exist: {gone}"


def test_no_import_points_backwards() -> None:
    backwards = []
    for module, path in _modules():
        here = ROOMS[_room(module)]
        for imported in _imports(path, module):
            room = _room(imported)
            if room is None or room not in ROOMS:
                continue  # not ours, or `from hpc import x` naming an attribute (checked as the module)
            there = ROOMS[room]
            if STAGES.index(there) > STAGES.index(here):
                backwards.append(f"{module} ({here}) imports {imported} ({there})")
    assert not backwards, "imports against the data flow:\n" + "\n".join(backwards)


def _docstring_table() -> dict[str, set[str]]:
    """hpc/__init__.py's map: `    stage  room  what` lines, continued by `        room  what` lines."""
    shown: dict[str, set[str]] = {}
    stage = None
    for line in (hpc.__doc__ or "").splitlines():
        words = line.split()
        if not line.startswith("    ") or not words:
            stage = None
            continue
        if words[0] in STAGES:
            stage, room = words[0], words[1]
        elif stage is not None and line.startswith("        "):
            room = words[0]
        else:
            continue
        shown.setdefault(stage, set()).add(re.sub(r"/$|\.py$", "", room))
    return shown


def test_the_package_docstring_shows_the_same_table() -> None:
    shown = _docstring_table()
    assert list(shown) == STAGES, f"the docstring's stages {list(shown)} differ from {STAGES}"
    for stage in STAGES:
        rooms = {r for r, s in ROOMS.items() if s == stage and r != "__init__"}
        assert shown[stage] == rooms, f"stage {stage}: the docstring shows {sorted(shown[stage])}, ROOMS {sorted(rooms)}"


def test_login_node_modules_do_not_import_torch_at_top_level() -> None:
    offenders = []
    for stage in ("config", "submit"):
        for path in (PACKAGE / stage).rglob("*.py"):
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
            offenders += [f"{path.name}: {m}" for m in names if m.split(".")[0] in ("torch", "deepspeed")]
    assert not offenders, offenders


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml names the packages one by one (the shipped presets are mapped into the
    package beside them): a new sub-package missing from the list would be missing from the wheel."""
    import tomllib

    setup = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    ours = {".".join(p.relative_to(PACKAGE.parent).parent.parts) for p in PACKAGE.rglob("__init__.py")}
    listed = set(setup["packages"])
    assert listed - set(setup["package-dir"]) == ours
    assert setup["package-dir"] == {"hpc._shipped.configs": "configs", "hpc._shipped.templates": "templates"}
