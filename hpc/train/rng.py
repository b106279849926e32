"""The random streams of one rank: seeded from the config, captured into and restored from a
checkpoint. The loop seeds them at start; the checkpoint stage captures them at a save and, on
resume, restores them (same world size) or seeds them afresh for the resumed step (another one).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_rank_streams(seed: int, rank: int, step: int = 0) -> None:
    """Python, numpy and torch random streams start from the seed (not from the OS), distinct per
    rank and per starting step, so that a run and its resumed twin draw the same numbers
    (checkpoints restore them) and a resume that cannot restore them does not repeat step 0's."""
    value = (seed * 1_000_003 + step) * 65_537 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def capture() -> dict[str, Any]:
    """This rank's generator states as tensors, numbers and text only (CUDA's only once CUDA is in
    use: asking would initialise it), so that a checkpoint loads them with `weights_only=True`: no
    pickled object from storage is ever rebuilt (hence run) to restore them."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
