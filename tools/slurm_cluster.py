#!/usr/bin/env python3
"""Bring up, check and stop a real local SLURM test cluster on this one machine.

Usage (as root; ``tools/slurm-cluster`` is a thin wrapper around this file)::

    tools/slurm-cluster install   # apt-get the packages, only if a binary is missing
    tools/slurm-cluster up        # install if needed, then start what is not running
    tools/slurm-cluster status    # short table; exit 0 only when the cluster is healthy
    tools/slurm-cluster down      # stop what `up` started (verified by PID), nothing else
    eval "$(tools/slurm-cluster env)"   # point sinfo/srun/sbatch/sacct at the cluster

What runs: munge (reused when one already works), MariaDB + slurmdbd (so ``sacct``
works), slurmctld and four slurmd daemons ``n1``..``n4`` on this host (SLURM's
multiple-slurmd support: each node has its own port, spool folder and PID file).
Cluster name ``hpctest``, one partition ``debug`` with all four nodes.

Everything the cluster writes lives in one state folder, ``$HPC_SLURM_STATE``
(default ``/var/tmp/hpc-slurm``)::

    etc/slurm.conf, etc/slurmdbd.conf (0600), etc/hosts, etc/dbpass (0600)
    ports            ports in use (key=value), chosen on a fresh start
    first_job_id     FirstJobId chosen from the clock when the state was created
    env.sh           `export SLURM_CONF=... HPC_CLUSTER=testcluster` (written by `up`)
    state/           slurmctld StateSaveLocation
    spool/<node>/    slurmd spool folders
    scratch/<node>/  node-local scratch folders (mode 1777)
    logs/            daemon logs (slurmctld.log, slurmd-n1.log, slurmdbd.log, mariadb.log ...)
    pids/            slurmctld.pid, slurmd-<node>.pid, slurmdbd.pid
    run/             MariaDB socket and PID file (owned by mysql)
    mysql/           MariaDB data folder (owned by mysql)

The machine's /etc/slurm and /etc/hosts are never modified.

Why it is built this way:

* Private mount namespaces.  Jobs rendezvous on a node name (e.g. ``MASTER_ADDR=n1``),
  so n1..n4 must resolve inside jobs.  Rather than editing the machine's /etc/hosts,
  each slurmd starts in its own mount namespace (``unshare --mount --propagation
  private``) in which ``STATE/etc/hosts`` is bind-mounted over /etc/hosts; the job
  steps it forks inherit that view.  All nodes map to 127.0.0.1: they share one
  network stack (and /tmp).
* ``ProctrackType=proctrack/pgid`` and ``TaskPlugin=task/none``: there is no
  systemd/cgroup delegation here, and four slurmd on one host cannot each own a
  cgroup tree; process groups are enough to signal and clean up job steps.
* ``SlurmdParameters=config_overrides``: four nodes declaring 2 CPUs each on a
  2-core host would otherwise be drained for a hardware mismatch.
  ``OverSubscribe=FORCE:4`` lets several small jobs share a node.
* Fast requeue for tests: ``AuthInfo=cred_expire=5``, ``sched_interval=2``,
  ``bf_interval=2``, ``KillWait=5``.
* ``FirstJobId`` is taken from the clock on a fresh state folder, so job ids (and
  result folders keyed by them) never collide with those of an earlier cluster.
* Stopping is by PID only: a PID from a PID file is signalled only when
  /proc/PID/cmdline names the expected binary AND /proc/PID/environ holds the marker
  ``HPC_SLURM_CLUSTER=<state folder>`` that `up` set when starting it.  A munged that
  was already running is reused and never stopped.

Ports (defaults; override with the environment variable in brackets):
slurmctld 16817 [HPC_SLURM_CTLD_PORT], slurmdbd 16819 [HPC_SLURM_DBD_PORT],
MariaDB 16306 [HPC_SLURM_DB_PORT], slurmd 17001-17004 [HPC_SLURM_SLURMD_PORT, first
of four].  A default that is busy is replaced by the next free port; an explicitly
requested port that is busy is an error.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "hpctest"
HPC_CLUSTER = "testcluster"
PARTITION = "debug"
NODES = ("n1", "n2", "n3", "n4")
NODE_CPUS = 2
NODE_MEMORY_MB = 4000
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
MARKER_VAR = "HPC_SLURM_CLUSTER"
DEFAULT_STATE = "/var/tmp/hpc-slurm"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")
# name in the ports file -> (environment override, default)
PORT_DEFAULTS: dict[str, tuple[str, int]] = {
    "slurmctld": ("HPC_SLURM_CTLD_PORT", 16817),
    "slurmdbd": ("HPC_SLURM_DBD_PORT", 16819),
    "mariadb": ("HPC_SLURM_DB_PORT", 16306),
    "slurmd": ("HPC_SLURM_SLURMD_PORT", 17001),
}
HEALTHY_NODE_STATES = {"idle", "allocated", "mixed", "completing"}
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PIDFILE = MUNGE_RUN_DIR / "munged.pid"


class ClusterError(RuntimeError):
    """A step failed; the message says what and where to look."""


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        return self.etc / "slurmdbd.conf"

    @property
    def hosts(self) -> Path:
        return self.etc / "hosts"

    @property
    def dbpass(self) -> Path:
        return self.etc / "dbpass"

    @property
    def ports(self) -> Path:
        return self.root / "ports"

    @property
    def first_job_id(self) -> Path:
        return self.root / "first_job_id"

    @property
    def env_sh(self) -> Path:
        return self.root / "env.sh"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def mysql(self) -> Path:
        return self.root / "mysql"

    @property
    def db_socket(self) -> Path:
        return self.run / "mysqld.sock"

    def spool(self, node: str) -> Path:
        return self.root / "spool" / node

    def scratch(self, node: str) -> Path:
        return self.root / "scratch" / node

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


@dataclass(frozen=True)
class Daemon:
    """A process `up` starts and `down` stops: its binary name and PID file."""

    name: str
    binary: str
    pidfile: Path
    log: Path


def state_paths() -> Paths:
    return Paths(Path(os.environ.get("HPC_SLURM_STATE", DEFAULT_STATE)).absolute())


def marker(paths: Paths) -> str:
    return f"{MARKER_VAR}={paths.root}"


def daemons(paths: Paths) -> dict[str, Daemon]:
    """All daemons in start order (munged only counts when we started it)."""
    out = {
        "munged": Daemon("munged", "munged", MUNGE_PIDFILE, Path("/var/log/munge/munged.log")),
        "mariadbd": Daemon("mariadbd", "mariadbd", paths.run / "mariadbd.pid", paths.log("mariadb")),
        "slurmdbd": Daemon("slurmdbd", "slurmdbd", paths.pids / "slurmdbd.pid", paths.log("slurmdbd")),
        "slurmctld": Daemon("slurmctld", "slurmctld", paths.pids / "slurmctld.pid", paths.log("slurmctld")),
    }
    for node in NODES:
        out[f"slurmd-{node}"] = Daemon(
            f"slurmd-{node}", "slurmd", paths.pids / f"slurmd-{node}.pid", paths.log(f"slurmd-{node}")
        )
    return out


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


# --------------------------------------------------------------------------- processes


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


def run_detaching(argv: Sequence[str], env: dict[str, str], log: Path) -> None:
    """Run a daemon that forks into the background; fail if the launcher itself fails."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S, check=False)
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


