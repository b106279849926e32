"""Communication per optimizer step and a rough step time, per strategy.

Volumes are the bytes each GPU sends in ring collectives (what NCCL's bus bandwidth is measured
against): all-gather and reduce-scatter of M bytes over n ranks send (n-1)/n x M, an all-reduce
twice that. With k micro-batches per step (train.grad_accum), P parameters, c bytes per element
in the compute dtype (2 for bf16/fp16, 4 for fp32), g bytes per gradient element as reduced (4:
FSDP and DDP reduce in fp32; DeepSpeed in the compute dtype):

  ddp                 all-reduce 4P once per step (no_sync on the other micro-batches)
  fsdp full_shard     per micro-batch: all-gather cP in forward, c(P - root) again in backward (the
                      blocks were freed after forward), reduce-scatter 4P
  fsdp shard_grad_op  per micro-batch: all-gather cP once, reduce-scatter 4P
  fsdp hybrid_shard   full_shard's collectives within the shard group (a node by default), plus an
                      all-reduce of the 4P/S gradient shard across replicas once per step
  fsdp no_shard       all-reduce 4P once per step
  zero1               all-reduce gP of the gradients once per step, all-gather cP of the new weights
  zero2               reduce-scatter gP every micro-batch, all-gather cP per step
  zero3               per micro-batch: all-gather cP forward and backward, reduce-scatter gP

A collective whose group spans nodes is counted as inter-node (a ring runs at its slowest link);
one within a node as intra-node. Time: volumes over the cluster preset's bandwidths, compute over
peak_tflops x plan.compute_efficiency, CPU offload's copies over host_link_gbps; the step takes
the longest of them (overlapped), which also names the bottleneck.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.schema import Config
from hpc.estimate.activations import checkpointed
from hpc.estimate.shape import flops_per_token, shape_of


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


@dataclass(frozen=True)
class Traffic:
    """Bytes each GPU sends per optimizer step, and what the step's time is made of."""

    intra: float
    inter: float
    host: float
    """GPU <-> host copies per step (CPU offload)."""
    compute_s: float
    intra_s: float
    inter_s: float
    host_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.intra_s, self.inter_s, self.host_s)

    @property
    def bottleneck(self) -> str:
        parts = {"compute": self.compute_s, "intra-node links": self.intra_s, "inter-node network": self.inter_s,
                 "host link (offload)": self.host_s}
        return max(parts, key=parts.get)


def grad_reduce_bytes(cfg: Config) -> int:
    """Bytes per gradient element in the reduction: fp32 for FSDP (reduce_dtype) and DDP (fp32
    gradients); DeepSpeed reduces in the compute dtype (its communication_data_type defaults to
    bf16/fp16, the fp32 accumulation notwithstanding)."""
    s = cfg.strategy
    return 2 if s.name == "deepspeed" and s.mixed_precision != "fp32" else 4


def traffic(cfg: Config) -> Traffic:
    s, train = cfg.strategy, cfg.train
    shape = shape_of(cfg.model)
    p, root = shape.total, shape.root
    n, per_node = cfg.world_size, cfg.slurm.gpus_per_node
    multi_node = cfg.slurm.nodes > 1
    c = 2 if s.mixed_precision in ("bf16", "fp16") else 4
    g = grad_reduce_bytes(cfg)
    k = train.grad_accum
    flat, replicas, host = 0.0, 0.0, 0.0  # bytes over all N ranks / across replicas; host link
    group_intra = 0.0  # HSDP: collectives inside the shard group
    if s.name == "ddp" or (s.name == "fsdp" and s.sharding == "no_shard"):
        flat = 2 * _ring(n) * 4 * p
    elif s.name == "fsdp" and s.sharding == "full_shard":
        flat = k * _ring(n) * (c * p + c * (p - root) + 4 * p)
    elif s.name == "fsdp" and s.sharding == "shard_grad_op":
        flat = k * _ring(n) * (c * p + 4 * p)
    elif s.name == "fsdp":  # hybrid_shard
        shard = s.hsdp_shard_size or per_node
        group_intra = k * _ring(shard) * (c * p + c * (p - root) + 4 * p)
        replicas = 2 * _ring(n // shard) * 4 * p / shard
    elif s.zero_stage == 1:
        flat = 2 * _ring(n) * g * p + _ring(n) * c * p
    elif s.zero_stage == 2:
        flat = k * _ring(n) * g * p + _ring(n) * c * p
    else:
        flat = k * _ring(n) * (2 * c * p + g * p)
    if s.name == "deepspeed":
        if s.offload_optimizer != "none":
            host += (g + c) * p / n  # gradient partition out, updated weights back
        if s.offload_params != "none":
            host += k * 2 * c * p / n  # the partition fetched for forward and again for backward
    elif s.name == "fsdp" and s.offload_params == "cpu":
        host += k * 2 * c * p / n + (4 + 4) * p / n  # shards to the GPU and back; gradients out
    shard_spans_nodes = s.name == "fsdp" and s.sharding == "hybrid_shard" and \
        (s.hsdp_shard_size or per_node) > per_node
    intra = (0.0 if multi_node else flat) + (0.0 if shard_spans_nodes else group_intra)
    inter = (flat if multi_node else 0.0) + (group_intra if shard_spans_nodes else 0.0) + replicas
    cl = cfg.cluster
    return Traffic(intra=intra, inter=inter, host=host, compute_s=compute_seconds(cfg),
                   intra_s=intra / (cl.intra_node_gbps * 1e9), inter_s=inter / (cl.inter_node_gbps * 1e9),
                   host_s=host / (cl.host_link_gbps * 1e9))


def compute_seconds(cfg: Config) -> float:
    """One optimizer step's compute on one GPU: 6 FLOPs per parameter and token (plus attention),
    and the forward of every checkpointed block once more."""
    m, train, s = cfg.model, cfg.train, cfg.strategy
    tokens = train.micro_batch_size * train.seq_len * train.grad_accum
    recomputed = checkpointed(m, s.activation_checkpointing, s.ac_every_k) / max(m.n_layers, 1)
    blocks_share = 1 - 2 * m.vocab_size * m.dim / max(shape_of(m).total, 1)
    flops = tokens * flops_per_token(m, train.seq_len) * (1 + recomputed * blocks_share / 3)
    return flops / (cfg.cluster.peak_tflops * 1e12 * cfg.plan.compute_efficiency)
