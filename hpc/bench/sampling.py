"""Watching a command run: its wall time, the memory of its whole process tree (RSS, anonymous,
PSS) sampled from /proc, and how much an output folder held, for the benchmarks that time
commands as a user runs them (hpc.bench.convert)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.05


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while walked (a converter's temporary file)
                pass
    return total


@dataclass
class Sample:
    """One run of one command."""

    seconds: float
    rc: int
    peak_rss: int
    """Bytes: the largest sum of resident sets over the command's process tree, or the kernel's
    high-water mark of its largest process if that is higher (a peak between two samples)."""
    peak_anon: int
    """Bytes: the same sum over anonymous memory only (no page-cache pages of mapped files)."""
    peak_pss: int
    """Bytes: the largest sum of proportional set sizes over the tree (each shared page counted
    once in all), or the largest process's high-water mark if that is higher: the goal's measure."""
    peak_tree_bytes: int
    """The most the watched output folder held while the command ran (temporary files included)."""
    out_bytes: int
    largest_process_rss: int
    """Bytes: the kernel's high-water mark of the command's largest single process."""
    log: str
    tool_seconds: float | None = None
    """What the command says it took, interpreter start and imports left out (when it says)."""


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return kids


def _memory(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous RSS, PSS) in bytes of `pid` and every process below it. RSS sums count a
    page shared by several of the processes (torch's libraries, a forked parent's heap, the page
    cache of a file they all map) once per process; PSS splits it among them: the tree's memory."""
    rss = anon = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        todo += _children(p)
    return rss, anon, pss


def measure(argv: Sequence[str], *, env: dict[str, str], log: Path, watch: Path | None, timeout_s: float,
            cwd: Path | None = None, read_seconds: Callable[[str], float | None] | None = None) -> Sample:
    """Run `argv` to the end, sampling its process tree's memory and `watch`'s size meanwhile;
    `read_seconds` finds in its whole output the seconds the command reports of itself."""
    peak = {"rss": 0, "anon": 0, "pss": 0, "tree": 0}
    stop = threading.Event()

    def sizes() -> None:  # walking a folder is slower than reading /proc: its own, slower loop
        while not stop.wait(0.5):
            if watch is not None and watch.exists():
                peak["tree"] = max(peak["tree"], tree_bytes(watch))

    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        walker = threading.Thread(target=sizes, daemon=True)
        walker.start()
        deadline = time.monotonic() + timeout_s
        while True:
            # wait4, not Popen.wait: only wait4 hands back this child's own rusage.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, anon, pss = _memory(proc.pid)
            for key, now in (("rss", rss), ("anon", anon), ("pss", pss)):
                peak[key] = max(peak[key], now)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its worker processes too
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        walker.join()
    out_bytes = tree_bytes(watch) if watch is not None and watch.exists() else 0
    text = log.read_text()
    return Sample(seconds=seconds, rc=proc.returncode, peak_rss=max(peak["rss"], usage.ru_maxrss * 1024),
                  peak_anon=peak["anon"], peak_pss=max(peak["pss"], usage.ru_maxrss * 1024),
                  peak_tree_bytes=max(peak["tree"], out_bytes), out_bytes=out_bytes,
                  largest_process_rss=usage.ru_maxrss * 1024, log=text[-2000:],
                  tool_seconds=read_seconds(text) if read_seconds else None)
