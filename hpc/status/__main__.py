"""`python -m hpc.status RUN`: the text view; `--json` the same as one object; `--plot PNG` the
run's metrics across its restarts; `--watch [S]` the text view again every S seconds until the job
ends (Ctrl-C leaves)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from hpc.status.report import ENDED, StatusError, find_run_dir, gather, render

CLEAR = "\033[H\033[J"


def watch(run_dir: Path, every_s: float, out: TextIO, *, look: Callable[[Path], dict[str, Any]] = gather,
          sleep: Callable[[float], None] = time.sleep, clear: bool | None = None) -> dict[str, Any]:
    """Render the status every `every_s` seconds until the job's state is one of ENDED; the screen
    is cleared between views on a terminal, views are separated by a blank line elsewhere."""
    clear = out.isatty() if clear is None else clear
    first = True
    while True:
        status = look(run_dir)
        text = render(status)
        if clear:
            out.write(CLEAR)
        elif not first:
            out.write("\n")
        stamp = time.strftime("%H:%M:%S")
        out.write(f"{text}({stamp}; every {every_s:g} s, Ctrl-C to leave)\n" if status["state"] not in ENDED
                  else text)
        out.flush()
        first = False
        if status["state"] in ENDED:
            return status
        sleep(every_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.status", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder or SLURM job id")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="print one JSON object")
    view.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="S",
                      help="show the status again every S seconds (10) until the job ends")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="also draw loss, tokens/s and step time against step, restarts marked (matplotlib)")
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch needs a positive number of seconds")
    try:
        run_dir = find_run_dir(args.run)
        if args.plot is not None:
            from hpc.status.plot import plot_run

            shown = plot_run(run_dir, args.plot)
            restarts = ", ".join(f"{r} {n}" for r, n in sorted(shown["restarts"].items())) or "none"
            print(f"wrote {args.plot}: {shown['records']} records in {shown['segments']} segment(s), "
                  f"restarts: {restarts}", file=sys.stderr)
        if args.watch is not None:
            try:
                watch(run_dir, args.watch, sys.stdout)
            except KeyboardInterrupt:
                print()
            return 0
        status = gather(run_dir)
    except (StatusError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else render(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
