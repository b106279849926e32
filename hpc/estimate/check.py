"""The fit check `python -m hpc.submit` runs before anything is queued (plan.check).

A job predicted not to fit in the cluster preset's GPU memory - or, on a cpu preset, in its rank's
share of this machine's memory - is refused with the numbers and the smallest single changes that
would fit (plan.check=refuse, the default); plan.check=warn prints the same and submits anyway;
plan.check=off skips it. Where a GPU preset does not state its memory, the check says so and lets
the job go. The dry run prints the same summary line and the same refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.compose import StrategyVariants
from hpc.config.schema import Config
from hpc.estimate.advisor import STRATEGY_PRESETS, budget, evaluate, fixes
from hpc.estimate.memory import COMPONENTS
from hpc.estimate.report import LABELS, summary_line

GB = 1e9


@dataclass(frozen=True)
class FitCheck:
    summary: str | None
    """The plan in one line (None when plan.check=off)."""
    problem: str | None = None
    """Why the job does not fit, with the numbers and the changes that would fit."""
    refuse: bool = False
    """plan.check=refuse and a problem: the job must not be queued."""


def check_fit(cfg: Config, preset: str, variants: StrategyVariants) -> FitCheck:
    """`cfg` is the job as composed, `preset` its strategy preset's name, `variants` the job over
    other strategy presets (hpc.config.compose.compose_strategies), asked for only to find hints."""
    if cfg.plan.check == "off":
        return FitCheck(None)
    limit = budget(cfg)
    option = evaluate(preset, cfg, limit)
    summary = summary_line(option, limit)
    if option.fits is not False:
        return FitCheck(summary)
    assert option.memory is not None and limit.bytes is not None
    parts = ", ".join(f"{LABELS[k]} {option.memory.gpu[k] / GB:.2f}" for k in COMPONENTS)
    hints = fixes(cfg, preset, limit, variants(STRATEGY_PRESETS))
    hint = ("HINT: any one of these would fit: " + "; ".join(hints) + ". " if hints else
            "HINT: no single change of nodes, strategy, activation checkpointing or micro-batch fits; ")
    problem = (f"{cfg.exp} with strategy={preset} does not fit: {option.memory.total / GB:.2f} GB per GPU "
               f"({parts} GB) against {limit.what}. {hint}"
               "python -m hpc.estimate with the same overrides and --compare shows every strategy; "
               "plan.check=warn submits anyway")
    return FitCheck(summary, problem, refuse=cfg.plan.check == "refuse")
