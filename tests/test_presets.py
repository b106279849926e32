"""Every shipped experiment can run on the `slurm` cluster preset: its model state fits one GPU.

Pure arithmetic on the composed config (no torch): the parameter count from the model preset's
shape, 16 bytes of model state per parameter for AdamW, split over the shard group the strategy
uses. A coarse guard against presets that cannot start, not a memory planner: a quarter of each
GPU is left for activations, gathered parameters and communication buffers.
"""

from __future__ import annotations

import pytest

from hpc.config import Config, available, compose
from hpc.config.schema import ModelConfig

WITH_SBATCH = {"which": lambda name: f"/usr/bin/{name}", "environ": {}}

GPU_BYTES = 80e9
"""configs/cluster/slurm.yaml: 8 x H100 80 GB per node (the cluster preset has no memory field)."""
STATE_SHARE = 0.75
"""Share of a GPU the model state may take; the rest holds activations and transient buffers (at 70B
and seq_len 8192 with every block checkpointed, the saved block inputs alone are
80 x 8192 x 8192 x 2 B = 10.7 GB)."""


def param_count(m: ModelConfig) -> int:
    """hpc/train/model.py's Transformer: GQA attention, SwiGLU FFN, two RMSNorms per block, a final
    norm, untied input embedding and output projection, no biases."""
    head_dim = m.dim // m.n_heads
    attention = 2 * m.dim * m.n_heads * head_dim + 2 * m.dim * m.n_kv_heads * head_dim  # wq wo, wk wv
    feed_forward = 3 * m.dim * m.ffn_dim  # w1, w3, w2
    block = attention + feed_forward + 2 * m.dim
    return m.n_layers * block + 2 * m.vocab_size * m.dim + m.dim


def state_bytes_per_gpu(cfg: Config) -> float:
    """Bytes of weights, gradients and AdamW state one GPU holds (16 B/param before sharding)."""
    n, s, world = param_count(cfg.model), cfg.strategy, cfg.world_size
    mixed = s.mixed_precision != "fp32"
    if s.name == "deepspeed":
        # Compute-dtype weights and grads (2 + 2 B) beside fp32 master weights and Adam's two
        # moments (12 B); in fp32, 4 + 4 + 8. Offloaded parts take no GPU memory.
        weights, grads, optim = (2, 2, 12) if mixed else (4, 4, 8)
        optim = 0 if s.offload_optimizer != "none" else optim
        weights = 0 if s.offload_params != "none" else weights
        sharded = {1: optim, 2: grads + optim, 3: weights + grads + optim}[s.zero_stage]
        return n * (weights + grads + optim - sharded) + n * sharded / world
    # DDP and FSDP2 keep fp32 weights and grads (bf16 copies are made per use) and Adam's two fp32
    # moments: 4 + 4 + 8 B.
    if s.name == "ddp" or s.sharding == "no_shard":
        return 16.0 * n
    if s.offload_params == "cpu":
        return 0.0  # FSDP CPU offload: shards, gradients and the optimizer step live on the host
    group = (s.hsdp_shard_size or cfg.slurm.gpus_per_node) if s.sharding == "hybrid_shard" else world
    state = 16.0 * n / group
    if s.sharding == "shard_grad_op":
        # Every block's gathered compute-dtype weights are kept from forward to backward.
        state += n * (2 if mixed else 4)
    return state


@pytest.mark.parametrize("exp", available("exp"))
def test_every_shipped_experiment_fits_the_slurm_cluster(exp: str) -> None:
    cfg = compose([f"exp={exp}"], **WITH_SBATCH)
    assert cfg.cluster.name == "slurm" and cfg.cluster.max_gpus_per_node == 8
    state = state_bytes_per_gpu(cfg)
    assert state <= STATE_SHARE * GPU_BYTES, (
        f"{exp}: {param_count(cfg.model) / 1e9:.2f}B params on {cfg.strategy.name} "
        f"({cfg.strategy.sharding if cfg.strategy.name == 'fsdp' else cfg.strategy.zero_stage}) "
        f"at world {cfg.world_size} hold {state / 1e9:.1f} GB of model state per GPU; at most "
        f"{STATE_SHARE * GPU_BYTES / 1e9:.0f} GB of an 80 GB GPU leaves room for activations")


@pytest.mark.parametrize("exp", available("exp"))
def test_the_planner_lets_every_shipped_experiment_through_on_the_slurm_preset(exp: str) -> None:
    """What submit checks first (hpc.estimate.check): a shipped experiment it refused could not be
    submitted as shipped."""
    from hpc.config.compose import compose_strategies
    from hpc.estimate.check import check_fit

    cfg, preset, variants = compose_strategies([f"exp={exp}"], **WITH_SBATCH)
    fit = check_fit(cfg, preset, variants)
    assert cfg.cluster.name == "slurm" and not fit.refuse and not fit.problem, fit.problem


def test_param_count_matches_the_published_sizes() -> None:
    sizes = {name: param_count(compose(["exp=tiny_cpu", f"model={name}"], **WITH_SBATCH).model)
             for name in ("llama2_7b", "llama2_13b", "llama3_8b", "llama3_70b")}
    assert sizes == {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320,
                     "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}


@pytest.mark.parametrize("args,gb", [
    # A full fp32 replica with AdamW: 6.74B x 16 B.
    (["exp=7b_zero1", "strategy=ddp"], 107.8),
    # HYBRID_SHARD within one 8-GPU node: 70.55B x 16 B / 8.
    (["exp=70b_hsdp", "strategy.hsdp_shard_size=8"], 141.1),
])
def test_the_check_fails_a_preset_that_cannot_run(args: list[str], gb: float) -> None:
    state = state_bytes_per_gpu(compose(args, **WITH_SBATCH))
    assert state / 1e9 == pytest.approx(gb, abs=0.1)
    assert state > STATE_SHARE * GPU_BYTES
