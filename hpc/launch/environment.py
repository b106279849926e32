"""Who am I in this job? One frozen answer, whichever launcher started the process.

Sources, first match wins: a SLURM task (srun), a submitit local task, torchrun's variables,
or a lone process (world size 1).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from hpc import slurm


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
    step: str = "0"
    """The job step (srun launch) within this run: a second srun in one allocation is another meeting."""

    @property
    def tasks_per_node(self) -> int:
        """Ranks per node (the job runs the same number on every node)."""
        return max(self.world_size // max(self.num_nodes, 1), 1)


def detect(environ: Mapping[str, str] = os.environ) -> JobEnv:
    if "SLURM_PROCID" in environ and "SLURM_JOB_ID" in environ:
        return JobEnv(launcher="slurm", **slurm.task_place(environ))
    host = socket.gethostname()
    if "SUBMITIT_LOCAL_JOB_ID" in environ:
        rank = int(environ["SUBMITIT_LOCAL_GLOBALID"])
        return JobEnv(launcher="local", job_id=environ["SUBMITIT_LOCAL_JOB_ID"], rank=rank,
                      local_rank=int(environ["SUBMITIT_LOCAL_LOCALID"]),
                      world_size=int(environ["SUBMITIT_LOCAL_NTASKS"]), node_rank=0, num_nodes=1,
                      hostnames=(host,), node_name=host)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        rank = int(environ["RANK"])
        master = environ.get("MASTER_ADDR", host)
        return JobEnv(launcher="torchrun", job_id=environ.get("TORCHELASTIC_RUN_ID", "torchrun"), rank=rank,
                      local_rank=int(environ.get("LOCAL_RANK", 0)), world_size=world,
                      node_rank=rank // local_world, num_nodes=max(world // local_world, 1),
                      hostnames=(master,), node_name=host,
                      restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    return JobEnv(launcher="single", job_id=str(os.getpid()), rank=0, local_rank=0, world_size=1, node_rank=0,
                  num_nodes=1, hostnames=(host,), node_name=host)
