"""Where and how a job runs: cluster presets (NCCL, scratch, modules), SLURM resources, requeue
budget and rendezvous settings. Part of the one schema (hpc.config.schema imports these)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hpc.config.errors import (
    ConfigError,
    require,
    require_choice,
    require_positive,
    require_single_line,
    require_slurm_name,
)


@dataclass(frozen=True)
class NcclConfig:
    """NCCL environment exported in the sbatch script (from the cluster preset)."""

    socket_ifname: str | None = None
    """NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME): the interface for bootstrap traffic."""
    ib_hca: str | None = None
    """NCCL_IB_HCA: InfiniBand adapters to use, e.g. 'mlx5'."""
    async_error_handling: bool = True
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a hung collective kills the job instead of hanging it."""
    timeout_s: int = 1800
    """Collective timeout passed to init_process_group."""
    debug: str | None = "WARN"
    """NCCL_DEBUG level (None leaves it unset)."""
    env: dict[str, str] = field(default_factory=dict)
    """Further NCCL_* / FI_* variables, exported as given."""

    def __post_init__(self) -> None:
        require_positive("cluster.nccl.timeout_s", self.timeout_s)
        for key in ("socket_ifname", "ib_hca", "debug"):
            require_single_line(f"cluster.nccl.{key}", getattr(self, key))
        _require_env_vars("cluster.nccl.env", self.env)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _require_env_vars(key: str, env: dict[str, str]) -> None:
    for name, value in env.items():
        require(bool(_ENV_NAME.match(str(name))), f"{key}: '{name}' is not a valid variable name")
        require_single_line(f"{key}.{name}", str(value))


@dataclass(frozen=True)
class ClusterConfig:
    """What a cluster offers and how jobs set up on it (presets in configs/cluster/)."""

    name: str = "local"
    """Preset name."""
    kind: str = "local"
    """slurm: submit with sbatch; local: run on this machine through submitit's local executor."""
    accelerator: str = "cpu"
    """cuda: one process per GPU, nccl; cpu: one process per 'GPU' slot, gloo."""
    max_gpus_per_node: int = 8
    """GPUs (process slots) a node has; slurm.gpus_per_node may not exceed it."""
    max_nodes: int | None = None
    """Nodes the cluster has, when known (a larger slurm.nodes is refused at submit time)."""
    cpus_per_gpu: int | None = None
    """Default --cpus-per-task for each rank."""
    mem_per_gpu_gb: float | None = None
    """Default memory per rank; the job asks nodes' share of it with --mem."""
    peak_tflops: float = 1.0
    """Peak dense TFLOP/s per GPU at the training precision (for MFU)."""
    scratch_dir: str = "/tmp/hpc-scratch/{user}/{job_id}"
    """Node-local scratch (NVMe) for checkpoints; {user}, {job_id} and {node} are filled per node."""
    modules: list[str] = field(default_factory=list)
    """Environment modules loaded in the job (`module load ...`)."""
    venv: str | None = None
    """Python virtual environment activated in the job (path to its folder)."""
    partition: str | None = None
    """Default partition when slurm.partition is not given."""
    env: dict[str, str] = field(default_factory=dict)
    """Further variables exported in the job."""
    nccl: NcclConfig = field(default_factory=NcclConfig)
    """NCCL settings."""

    def __post_init__(self) -> None:
        require_choice("cluster.kind", self.kind, ("slurm", "local"))
        require_choice("cluster.accelerator", self.accelerator, ("cuda", "cpu"))
        require_positive("cluster.max_gpus_per_node", self.max_gpus_per_node)
        if self.max_nodes is not None:
            require_positive("cluster.max_nodes", self.max_nodes)
        require(self.peak_tflops > 0, f"cluster.peak_tflops={self.peak_tflops}: must be positive")
        for key in ("scratch_dir", "venv"):
            require_single_line(f"cluster.{key}", getattr(self, key))
        for i, module in enumerate(self.modules):
            require_single_line(f"cluster.modules[{i}]", module)
        require_slurm_name("cluster.partition", self.partition)
        _require_env_vars("cluster.env", self.env)


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
    """Ask for whole nodes."""
    job_name: str | None = None
    """Job name shown by squeue (defaults to the run name)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further sbatch options, e.g. {mail-type: END}; values are shell-quoted."""

    def __post_init__(self) -> None:
        require_positive("slurm.nodes", self.nodes)
        require_positive("slurm.gpus_per_node", self.gpus_per_node)
        time_to_minutes(self.time)
        for key in ("partition", "account", "qos", "reservation"):
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


@dataclass(frozen=True)
class RequeueConfig:
    """When and how often the job saves and requeues itself."""

    signal: str = "USR2"
    """Signal SLURM sends ahead of the time limit (NCCL may use USR1, so USR2 by default)."""
    lead_s: int = 300
    """Seconds before the time limit that the signal arrives: at least save time plus a margin."""
    auto_lead: bool = True
    """Raise lead_s (never lower it) to what this run's measured saves need: at submit time for
    SLURM's warning, and in the job as its own deadline once a save takes longer."""
    max_requeues: int = 20
    """Requeues after time limits before the job gives up."""
    max_preemptions: int = 50
    """Requeues after preemption (SIGTERM, or the warning signal well before the limit)."""
    max_failures: int = 3
    """Requeues after crashes, dead nodes or failed preflights before the job gives up."""

    def __post_init__(self) -> None:
        require_choice("requeue.signal", self.signal, ("USR2", "USR1"))
        require_positive("requeue.lead_s", self.lead_s, 10)
        require_positive("requeue.max_requeues", self.max_requeues, 0)
        require_positive("requeue.max_preemptions", self.max_preemptions, 0)
        require_positive("requeue.max_failures", self.max_failures, 0)


@dataclass(frozen=True)
class LaunchConfig:
    """Rendezvous and preflight inside the allocation."""

    master_addr: str | None = None
    """Override the rendezvous host (default: the first node of the allocation)."""
    port_min: int = 20000
    """Lowest rendezvous port; the port is port_min + job_id mod the range size."""
    port_max: int = 29999
    """Highest rendezvous port."""
    init_timeout_s: int = 600
    """How long ranks wait for each other at process-group start."""
    preflight: bool = True
    """Check every rank (host, device, scratch, one all-reduce) before work starts."""

    def __post_init__(self) -> None:
        require_single_line("launch.master_addr", self.master_addr)
        require(1024 <= self.port_min <= self.port_max <= 65535,
                f"launch.port_min={self.port_min}, launch.port_max={self.port_max}: need "
                "1024 <= port_min <= port_max <= 65535")
        require_positive("launch.init_timeout_s", self.init_timeout_s)
