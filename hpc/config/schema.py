"""The one structured config schema: a frozen dataclass per component, a docstring on every field.

YAML under `configs/` and CLI overrides are composed onto these classes once, at the edge
(`hpc.config.compose`); below that, code receives these frozen objects and never a DictConfig.
Each class validates its own fields in `__post_init__`; rules that span classes live in `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hpc.config.checkpoint import CheckpointConfig
from hpc.config.cluster import ClusterConfig
from hpc.config.launch import LaunchConfig
from hpc.config.loggers import WandbConfig, check_loggers
from hpc.config.requeue import RequeueConfig
from hpc.config.slurm import SlurmConfig
from hpc.config.errors import (
    require,
    require_choice,
    require_folder_name,
    require_positive,
    require_single_line,
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
    hsdp_shard_size: int | None = None
    """hybrid_shard: ranks per shard group (default: gpus_per_node, i.e. shard within a node)."""
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
            require(not self.deepspeed,
                    f"strategy.deepspeed: extra DeepSpeed keys need strategy.name=deepspeed, "
                    f"not {self.name}")
        if self.name == "ddp":
            require(self.offload_optimizer == "none" and self.offload_params == "none",
                    "strategy.offload_*: DDP keeps a full replica on the GPU and cannot offload; "
                    "use strategy=zero3_offload, or strategy=fsdp_full_shard with strategy.offload_params=cpu")
        if self.name == "fsdp":
            require(self.offload_optimizer == "none",
                    "strategy.offload_optimizer: FSDP offloads the optimizer step together with the "
                    "parameters; set strategy.offload_params=cpu instead")
            require(self.offload_params in ("none", "cpu"),
                    f"strategy.offload_params={self.offload_params}: FSDP offloads to cpu only "
                    "(NVMe offload is DeepSpeed ZeRO-3: strategy=zero3_offload)")
            require(self.mixed_precision != "fp16",
                    "strategy.mixed_precision=fp16: FSDP2 here has no sharded loss scaler; use bf16 "
                    "(or strategy.name=ddp / deepspeed for fp16)")
        if self.hsdp_shard_size is not None:
            require(self.name == "fsdp" and self.sharding == "hybrid_shard",
                    "strategy.hsdp_shard_size: only used with strategy.sharding=hybrid_shard")
            require_positive("strategy.hsdp_shard_size", self.hsdp_shard_size)
        if self.name == "deepspeed" and self.offload_params != "none":
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
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where rank 0 sends each metrics record: jsonl (`<run folder>/metrics.jsonl`, always on),
    tensorboard (event files in `<run folder>/tensorboard/`, `pip install 'hpc[tensorboard]'`), wandb
    (Weights & Biases, `train.wandb`, `pip install 'hpc[wandb]'`). A logger that cannot start stops
    the job at start-up with the reason; one that fails later is dropped with a warning and
    training goes on."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_loggers(self.loggers)
        for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
            require_positive(f"train.{key}", getattr(self, key))
        require_positive("train.warmup_steps", self.warmup_steps, 0)
        require(self.lr > 0, f"train.lr={self.lr}: the learning rate must be positive")
        require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        require(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables)")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"train.{key}={value}: must be in [0, 1)")


DATA_SOURCES = ("synthetic", "tokens")
TOKEN_DTYPES = ("auto", "uint16", "uint32")


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    source: str = "synthetic"
    """synthetic (a seeded, learnable token stream; no files) | tokens (a binary token file)."""
    path: str | None = None
    """Token file for source=tokens: a flat array of token ids (see tools/make_tokens.py)."""
    dtype: str = "auto"
    """Token id type in the file: uint16 | uint32 | auto (read from the file's .json sidecar)."""

    def __post_init__(self) -> None:
        require_choice("data.source", self.source, DATA_SOURCES)
        require_choice("data.dtype", self.dtype, TOKEN_DTYPES)
        require_single_line("data.path", self.path)
        if self.source == "tokens":
            require(bool(self.path), "data.path: source=tokens needs a token file, e.g. "
                    "data.path=/datasets/web.bin (write one with tools/make_tokens.py)")


PLAN_CHECKS = ("refuse", "warn", "off")


@dataclass(frozen=True)
class PlanConfig:
    """The planner's check at submit (`python -m hpc.estimate` shows the whole plan)."""

    check: str = "refuse"
    """refuse: a job predicted not to fit in the cluster preset's GPU memory (host memory per rank on
    a cpu preset) is refused before it is queued, with the numbers and changes that would fit |
    warn: print that and submit anyway | off: no check."""
    compute_efficiency: float = 0.5
    """Fraction of cluster.peak_tflops a training step achieves, for the planner's step time (0.4-0.55
    is typical of dense LLM training on H100s; measure yours with `python -m hpc.bench`)."""

    def __post_init__(self) -> None:
        if self.check in ("False", False):  # YAML reads a bare `off` as false
            object.__setattr__(self, "check", "off")
        require_choice("plan.check", self.check, PLAN_CHECKS)
        require(0 < self.compute_efficiency <= 1,
                f"plan.compute_efficiency={self.compute_efficiency}: a fraction of peak in (0, 1]")


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
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    requeue: RequeueConfig = field(default_factory=RequeueConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
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
        strategy = self.strategy
        if cluster.accelerator == "cpu":
            require(not (strategy.name == "fsdp" and strategy.offload_params != "none"),
                    f"strategy.offload_params={strategy.offload_params}: FSDP CPU offload moves "
                    f"parameters between GPU and host; cluster '{cluster.name}' has no accelerator "
                    "(use strategy.offload_params=none here)")
            require(strategy.mixed_precision != "fp16",
                    f"strategy.mixed_precision=fp16: fp16 with loss scaling needs a GPU; cluster "
                    f"'{cluster.name}' runs on cpu (use bf16 or fp32)")
        if strategy.name == "fsdp" and strategy.sharding == "hybrid_shard":
            shard = strategy.hsdp_shard_size or slurm.gpus_per_node
            require(self.world_size % shard == 0,
                    f"strategy.hsdp_shard_size={shard} must divide the world size {self.world_size} "
                    f"(nodes={slurm.nodes} x gpus_per_node={slurm.gpus_per_node})")
        require(self.requeue.lead_s < slurm.time_min * 60,
                f"requeue.lead_s={self.requeue.lead_s} is not shorter than time={slurm.time}; "
                "the warning would come before the job starts")
        if self.checkpoint.interval is None:
            # Resolved here, by the cluster, so that the dry run prints what the job will do. On
            # SLURM a crash, a dead node or an NCCL abort must not lose the whole run; a local
            # run (the demo, unit tests) keeps saving only on a stop and at the end.
            ckpt = self.checkpoint
            interval = "fixed" if ckpt.every_minutes > 0 else "auto" if cluster.kind == "slurm" else "never"
            object.__setattr__(self, "checkpoint", replace(ckpt, interval=interval))

    @property
    def world_size(self) -> int:
        return self.slurm.nodes * self.slurm.gpus_per_node

    @property
    def run_name(self) -> str:
        assert self.run.name is not None, "compose() fills run.name"
        return self.run.name
