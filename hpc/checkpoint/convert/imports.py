"""`import`: a Hugging Face Llama folder as a committed step 0 that a job with N ranks and a
strategy loads directly.

The weights become fp32 master copies (every engine here keeps fp32 masters; bf16 in the folder
casts exactly). There is no optimizer state: a DCP step holds the model only (the job starts AdamW
afresh), while a DeepSpeed step keeps its fp32 masters inside the optimizer's partitions, so it
gets AdamW's state at step 0 (zero moments: what a fresh AdamW starts from).
"""

from __future__ import annotations

from typing import Any

import torch

from hpc.checkpoint.convert.neutral import Reader, StepState, TensorInfo, split_key


class ImportedReader:
    """An HF folder's weights as fp32 master copies (the optimizer state is left to the writer:
    none for DCP, zero moments at step 0 for DeepSpeed)."""

    def __init__(self, base: Reader, state: StepState) -> None:
        self.base, self.state = base, state

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(i.key, i.shape, torch.float32) for i in self.base.infos() if i.kind == "model"]

    def read(self, key: str) -> torch.Tensor:
        if split_key(key)[0] != "model":
            raise KeyError(key)
        return self.base.read(key).to(torch.float32)

    def close(self) -> None:
        self.base.close()


def adam_param_groups(cfg: Any, infos: list[TensorInfo]) -> list[dict[str, Any]]:
    """AdamW's param_groups as the job builds them (hpc.train.optim.param_groups: decay for
    matrices, none for vectors), with every hyperparameter torch's AdamW records."""
    from hpc.train.optim import build_optimizer

    fqns = [split_key(i.key)[1] for i in infos if i.kind == "model"]
    shapes = {split_key(i.key)[1]: i.shape for i in infos if i.kind == "model"}
    probe = torch.nn.Module()  # parameters of the right rank (1-element), to read the groups torch makes
    for n, fqn in enumerate(fqns):
        probe.register_parameter(f"p{n}", torch.nn.Parameter(torch.zeros([1] * len(shapes[fqn]))))
    optimizer = build_optimizer(probe, cfg.train)
    by_param = {id(p): fqns[n] for n, p in enumerate(probe.parameters())}
    groups = []
    for group in optimizer.param_groups:
        entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        entry["params"] = [by_param[id(p)] for p in group["params"]]
        groups.append(entry)
    return groups


def import_hf(hf_dir: str, out: str, *, world: int, strategy: str, model: str | None = None,
              exp: str = "tiny_cpu", overrides: list[str] = (), workers: int = 1, force: bool = False,
              verify: bool = True) -> Any:
    """Write the HF folder as a committed step 0 for `world` ranks and `strategy`."""
    from hpc.checkpoint.convert.hf import model_config_from_hf
    from hpc.checkpoint.convert.pipeline import reshard
    from hpc.checkpoint.convert.steps import Source, Target, is_hf_folder
    from hpc.checkpoint.manifest import CheckpointError
    from hpc.config import compose
    from hpc.config.compose import to_yaml

    if not is_hf_folder(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a Hugging Face folder (config.json and *.safetensors). HINT: "
                              "download the model folder first (nodes usually have no network)")
    picks = [f"exp={exp}", f"strategy={strategy}", "cluster=local", f"gpus_per_node={world}"]
    if model:
        picks.append(f"model={model}")
    else:  # the folder's own shape
        picks += [f"model.{k}={v}" for k, v in model_config_from_hf(hf_dir).items()]
    sets = [s for s in overrides if not s.startswith("strategy.")]
    cfg = compose([*picks, *sets, *[s for s in overrides if s.startswith("strategy.")]],
                  which=lambda name: None, environ={})

    def fill(source: Source, target: Target) -> bool:
        """The imported step's state: data at its start, AdamW's groups as the job builds them."""
        from hpc.checkpoint.convert.pipeline import open_reader

        source.state.data = {"consumed_samples": 0, "seed": cfg.train.seed}
        reader = open_reader("hf", source.folder, source.state, cfg.model)
        try:
            source.state.param_groups = adam_param_groups(cfg, reader.infos())
        finally:
            reader.close()
        return True

    return reshard(hf_dir, out, world=world, strategy=strategy,
                   overrides=[s for s in overrides if s.startswith("strategy.")], workers=workers,
                   force=force, verify=verify, model_cfg=cfg.model, config_yaml=to_yaml(cfg),
                   on_source=fill)
