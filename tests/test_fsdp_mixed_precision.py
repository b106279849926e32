"""FSDP2 with bf16 mixed precision computes in bf16 but rotates queries and keys with the fp32 table.

FSDP2 casts the floating-point forward arguments of every wrapped block to the compute dtype; the
rotary table is such an argument, and in bf16 its cos/sin keep 8 significant bits, so positions
far into a long sequence would be rotated by visibly wrong angles. One gloo rank is enough: the cast
happens in each block's pre-forward hook whatever the world size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hpc.config import compose
from hpc.train.strategies import World
from hpc.train.strategies.fsdp import FSDPEngine

NO_SBATCH = {"which": lambda name: None, "environ": {}}


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield World(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


@pytest.mark.parametrize("ac", ["none", "all"])
def test_bf16_blocks_see_the_fp32_rotary_table(one_rank: World, ac: str) -> None:
    cfg = compose(["exp=tiny_cpu", "gpus_per_node=1", "strategy=fsdp_full_shard",
                   "strategy.mixed_precision=bf16", f"strategy.activation_checkpointing={ac}"], **NO_SBATCH)
    engine = FSDPEngine(cfg, one_rank, sharded_init=False)
    seen: list[tuple[torch.dtype, torch.Tensor]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        hidden, rope = args
        seen.append((hidden.dtype, rope))

    for block in engine.module.layers:
        block.attention.register_forward_pre_hook(record)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len))
    engine.forward_backward(tokens, tokens, sync=True)

    assert len(seen) >= cfg.model.n_layers
    table = engine.module.rope
    assert table.dtype == torch.float32
    for hidden_dtype, rope in seen:
        assert hidden_dtype == torch.bfloat16, "mixed precision no longer computes the blocks in bf16"
        assert rope.dtype == torch.float32, f"the rotary table reached attention as {rope.dtype}"
        assert torch.equal(rope, table)
