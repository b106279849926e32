"""Processes: PID files, PID checks, running commands and waiting for daemons.

A PID read from a PID file is trusted only when /proc says the process is alive, runs the
expected binary and (for `our_pid`) carries the state folder's marker in its environment,
so a stale PID file can never make `down` signal somebody else's process.  `run` is the one
seam for short commands (it captures output and never raises on a non-zero exit);
`run_detaching` starts a daemon that forks into the background; `wait_for` polls with
back-off and fails with the tail of the daemon's log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from localslurm.paths import MARKER_VAR, ClusterError, Daemon, Paths

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  (no log at {path}: {exc.strerror})"
    return "\n".join(f"  | {line}" for line in text[-lines:]) or f"  ({path} is empty)"


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (PID 1 may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def pid_is(pid: int, binary: str) -> bool:
    """Does /proc/PID/cmdline name `binary`?"""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    # daemons may retitle themselves, e.g. "slurmstepd: [123.batch]"
    return os.path.basename(argv0.split()[0].rstrip(":") if argv0.strip() else "") == binary


def pid_has_marker(pid: int, mark: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return mark.encode() in environ


def our_pid(daemon: Daemon, mark: str) -> int | None:
    """The PID of `daemon` if it is alive, runs the right binary and was started by us."""
    pid = read_pid(daemon.pidfile)
    if pid and pid_alive(pid) and pid_is(pid, daemon.binary) and pid_has_marker(pid, mark):
        return pid
    return None


def running_pid(daemon: Daemon) -> int | None:
    """The PID of `daemon` if alive with the right binary (no marker check: works as non-root)."""
    pid = read_pid(daemon.pidfile)
    if pid and pid_alive(pid) and pid_is(pid, daemon.binary):
        return pid
    return None


def daemon_env(paths: Paths) -> dict[str, str]:
    env = client_env(paths)
    env[MARKER_VAR] = str(paths.root)
    return env


def client_env(paths: Paths) -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(paths.slurm_conf)
    return env


def run(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60.0,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, never raise on a non-zero exit."""
    try:
        return subprocess.run(list(argv), env=env, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(list(argv), 124, exc.stdout or "", f"timed out after {timeout:.0f} s")
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", str(exc))


def _normal_priority() -> None:
    """Daemons (and so every job they start) run at nice 0 even when `up` is called from a niced
    shell: tools/test.sh runs the tests niced beside SLURM jobs whose timing must hold."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:  # only root may lower a nice value; the cluster needs root anyway
        pass


def run_detaching(argv: Sequence[str], env: dict[str, str], log: Path) -> None:
    """Run a daemon that forks into the background; fail if the launcher itself fails."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S, check=False,
                                  preexec_fn=_normal_priority)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"`{' '.join(argv)}` did not detach within {START_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` exited with {proc.returncode}; see {log}:\n{log_tail(log)}")


def wait_for(what: str, check: Callable[[], bool], log: Path | None, timeout: float = START_TIMEOUT_S,
             interval: float = 0.05) -> None:
    """Poll `check()` until true; fail loudly with the tail of `log` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            tail = f"\nlast lines of {log}:\n{log_tail(log)}" if log else ""
            raise ClusterError(f"{what} did not happen within {timeout:.0f} s{tail}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def wait_for_pidfile(daemon: Daemon, mark: str) -> int:
    found: list[int] = []

    def check() -> bool:
        pid = our_pid(daemon, mark)
        if pid:
            found.append(pid)
        return pid is not None

    wait_for(f"{daemon.name} writing its PID file {daemon.pidfile}", check, daemon.log)
    return found[-1]


def stop_pid(pid: int, name: str) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT_S, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    print(f"  {name} (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; sending SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
