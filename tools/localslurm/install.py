"""Installing SLURM, munge and MariaDB from apt, only when a binary is missing.

`up` calls `install(quiet=True)` first, so a fresh machine needs one command; on a machine
that has everything, nothing touches apt.  Managing packages and system daemons needs root,
which `require_root` checks with a message naming the action.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from localslurm.paths import ClusterError

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")


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
