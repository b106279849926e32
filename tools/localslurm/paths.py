"""Names, constants and the state folder layout of the local SLURM test cluster.

Everything the cluster writes lives under one state folder (``$HPC_SLURM_STATE``); `Paths`
names each file and folder in it so no other module builds a path by hand, and `daemons`
lists every process `up` starts and `down` stops, with its PID file and log.  The marker
(``HPC_SLURM_CLUSTER=<state folder>``) that `up` puts in each daemon's environment is how
`down` proves a PID is ours before signalling it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

CLUSTER_NAME = "hpctest"
HPC_CLUSTER = "testcluster"
PARTITION = "debug"
# Seconds a preempted job in the `low` partition gets to save between the signal and its requeue.
GRACE_TIME_S = 30
NODES = ("n1", "n2", "n3", "n4")
NODE_CPUS = 2
NODE_MEMORY_MB = 4000
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
MARKER_VAR = "HPC_SLURM_CLUSTER"
DEFAULT_STATE = "/var/tmp/hpc-slurm"
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_PIDFILE = MUNGE_RUN_DIR / "munged.pid"


class ClusterError(RuntimeError):
    """A step failed; the message says what and where to look."""


@dataclass(frozen=True)
class Paths:
    """Every file and folder in the state folder `root` (see tools/slurm_cluster.py for the layout)."""

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
    def preempt_conf(self) -> Path:
        """Included by slurm.conf: whether a preempted job gets its own warning signal (see conf.py)."""
        return self.etc / "preempt.conf"

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
