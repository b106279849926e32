"""Passed DeepSpeed config checks, remembered: a second submit of the same config with the same
DeepSpeed skips the check's subprocess (importing torch and deepspeed: seconds on a login node).

An entry is keyed by everything the check's verdict depends on: the JSON, the job's accelerator,
this package's version and check code, and the DeepSpeed the job's python imports, found by a probe
that locates the package without importing it (its version, where it lies, and that file's
modification time; tens of milliseconds). A failed check is never stored, so a typo fails every
time. Entries are files in `$HPC_CACHE_DIR/deepspeed-check/` (default `$XDG_CACHE_HOME/hpc`, else
`~/.cache/hpc`), each written to a temporary name and renamed into place: concurrent submits may
write the same entry, and a reader sees a whole one or none. `HPC_CACHE_DIR=` (empty) turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hpc

PROBE = ("import importlib.util as u, importlib.metadata as m, os, json\n"
         "s = u.find_spec('deepspeed')\n"
         "o = s.origin if s and s.origin else None\n"
         "print(json.dumps([o, m.version('deepspeed'), os.stat(o).st_mtime_ns]) if o else 'null')\n")
"""Run with the job's python: where its deepspeed is and which version, without importing it."""
PROBE_TIMEOUT_S = 30


def probe_here() -> list[Any] | None:
    """PROBE's answer for this interpreter, without starting another."""
    namespace: dict[str, Any] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(PROBE, namespace)  # noqa: S102 - our own constant, the same code the subprocess runs
    return json.loads(out.getvalue())
_CHECK_CODE = [Path(__file__).with_name(name) for name in ("deepspeed_check.py", "deepspeed.py")]


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where entries live, or None when `HPC_CACHE_DIR` is set empty (no cache)."""
    if "HPC_CACHE_DIR" in environ:
        return Path(environ["HPC_CACHE_DIR"]) / "deepspeed-check" if environ["HPC_CACHE_DIR"] else None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hpc" / "deepspeed-check"


class CheckCache:
    """Passed checks under `folder`; every failure to read or write one is a miss, never an error."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def key(self, argv: list[str], text: str, accelerator: str, env: Mapping[str, str],
            run: Callable[..., Any], cwd: str) -> str | None:
        """The entry's name for this check, or None when the probe cannot tell which DeepSpeed the
        job's python has (then the check itself runs and says why)."""
        if self.folder is None:
            return None
        try:
            if argv == [sys.executable] and run is subprocess.run:
                # The job's python is this one: ask here (a second interpreter's start-up is most of
                # a repeated submit's time).
                found = probe_here()
            else:
                proc = run([*argv, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                           cwd=cwd, env=dict(env))
                lines = (proc.stdout or "").strip().splitlines()
                found = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        except Exception:  # noqa: BLE001 - whatever stops the probe is a miss: the check runs and tells
            return None
        if not found:
            return None
        code = hashlib.sha256(b"".join(p.read_bytes() for p in _CHECK_CODE)).hexdigest()
        parts = [hpc.__version__, code, argv, found, accelerator, text]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def passed(self, key: str | None) -> bool:
        return key is not None and self.folder is not None and (self.folder / key).is_file()

    def remember(self, key: str | None, what: dict[str, Any]) -> None:
        if key is None or self.folder is None:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:12]}-")
            with os.fdopen(fd, "w") as f:
                json.dump(what, f)
            os.replace(tmp, self.folder / key)
        except OSError:  # a read-only or full home folder: the next submit checks again
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
