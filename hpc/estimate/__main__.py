"""`python -m hpc.estimate exp=NAME [key=value ...] [--compare] [--json]`: the plan before the job.

Per-GPU memory by component, communication per step and a rough step time for the configured
strategy; with --compare every strategy preset side by side and a recommendation with the reason
at each branch. Takes the same overrides as `python -m hpc.submit`. Imports neither torch nor
DeepSpeed: it runs on a login node in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hpc.config.compose import compose_strategies
from hpc.config.errors import ConfigError
from hpc.estimate.advisor import STRATEGY_PRESETS, budget, evaluate, fixes, recommend
from hpc.estimate.report import plan_json, plan_text

EPILOG = """\
examples:
  python -m hpc.estimate exp=70b_zero3 nodes=4
  python -m hpc.estimate exp=70b_fsdp nodes=1 --compare
  python -m hpc.estimate exp=70b_zero3 nodes=4 train.micro_batch_size=2 --compare --json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpc.estimate", description="Per-GPU memory, communication and step time of a job, "
        "before it runs; --compare: every strategy, and which to use.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="as for python -m hpc.submit")
    parser.add_argument("--compare", action="store_true", help="every strategy preset side by side, and a "
                        "recommendation")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come between the overrides
    try:
        cfg, chosen, strategy_variants = compose_strategies(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limit = budget(cfg)
    own = evaluate(chosen, cfg, limit)
    options = [own]
    variants = strategy_variants(STRATEGY_PRESETS) if args.compare or own.fits is False else {}
    variants[chosen] = cfg  # the job as configured, strategy.* overrides and all
    if args.compare:
        options = [own if name == chosen else evaluate(name, variants[name], limit) for name in STRATEGY_PRESETS]
        if chosen not in STRATEGY_PRESETS:
            options.insert(0, own)
    advice = recommend(options, limit) if args.compare else None
    hints = fixes(cfg, chosen, limit, variants) if own.fits is False else []
    if args.json:
        print(json.dumps(plan_json(cfg, chosen, options, limit, advice, hints), indent=1))
    else:
        print(plan_text(cfg, chosen, options, limit, advice, hints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
