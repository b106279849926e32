"""How this toolkit's Transformer lies in a Hugging Face Llama folder: tensor names, the rotary row
order of q_proj/k_proj, and config.json in both directions. Pure functions of names, shapes and
dicts; hf.py does the reading and writing.

Rotary embeddings are the one real difference: ours rotates (even, odd) feature pairs of each head,
Hugging Face's Llama rotates (first half, second half), so the rows of q_proj and k_proj are
permuted within each head on export (`to_hf_rows`) and back on import (`from_hf_rows`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from hpc.config.schema import ModelConfig
from hpc.train.model import parameter_shapes

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # Our FeedForward is w2(silu(w1 x) * w3 x): w1 is the gated projection.
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Buffers some older exports saved; recomputed by every loader, so safe to skip.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_name(fqn: str) -> str:
    """Hugging Face's name of one of our parameters (`layers.0.attention.wq.weight` ->
    `model.layers.0.self_attn.q_proj.weight`)."""
    if fqn in _TOP:
        return _TOP[fqn]
    match = _LAYER.fullmatch(fqn)
    if match and match.group(2) in _BLOCK:
        return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}"
    raise KeyError(f"{fqn}: not a parameter of this toolkit's Transformer")


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in the model's parameter order (no memory, no weights drawn)."""
    return parameter_shapes(cfg)


def rotary_heads(fqn: str, cfg: ModelConfig) -> int:
    """Heads whose rows the rotary layout permutes in this parameter; 0 for the other parameters."""
    if fqn.endswith("attention.wq.weight"):
        return cfg.n_heads
    if fqn.endswith("attention.wk.weight"):
        return cfg.n_kv_heads
    return 0


def to_hf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Our rows (head, pair, even|odd) to Hugging Face's (head, first|second half, pair)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_hf_rows`."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# --- config.json ------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, dtype: torch.dtype, *, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with our model's shape."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads the top-level rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "dtype": dtype_name, "torch_dtype": dtype_name,  # 5.x and 4.x names
    }


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields (all but name) a Hugging Face Llama config.json describes, for
    `ModelConfig(name=..., **fields)` or `model.<key>=<value>` overrides. Raises ValueError for what
    this Transformer cannot hold (biases, a head_dim of its own)."""
    try:
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = {"dim": dim, "n_layers": int(hf["num_hidden_layers"]), "n_heads": heads,
                  "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
                  "ffn_dim": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
                  "max_seq_len": int(hf.get("max_position_embeddings", 2048)),
                  "rope_theta": float(_rope(hf).get("rope_theta", 10000.0)),
                  "norm_eps": float(hf.get("rms_norm_eps", 1e-6))}
    except KeyError as err:
        raise ValueError(f"config.json has no {err.args[0]}: not a Llama config") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != dim:
        raise ValueError(f"config.json: head_dim={head_dim} x num_attention_heads={heads} != "
                         f"hidden_size={dim}; this Transformer uses head_dim = dim / n_heads")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key}=true; this Transformer's projections have no biases")
    return fields


def function_differences(hf: dict[str, Any], cfg: ModelConfig | None = None) -> list[str]:
    """What makes our Transformer (with `cfg`, when given) compute something other than the Hugging
    Face model, weights aside. Not errors: a fine-tune may change rope_theta on purpose."""
    found = []
    if cfg is not None:
        own = model_fields(hf)
        found += [f"config.json has {theirs}={own[ours]}, model preset {cfg.name} {ours}={getattr(cfg, ours)} "
                  f"(set model.{ours}={own[ours]} to compute what the Hugging Face model computes)"
                  for ours, theirs in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps"))
                  if own[ours] != getattr(cfg, ours)]
    rope_type = _rope(hf).get("rope_type", _rope(hf).get("type", "default"))
    if rope_type != "default":
        found.append(f"rope_type={rope_type} (rotary scaling) is not implemented here: long-wavelength "
                     "rotary frequencies differ")
    if hf.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act={hf['hidden_act']}: this Transformer's MLP uses silu")
    if hf.get("model_type", "llama") != "llama":
        found.append(f"model_type={hf['model_type']}: only Llama is mapped; other architectures may differ")
    return found


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    if "rope_theta" in hf and "rope_theta" not in rope:
        rope["rope_theta"] = hf["rope_theta"]
    return rope
