"""The job's SLURM resources and scheduling (nodes, GPUs, time limit, partition, account, ...) and
SLURM's --time formats. Part of the one schema (hpc.config.schema imports it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hpc.config.errors import (
    ConfigError,
    require,
    require_positive,
    require_single_line,
    require_slurm_name,
)


# SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_to_minutes(text: str) -> int:
    """Minutes in a SLURM --time value (rounded up), or ConfigError naming the formats."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(
            f"slurm.time='{text}': use minutes, HH:MM:SS or D-HH:MM:SS (e.g. time=04:00:00)"
        )
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"slurm.time='{text}': a job needs a positive time limit")
    return -(-seconds // 60)


@dataclass(frozen=True)
class SlurmConfig:
    """The job's resources and scheduling (shorthands: nodes, gpus_per_node, time, partition, ...)."""

    nodes: int = 1
    """Nodes to allocate."""
    gpus_per_node: int = 1
    """GPUs per node; one rank (srun task) per GPU."""
    time: str = "01:00:00"
    """Time limit per run (requeues get a fresh one): minutes, HH:MM:SS or D-HH:MM:SS."""
    partition: str | None = None
    """Partition (defaults to the cluster preset's)."""
    account: str | None = None
    """Account to charge."""
    qos: str | None = None
    """Quality of service."""
    reservation: str | None = None
    """Reservation to run in."""
    constraint: str | None = None
    """Node features, e.g. 'h100' or 'h100&ib'."""
    exclude: str | None = None
    """Nodes not to use, e.g. 'gpu[003,017]'."""
    cpus_per_task: int | None = None
    """CPUs per rank (defaults to the cluster preset's cpus_per_gpu)."""
    mem_gb: float | None = None
    """Memory per node in GB (defaults to cluster.mem_per_gpu_gb x gpus_per_node)."""
    exclusive: bool = False
    """Ask for whole nodes, with all their memory (--mem=0 unless mem_gb is given)."""
    wckey: str | None = None
    """Workload characterization key (--wckey), only where the site accounts by it."""
    job_name: str | None = None
    """Job name shown by squeue (defaults to the run name)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further sbatch options, e.g. {mail-type: END}; values are shell-quoted."""

    def __post_init__(self) -> None:
        require_positive("slurm.nodes", self.nodes)
        require_positive("slurm.gpus_per_node", self.gpus_per_node)
        time_to_minutes(self.time)
        for key in ("partition", "account", "qos", "reservation", "wckey"):
            require_slurm_name(f"slurm.{key}", getattr(self, key))
        for key in ("constraint", "exclude", "job_name"):
            require_single_line(f"slurm.{key}", getattr(self, key))
        if self.cpus_per_task is not None:
            require_positive("slurm.cpus_per_task", self.cpus_per_task)
        if self.mem_gb is not None:
            require(self.mem_gb > 0, f"slurm.mem_gb={self.mem_gb}: must be positive")
        for name, value in self.extra.items():
            require(bool(re.match(r"^[a-z][a-z0-9-]*$", str(name))),
                    f"slurm.extra: '{name}' is not an sbatch option name (like mail-type)")
            require_single_line(f"slurm.extra.{name}", str(value))

    @property
    def time_min(self) -> int:
        return time_to_minutes(self.time)