# --------------------------------------------------------------------------- install


def missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in REQUIRED_BINARIES if shutil.which(b, path=path) is None]


def install(quiet: bool = False) -> None:
    missing = missing_binaries()
    if not missing:
        if not quiet:
            print("SLURM, munge and MariaDB are installed")
        return
    require_root("install")
    print(f"installing {' '.join(PACKAGES)} (missing: {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise ClusterError(f"`{' '.join(argv)}` failed")
    still = missing_binaries()
    if still:
        raise ClusterError(f"still missing after apt-get install: {' '.join(still)}")


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise ClusterError(f"`{action}` must run as root (it manages system daemons)")


# --------------------------------------------------------------------------- ports & config


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def read_kv(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def read_ports(paths: Paths) -> dict[str, int]:
    stored = read_kv(paths.ports)
    out: dict[str, int] = {}
    for name, (_, default) in PORT_DEFAULTS.items():
        try:
            out[name] = int(stored[name])
        except (KeyError, ValueError):
            out[name] = default
    return out


def pick_port(name: str, width: int, taken: set[int], previous: int | None) -> int:
    """An explicit env port must be free; otherwise previous, default, then the next free run."""
    env_var, default = PORT_DEFAULTS[name]

    def usable(start: int) -> bool:
        block = range(start, start + width)
        return all(p not in taken and port_free(p) for p in block)

    if os.environ.get(env_var):
        port = int(os.environ[env_var])
        if not usable(port):
            span = f"ports {port}-{port + width - 1} are" if width > 1 else f"port {port} is"
            raise ClusterError(f"{env_var}={port}: {span} already in use; pick another or unset {env_var}")
        return port
    for start in [p for p in (previous, default) if p] + list(range(default + width, default + 400, width)):
        if usable(start):
            return start
    raise ClusterError(f"no free port for {name} near {default}; set {env_var}")


def choose_ports(paths: Paths) -> dict[str, int]:
    previous = read_kv(paths.ports)
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name in PORT_DEFAULTS:
        width = len(NODES) if name == "slurmd" else 1
        prev = int(previous[name]) if previous.get(name, "").isdigit() else None
        ports[name] = pick_port(name, width, taken, prev)
        taken.update(range(ports[name], ports[name] + width))
    text = "".join(f"{k}={v}\n" for k, v in ports.items())
    text += f"slurmd_range={ports['slurmd']}-{ports['slurmd'] + len(NODES) - 1}\n"
    paths.ports.write_text(text)
    return ports


def first_job_id(paths: Paths) -> int:
    """From the clock on a fresh state folder (so ids never repeat a wiped cluster's)."""
    fresh = not any(paths.state.glob("job_state*"))
    stored = read_pid(paths.first_job_id)
    if stored and not fresh:
        return stored
    value = int(time.time()) % 1_000_000 * 10 + 1000
    paths.first_job_id.write_text(f"{value}\n")
    return value


def slurm_conf_text(paths: Paths, ports: dict[str, int], job_id: int) -> str:
    host = short_hostname()
    last = ports["slurmd"] + len(NODES) - 1
    nodes = f"n[1-{len(NODES)}]"
    return f"""\
# Generated by tools/slurm_cluster.py on a fresh `up`; edits are overwritten.
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={paths.state}
SlurmdSpoolDir={paths.root}/spool/%n
SlurmctldPidFile={paths.pids}/slurmctld.pid
SlurmdPidFile={paths.pids}/slurmd-%n.pid
SlurmctldLogFile={paths.logs}/slurmctld.log
SlurmdLogFile={paths.logs}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
KillWait=5
ReturnToService=2
MailProg=/bin/true
MinJobAge=300
InactiveLimit=0
MessageTimeout=20
FirstJobId={job_id}
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port=[{ports['slurmd']}-{last}] \
CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName={PARTITION} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def slurmdbd_conf_text(paths: Paths, ports: dict[str, int], password: str) -> str:
    return f"""\
# Generated by tools/slurm_cluster.py on a fresh `up`; edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={paths.pids}/slurmdbd.pid
LogFile={paths.logs}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser={DB_USER}
StoragePass={password}
StorageLoc={DB_NAME}
"""


def hosts_text() -> str:
    """Node names, this host's short name and localhost -> 127.0.0.1, then the machine's lines."""
    try:
        original = Path("/etc/hosts").read_text()
    except OSError:
        original = ""
    ours = f"127.0.0.1 localhost {short_hostname()} {' '.join(NODES)}\n"
    return f"# Generated by tools/slurm_cluster.py; bind-mounted over /etc/hosts for each slurmd.\n{ours}\n{original}"


def db_password(paths: Paths) -> str:
    if not paths.dbpass.exists():
        write_private(paths.dbpass, secrets.token_hex(16) + "\n")
    return paths.dbpass.read_text().strip()


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def make_dirs(paths: Paths) -> None:
    for folder, mode in ((paths.root, 0o755), (paths.etc, 0o755), (paths.state, 0o700),
                         (paths.logs, 0o755), (paths.pids, 0o755), (paths.run, 0o755),
                         (paths.root / "spool", 0o755), (paths.root / "scratch", 0o755)):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, mode)
    for node in NODES:
        paths.spool(node).mkdir(exist_ok=True)
        paths.scratch(node).mkdir(exist_ok=True)
        os.chmod(paths.scratch(node), 0o1777)
    shutil.chown(paths.run, "mysql", "mysql")  # MariaDB's socket and PID file
    check_traversable(paths.root)


def check_traversable(folder: Path) -> None:
    """MariaDB runs as mysql and must reach STATE/run and STATE/mysql."""
    for parent in [folder, *folder.parents]:
        if not os.stat(parent).st_mode & 0o001:
            raise ClusterError(f"{parent} is not searchable by other users, so MariaDB (user mysql) cannot "
                               f"reach {folder}; pick another HPC_SLURM_STATE or chmod o+x {parent}")


def write_configs(paths: Paths) -> dict[str, int]:
    ports = choose_ports(paths)
    paths.slurm_conf.write_text(slurm_conf_text(paths, ports, first_job_id(paths)))
    write_private(paths.slurmdbd_conf, slurmdbd_conf_text(paths, ports, db_password(paths)))
    paths.hosts.write_text(hosts_text())
    return ports


# --------------------------------------------------------------------------- munge


def munge_works() -> bool:
    cred = run(["munge", "-n"], timeout=10)
    if cred.returncode != 0:
        return False
    return run(["unmunge"], stdin=cred.stdout, timeout=10).returncode == 0


def start_munge(paths: Paths) -> str:
    if munge_works():
        pid = our_pid(daemons(paths)["munged"], marker(paths))
        return f"munge: running (pid {pid}, started by us)" if pid else "munge: reusing the running munged"
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", str(MUNGE_RUN_DIR)], check=True)
    if not MUNGE_KEY.exists():
        result = run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
        if result.returncode != 0:
            raise ClusterError(f"mungekey --create failed: {result.stderr.strip()}")
    daemon = daemons(paths)["munged"]
    MUNGE_PIDFILE.unlink(missing_ok=True)
    run_detaching(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], daemon_env(paths), paths.log("munged-launch"))
    pid = wait_for_pidfile(daemon, marker(paths))
    wait_for("munge -n | unmunge working", munge_works, daemon.log, timeout=20, interval=0.1)
    return f"munge: started munged (pid {pid})"


# --------------------------------------------------------------------------- mariadb


def mariadb(paths: Paths, sql: str) -> subprocess.CompletedProcess[str]:
    return run(["mariadb", f"--socket={paths.db_socket}", "-u", "root", "--batch", "-e", sql], timeout=30)


def init_mariadb(paths: Paths) -> None:
    if (paths.mysql / "mysql").is_dir():
        return
    paths.mysql.mkdir(exist_ok=True)
    shutil.chown(paths.mysql, "mysql", "mysql")
    log = paths.log("mariadb-install")
    with open(log, "ab") as out:
        rc = subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={paths.mysql}",
                             "--auth-root-authentication-method=socket", "--skip-test-db"],
                            stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        shutil.rmtree(paths.mysql / "mysql", ignore_errors=True)
        raise ClusterError(f"mariadb-install-db failed ({rc}); see {log}:\n{log_tail(log)}")


def start_mariadb(paths: Paths, ports: dict[str, int]) -> str:
    daemon = daemons(paths)["mariadbd"]
    pid = our_pid(daemon, marker(paths))
    if pid is None:
        init_mariadb(paths)
        daemon.pidfile.unlink(missing_ok=True)
        argv = ["mariadbd", "--user=mysql", f"--datadir={paths.mysql}", f"--socket={paths.db_socket}",
                f"--port={ports['mariadb']}", f"--pid-file={daemon.pidfile}", "--skip-networking=0",
                "--bind-address=127.0.0.1", "--skip-name-resolve", f"--log-error={daemon.log}",
                "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900",
                "--innodb-log-file-size=64M"]
        with open(paths.log("mariadb-stdout"), "ab") as out:
            proc = subprocess.Popen(argv, env=daemon_env(paths), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("MariaDB answering `select 1`",
                 lambda: proc.poll() is None and mariadb(paths, "select 1").returncode == 0
                 or _raise_if_exited(proc, daemon), daemon.log)
        pid = wait_for_pidfile(daemon, marker(paths))
        what = f"mariadb: started (pid {pid}, port {ports['mariadb']})"
    else:
        what = f"mariadb: running (pid {pid})"
    setup_database(paths)
    return what


def _raise_if_exited(proc: subprocess.Popen[bytes], daemon: Daemon) -> bool:
    if proc.poll() is not None:
        raise ClusterError(f"mariadbd exited with {proc.returncode}; see {daemon.log}:\n{log_tail(daemon.log)}")
    return False


def setup_database(paths: Paths) -> None:
    password = db_password(paths)
    statements = [f"CREATE DATABASE IF NOT EXISTS {DB_NAME}"]
    for host in ("127.0.0.1", "localhost"):
        user = f"'{DB_USER}'@'{host}'"
        statements += [f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY '{password}'",
                       f"ALTER USER {user} IDENTIFIED BY '{password}'",
                       f"GRANT ALL ON {DB_NAME}.* TO {user}"]
    result = mariadb(paths, "; ".join(statements))
    if result.returncode != 0:
        raise ClusterError(f"setting up database {DB_NAME} failed: {result.stderr.strip()}")


# --------------------------------------------------------------------------- slurm daemons


def start_slurmdbd(paths: Paths) -> str:
    daemon = daemons(paths)["slurmdbd"]
    pid = our_pid(daemon, marker(paths))
    if pid is None:
        daemon.pidfile.unlink(missing_ok=True)
        run_detaching(["slurmdbd"], daemon_env(paths), paths.log("slurmdbd-launch"))
        pid = wait_for_pidfile(daemon, marker(paths))
        what = f"slurmdbd: started (pid {pid})"
    else:
        what = f"slurmdbd: running (pid {pid})"
    wait_for("slurmdbd answering `sacctmgr list cluster`", lambda: accounting_clusters(paths) is not None,
             daemon.log, interval=0.1)
    ensure_accounting_cluster(paths)
    return what


def accounting_clusters(paths: Paths) -> list[str] | None:
    result = run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], env=client_env(paths), timeout=30)
    if result.returncode != 0 or "error" in result.stderr.lower():
        return None
    return result.stdout.split()


def ensure_accounting_cluster(paths: Paths) -> None:
    if CLUSTER_NAME in (accounting_clusters(paths) or []):
        return
    result = run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=client_env(paths), timeout=30)
    if result.returncode != 0 and "already exists" not in (result.stdout + result.stderr).lower():
        raise ClusterError(f"sacctmgr add cluster {CLUSTER_NAME} failed: {(result.stdout + result.stderr).strip()}")


def ping_up(paths: Paths) -> bool:
    result = run(["scontrol", "ping"], env=client_env(paths), timeout=30)
    return result.returncode == 0 and " is UP" in result.stdout


def start_slurmctld(paths: Paths) -> str:
    daemon = daemons(paths)["slurmctld"]
    pid = our_pid(daemon, marker(paths))
    if pid is not None:
        return f"slurmctld: running (pid {pid})"
    daemon.pidfile.unlink(missing_ok=True)
    run_detaching(["slurmctld", "-f", str(paths.slurm_conf)], daemon_env(paths), paths.log("slurmctld-launch"))
    pid = wait_for_pidfile(daemon, marker(paths))
    wait_for("`scontrol ping` reporting UP", lambda: ping_up(paths), daemon.log)
    return f"slurmctld: started (pid {pid})"


def slurmd_argv(paths: Paths, node: str) -> list[str]:
    """slurmd in a private mount namespace that sees STATE/etc/hosts as /etc/hosts."""
    script = 'mount --bind "$1" /etc/hosts && exec "$2" -f "$3" -N "$4"'
    slurmd = shutil.which("slurmd", path=os.environ.get("PATH", "") + ":/usr/sbin") or "/usr/sbin/slurmd"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(paths.hosts), slurmd, str(paths.slurm_conf), node]


def start_slurmd(paths: Paths, node: str) -> str | None:
    daemon = daemons(paths)[f"slurmd-{node}"]
    if our_pid(daemon, marker(paths)) is not None:
        return None
    daemon.pidfile.unlink(missing_ok=True)
    run_detaching(slurmd_argv(paths, node), daemon_env(paths), paths.log(f"slurmd-{node}-launch"))
    return node


def node_states(paths: Paths) -> dict[str, str]:
    result = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=client_env(paths), timeout=30)
    if result.returncode != 0:
        return {}
    states: dict[str, str] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def node_ok(state: str) -> bool:
    return state.rstrip("+") in HEALTHY_NODE_STATES


def nodes_ok(paths: Paths) -> bool:
    states = node_states(paths)
    return all(node_ok(states.get(node, "missing")) for node in NODES)


def resume_nodes(paths: Paths) -> list[str]:
    """Nodes left down/drained by an earlier run come back once their slurmd is up."""
    stuck = [n for n, s in node_states(paths).items()
             if n in NODES and s.rstrip("*+~#$@%!^-").startswith(("down", "drain"))]
    if stuck:
        run(["scontrol", "update", f"NodeName={','.join(stuck)}", "State=RESUME"], env=client_env(paths))
    return stuck


def start_slurmds(paths: Paths) -> str:
    started = [n for n in NODES if start_slurmd(paths, n)]
    for node in started:
        wait_for_pidfile(daemons(paths)[f"slurmd-{node}"], marker(paths))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not nodes_ok(paths):
        resumed = resume_nodes(paths)
        if time.monotonic() > deadline:
            bad = {n: s for n, s in node_states(paths).items() if not node_ok(s)}
            logs = "\n".join(f"last lines of {paths.log('slurmd-' + n)}:\n{log_tail(paths.log('slurmd-' + n), 10)}"
                             for n in bad)
            raise ClusterError(f"nodes not idle after {START_TIMEOUT_S:.0f} s: {bad}; resumed {resumed}\n{logs}")
        time.sleep(0.1)
    return f"slurmd: started {' '.join(started)}" if started else "slurmd: all 4 running"


def sacct_works(paths: Paths) -> bool:
    result = run(["sacct", "-n", "-X", "-a", "-S", "now-1minutes", "-o", "JobID"], env=client_env(paths), timeout=30)
    return result.returncode == 0 and "error" not in result.stderr.lower()


def write_env_sh(paths: Paths) -> None:
    paths.env_sh.write_text(env_lines(paths))


def env_lines(paths: Paths) -> str:
    return f"export SLURM_CONF={paths.slurm_conf}\nexport HPC_CLUSTER={HPC_CLUSTER}\n"


# --------------------------------------------------------------------------- health


@dataclass
class Row:
    component: str
    ok: bool
    state: str
    detail: str


def hosts_in_namespace(pid: int) -> bool:
    """Does the slurmd see our hosts file (n1 resolvable inside jobs)?  Unknown (True) when not root."""
    try:
        text = Path(f"/proc/{pid}/root/etc/hosts").read_text()
    except PermissionError:
        return True
    except OSError:
        return False
    return any(line.split()[:1] == ["127.0.0.1"] and "n1" in line.split() for line in text.splitlines())


def health(paths: Paths) -> list[Row]:
    rows: list[Row] = []
    ds = daemons(paths)
    munge_ok = munge_works()
    mpid = running_pid(ds["munged"])
    owner = "started by us" if mpid and pid_has_marker(mpid, marker(paths)) else "external"
    rows.append(Row("munge", munge_ok, "ok" if munge_ok else "down", owner if munge_ok else "munge -n | unmunge fails"))
    for name in ("mariadbd", "slurmdbd", "slurmctld"):
        pid = running_pid(ds[name])
        if pid is None and not os.access(ds[name].pidfile, os.R_OK) and ds[name].pidfile.exists():
            rows.append(Row(name, True, "?", f"cannot read {ds[name].pidfile} (not root)"))
            continue
        rows.append(Row(name, pid is not None, "running" if pid else "down", f"pid {pid}" if pid else str(ds[name].pidfile)))
    if rows[-1].ok:
        up = ping_up(paths)
        rows.append(Row("scontrol ping", up, "UP" if up else "DOWN", ""))
    states = node_states(paths) if rows[-1].ok else {}
    for node in NODES:
        pid = running_pid(ds[f"slurmd-{node}"])
        state = states.get(node, "?")
        ns = pid is not None and hosts_in_namespace(pid)
        ok = pid is not None and node_ok(state) and ns
        detail = f"slurmd pid {pid}" + ("" if ns else ", /etc/hosts lacks n1 in its namespace") if pid else "slurmd down"
        rows.append(Row(node, ok, state, detail))
    dbd_ok = next(r.ok for r in rows if r.component == "slurmdbd")
    acct = dbd_ok and sacct_works(paths)
    rows.append(Row("sacct", acct, "ok" if acct else "failing", f"cluster {CLUSTER_NAME}"))
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.component) for r in rows)
    swidth = max(len(r.state) for r in rows)
    for r in rows:
        mark = "ok " if r.ok else "BAD"
        print(f"  {mark} {r.component:<{width}}  {r.state:<{swidth}}  {r.detail}".rstrip())


def healthy(rows: list[Row]) -> bool:
    return all(r.ok for r in rows)


# --------------------------------------------------------------------------- commands


@contextmanager
def state_lock(paths: Paths) -> Iterator[None]:
    """One `up`/`down` at a time per state folder."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `up`/`down` on {paths.root} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def any_ours_running(paths: Paths) -> bool:
    mark = marker(paths)
    return any(our_pid(d, mark) for name, d in daemons(paths).items() if name != "munged")


def cmd_up(paths: Paths) -> int:
    require_root("up")
    t0 = time.monotonic()
    install(quiet=True)
    with state_lock(paths):
        make_dirs(paths)
        if paths.slurm_conf.exists() and healthy(health(paths)):
            write_env_sh(paths)
            print(f"cluster already up and healthy (checked in {time.monotonic() - t0:.1f} s); "
                  f'eval "$(tools/slurm-cluster env)" or source {paths.env_sh}')
            return 0
        if any_ours_running(paths):
            ports = read_ports(paths)
            print(f"cluster is half up; starting what is missing (ports from {paths.ports})")
        else:
            ports = write_configs(paths)
        steps = (lambda: start_munge(paths), lambda: start_mariadb(paths, ports), lambda: start_slurmdbd(paths),
                 lambda: start_slurmctld(paths), lambda: start_slurmds(paths))
        for step in steps:
            print(f"  {step()}", flush=True)
        if not sacct_works(paths):
            raise ClusterError(f"sacct does not work; see {paths.log('slurmdbd')}:\n{log_tail(paths.log('slurmdbd'))}")
        write_env_sh(paths)
    states = node_states(paths)
    counts = {st: sum(1 for s in states.values() if s == st) for st in sorted(set(states.values()))}
    if len(counts) == 1:
        summary = f"{len(states)} nodes {next(iter(counts))}"
    else:
        summary = f"{len(states)} nodes: " + ", ".join(f"{n} {st}" for st, n in counts.items())
    print(f"cluster up in {time.monotonic() - t0:.1f} s ({summary}, accounting on)")
    print(f'use it with: eval "$(tools/slurm-cluster env)"   (or: source {paths.env_sh})')
    return 0


def cmd_status(paths: Paths) -> int:
    if not paths.slurm_conf.exists():
        print(f"no cluster configured in {paths.root} (run: tools/slurm-cluster up)")
        return 1
    rows = health(paths)
    ok = healthy(rows)
    print(f"cluster {CLUSTER_NAME} ({paths.root}): {'healthy' if ok else 'NOT healthy'}")
    print_table(rows)
    return 0 if ok else 1


def cancel_jobs(paths: Paths) -> None:
    result = run(["squeue", "-h", "-o", "%A"], env=client_env(paths), timeout=30)
    jobs = result.stdout.split() if result.returncode == 0 else []
    if not jobs:
        return
    print(f"  cancelling {len(jobs)} job(s)")
    run(["scancel", "--full", *jobs], env=client_env(paths), timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = run(["squeue", "-h", "-t", "all", "-o", "%T"], env=client_env(paths), timeout=30).stdout.split()
        if not any(s in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING", "REQUEUED") for s in left):
            return
        time.sleep(0.5)


def stray_slurmstepds(mark: str) -> list[int]:
    """Job step daemons forked by our slurmd (they inherit its environment marker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid_is(pid, "slurmstepd") and pid_alive(pid) and pid_has_marker(pid, mark):
                pids.append(pid)
    return pids


def cmd_down(paths: Paths) -> int:
    require_root("down")
    if not paths.root.exists():
        print(f"cluster is down (no state folder {paths.root})")
        return 0
    mark = marker(paths)
    with state_lock(paths):
        ds = daemons(paths)
        if our_pid(ds["slurmctld"], mark):
            cancel_jobs(paths)
        stopped = []
        order = [f"slurmd-{n}" for n in NODES] + ["slurmctld", "slurmdbd", "mariadbd", "munged"]
        for name in order:
            pid = our_pid(ds[name], mark)
            if pid:
                stop_pid(pid, name)
                stopped.append(name)
                if name != "munged":  # munged removes its own PID file in /run/munge
                    ds[name].pidfile.unlink(missing_ok=True)
            if name == "slurmd-" + NODES[-1]:
                for step in stray_slurmstepds(mark):
                    stop_pid(step, "slurmstepd")
        if stopped:
            print(f"stopped {' '.join(stopped)}")
        else:
            print("cluster is already down (nothing started by us is running)")
        if running_pid(ds["munged"]) and "munged" not in stopped:
            print("  left munged running (it was not started by this tool)")
    return 0


def cmd_env(paths: Paths) -> int:
    sys.stdout.write(env_lines(paths))
    return 0


def cmd_install(paths: Paths) -> int:
    install()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slurm-cluster", description="Local 4-node SLURM test cluster (state in $HPC_SLURM_STATE, "
        f"default {DEFAULT_STATE}).", epilog="See the module docstring of tools/slurm_cluster.py for details.")
    parser.add_argument("command", choices=("install", "up", "status", "down", "env"))
    args = parser.parse_args(argv)
    commands = {"install": cmd_install, "up": cmd_up, "status": cmd_status, "down": cmd_down, "env": cmd_env}
    try:
        return commands[args.command](state_paths())
    except ClusterError as exc:
        print(f"slurm-cluster {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
