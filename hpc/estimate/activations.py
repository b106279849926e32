"""Activation memory: the bytes autograd keeps from forward for backward, tensor by tensor.

Counted from what this model's forward really saves (`hpc.train.model`; checked against
`torch.autograd.graph.saved_tensors_hooks` in tests/test_estimate_memory.py), per micro-batch of
b sequences of s tokens, with d = dim, f = ffn_dim, H = heads, kv = n_kv_heads x head_dim:

  block (fp32)      32bsd + 8bs*kv + 16bsf + 4bHs + 8bs   the block input and the normalised copy
                    for each RMSNorm (and its rsqrt), the q/k/v after rotary, attention output and
                    log-sum-exp, the three SwiGLU intermediates and their product
  block (bf16/fp16 weights, FSDP and DeepSpeed)
                    28bsd + 4bs*kv + 8bsf + 4bHs + 8bs   RMSNorm computes in fp32 from two fp32
                    copies of its input: it keeps 10 bytes per element where the rest keeps 2
  block (autocast, DDP bf16/fp16)
                    30bsd + 4bs*kv + 8bsf + 4bHs + 8bs   the residual stream stays fp32; every linear
                    casts its input again (q, k and v: three copies)
  checkpointed block  its input only (bsd x 4, or x 2 with half-precision weights); in backward it
                    is recomputed whole, one block at a time
  outside blocks    token ids (8bs), the final RMSNorm, the output layer's input, and the
                    log-softmax of the logits in fp32 (4bsV: 4.2 GB for one 8k sequence at a
                    128k vocabulary)

At the loss the logits (bsV x compute bytes, and an fp32 copy under half precision) and, in
backward, their gradient (fp32) also exist for a moment: `Activations.transient` is them, or the
recomputation of one checkpointed block, whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.schema import ModelConfig
from hpc.estimate.shape import shape_of

MODES = ("fp32", "half", "autocast")
"""How the forward runs: fp32 | half (bf16/fp16 weights: FSDP mixed precision, DeepSpeed) |
autocast (fp32 weights cast per op: DDP with bf16/fp16)."""


def compute_mode(engine: str, precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "autocast" if engine == "ddp" else "half"


@dataclass(frozen=True)
class Activations:
    """Bytes per micro-batch on one rank."""

    saved: int
    """Kept from forward for backward, at the end of forward (the usual peak)."""
    transient: int
    """Alive for a moment on top of `saved`: the logits and their gradient at the loss, or one
    checkpointed block recomputed in backward, whichever is larger."""

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def block_bytes(m: ModelConfig, b: int, s: int, mode: str) -> int:
    """Saved bytes of one block that is not checkpointed."""
    d, f, heads = m.dim, m.ffn_dim, m.n_heads
    kv = m.n_kv_heads * (m.dim // m.n_heads)
    bs = b * s
    tail = 4 * bs * heads + 8 * bs  # log-sum-exp (fp32) and two RMSNorm rsqrt columns (fp32)
    if mode == "fp32":
        return 32 * bs * d + 8 * bs * kv + 16 * bs * f + tail
    if mode == "half":
        return 28 * bs * d + 4 * bs * kv + 8 * bs * f + tail
    if mode == "autocast":
        return 30 * bs * d + 4 * bs * kv + 8 * bs * f + tail
    raise ValueError(f"unknown compute mode {mode!r} (one of {', '.join(MODES)})")


def autocast_weight_copies(m: ModelConfig, policy: str = "none", every_k: int = 2) -> int:
    """Under autocast every weight matrix is cast once per forward (bf16/fp16, 2 bytes) and the copy
    is saved for backward: a second, half-precision copy of the model while a micro-batch is in
    flight. Not the embedding (a lookup, which autocast leaves in fp32), nor the norm weights (a
    multiply, likewise), nor a checkpointed block's (cast again when it is recomputed)."""
    shape = shape_of(m)
    return 2 * ((shape.n_blocks - checkpointed(m, policy, every_k)) * shape.block_matrices + shape.output)


def checkpointed(m: ModelConfig, policy: str, every_k: int) -> int:
    """How many blocks `Transformer.set_activation_checkpointing` marks for recomputation."""
    if policy == "all":
        return m.n_layers
    if policy == "every_k":
        return len(range(0, m.n_layers, every_k))
    return 0


def activations(m: ModelConfig, b: int, s: int, mode: str, policy: str = "none", every_k: int = 2) -> Activations:
    """Activation bytes of one micro-batch (b sequences of s tokens) on one rank, weight casts
    excluded (`autocast_weight_copies`: they are a copy of the model, counted as a buffer)."""
    d, vocab, bs = m.dim, m.vocab_size, b * s
    hidden = 2 if mode == "half" else 4  # bytes per element of the residual stream
    full = block_bytes(m, b, s, mode)
    n_ckpt = checkpointed(m, policy, every_k)
    blocks = (m.n_layers - n_ckpt) * full + n_ckpt * bs * d * hidden
    norm = (10 if mode == "half" else 8) * bs * d + 4 * bs
    output_input = (4 if mode == "fp32" else 2) * bs * d
    outside = 8 * bs + norm + output_input + 4 * bs * vocab + 4
    compute = 4 if mode == "fp32" else 2
    # The logits, their fp32 copy under half precision, and the fp32 gradient of the log-softmax.
    at_loss = bs * vocab * (compute + (4 if mode != "fp32" else 0) + 4)
    recompute = full if n_ckpt else 0
    return Activations(saved=blocks + outside, transient=max(at_loss, recompute))
