"""Worker for test_grad_sync.py (one per rank, started by torchrun): profile the collectives of one
non-final and one final micro-step per strategy; rank 0 prints the counts as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from hpc.config import compose
from hpc.train.strategies import World, build_engine


def gradient_reductions(prof) -> dict[str, int]:
    # Count at the c10d level, which every backend's collectives go through (gloo runs a
    # reduce-scatter as an all-reduce underneath, so its own names would mislead).
    names = [e.name for e in prof.events() if e.name.startswith("c10d::")]
    return {"all_reduce": sum("allreduce" in n for n in names),
            "reduce_scatter": sum("reduce_scatter" in n for n in names)}


def main(strategies: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    world = World(rank, world_size, rank, world_size, torch.device("cpu"))
    counts = {}
    for strategy in strategies:
        extra = ["strategy.hsdp_shard_size=2"] if strategy == "fsdp_hybrid_shard" else []
        cfg = compose(["exp=tiny_cpu", "cluster=local", f"gpus_per_node={world_size}",
                       f"strategy={strategy}", "train.grad_accum=2", *extra],
                      which=lambda n: None, environ={})
        engine = build_engine(cfg, world)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
        per_micro_step = []
        for sync in (False, True):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.forward_backward(tokens[:, :-1], tokens[:, 1:], sync=sync)
            per_micro_step.append(gradient_reductions(prof))
        engine.step()
        engine.close()
        counts[strategy] = per_micro_step
    if rank == 0:
        print("COUNTS " + json.dumps(counts), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
