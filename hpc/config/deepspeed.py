"""The DeepSpeed config, generated from our Config: our keys, then strategy.deepspeed merged over them.

`build_deepspeed_config(cfg)` is pure (no torch): the job calls it again, so the JSON the dry run
prints is the JSON the job uses. Keys our config owns are refused here, with the key to set
instead; checking the rest with DeepSpeed's own parser lives in `hpc.config.deepspeed_check`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hpc.config.errors import ConfigError
from hpc.config.schema import Config

PREFIX = "strategy.deepspeed"
# Our loop writes the metrics lines; DeepSpeed's own step log would only repeat them.
STEPS_PER_PRINT = 2**31 - 1

# Keys our config owns, with the key to set instead. Two settings for one thing would disagree.
OWNED: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "the global batch is train.micro_batch_size x train.grad_accum x world "
                           "size, which DeepSpeed derives at run time",
    ("train_micro_batch_size_per_gpu",): "set by train.micro_batch_size",
    ("gradient_accumulation_steps",): "set by train.grad_accum",
    ("gradient_clipping",): "set by train.grad_clip (0 disables clipping)",
    ("zero_optimization", "stage"): "set by strategy.zero_stage (or strategy=zero1|zero2|zero3)",
    ("zero_optimization", "offload_optimizer", "device"): "set by strategy.offload_optimizer",
    ("zero_optimization", "offload_optimizer", "nvme_path"): "set by strategy.nvme_path",
    ("zero_optimization", "offload_param", "device"): "set by strategy.offload_params",
    ("zero_optimization", "offload_param", "nvme_path"): "set by strategy.nvme_path",
    ("bf16", "enabled"): "set by strategy.mixed_precision",
    ("fp16", "enabled"): "set by strategy.mixed_precision",
    ("bfloat16",): "a legacy name for bf16; precision is set by strategy.mixed_precision",
    ("optimizer",): "the optimizer is set by train.lr/beta1/beta2/weight_decay",
    ("scheduler",): "the schedule is set by train.lr/warmup_steps/min_lr_ratio (the loop sets lr "
                    "every step)",
    ("zero_allow_untested_optimizer",): "fixed: the trainer passes its own torch optimizer",
    ("zero_force_ds_cpu_optimizer",): "fixed: the trainer passes its own torch optimizer",
}


def key_name(path: tuple[str, ...]) -> str:
    """The dotted name a user types for a DeepSpeed key path: strategy.deepspeed.a.b."""
    return ".".join((PREFIX, *path))


def build_deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON for a config: generated keys, then strategy.deepspeed merged over them."""
    s, train = cfg.strategy, cfg.train
    zero: dict[str, Any] = {"stage": s.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    for key, device in (("offload_optimizer", s.offload_optimizer), ("offload_param", s.offload_params)):
        if device != "none":
            # Pinned host memory needs an accelerator; without one pin_memory() fails.
            zero[key] = {"device": device, "pin_memory": cfg.cluster.accelerator == "cuda"}
            if device == "nvme":
                zero[key]["nvme_path"] = s.nvme_path
    ds: dict[str, Any] = {
        # No train_batch_size: DeepSpeed derives it from the world size when the job starts, so a
        # change of nodes= can never contradict it.
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # The trainer passes its own torch AdamW (it sets lr every step), not a DeepSpeed optimizer.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if s.mixed_precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # Accumulate gradients in fp32 as DDP and FSDP do; DeepSpeed's default is the model
        # dtype, which loses small gradients over many micro-batches. (DeepSpeed still reduces
        # them across ranks in bf16: its communication_data_type follows the model dtype.)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif s.mixed_precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    extra = s.deepspeed or {}
    _refuse_owned(extra)
    _refuse_orphans(extra, ds, cfg)
    return _merge(ds, extra, ())


def _refuse_owned(extra: Mapping[str, Any]) -> None:
    for owned, reason in OWNED.items():
        node: Any = extra
        for depth, part in enumerate(owned):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
            # `zero_optimization: true` would set the owned stage too.
            if depth == len(owned) - 1 or not isinstance(node, Mapping):
                raise ConfigError(f"{key_name(owned[:depth + 1])}: {reason}; remove this key")


def _refuse_orphans(extra: Mapping[str, Any], ds: Mapping[str, Any], cfg: Config) -> None:
    """Settings for a feature our config leaves off would be silently unused."""
    s = cfg.strategy
    sections = {("fp16",): ("strategy.mixed_precision", "fp16", s.mixed_precision),
                ("bf16",): ("strategy.mixed_precision", "bf16", s.mixed_precision),
                ("zero_optimization", "offload_optimizer"): ("strategy.offload_optimizer", "cpu|nvme",
                                                             s.offload_optimizer),
                ("zero_optimization", "offload_param"): ("strategy.offload_params", "cpu|nvme",
                                                         s.offload_params)}
    for path, (key, needed, now) in sections.items():
        if lookup(extra, path) is not None and lookup(ds, path) is None:
            raise ConfigError(f"{key_name(path)}: these settings need {key}={needed} (it is {now})")


def lookup(tree: Any, path: tuple[str, ...]) -> Any:
    """The value at path in nested mappings, or None where the path stops."""
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = dict(base)
    for raw_key, value in extra.items():
        key = str(raw_key)
        here = (*path, key)
        if isinstance(out.get(key), dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key_name(here)}={value!r}: expected a mapping of DeepSpeed keys, "
                                  f"e.g. {key_name(here)}.KEY=VALUE")
            out[key] = _merge(out[key], value, here)
        else:
            out[key] = coerce(value)
    return out


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def coerce(value: Any) -> Any:
    """Strings typed as numbers or booleans become them: PyYAML reads 5e8 and 3e-4 as text."""
    if isinstance(value, Mapping):
        return {str(k): coerce(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce(v) for v in value]
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        number = float(text)
        # 5e8 is a count (bucket sizes are ints in DeepSpeed's schema); 1.0 and 3e-4 stay floats.
        return int(number) if "." not in text and number.is_integer() else number
    return value

