"""What a waiting client shows of a running job besides its result: the warnings and errors its
ranks log (a checkpoint skipped because a checksum did not match, a logger dropped, a converted
step...), read from the tasks' log files in submitit's folder as they grow.

Only the job's own log lines count (`HH:MM:SS [rank R node] WARNING ...`, hpc.job's format), not
every library's stderr chatter; a multi-line message shows its first line.
"""

from __future__ import annotations

import re
from pathlib import Path

from hpc.run_folder import RunFolder

LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank \d+ [^\]]*\] (WARNING|ERROR|CRITICAL) ")


class LogFollower:
    """New warning and error lines of one job's task logs since the last call."""

    def __init__(self, run_dir: Path, job_id: str) -> None:
        self.folder = RunFolder(run_dir).submitit
        self.job_id = job_id
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, str] = {}

    def new_lines(self) -> list[str]:
        out = []
        for path in sorted(self.folder.glob(f"{self.job_id}_*_log.out")):
            try:
                with path.open("rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
            text = self.partial.pop(path, "") + data.decode("utf-8", errors="replace")
            lines = text.split("\n")
            if lines[-1]:  # a line still being written: kept for the next call
                self.partial[path] = lines[-1]
            out += [line for line in lines[:-1] if LINE.match(line)]
        return out
