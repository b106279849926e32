"""Is the cluster healthy?  The checks `up` waits on and the table `status` prints.

Each check asks the running system, not the state folder: munge round-trips a credential,
`scontrol ping` reaches slurmctld, `sinfo` gives each node's state, `sacct` proves
accounting, and /proc/PID/root/etc/hosts shows whether a slurmd sees the node names in its
private mount namespace.  PID checks skip the marker test so `status` also works as non-root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from localslurm.paths import CLUSTER_NAME, NODES, Paths, daemons, marker
from localslurm.processes import client_env, pid_has_marker, run, running_pid

HEALTHY_NODE_STATES = {"idle", "allocated", "mixed", "completing"}


def munge_works() -> bool:
    cred = run(["munge", "-n"], timeout=10)
    if cred.returncode != 0:
        return False
    return run(["unmunge"], stdin=cred.stdout, timeout=10).returncode == 0


def ping_up(paths: Paths) -> bool:
    result = run(["scontrol", "ping"], env=client_env(paths), timeout=30)
    return result.returncode == 0 and " is UP" in result.stdout


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


def sacct_works(paths: Paths) -> bool:
    result = run(["sacct", "-n", "-X", "-a", "-S", "now-1minutes", "-o", "JobID"], env=client_env(paths), timeout=30)
    return result.returncode == 0 and "error" not in result.stderr.lower()


# --------------------------------------------------------------------------- the status table


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
    # Our hosts file comes first: the first line naming n1 is ours (node names -> the node address).
    return any("n1" in line.split()[1:] for line in text.splitlines() if not line.lstrip().startswith("#"))


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
