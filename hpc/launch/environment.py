"""Who am I in this job? One frozen answer, whichever launcher started the process.

Sources, first match wins: a SLURM task (srun), a submitit local task, torchrun's variables,
or a lone process (world size 1).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from hpc.slurm import SlurmEnv


@dataclass(frozen=True)
class JobEnv:
    """This process's place in the job."""

    launcher: str
    """slurm | local | torchrun | single."""
    job_id: str
    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    num_nodes: int
    hostnames: tuple[str, ...]
    """Node names of the allocation, in order (the first hosts the rendezvous)."""
    node_name: str
    """This node's name as the scheduler knows it."""
    restart_count: int = 0


def detect(environ: Mapping[str, str] = os.environ) -> JobEnv:
    if "SLURM_PROCID" in environ and "SLURM_JOB_ID" in environ:
        s = SlurmEnv.from_environ(environ)
        return JobEnv("slurm", s.job_id, s.rank, s.local_rank, s.world_size, s.node_rank,
                      s.num_nodes, s.hostnames, s.node_name, s.restart_count)
    host = socket.gethostname()
    if "SUBMITIT_LOCAL_JOB_ID" in environ:
        rank = int(environ["SUBMITIT_LOCAL_GLOBALID"])
        return JobEnv("local", environ["SUBMITIT_LOCAL_JOB_ID"], rank,
                      int(environ["SUBMITIT_LOCAL_LOCALID"]), int(environ["SUBMITIT_LOCAL_NTASKS"]),
                      0, 1, (host,), host)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        rank = int(environ["RANK"])
        master = environ.get("MASTER_ADDR", host)
        return JobEnv("torchrun", environ.get("TORCHELASTIC_RUN_ID", "torchrun"), rank,
                      int(environ.get("LOCAL_RANK", 0)), world, rank // local_world,
                      max(world // local_world, 1), (master,), host,
                      int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    return JobEnv("single", str(os.getpid()), 0, 0, 1, 0, 1, (host,), host)
