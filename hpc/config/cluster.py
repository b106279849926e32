"""A cluster preset: what a site's nodes offer (GPUs, NCCL interfaces and HCAs, node-local scratch,
modules, venv, peak FLOP/s). Part of the one schema (hpc.config.schema imports it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hpc.config.errors import (
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
    """NCCL_SOCKET_IFNAME: the interface for NCCL's bootstrap traffic. Prefer a positive name or
    prefix ('ib0', '=eth1'); an exclusion list ('^lo,docker') matches any other interface, virtual
    ones included. A plain name is also gloo's (GLOO_SOCKET_IFNAME); otherwise each rank derives
    gloo's from the address the rendezvous reaches the first node on."""
    ib_hca: str | None = None
    """NCCL_IB_HCA: InfiniBand adapters and ports to use. List them ('=mlx5_0:1,mlx5_1:1'): a bare
    prefix ('mlx5') also matches the Ethernet-mode and storage ports of the same card."""
    async_error_handling: bool = True
    """TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a hung collective kills the job instead of hanging it."""
    timeout_s: int = 1800
    """Collective timeout passed to init_process_group."""
    debug: str | None = "WARN"
    """NCCL_DEBUG level (None leaves it unset)."""
    show_transport: bool = True
    """On a run's first start (not on requeues), log NCCL's chosen interfaces and transports
    (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,NET), so a wrong NIC shows in the first log."""
    env: dict[str, str] = field(default_factory=dict)
    """Further NCCL_* / FI_* variables, exported as given."""

    def __post_init__(self) -> None:
        require_positive("cluster.nccl.timeout_s", self.timeout_s)
        for key in ("socket_ifname", "ib_hca", "debug"):
            require_single_line(f"cluster.nccl.{key}", getattr(self, key))
        _require_env_vars("cluster.nccl.env", self.env)


CPU_BINDS = ("cores", "threads", "sockets", "ldoms", "rank", "none")
GPU_BINDS = ("none", "closest")

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
    """Default --cpus-per-task for each rank (given to srun too: SLURM 22.05-23.02 do not pass the
    allocation's value on, and every rank would share one core)."""
    cpu_bind: str = "cores"
    """srun --cpu-bind: 'cores' pins each rank to its own cores; 'none' leaves placement to the
    kernel (for nodes that share cores, like the project's one-host test cluster)."""
    gpu_bind: str = "none"
    """srun --gpu-bind: 'none' shows every rank all of the node's GPUs and each takes the one at its
    local rank (NCCL sees every peer for P2P); with 'closest' or 'single:1' a rank uses what it sees."""
    mem_per_gpu_gb: float | None = None
    """Default memory per rank; the job asks nodes' share of it with --mem."""
    peak_tflops: float = 1.0
    """Peak dense TFLOP/s per GPU at the training precision (for MFU and the planner's step time)."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GB (80 for an H100 SXM), for the planner's fit check at submit. Unset on a
    GPU preset: the check says it cannot tell and does not refuse. On a cpu preset (each rank is a
    process on the host): unset means this machine's memory shared by the job's ranks, which is
    right for `local` and the one-host test cluster."""
    reserved_gb: float = 3.0
    """Per-GPU memory the planner sets aside beyond tensors: the CUDA context and kernels (~0.6 GB),
    NCCL's buffers (~0.5-1 GB with a few communicators) and the caching allocator's fragmentation.
    On a cpu preset: a rank process's own footprint (interpreter, torch), ~0.5 GB."""
    intra_node_gbps: float = 150.0
    """Collective bandwidth between GPUs of one node, GB/s per GPU, as nccl-tests reports it
    (busbw): ~360 for H100 NVLink 4, ~150 for A100 NVLink 3, ~20 over PCIe."""
    inter_node_gbps: float = 25.0
    """Collective bandwidth across nodes, GB/s per GPU (busbw): ~45 with one 400 Gb/s NIC per GPU,
    ~22 with 200 Gb/s, ~10 on 100 Gb/s Ethernet shared by the node."""
    host_link_gbps: float = 25.0
    """GPU <-> host copy bandwidth, GB/s per GPU (PCIe Gen5 x16: ~50 peak, ~25 sustained): what
    CPU offload moves every step."""
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
        if self.gpu_memory_gb is not None:
            require(self.gpu_memory_gb > 0, f"cluster.gpu_memory_gb={self.gpu_memory_gb}: must be positive (GB)")
        require(self.reserved_gb >= 0, f"cluster.reserved_gb={self.reserved_gb}: must be >= 0 (GB)")
        for key in ("intra_node_gbps", "inter_node_gbps", "host_link_gbps"):
            require(getattr(self, key) > 0, f"cluster.{key}={getattr(self, key)}: must be positive (GB/s)")
        for key in ("scratch_dir", "venv"):
            require_single_line(f"cluster.{key}", getattr(self, key))
        for i, module in enumerate(self.modules):
            require_single_line(f"cluster.modules[{i}]", module)
        require_slurm_name("cluster.partition", self.partition)
        require_choice("cluster.cpu_bind", self.cpu_bind, CPU_BINDS)
        require(self.gpu_bind in GPU_BINDS or self.gpu_bind.startswith(("single:", "map_gpu:", "mask_gpu:")),
                f"cluster.gpu_bind='{self.gpu_bind}' is not one of {', '.join(GPU_BINDS)}, single:N, "
                "map_gpu:LIST or mask_gpu:LIST")
        require_single_line("cluster.gpu_bind", self.gpu_bind)
        _require_env_vars("cluster.env", self.env)
