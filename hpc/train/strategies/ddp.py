"""DDP: a full replica per rank, gradients all-reduced in buckets during backward."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from hpc.config import Config
from hpc.train.optim import build_optimizer
from hpc.train.strategies.base import Engine, World, autocast, build_full_model, compute_loss, grad_norm_value


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: Config, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.module = build_full_model(cfg, world.device)
        # DDP broadcasts rank 0's weights at construction; build_full_model already made them equal.
        self.model = DistributedDataParallel(
            self.module, device_ids=[world.device.index] if world.is_cuda else None,
            # The only buffer (rotary table) is computed alike everywhere: no per-forward broadcast.
            gradient_as_bucket_view=True, broadcast_buffers=False)
        self.precision = cfg.strategy.mixed_precision
        self._settle_buckets()
        self.optimizer = build_optimizer(self.module, cfg.train)
        # fp16 has too narrow a range for raw gradients: scale the loss, unscale before clipping.
        self.scaler = torch.amp.GradScaler(world.device.type) if self.precision == "fp16" else None
        self.accum = cfg.train.grad_accum

    def _settle_buckets(self) -> None:
        """DDP regroups its gradient buckets after the first backward, in the order gradients became
        ready, and a bucket's layout decides in which order a ring all-reduce adds the ranks'
        values. A run resumed at step N would reduce step N+1 with the first layout where the
        uninterrupted run used the regrouped one: a last-bit drift with more than two ranks. One
        backward on a few dummy tokens, here, settles the layout before any real step in every
        run (the weights, optimizer and random streams are untouched)."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.world.device) if self.world.is_cuda else None
        tokens = torch.zeros((1, min(8, self.cfg.train.seq_len)), dtype=torch.long, device=self.world.device)
        with autocast(self.world, self.precision):
            loss = compute_loss(self.model, tokens, tokens)
        loss.backward()
        self.module.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.world.device)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *, sync: bool) -> torch.Tensor:
        # no_sync() skips the all-reduce; gradients accumulate locally until the last micro-batch.
        context = contextlib.nullcontext() if sync else self.model.no_sync()
        with context:
            with autocast(self.world, self.precision):
                loss = compute_loss(self.model, inputs, targets)
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def step(self) -> float:
        clip = self.cfg.train.grad_clip or float("inf")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/nan grads
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm_value(norm)
