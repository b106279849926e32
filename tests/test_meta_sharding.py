"""A 70B-shape model built on the meta device and sharded at world 8 never materialises on one rank.

One process plays rank 0 of a fake 8-rank (and 64-rank, HSDP groups of 32) process group: FSDP2
computes the shard layout exactly as on a real cluster, while every tensor stays on the meta device
(no storage).
"""

from __future__ import annotations

import resource

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from hpc.config import compose
from hpc.estimate.shape import count_params
from hpc.train.strategies.base import build_meta_model
from hpc.train.strategies.fsdp import mesh_shape, shard_model


@pytest.fixture
def fake_world():
    def start(world_size: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.parametrize("exp,world,shard_group", [("70b_fsdp", 8, 8), ("70b_hsdp", 128, 64)])
def test_70b_shards_to_its_group_share_per_rank_without_allocating(fake_world, exp, world, shard_group) -> None:
    nodes = world // 8
    cfg = compose([f"exp={exp}", "cluster=slurm", f"nodes={nodes}", "gpus_per_node=8"],
                  which=lambda name: "/usr/bin/" + name, environ={})
    fake_world(world)
    rss_before = _rss_gb()
    model = build_meta_model(cfg)
    shape = mesh_shape(cfg, world, 8)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard") if len(shape) == 2 else ("shard",))
    shard_model(model, cfg, mesh)

    locals_ = [p.to_local() for p in model.parameters()]
    assert all(t.is_meta for t in locals_), "a parameter was materialised"
    total_bytes = count_params(cfg.model) * 4  # fp32 master weights
    rank_bytes = sum(t.numel() * t.element_size() for t in locals_)
    # FSDP2 pads dim 0 of each parameter up to a multiple of the shard group: at most one row each.
    padding = sum(-(-p.shape[0] // shard_group) * p[0].numel() * 4 for p in model.parameters()) - total_bytes / shard_group
    print(f"\n{exp} world {world} mesh {shape}: total {total_bytes / 2**30:.1f} GiB, "
          f"rank 0 holds {rank_bytes / 2**30:.2f} GiB (total/{shard_group} = "
          f"{total_bytes / shard_group / 2**30:.2f} GiB, padding {padding / 2**20:.2f} MiB)")
    assert total_bytes / shard_group <= rank_bytes <= total_bytes / shard_group + padding
    assert count_params(cfg.model) > 70e9
    # Building and sharding touched no parameter storage: the peak RSS grew far less than one
    # shard (35 GB here), let alone the 282 GB model.
    assert _rss_gb() - rss_before < 1.0
