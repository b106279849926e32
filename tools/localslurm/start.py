"""Starting the daemons, in order: munge, MariaDB, slurmdbd, slurmctld, the four slurmd.

Each `start_*` is idempotent: it returns a one-line report ("started" or "running") and
starts the daemon only when no process of ours holds its PID file; every daemon is started
with the state folder's marker in its environment so `down` can later prove it is ours.
A working munged is reused, whoever started it.  Each start waits until the daemon really
answers (a SQL query, `sacctmgr`, `scontrol ping`, the nodes idle in `sinfo`) and otherwise
fails with the tail of its log.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from localslurm.health import munge_works, node_ok, node_states, nodes_ok, ping_up
from localslurm.paths import (CLUSTER_NAME, DB_NAME, DB_USER, MUNGE_KEY, MUNGE_PIDFILE, MUNGE_RUN_DIR, NODES,
                              ClusterError, Daemon, Paths, daemons, marker)
from localslurm.processes import (START_TIMEOUT_S, client_env, daemon_env, log_tail, our_pid, run, run_detaching,
                                  wait_for, wait_for_pidfile)
from localslurm.statedir import db_password

# --------------------------------------------------------------------------- munge


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
