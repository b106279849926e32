"""The state folder's contents: its folders, the ports file, the first job id, the database
password and the config files.

`make_dirs` creates the layout `localslurm.paths.Paths` names, with the modes MariaDB (user
mysql) and jobs (node-local scratch, mode 1777) need.  On a fresh `up`, `write_configs`
chooses the ports (an explicit environment port must be free; a busy default moves to the
next free one), takes the first job id from the clock, and writes the text that the pure
functions in `localslurm.conf` produce; a half-up cluster reuses the stored ports instead.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from localslurm.conf import env_lines, hosts_text, preempt_conf_text, slurm_conf_text, slurmdbd_conf_text
from localslurm.paths import NODES, ClusterError, Paths, short_hostname
from localslurm.processes import read_pid

# name in the ports file -> (environment override, default)
PORT_DEFAULTS: dict[str, tuple[str, int]] = {
    "slurmctld": ("HPC_SLURM_CTLD_PORT", 16817),
    "slurmdbd": ("HPC_SLURM_DBD_PORT", 16819),
    "mariadb": ("HPC_SLURM_DB_PORT", 16306),
    "slurmd": ("HPC_SLURM_SLURMD_PORT", 17001),
}


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
    node_addr = routable_address()
    paths.slurm_conf.write_text(slurm_conf_text(paths, ports, first_job_id(paths), short_hostname(), node_addr))
    paths.preempt_conf.write_text(preempt_conf_text(user_signal=False))
    write_private(paths.slurmdbd_conf, slurmdbd_conf_text(paths, ports, db_password(paths)))
    paths.hosts.write_text(hosts_text(short_hostname(), machine_hosts(), node_addr))
    return ports


def routable_address() -> str:
    """This machine's address on its default route (no packet is sent: a UDP connect only picks the
    source address), or 127.0.0.1 when it has none. The nodes answer on it so jobs see node names that
    resolve to a routable address, as on a real cluster, while this host's own name may still
    resolve to loopback (Debian's 127.0.1.1), which is what the toolkit must not bind gloo to."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 9))
            address = probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") or address == "0.0.0.0" else address


def machine_hosts() -> str:
    """The machine's own /etc/hosts, appended to ours so every other name still resolves in jobs."""
    try:
        return Path("/etc/hosts").read_text()
    except OSError:
        return ""


def write_env_sh(paths: Paths) -> None:
    paths.env_sh.write_text(env_lines(paths))
