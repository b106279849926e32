"""The one structured config schema: a frozen dataclass per component, a docstring on every field.

YAML under `configs/` and CLI overrides are composed onto these classes once, at the edge
(`hpc.config.compose`); below that, code receives these frozen objects and never a DictConfig.
Each class validates its own fields in `__post_init__`; rules that span classes live in `Config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hpc.config.errors import (
    ConfigError,
    require,
    require_choice,
    require_folder_name,
    require_positive,
    require_single_line,
    require_slurm_name,
)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder's shape (presets in configs/model/)."""

    name: str = "tiny"
    """Preset name, for logs and run names."""
    dim: int = 128
    """Hidden size."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); divides n_heads."""
    ffn_dim: int = 256
    """SwiGLU hidden size."""
    vocab_size: int = 512
    """Vocabulary size."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    def __post_init__(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            require_positive(f"model.{key}", getattr(self, key))
        require(self.dim % self.n_heads == 0,
                f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        require(self.n_heads % self.n_kv_heads == 0,
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")


STRATEGIES = ("ddp", "fsdp", "deepspeed")
FSDP_SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
OFFLOAD = ("none", "cpu", "nvme")
PRECISIONS = ("fp32", "bf16", "fp16")
ACTIVATION_CHECKPOINTING = ("none", "all", "every_k")


@dataclass(frozen=True)
class StrategyConfig:
    """How the model is spread over ranks (presets in configs/strategy/)."""

    name: str = "ddp"
    """Engine: ddp | fsdp | deepspeed."""
    sharding: str = "full_shard"
    """FSDP sharding: full_shard | shard_grad_op | hybrid_shard | no_shard (fsdp only)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 1, 2 or 3 (deepspeed only)."""
    offload_optimizer: str = "none"
    """DeepSpeed optimizer state offload: none | cpu | nvme."""
    offload_params: str = "none"
    """DeepSpeed parameter offload (ZeRO-3 only): none | cpu | nvme."""
    nvme_path: str | None = None
    """Node-local folder for NVMe offload; required when an offload is 'nvme'."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward pass: none | all (every block) | every_k."""
    ac_every_k: int = 2
    """With activation_checkpointing=every_k: checkpoint every k-th block."""
    mixed_precision: str = "fp32"
    """Compute dtype: fp32 | bf16 | fp16 (fp16 uses loss scaling)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged over the generated JSON (deepspeed only)."""

    def __post_init__(self) -> None:
        require_choice("strategy.name", self.name, STRATEGIES)
        require_choice("strategy.sharding", self.sharding, FSDP_SHARDING)
        require_choice("strategy.offload_optimizer", self.offload_optimizer, OFFLOAD)
        require_choice("strategy.offload_params", self.offload_params, OFFLOAD)
        require_choice("strategy.activation_checkpointing", self.activation_checkpointing,
                       ACTIVATION_CHECKPOINTING)
        require_choice("strategy.mixed_precision", self.mixed_precision, PRECISIONS)
        require_positive("strategy.ac_every_k", self.ac_every_k)
        require_single_line("strategy.nvme_path", self.nvme_path)
        if self.name == "deepspeed":
            require(self.zero_stage in (1, 2, 3),
                    f"strategy.zero_stage={self.zero_stage}: DeepSpeed needs ZeRO stage 1, 2 or 3")
        else:
            require(self.zero_stage == 0,
                    f"strategy.zero_stage={self.zero_stage} is a DeepSpeed setting; "
                    f"strategy.name={self.name} shards with its own engine (set strategy=zero3 or similar)")
            require(self.offload_optimizer == "none" and self.offload_params == "none",
                    f"strategy.offload_*: offload is a DeepSpeed setting; strategy.name={self.name} "
                    "cannot offload here (use strategy=zero3_offload)")
            require(not self.deepspeed,
                    f"strategy.deepspeed: extra DeepSpeed keys need strategy.name=deepspeed, "
                    f"not {self.name}")
        if self.offload_params != "none":
            require(self.zero_stage == 3,
                    f"strategy.offload_params={self.offload_params}: parameter offload needs "
                    f"ZeRO stage 3 (got {self.zero_stage})")
        if "nvme" in (self.offload_optimizer, self.offload_params):
            require(self.nvme_path is not None,
                    "strategy.nvme_path: NVMe offload needs a node-local folder, e.g. "
                    "strategy.nvme_path=/local_nvme/offload")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    seed: int = 0
    """Seed for weights, data order and dropout."""
    max_steps: int = 100
    """Optimizer steps to run in total (across requeues)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 256
    """Tokens per sequence; at most model.max_seq_len."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 10
    """Write a metrics line every this many steps."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
            require_positive(f"train.{key}", getattr(self, key))
        require_positive("train.warmup_steps", self.warmup_steps, 0)
        require(self.lr > 0, f"train.lr={self.lr}: the learning rate must be positive")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables)")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"train.{key}={value}: must be in [0, 1)")


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
    max_requeues: int = 20
    """Requeues after time limits or preemption before the job gives up."""
    max_failures: int = 3
    """Requeues after crashes or node failures before the job gives up."""

    def __post_init__(self) -> None:
        require_choice("requeue.signal", self.signal, ("USR2", "USR1"))
        require_positive("requeue.lead_s", self.lead_s, 10)
        require_positive("requeue.max_requeues", self.max_requeues, 0)
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


@dataclass(frozen=True)
class RunConfig:
    """Where a run's files go."""

    root: str = "runs"
    """Folder holding run folders (shared storage on a cluster)."""
    name: str | None = None
    """Run folder name (default: <exp>-<timestamp>); reusing a name resumes that run."""
    python: str | None = None
    """Python interpreter the job runs (default: the one running hpc.submit)."""

    def __post_init__(self) -> None:
        require_single_line("run.root", self.root)
        require(bool(self.root), "run.root: must not be empty")
        require_folder_name("run.name", self.name)
        require_single_line("run.python", self.python)


@dataclass(frozen=True)
class Config:
    """A whole experiment: what `python -m hpc.submit exp=NAME ...` resolves to."""

    exp: str = "tiny_cpu"
    """Experiment preset name (configs/exp/<exp>.yaml)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    requeue: RequeueConfig = field(default_factory=RequeueConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        slurm, cluster = self.slurm, self.cluster
        require(slurm.gpus_per_node <= cluster.max_gpus_per_node,
                f"gpus_per_node={slurm.gpus_per_node}: cluster '{cluster.name}' has "
                f"{cluster.max_gpus_per_node} per node; use gpus_per_node<={cluster.max_gpus_per_node} "
                "and raise nodes instead")
        if cluster.max_nodes is not None:
            require(slurm.nodes <= cluster.max_nodes,
                    f"nodes={slurm.nodes}: cluster '{cluster.name}' has {cluster.max_nodes} nodes")
        if cluster.kind == "local":
            require(slurm.nodes == 1,
                    f"nodes={slurm.nodes}: cluster=local runs on this one machine; use nodes=1 "
                    "(gpus_per_node sets the number of processes) or cluster=slurm")
        require(self.train.seq_len <= self.model.max_seq_len,
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        require(self.requeue.lead_s < slurm.time_min * 60,
                f"requeue.lead_s={self.requeue.lead_s} is not shorter than time={slurm.time}; "
                "the warning would come before the job starts")

    @property
    def world_size(self) -> int:
        return self.slurm.nodes * self.slurm.gpus_per_node

    @property
    def run_name(self) -> str:
        assert self.run.name is not None, "compose() fills run.name"
        return self.run.name
