"""The model's shape as numbers: parameters per tensor and per sharding unit, FLOPs per token.

Pure arithmetic on a `ModelConfig` (no torch), shared by the planner on the login node and by the
trainer (its metrics, sharded-init threshold and checkpoint-space check import `count_params` and
`flops_per_token` from here), so the two never disagree about what the model is. The tensors are
the ones `hpc.train.model.Transformer` creates, in its order; `tests/test_estimate_memory.py`
checks them against the real module.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.schema import ModelConfig


@dataclass(frozen=True)
class Shape:
    """Parameter counts of one model, by the units FSDP shards and checkpointing recomputes."""

    embedding: int
    """tok_embeddings: vocab x dim."""
    block: int
    """One transformer block: attention (GQA), SwiGLU, two RMSNorm weights."""
    block_matrices: int
    """The block's weight matrices (what autocast casts to the compute dtype); norms excluded."""
    n_blocks: int
    final_norm: int
    output: int
    """The output projection: vocab x dim (not tied to the embedding)."""

    @property
    def total(self) -> int:
        return self.embedding + self.n_blocks * self.block + self.final_norm + self.output

    @property
    def root(self) -> int:
        """What FSDP's root unit holds: everything outside the blocks."""
        return self.embedding + self.final_norm + self.output


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, by name, in the order the model creates them."""
    head_dim = cfg.dim // cfg.n_heads
    q, kv = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        block = f"layers.{i}."
        shapes.update({
            block + "attention_norm.weight": (cfg.dim,),
            block + "attention.wq.weight": (q, cfg.dim),
            block + "attention.wk.weight": (kv, cfg.dim),
            block + "attention.wv.weight": (kv, cfg.dim),
            block + "attention.wo.weight": (cfg.dim, q),
            block + "ffn_norm.weight": (cfg.dim,),
            block + "feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim),
            block + "feed_forward.w3.weight": (cfg.ffn_dim, cfg.dim),
            block + "feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim),
        })
    shapes["norm.weight"] = (cfg.dim,)
    shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


def shape_of(cfg: ModelConfig) -> Shape:
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    matrices = attention + 3 * cfg.dim * cfg.ffn_dim
    return Shape(embedding=cfg.vocab_size * cfg.dim, block=matrices + 2 * cfg.dim, block_matrices=matrices,
                 n_blocks=cfg.n_layers, final_norm=cfg.dim, output=cfg.vocab_size * cfg.dim)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the shape alone (no tensors)."""
    return shape_of(cfg).total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (embedding lookup excluded) plus causal attention."""
    dense = count_params(cfg) - cfg.vocab_size * cfg.dim
    # QK^T and AV: 2 matmuls x 2 FLOPs x seq x dim per layer forward, x3 for training, /2 causal.
    attention = 6 * cfg.n_layers * seq_len * cfg.dim
    return 6 * dense + attention
