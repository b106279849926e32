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

import sys

# Run as a script, so this folder (tools/) is sys.path[0] and the package next to it imports.
from localslurm.cli import main

if __name__ == "__main__":
    sys.exit(main())
