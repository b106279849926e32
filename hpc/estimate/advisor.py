"""The strategy advisor: every strategy preset for one model, cluster and batch, side by side, a
recommendation with the reason at each branch, and the smallest changes that make a job fit.

The decision tree is the usual one (a replica if it fits; else shard the optimizer state and
gradients; else shard everything, within a node when the network is the bottleneck; else
offload), but every branch is decided by this job's numbers, not by rules of thumb. Where the rules
of thumb go wrong - SHARD_GRAD_OP "for 40 GB GPUs" keeps every gathered parameter from forward to
backward, DDP "needs 2 bytes per parameter" when AdamW keeps 16 - the numbers say so.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc.config.errors import ConfigError
from hpc.config.schema import Config
from hpc.estimate.comm import Traffic, traffic
from hpc.estimate.memory import Memory, estimate_memory

STRATEGY_PRESETS = ("ddp", "fsdp_no_shard", "zero1", "zero2", "fsdp_shard_grad_op", "fsdp_full_shard", "zero3",
                    "fsdp_hybrid_shard", "zero3_offload")
"""Every preset in configs/strategy/, simplest first (the order ties are broken in)."""
TIERS = (
    ("a full replica on every GPU", ("ddp", "fsdp_no_shard")),
    ("sharded optimizer state and gradients, full weights", ("zero1", "zero2", "fsdp_shard_grad_op")),
    ("everything sharded", ("fsdp_full_shard", "zero3", "fsdp_hybrid_shard")),
    ("state offloaded to host memory", ("zero3_offload",)),
)
SIMPLER_WITHIN = 1.10
"""A simpler strategy is kept when its predicted step is at most this much slower."""
GB = 1e9
MAX_NODES_TRIED = 256
"""How far `fixes` looks for a node count that fits, where the preset does not cap it."""


@dataclass(frozen=True)
class Budget:
    """What one rank may use: GPU memory, or on a cpu cluster its share of the host's memory."""

    bytes: int | None
    what: str
    """'80 GB per GPU (cluster slurm)', or why it is unknown."""
    host_bytes: int | None = None
    """Host memory a rank may fill with offloaded state (cluster.mem_per_gpu_gb), when known."""


def budget(cfg: Config, *, host_bytes: int | None = None) -> Budget:
    cl = cfg.cluster
    host = int(cl.mem_per_gpu_gb * GB) if cl.mem_per_gpu_gb is not None and cl.accelerator == "cuda" else None
    if cl.gpu_memory_gb is not None:
        unit = "GPU" if cl.accelerator == "cuda" else "rank"
        return Budget(int(cl.gpu_memory_gb * GB), f"{cl.gpu_memory_gb:g} GB per {unit} (cluster {cl.name})", host)
    if cl.accelerator == "cuda":
        return Budget(None, f"cluster {cl.name} does not state its GPU memory (cluster.gpu_memory_gb)", host)
    total = host_bytes if host_bytes is not None else host_memory()
    if total is None:
        return Budget(None, "this machine's memory is unknown")
    share = total // cfg.world_size
    return Budget(share, f"{share / GB:.1f} GB per rank ({total / GB:.1f} GB of host memory over "
                         f"{cfg.world_size} rank(s) on this machine, cluster {cl.name})")


