"""What an engine really holds: its model states counted from its own tensors, for checking the
planner (tests/test_estimate_memory.py) and for the benchmark's predicted-vs-measured plot.

Each tensor's storage is counted once (a parameter that is a view into DeepSpeed's flat buffer
is the buffer), by what it is:

  params     the module's parameters (DTensor shards by their padded storage), DeepSpeed's flat
             bit16 groups, ZeRO-3's partitions (ds_tensor) and the parameters it keeps gathered
  grads      .grad of every parameter, DeepSpeed's gradient partitions and fp32 accumulators
  optimizer  the optimizer's state (exp_avg, exp_avg_sq, step) and DeepSpeed's fp32 master copies
  buffers    DeepSpeed's reduce buckets

Meta tensors (DeepSpeed keeps some as shape records) hold no memory and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KINDS = ("params", "grads", "optimizer", "buffers")

# DeepSpeed 0.19 optimizer attributes, by kind (stage_1_and_2.py, bf16_optimizer.py, stage3.py).
_DS_ATTRIBUTES = {
    "params": ("bit16_groups", "bf16_groups", "fp16_partitioned_groups"),
    "grads": ("averaged_gradients", "fp32_groups_gradients", "non_expert_gradients", "grad_partitions_flat_buffer",
              "fp32_groups_gradients_flat"),
    "optimizer": ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"),
}


def _tensors(obj: Any, depth: int = 0) -> Iterable[Any]:
    """Every tensor in obj, through lists, tuples, dicts and DeepSpeed's bucket objects."""
    import torch

    if depth > 5:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors(value, depth + 1)


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def census(engine: Any) -> dict[str, int]:
    """Bytes of each kind this rank's engine holds now."""
    seen: set[tuple[str, int]] = set()
    out = dict.fromkeys(KINDS, 0)

    def add(kind: str, tensors: Iterable[Any]) -> None:
        for tensor in tensors:
            tensor = _local(tensor)
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = (tensor.device.type, storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            out[kind] += storage.nbytes()

    module = engine.module
    params = list(module.parameters())
    ds = getattr(engine, "engine", None)
    optimizer = ds.optimizer if ds is not None else engine.optimizer
    if ds is not None:  # DeepSpeed's own containers first: a parameter view is its flat buffer
        for kind, names in _DS_ATTRIBUTES.items():
            for name in names:
                add(kind, _tensors(getattr(optimizer, name, None)))
        offload = getattr(optimizer, "parameter_offload", None)
        add("params", _tensors(getattr(offload, "persistent_parameters", None)))
        add("params", (p.ds_tensor for p in params if hasattr(p, "ds_tensor")))
        add("buffers", _tensors(getattr(optimizer, "ipg_buckets", None)))
        base = optimizer.optimizer
        add("optimizer", (p for group in base.param_groups for p in group["params"]))
        add("optimizer", _tensors(list(base.state.values())))
    add("params", params)
    add("grads", (p.grad for p in params if p.grad is not None))
    if ds is None:
        add("optimizer", _tensors(list(optimizer.state.values())))
    return out


def census_cases(spec: dict[str, Any]) -> dict[str, Any]:
    """In a rank (hpc.bench.harness.run_ranks): for each case (label -> overrides) build the engine,
    run one optimizer step and count its model states: gradients after each micro-batch's backward
    (the most of them), parameters and optimizer state after the step; every rank's counts,
    gathered on rank 0."""
    import torch
    import torch.distributed as dist

    from hpc.bench.harness import join_local, local_config
    from hpc.train.strategies import build_engine

    cases: dict[str, list[str]] = spec["cases"]
    _, world = join_local(next(iter(cases.values())))
    results: dict[str, Any] = {}
    for label, overrides in cases.items():
        cfg = local_config(world.world_size, overrides)
        engine = build_engine(cfg, world)
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len),
                               generator=torch.Generator().manual_seed(0))
        backward = []
        for micro in range(cfg.train.grad_accum):  # gradients after every micro-batch's backward
            engine.forward_backward(tokens, tokens, sync=micro == cfg.train.grad_accum - 1)
            backward.append(census(engine))
        engine.step()
        after_step = census(engine)
        mine = {"params": after_step["params"], "grads": max(c["grads"] for c in backward),
                "optimizer": after_step["optimizer"],
                "buffers": max(max(c["buffers"] for c in backward), after_step["buffers"])}
        every: list[Any] = [None] * world.world_size
        dist.all_gather_object(every, mine)
        results[label] = every
        engine.close()
        del engine
        dist.barrier()
    return results
