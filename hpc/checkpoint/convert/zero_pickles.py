"""DeepSpeed's classes as its ZeRO checkpoints pickle them, without importing DeepSpeed.

A ZeRO file's pickle names a few DeepSpeed classes (loss scalers, the ZeRO stage enum, fragment
addresses). Reading allowlists stand-ins under those names for weights_only loading; writing
pickles the stand-ins under the same names (`__pickle_as__`, see torchfile), byte for byte what the
real classes pickle to, so DeepSpeed unpickles its own objects. Importing DeepSpeed would cost a
converter about a second of start-up.
"""

from __future__ import annotations

from typing import Any


class Stored:
    """Stands in for an object DeepSpeed pickles into its checkpoints (a loss scaler, a fragment
    address): its fields and nothing else. Read under DeepSpeed's name, and written under it
    (`__pickle_as__`, see torchfile), so DeepSpeed unpickles its own class with these fields."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class LossScaler(Stored):
    __pickle_as__ = "deepspeed.runtime.fp16.loss_scaler.LossScaler"


class DynamicLossScaler(Stored):
    __pickle_as__ = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"


class FragmentAddress(Stored):
    __pickle_as__ = "deepspeed.utils.tensor_fragment.fragment_address"


class ZeroStage(int):
    """Stands in for DeepSpeed's ZeroStageEnum, an int enum, pickled as the enum pickles itself."""

    __pickle_as__ = "deepspeed.runtime.zero.config.ZeroStageEnum"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self), (int(self),)


STAND_INS = [(c, c.__pickle_as__) for c in (LossScaler, DynamicLossScaler, FragmentAddress, ZeroStage)]
"""The DeepSpeed classes its checkpoints pickle, allowed for weights_only loading under their own
names (nothing else is: a checkpoint is data, not code). Neither reading nor writing imports
DeepSpeed, about a second of a converter's start-up."""


def loss_scaler() -> LossScaler:
    """What DeepSpeed's LossScaler(1.0) holds (a static scale of 1: bf16 and fp32 need none)."""
    return LossScaler(cur_scale=1.0, dynamic=False)
