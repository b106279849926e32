"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Built in two phases so a 70B model never exists whole on one rank: `Transformer(cfg)` under
`torch.device("meta")` allocates nothing, the strategy shards it, and only then does
`materialize()` give each rank storage for its own shard and fill it (`init_weights`). Small models
take the same path on a real device, which makes every strategy start from the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpc.config.schema import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 has too few mantissa bits for a mean of squares.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin of the rotary angles, shape (max_seq_len, head_dim // 2, 2), fp32."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) by position; pairs are (even, odd) features."""
    seq = x.shape[1]
    cos, sin = tables[:seq, None, :, 0], tables[:seq, None, :, 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One transformer block: the unit FSDP shards and activation checkpointing recomputes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.recompute = False
        """Drop this block's activations after forward and recompute them in backward."""

    def _forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            # Non-reentrant: works with FSDP2 hooks and DeepSpeed ZeRO-3 parameter fetching, and
            # lets inputs that do not require grad pass through.
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not a parameter and not saved: recomputed by init_weights, so meta-device construction
        # followed by to_empty() cannot leave garbage in it.
        self.register_buffer("rope", torch.empty(cfg.max_seq_len, cfg.dim // cfg.n_heads // 2, 2),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope)
        return self.output(self.norm(h))

    def set_activation_checkpointing(self, policy: str, every_k: int = 1) -> int:
        """none | all | every_k: mark blocks for recomputation; returns how many are marked."""
        for i, layer in enumerate(self.layers):
            layer.recompute = policy == "all" or (policy == "every_k" and i % every_k == 0)
        return sum(layer.recompute for layer in self.layers)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the rotary tables (a meta-device model has none until materialised)."""
        self.rope.copy_(rotary_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len,
                                      self.cfg.rope_theta, device=self.rope.device))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter from the current RNG, in a fixed order, and the rotary tables."""
        self.reset_buffers()
        for name, param in self.named_parameters():
            # A sharded (DTensor) parameter is filled shard by shard: each rank draws only its part.
            init_parameter(name, param.to_local() if hasattr(param, "to_local") else param, self.cfg)


def init_parameter(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> None:
    """Llama-style init: norms 1, weights normal(0, 0.02), residual projections scaled by depth."""
    if name.endswith("norm.weight"):
        nn.init.ones_(tensor)
    elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        nn.init.normal_(tensor, std=0.02 / math.sqrt(2 * cfg.n_layers))
    else:
        nn.init.normal_(tensor, std=0.02)


def materialize(model: Transformer, device: torch.device | str, seed: int, *, rank_offset: int = 0,
                buffer_device: torch.device | str | None = None) -> None:
    """Give a meta-device (possibly sharded) model real storage on `device` and initialise it.

    With `rank_offset=0` every rank draws the same numbers, which is what an unsharded model needs.
    Sharded parameters pass their rank so shards are not copies of one another.
    """
    model.to_empty(device=device)
    if buffer_device is not None:
        model.rope = torch.empty_like(model.rope, device=buffer_device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + rank_offset)
        model.init_weights()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


_DEFAULT_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                  "xavier_normal_", "constant_", "ones_", "zeros_")


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in the model's own parameter order, with no tensor allocated: for
    tools that map checkpoints. The model is built on the meta device with torch's per-layer default
    initialisers skipped: on meta they change nothing, yet their first call imports torch._dynamo,
    seconds of start-up for a command that never trains. (The swap is process-wide for its few
    milliseconds: call it where no other thread is building a model.)"""
    saved = {name: getattr(nn.init, name) for name in _DEFAULT_INITS}
    try:
        for name in _DEFAULT_INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            model = Transformer(cfg)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}
