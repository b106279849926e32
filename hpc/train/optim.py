"""AdamW and its learning-rate schedule, shared by every strategy so they all optimise alike."""

from __future__ import annotations

import math

import torch
from torch import nn

from hpc.config.schema import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never norms or other vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # A ZeRO-3 partitioned parameter is an empty 1-D placeholder; its shape is ds_shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig, *, cpu_adam: bool = False) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeed's vectorised CPU Adam when the optimizer state is offloaded from a GPU."""
    groups = param_groups(model, train.weight_decay)
    betas = (train.beta1, train.beta2)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, adamw_mode=True)
    # foreach: one kernel per group instead of one per tensor; the default on GPU, chosen here too.
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, foreach=True)


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up to train.lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(train.max_steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / decay_steps, 1.0)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
