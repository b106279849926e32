"""The commands `install`, `up`, `status`, `down` and `env`, and `main` (argument parsing,
exit codes, error messages) for tools/slurm_cluster.py.

`up` and `down` hold a lock on the state folder so only one of them runs at a time; `up`
returns at once when the cluster is already healthy, starts only what is missing when it is
half up (keeping its ports), and otherwise writes fresh configs first.  `down` stops by PID
only what carries this state folder's marker, slurmd first, and never a munged it did not start.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from localslurm.conf import env_lines
from localslurm.health import health, healthy, node_states, print_table, sacct_works
from localslurm.install import install, require_root
from localslurm.paths import CLUSTER_NAME, DEFAULT_STATE, NODES, ClusterError, Paths, daemons, marker, state_paths
from localslurm.processes import (client_env, log_tail, our_pid, pid_alive, pid_has_marker, pid_is, run, running_pid,
                                  stop_pid)
from localslurm.start import start_mariadb, start_munge, start_slurmctld, start_slurmdbd, start_slurmds
from localslurm.statedir import make_dirs, read_ports, write_configs, write_env_sh


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
