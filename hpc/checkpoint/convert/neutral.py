"""The one shape every checkpoint format is read into and written from: named whole tensors plus a
small record of everything that is not a tensor. Each format (DCP, DeepSpeed ZeRO, Hugging Face)
implements a Reader and a Writer against it; the pipeline moves one tensor at a time from one to
the other, so no process ever holds the whole model.

Tensor keys (model FQNs are this toolkit's Transformer's, e.g. `layers.0.attention.wq.weight`):

    model/<fqn>               the exact weights: fp32 master copy where the engine keeps one
    optim/<fqn>/exp_avg       AdamW first moment, fp32, the parameter's shape
    optim/<fqn>/exp_avg_sq    AdamW second moment, fp32, the parameter's shape
    optim/<fqn>/step          AdamW step count, a 0-d fp32 tensor (DeepSpeed keeps one per group:
                              every parameter of the group gets the group's value)

Model keys come in the model's own parameter order (`Transformer.named_parameters()`), which is
also the order DeepSpeed flattens them in; a Writer may ask for another order (`Part.keys`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

MODEL, OPTIM = "model", "optim"
ADAM_STATES = ("exp_avg", "exp_avg_sq", "step")


def adamw_group_defaults() -> dict[str, Any]:
    """Every hyperparameter torch's AdamW keeps in a param group, with build_optimizer's foreach=True:
    a load asks for each one, and a source from another engine may lack some. Read off the
    constructors' signatures (AdamW is Adam with decoupled weight decay), because building an
    optimizer imports torch._dynamo, seconds of start-up for a converter (a test compares the two)."""
    import inspect

    defaults: dict[str, Any] = {}
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        defaults.update({name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                         if name not in ("self", "params") and p.default is not inspect.Parameter.empty})
    defaults.update(decoupled_weight_decay=True, foreach=True)
    return defaults


def model_key(fqn: str) -> str:
    return f"{MODEL}/{fqn}"


def optim_key(fqn: str, state: str) -> str:
    return f"{OPTIM}/{fqn}/{state}"


def split_key(key: str) -> tuple[str, str, str | None]:
    """`model/<fqn>` -> ("model", fqn, None); `optim/<fqn>/<state>` -> ("optim", fqn, state)."""
    kind, _, rest = key.partition("/")
    if kind == MODEL:
        return kind, rest, None
    if kind == OPTIM:
        fqn, _, state = rest.rpartition("/")
        return kind, fqn, state
    raise ValueError(f"not a checkpoint tensor key: {key!r}")


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor from metadata alone (no tensor data read)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def kind(self) -> str:
        """model | optimizer"""
        return "model" if self.key.startswith(MODEL + "/") else "optimizer"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class StepState:
    """Everything of a step that is not a model or optimizer tensor."""

    step: int
    world_size: int
    strategy: str
    """The engine that saved it: ddp | fsdp | deepspeed (hf for an imported folder)."""
    zero_stage: int = 0
    data: dict[str, int] = field(default_factory=dict)
    """The data position, as the manifest holds it: {consumed_samples, seed, num_samples}."""
    config_yaml: str = ""
    """The resolved config the step was saved with (config.yaml); empty when unknown."""
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    """AdamW's groups: hyperparameters (lr, betas, eps, weight_decay, ...) and "params": [fqn, ...]."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reader(Protocol):
    """A source checkpoint, opened read-only (memory-mapped where the format allows)."""

    state: StepState

    def infos(self) -> list[TensorInfo]:
        """Every tensor, model keys first in the model's parameter order, from metadata only."""

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor, on the CPU, in its saved dtype (no copy of anything else)."""

    def close(self) -> None: ...


class Part(Protocol):
    """One worker's share of a Writer's output; picklable, so a worker process can run it."""

    keys: list[str]
    """The tensors this part needs, in the order it must be given them."""

    def write(self, key: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> Any:
        """Finish this part's files; returns a picklable record for Writer.finish."""


class Writer(Protocol):
    """A destination step folder (local path) being written in a format."""

    def parts(self, workers: int) -> list[Part]:
        """Split the work into at most `workers` independent parts."""

    def finish(self, records: list[Any]) -> None:
        """Write the format's own index files from the parts' records (not the manifest: the
        pipeline writes that last)."""
