"""Per-rank memory of a config: model states as each engine really keeps them, activations, buffers.

Model states are counted the way this toolkit's engines hold them (hpc/train/strategies/), not by
the textbook 2+2+12 bytes per parameter, and tests/test_estimate_memory.py checks them against the
engines' own tensors at world sizes 1, 2 and 4:

  DDP        fp32 weights, fp32 gradients (DDP's buckets are the gradients: gradient_as_bucket_view),
             AdamW's two fp32 moments: 16 bytes per parameter on every rank. bf16/fp16 run under
             autocast, which keeps a half-precision copy of every weight matrix per micro-batch.
  FSDP       the same 16 bytes, divided over the shard group (every rank for full_shard and
             shard_grad_op, `hsdp_shard_size` for hybrid_shard, one for no_shard), each tensor's
             first dimension padded to a multiple of the group. Gathered copies in the compute
             dtype exist while a unit runs: the root (embeddings, output) from forward to its
             backward, two blocks at a time (one prefetched) - or every block from forward to
             backward with shard_grad_op, which is why it cannot fit where full_shard does.
  DeepSpeed  see `_deepspeed`: half-precision weights (fp32 in fp32 runs), an fp32 master copy of
             this rank's partition (a separate clone even in fp32), the two moments, and gradient
             buffers that depend on the stage and on DeepSpeed's bucket sizes.

Every figure is bytes on the fullest rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hpc.config.schema import Config, ModelConfig
from hpc.estimate.activations import activations, autocast_weight_copies, compute_mode
from hpc.estimate.shape import shape_of, tensor_shapes

STATE_BYTES_PER_PARAM = 12
"""Bytes per parameter in a checkpoint: fp32 weights (or DeepSpeed's fp32 master copy) and AdamW's
two fp32 moments."""
COMPONENTS = ("params", "grads", "optimizer", "activations", "buffers", "overhead")
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per element of the compute dtype (strategy.mixed_precision)."""


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds, by component; host and NVMe bytes per rank for offloads."""

    gpu: dict[str, int]
    """params, grads, optimizer, activations, buffers, overhead (and total)."""
    host: int = 0
    """Host memory per rank for offloaded state (0 without offload)."""
    nvme: int = 0
    """NVMe bytes per rank for NVMe offload."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.gpu["total"]

    @property
    def model_states(self) -> int:
        return self.gpu["params"] + self.gpu["grads"] + self.gpu["optimizer"]


@dataclass(frozen=True)
class States:
    """Model states of the fullest rank in bytes, wherever they live, and how much of each an offload
    keeps off the GPU (`off`, on `off_to`: cpu or nvme)."""

    params: int
    grads: int
    optimizer: int
    off: dict[str, int] = field(default_factory=dict)
    off_to: dict[str, str] = field(default_factory=dict)

    def on_gpu(self, kind: str) -> int:
        return getattr(self, kind) - self.off.get(kind, 0)

    def offloaded(self, to: str) -> int:
        return sum(n for kind, n in self.off.items() if self.off_to[kind] == to)


def shard_group(cfg: Config) -> int:
    """Ranks one copy of the sharded state is spread over."""
    s = cfg.strategy
    if s.name == "deepspeed":
        return cfg.world_size
    if s.name == "fsdp":
        if s.sharding == "no_shard":
            return 1
        if s.sharding == "hybrid_shard":
            return s.hsdp_shard_size or cfg.slurm.gpus_per_node
        return cfg.world_size
    return 1


def padded_shard(model: ModelConfig, group: int) -> int:
    """Elements of one rank's FSDP2 shard of every parameter: each tensor's first dimension is cut
    into `group` equal chunks, the last padded (FSDP2 allocates the padded size)."""
    total = 0
    for shape in tensor_shapes(model).values():
        rest = math.prod(shape[1:])
        total += math.ceil(shape[0] / group) * rest
    return total


def model_states(cfg: Config) -> States:
    """params, grads (after backward), optimizer (after a step) on the fullest rank."""
    s = cfg.strategy
    if s.name == "ddp":
        return _ddp(cfg)
    if s.name == "fsdp":
        return _fsdp(cfg)
    return _deepspeed(cfg)


def _tensor_count(model: ModelConfig) -> int:
    return len(tensor_shapes(model))


def _ddp(cfg: Config) -> States:
    p = shape_of(cfg.model).total
    # AdamW keeps a 0-d fp32 `step` per parameter tensor beside the two moments.
    return States(params=4 * p, grads=4 * p, optimizer=8 * p + 4 * _tensor_count(cfg.model))


def _fsdp(cfg: Config) -> States:
    local = padded_shard(cfg.model, shard_group(cfg))
    states = States(params=4 * local, grads=4 * local, optimizer=8 * local + 4 * _tensor_count(cfg.model))
    if cfg.strategy.offload_params == "cpu":
        # CPUOffloadPolicy: shards, their gradients and the optimizer step live on the host.
        kinds = ("params", "grads", "optimizer")
        return dataclasses.replace(states, off={k: getattr(states, k) for k in kinds},
                                   off_to=dict.fromkeys(kinds, "cpu"))
    return states


def ds_setting(cfg: Config, key: str, default: int) -> int:
    """A zero_optimization value from strategy.deepspeed, else DeepSpeed's default."""
    zero = (cfg.strategy.deepspeed or {}).get("zero_optimization") or {}
    try:  # DeepSpeed takes 5e8, 500000000 and "5e8" alike
        return int(float(zero.get(key, default)))
    except (TypeError, ValueError):  # "auto" and the like: DeepSpeed decides; plan with its default
        return default


REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default reduce_bucket_size, in elements: its gradient buckets are this size whatever
the model's (1 GB each in bf16)."""
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default stage3_param_persistence_threshold: ZeRO-3 keeps smaller tensors gathered."""
PREFETCH_BUCKET = 50_000_000
"""DeepSpeed's default stage3_prefetch_bucket_size, in elements."""
MAX_REUSE_DISTANCE = 1_000_000_000
"""DeepSpeed's default stage3_max_reuse_distance, in elements."""


def persistent_params(cfg: Config) -> int:
    """Elements ZeRO-3 keeps gathered on every rank: each tensor under the persistence threshold."""
    limit = ds_setting(cfg, "stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
    return sum(math.prod(shape) for shape in tensor_shapes(cfg.model).values() if math.prod(shape) < limit)


def _deepspeed(cfg: Config) -> States:
    """What DeepSpeed 0.19's ZeRO optimizers keep per rank (counted in tests from their own
    attributes: bit16_groups / bf16_groups / fp16_partitioned_groups and the persistent parameters;
    averaged_gradients, BF16_Optimizer's fp32 gradients, grad_partitions_flat_buffer; the fp32
    partitions and AdamW's state):

      stage 1, bf16  BF16_Optimizer: bf16 weights (2P), a full fp32 gradient accumulator (4P) beside
                     the bf16 .grad (2P), fp32 master partition and moments (12P/N)
      stage 1, fp32/fp16  weights cP; whole gradients cP between micro-batches (train.grad_accum > 1),
                     else only the gradient partition gP/N; 12P/N
      stage 2        weights cP, the gradient partition (4P/N; fp16: 2P/N), 12P/N
      stage 3        weight partitions cP/N plus the persistent small tensors gathered, fp32
                     gradient partitions 4P/N, 12P/N
    """
    s, n = cfg.strategy, cfg.world_size
    p = shape_of(cfg.model).total
    c = COMPUTE_BYTES[s.mixed_precision]
    grad = 2 if s.mixed_precision == "fp16" else 4  # bf16 accumulates in fp32 (hpc.config.deepspeed)
    part = math.ceil(p / n)
    optimizer = 12 * part + 4 * 2  # fp32 master + exp_avg + exp_avg_sq; a 0-d step per group
    if s.zero_stage == 3:
        # On one rank a persistent tensor is its own partition: nothing extra is kept.
        params = c * part + (c * persistent_params(cfg) if n > 1 else 0)
        grads = grad * part
    elif s.zero_stage == 1 and s.mixed_precision == "bf16":
        params, grads = 2 * p, 4 * p + 2 * p
    elif s.zero_stage == 1 and cfg.train.grad_accum > 1:
        # Between micro-batches ZeRO-1 accumulates whole gradients (in .grad); they are reduced
        # into the partition bucket by bucket at the last one, so the peak is the whole set.
        params, grads = c * p, c * p
    else:
        params, grads = c * p, grad * part
    off: dict[str, int] = {}
    off_to: dict[str, str] = {}
    if s.offload_optimizer != "none":
        # The fp32 master partition, its moments and the fp32 gradient partition leave the GPU.
        off.update(optimizer=optimizer, grads=grad * part)
        off_to.update(optimizer=s.offload_optimizer, grads=s.offload_optimizer)
    if s.offload_params != "none":
        off["params"] = c * part  # the partitions; the persistent tensors stay gathered on the GPU
        off_to["params"] = s.offload_params
    return States(params=params, grads=grads, optimizer=optimizer, off=off, off_to=off_to)


def buffers(cfg: Config, activation_bytes: int = 0) -> tuple[int, list[str]]:
    """Temporary buffers on the fullest rank, with what they are, such that activations + buffers
    is the larger of the two peaks: backward (activations and the buffers of forward and backward)
    and the optimizer step, when the activations are gone but torch's foreach AdamW computes
    sqrt(exp_avg_sq) into one fp32 temporary the size of the rank's parameters (measured; an
    offloaded step runs on the host)."""
    during, notes = _forward_backward_buffers(cfg)
    states = model_states(cfg)
    # fp32 state per parameter element: two moments (8 bytes), and DeepSpeed's master copy (12).
    step = states.on_gpu("optimizer") // (3 if cfg.strategy.name == "deepspeed" else 2)
    if step > activation_bytes + during:
        notes.append("peak at the optimizer step: foreach AdamW's fp32 temporary the size of the parameters")
        return step - activation_bytes, notes
    return during, notes


def _forward_backward_buffers(cfg: Config) -> tuple[int, list[str]]:
    s, m = cfg.strategy, cfg.model
    shape = shape_of(m)
    compute = COMPUTE_BYTES[s.mixed_precision]
    notes: list[str] = []
    if s.name == "ddp":
        if s.mixed_precision == "fp32":
            return 0, notes
        copies = autocast_weight_copies(m, s.activation_checkpointing, s.ac_every_k)
        notes.append("autocast's half-precision copy of the weights, kept for backward")
        return copies, notes
    if s.name == "fsdp":
        largest = max(shape.block, shape.root)
        if s.sharding == "shard_grad_op":
            gathered = shape.root + shape.n_blocks * shape.block
            notes.append("shard_grad_op keeps every unit gathered from forward to backward")
        else:
            gathered = shape.root + min(2, shape.n_blocks) * shape.block
            notes.append("gathered: the root unit (embeddings, output) and two blocks (one prefetched)")
        # Reduce-scatter of the largest unit's gradient: in the compute dtype, then fp32 to reduce.
        reduce = largest * (compute + (4 if compute != 4 else 0))
        return gathered * compute + reduce, notes
    # DeepSpeed: gradient buckets of reduce_bucket_size elements whatever the model's size (two
    # during backward with overlap_comm; one, kept, in ZeRO-3), and ZeRO-3's gathered parameters.
    bucket = ds_setting(cfg, "reduce_bucket_size", REDUCE_BUCKET)
    if cfg.cluster.accelerator == "cpu":
        # On the host an untouched page of torch.empty is never resident: only the part a model's
        # gradients fill counts. (A GPU's caching allocator reserves the whole bucket.)
        bucket = min(bucket, shape.total)
    if s.zero_stage == 3:
        prefetch = ds_setting(cfg, "stage3_prefetch_bucket_size", PREFETCH_BUCKET)
        largest = max(math.prod(shape) for shape in tensor_shapes(m).values())
        gathered = min(shape.total, largest + prefetch)
        if 2 * shape.total <= ds_setting(cfg, "stage3_max_reuse_distance", MAX_REUSE_DISTANCE):
            # A parameter reused within max_reuse_distance elements is not released: from the
            # second step on, a model this small stays gathered from forward to backward.
            gathered = shape.total
        notes.append("ZeRO-3: one reduce bucket (reduce_bucket_size), the module being computed and a "
                     "prefetch bucket gathered")
        return bucket * compute + gathered * compute, notes
    if s.zero_stage == 1 and s.mixed_precision == "bf16":
        return 0, notes  # BF16_Optimizer reduces its fp32 accumulator in place
    notes.append("ZeRO-1/2: two gradient buckets of reduce_bucket_size elements during backward")
    return 2 * bucket * compute, notes


def checkpoint_bytes(cfg: Config) -> int:
    """Size of one checkpoint, all ranks together."""
    per_param = STATE_BYTES_PER_PARAM
    if cfg.strategy.name == "deepspeed" and cfg.strategy.mixed_precision != "fp32":
        per_param += 2  # DeepSpeed also saves the half-precision module weights
    return shape_of(cfg.model).total * per_param + (1 << 20)


def overhead_bytes(cfg: Config) -> int:
    return int(cfg.cluster.reserved_gb * 1e9)


def estimate_memory(cfg: Config) -> Memory:
    """The whole per-rank picture for `cfg`."""
    s, train = cfg.strategy, cfg.train
    states = model_states(cfg)
    mode = compute_mode(s.name, s.mixed_precision)
    acts = activations(cfg.model, train.micro_batch_size, train.seq_len, mode, s.activation_checkpointing,
                       s.ac_every_k)
    buf, notes = buffers(cfg, acts.peak)
    gpu = {"params": states.on_gpu("params"), "grads": states.on_gpu("grads"), "optimizer": states.on_gpu("optimizer"),
           "activations": acts.peak, "buffers": buf, "overhead": overhead_bytes(cfg)}
    gpu["total"] = sum(gpu[k] for k in COMPONENTS)
    return Memory(gpu=gpu, host=states.offloaded("cpu"), nvme=states.offloaded("nvme"), notes=notes)
