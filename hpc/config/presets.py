"""Where presets are found: a search path of configs folders, first match wins.

  1. `./configs/` in the current folder (a user's or a site repository's own presets),
  2. each folder of `$HPC_CONFIG_PATH` (colon-separated, in order: a site's shared presets),
  3. the shipped presets: `hpc/_shipped/configs` in an installed package, the repository's
     `configs/` in a checkout or an editable install (`$HPC_CONFIG_DIR` replaces them).

Each folder holds the groups as subfolders (`exp/`, `model/`, `strategy/`, `cluster/`), any of them
missing. A preset is found per group and name: a site's `cluster/mysite.yaml` sits beside the
shipped model and strategy presets, and a `cluster/slurm.yaml` of its own shadows the shipped one.
`python -m hpc.submit --list` shows every preset, where it comes from and which one is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GROUPS_LISTED = ("exp", "model", "strategy", "cluster")
_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_dir(kind: str) -> Path:
    """The shipped `configs` or `templates` folder: inside the installed package (a wheel carries
    them as hpc/_shipped/KIND), else the checkout's top-level folder."""
    installed = _PACKAGE / "_shipped" / kind
    return installed if installed.is_dir() else _PACKAGE.parent / kind


@dataclass(frozen=True)
class Folder:
    """One configs folder on the search path and how it got there."""
    path: Path
    origin: str  # "./configs", "$HPC_CONFIG_PATH", "shipped", ...

    def __str__(self) -> str:
        return f"{self.path} ({self.origin})"


@dataclass(frozen=True)
class SearchPath:
    """The configs folders, highest priority first."""
    folders: tuple[Folder, ...]

    @classmethod
    def single(cls, root: Path) -> SearchPath:
        """One folder alone (tests, and callers that name their folder)."""
        return cls((Folder(Path(root), "given"),))

    def find(self, group: str, name: str) -> Path | None:
        """The file `group/name.yaml` of the first folder that has it."""
        for folder in self.folders:
            path = folder.path / group / f"{name}.yaml"
            if path.is_file():
                return path
        return None

    def names(self, group: str) -> list[str]:
        """Every preset name of `group`, over all folders, sorted."""
        return sorted({p.stem for f in self.folders for p in (f.path / group).glob("*.yaml")})

    def candidates(self, group: str, name: str) -> list[Folder]:
        """The folders that hold `group/name.yaml`, the one used first."""
        return [f for f in self.folders if (f.path / group / f"{name}.yaml").is_file()]

    def describe(self) -> str:
        """The search path on one line, for error messages."""
        return "; ".join(str(f) for f in self.folders)

    def listing(self) -> str:
        """Every preset by group: the folder it is read from ([n] on the search path) and the
        folders whose preset of the same name it shadows."""
        number = {f: i for i, f in enumerate(self.folders, 1)}
        lines = ["search path, first match wins:"]
        lines += [f"  [{number[f]}] {f.origin:16} {f.path}" for f in self.folders]
        for group in GROUPS_LISTED:
            names = self.names(group)
            width = max((len(n) for n in names), default=0)
            lines.append(f"{group}:")
            for name in names:
                used, *shadowed = self.candidates(group, name)
                also = "".join(f"; shadows [{number[f]}] {f.origin}" for f in shadowed)
                lines.append(f"  {name:{width}}  [{number[used]}] {used.origin}{also}")
        return "\n".join(lines)


def search_path(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> SearchPath:
    """The search path for this process: ./configs, $HPC_CONFIG_PATH, the shipped presets (see the
    module docstring). A folder that appears twice (running from a checkout, ./configs is the
    shipped folder) is kept at its first place; folders that do not exist are left out."""
    here = Path(cwd) if cwd is not None else Path.cwd()
    replaced = environ.get("HPC_CONFIG_DIR")
    shipped = Folder(Path(replaced), "$HPC_CONFIG_DIR") if replaced else Folder(shipped_dir("configs"), "shipped")
    candidates = [Folder(here / "configs", "./configs")]
    candidates += [Folder(Path(p), "$HPC_CONFIG_PATH")
                   for p in environ.get("HPC_CONFIG_PATH", "").split(os.pathsep) if p]
    candidates.append(shipped)
    seen: set[Path] = set()
    folders = []
    for folder in candidates:
        key = folder.path.resolve()
        if key in seen or not folder.path.is_dir():
            continue
        seen.add(key)
        # Running in a checkout, ./configs is the shipped folder: call it that.
        is_shipped = not replaced and key == shipped.path.resolve()
        folders.append(Folder(folder.path, "shipped" if is_shipped else folder.origin))
    return SearchPath(tuple(folders))
