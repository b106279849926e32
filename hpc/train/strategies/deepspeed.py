"""DeepSpeed ZeRO-1/2/3, optionally with optimizer and parameter offload to CPU or NVMe.

The DeepSpeed JSON comes from `hpc.config.deepspeed` (already validated at submit time and again
here, before the engine exists). We always hand DeepSpeed our own optimizer object so the loop can
set the learning rate on it, like every other engine; DeepSpeed counts micro-steps itself and only
reduces gradients and steps the optimizer at the accumulation boundary.
"""

from __future__ import annotations

import torch

from hpc.config import Config
from hpc.config.deepspeed import build_deepspeed_config
from hpc.train.model import Transformer, init_parameter
from hpc.train.optim import build_optimizer
from hpc.train.strategies.base import Engine, World, build_full_model, compute_loss, grad_norm_value, wants_sharded_init


def _build_zero3_partitioned(cfg: Config, ds_config: dict, world: World) -> Transformer:
    """Construct under zero.Init (each module partitioned as soon as it exists), then initialise
    each module's parameters gathered one module at a time, filled on rank 0 and re-partitioned."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=_remote_device(cfg),
                             pin_memory=world.is_cuda):
        model = Transformer(cfg.model)
    # zero.Init makes torch.empty produce the training dtype; the rotary table must stay fp32.
    model.rope = torch.empty(model.rope.shape, dtype=torch.float32, device=model.rope.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        for module_name, module in model.named_modules():
            params = list(module.named_parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if world.rank == 0:
                    for name, param in params:
                        with torch.no_grad():
                            init_parameter(f"{module_name}.{name}".lstrip("."), param, cfg.model)
        model.reset_buffers()
    model.set_activation_checkpointing(cfg.strategy.activation_checkpointing, cfg.strategy.ac_every_k)
    return model


def _remote_device(cfg: Config) -> str | None:
    offload = cfg.strategy.offload_params
    return None if offload == "none" else offload


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, world: World, *, sharded_init: bool | None = None) -> None:
        import deepspeed

        self.cfg, self.world = cfg, world
        self.ds_config = build_deepspeed_config(cfg)
        if cfg.strategy.zero_stage == 3 and wants_sharded_init(cfg, sharded_init):
            self.module = _build_zero3_partitioned(cfg, self.ds_config, world)
        else:
            self.module = build_full_model(cfg, world.device)
        # DeepSpeedCPUAdam only pays off when the optimizer state moved off a GPU; on a CPU-only
        # machine torch's AdamW is already on the CPU (and needs no 70 s JIT build).
        cpu_adam = cfg.strategy.offload_optimizer != "none" and world.is_cuda
        self.optimizer = build_optimizer(self.module, cfg.train, cpu_adam=cpu_adam)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False)
        self.model = self.engine

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *, sync: bool) -> torch.Tensor:
        inputs, targets = inputs.to(self.engine.device), targets.to(self.engine.device)
        loss = compute_loss(self.engine, inputs, targets)
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not sync:
            self.engine.step()  # not a boundary: only counts the micro-step
        return loss.detach()

    def step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed step() off the accumulation boundary: micro-steps per step "
                               "must equal train.grad_accum")
        self.engine.step()
        return grad_norm_value(self.engine.get_global_grad_norm())

    def local_param_bytes(self) -> int:
        # ZeRO-3 keeps the partition in ds_tensor; the visible parameter is an empty placeholder.
        total = 0
        for param in self.module.parameters():
            data = getattr(param, "ds_tensor", param)
            total += data.numel() * data.element_size()
        return total

    def close(self) -> None:
        self.engine.destroy()
