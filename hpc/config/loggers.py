"""Where training metrics go (`train.loggers`, `train.wandb`), and whether the packages they need
are installed: asked at submit (when the job runs this python) and by every rank before it joins the
others, so that a missing package is a one-line error at start-up, never a failure mid-run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc.config.errors import ConfigError, require, require_choice, unknown_choice

LOGGERS = ("jsonl", "tensorboard", "wandb")
"""jsonl (`<run folder>/metrics.jsonl`) is always on; the others are added by `train.loggers`."""
PACKAGES = {"tensorboard": ("tensorboard", "hpc[tensorboard]"), "wandb": ("wandb", "hpc[wandb]")}
"""logger -> (the module it imports, the extra that installs it)."""
WANDB_MODES = ("offline", "online")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases (`train.loggers: [wandb]`). Rank 0 logs every metrics record, with the run's
    resolved config; every restart of a run continues the same W&B run (its id is kept in the run
    folder)."""

    project: str = "hpc"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; None: the API key's default entity."""
    mode: str = "offline"
    """offline: files under `<run folder>/wandb/` only (compute nodes usually have no network;
    upload later with `wandb sync <run folder>/wandb/offline-run-*`). online: stream to the server
    (needs network and `WANDB_API_KEY` on the nodes)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run."""

    def __post_init__(self) -> None:
        require_choice("train.wandb.mode", self.mode, WANDB_MODES)
        require(bool(self.project.strip()), "train.wandb.project: must not be empty")


def check_loggers(loggers: Sequence[Any]) -> None:
    """Every name is a logger this toolkit has (with a did-you-mean for a typo)."""
    for name in loggers:
        if name not in LOGGERS:
            err = unknown_choice("logger", str(name), LOGGERS)
            raise ConfigError(f"train.loggers: {err}")


def require_logger_packages(loggers: Sequence[str], python: str,
                            find: Callable[[str], Any] = importlib.util.find_spec) -> None:
    """Raise ConfigError naming each logger whose package `python` (this interpreter) lacks, and the
    extra that installs it; looks the packages up without importing them (milliseconds)."""
    missing = [(name, *PACKAGES[name]) for name in dict.fromkeys(loggers) if name in PACKAGES
               and find(PACKAGES[name][0]) is None]
    if missing:
        parts = "; ".join(f"'{name}' needs the {module} package: pip install '{extra}'"
                          for name, module, extra in missing)
        raise ConfigError(f"train.loggers: {parts} (not installed for {python})")