def host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Option:
    """One strategy preset applied to the job."""

    preset: str
    cfg: Config | None
    error: str | None = None
    """Why the preset cannot be applied to this job (the schema's own message)."""
    memory: Memory | None = None
    traffic: Traffic | None = None
    fits: bool | None = None
    """None: no budget to compare with."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.preset, "applicable": self.error is None}
        if self.error is not None:
            out.update(error=self.error, fits=False)
            return out
        assert self.memory is not None and self.traffic is not None
        t = self.traffic
        out.update(gpu_bytes=dict(self.memory.gpu), host_bytes=self.memory.host, nvme_bytes=self.memory.nvme,
                   comm_bytes_per_step={"intra": int(t.intra), "inter": int(t.inter), "host": int(t.host)},
                   fits=self.fits, step_s=t.step_s, bottleneck=t.bottleneck,
                   seconds={"compute": t.compute_s, "intra": t.intra_s, "inter": t.inter_s, "host": t.host_s},
                   notes=list(self.memory.notes))
        return out


def evaluate(preset: str, cfg: Config | ConfigError, limit: Budget) -> Option:
    if isinstance(cfg, ConfigError):
        return Option(preset, None, error=str(cfg))
    memory = estimate_memory(cfg)
    return Option(preset, cfg, memory=memory, traffic=traffic(cfg), fits=fits_in(memory, cfg, limit))


def fits_in(memory: Memory, cfg: Config, limit: Budget) -> bool | None:
    """On the GPU, and the offloaded state in the host memory a rank has (on a cpu cluster both
    are the same memory)."""
    if limit.bytes is None:
        return None
    if cfg.cluster.accelerator == "cpu":
        return memory.total + memory.host <= limit.bytes
    return memory.total <= limit.bytes and (limit.host_bytes is None or memory.host <= limit.host_bytes)


@dataclass
class Advice:
    recommended: str | None
    path: list[str] = field(default_factory=list)
    """The decision path: one line per branch, with its numbers."""


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def recommend(options: Sequence[Option], limit: Budget) -> Advice:
    """Walk the tiers simplest first; in the first tier where something fits take the fastest
    (a simpler one within SIMPLER_WITHIN of it); then prefer a later tier only when it is faster."""
    by_name = {o.preset: o for o in options}
    path: list[str] = []
    chosen: Option | None = None
    for question, names in TIERS:
        candidates = [by_name[n] for n in names if n in by_name and by_name[n].error is None]
        if not candidates:
            continue
        fitting = [o for o in candidates if o.fits is not False]
        sizes = ", ".join(f"{o.preset} {_gb(o.memory.total)}" for o in candidates if o.memory)
        if chosen is not None:
            faster = [o for o in fitting if o.traffic.step_s * SIMPLER_WITHIN < chosen.traffic.step_s]
            if faster:
                best = min(faster, key=lambda o: o.traffic.step_s)
                path.append(f"{question}? {best.preset} also fits and its step is faster "
                            f"({best.traffic.step_s:.2f} s vs {chosen.traffic.step_s:.2f} s: {chosen.preset} is "
                            f"bound by its {chosen.traffic.bottleneck}): take it")
                chosen = best
            continue
        if not fitting:
            path.append(f"{question}? no: per GPU {sizes} > {limit.what}")
            continue
        fastest = min(o.traffic.step_s for o in fitting)
        best = next(o for o in fitting if o.traffic.step_s <= fastest * SIMPLER_WITHIN)
        fit_text = "fits" if best.fits else "cannot be checked"
        path.append(f"{question}? yes: {best.preset} {fit_text} ({_gb(best.memory.total)} per GPU, "
                    f"{limit.what}), predicted step {best.traffic.step_s:.2f} s, bound by its "
                    f"{best.traffic.bottleneck}")
        chosen = best
    if chosen is None:
        path.append("nothing fits at this size: see the changes below")
    path += _departures(by_name)
    return Advice(chosen.preset if chosen else None, path)


def _departures(by_name: dict[str, Option]) -> list[str]:
    """Where the usual rules of thumb and this job's numbers disagree, said with the numbers."""
    notes = []
    ddp = by_name.get("ddp")
    if ddp is not None and ddp.memory is not None and ddp.fits is False:
        states = ddp.memory.model_states
        notes.append(f"note: a DDP replica is {_gb(states)} of model states per GPU (fp32 weights and gradients "
                     f"and AdamW's two moments: 16 bytes per parameter), not the 4 bytes of bf16 weights and "
                     f"gradients often quoted ({_gb(states / 4)})")
    grad_op, full = by_name.get("fsdp_shard_grad_op"), by_name.get("fsdp_full_shard")
    if grad_op is not None and full is not None and grad_op.memory and full.memory and grad_op.fits is False \
            and full.fits:
        notes.append(f"note: shard_grad_op is often advised for small GPUs, but it keeps every block's gathered "
                     f"weights from forward to backward ({_gb(grad_op.memory.gpu['buffers'])} of buffers here): "
                     f"full_shard fits where it does not")
    return notes


def fixes(cfg: Config, chosen: str, limit: Budget, variants: dict[str, Config | ConfigError]) -> list[str]:
    """The smallest single changes after which the job fits, each as the override to type."""
    if limit.bytes is None:
        return []
    out: list[str] = []

    def fitting(c: Config) -> str | None:
        """The GB per GPU `c` needs when it fits, else None."""
        memory = estimate_memory(c)
        return _gb(memory.total) if fits_in(memory, c, limit) else None

    s, train = cfg.strategy, cfg.train
    if s.activation_checkpointing != "all":
        c = dataclasses.replace(cfg, strategy=dataclasses.replace(s, activation_checkpointing="all"))
        if need := fitting(c):
            out.append(f"strategy.activation_checkpointing=all ({need} per GPU)")
    mbs = train.micro_batch_size // 2
    while mbs >= 1:
        c = dataclasses.replace(cfg, train=dataclasses.replace(
            train, micro_batch_size=mbs, grad_accum=train.grad_accum * (train.micro_batch_size // mbs)))
        if need := fitting(c):
            out.append(f"train.micro_batch_size={mbs} train.grad_accum={c.train.grad_accum} (same global batch; "
                       f"{need} per GPU)")
            break
        mbs //= 2
    for name, variant in variants.items():
        if name != chosen and not isinstance(variant, ConfigError) and (need := fitting(variant)):
            out.append(f"strategy={name} ({need} per GPU)")
    if cfg.cluster.kind == "slurm":
        for nodes in range(cfg.slurm.nodes + 1, (cfg.cluster.max_nodes or MAX_NODES_TRIED) + 1):
            try:
                c = dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, nodes=nodes))
            except ConfigError:  # e.g. an HSDP group that does not divide the new world size
                continue
            if need := fitting(c):
                out.append(f"nodes={nodes} ({need} per GPU)")
                break
    return out

