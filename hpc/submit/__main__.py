"""`python -m hpc.submit exp=NAME [key=value ...] [--dry-run] [--wait]`: compose, plan, submit."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc import slurm
from hpc.config import Config, ConfigError
from hpc.config.compose import compose_strategies
from hpc.config.deepspeed_check import check_at_submit
from hpc.config.loggers import require_logger_packages
from hpc.config.presets import search_path
from hpc.estimate.check import check_fit
from hpc.files import deny_world_write
from hpc.run_folder import RunFolder
from hpc.submit.backend import SubmitError, submit
from hpc.submit.follow import LogFollower
from hpc.submit.plan import build_plan, run_dir_of

EPILOG = """\
examples:
  python -m hpc.submit exp=70b_zero3 nodes=4 --dry-run
  python -m hpc.submit exp=70b_zero3 nodes=4 train.lr=3e-4 partition=gpu account=proj
  python -m hpc.submit exp=tiny_cpu cluster=local
shorthands: nodes gpus_per_node time partition account qos cluster (= slurm.* / preset choice)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpc.submit", description="Submit a training job to SLURM (or run it locally).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="exp=NAME, preset choices (model= strategy= cluster=) and dotted overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and resolved config; submit nothing")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=None,
                      help="wait for the job and print its result (default for cluster=local)")
    wait.add_argument("--no-wait", dest="wait", action="store_false")
    parser.add_argument("--list", action="store_true",
                        help="list every preset, the folder it is read from and any it shadows")
    return parser


def _list() -> str:
    return search_path().listing()


def _check_token_file(cfg: Config) -> None:
    """A token file whose sidecar (tools/make_tokens.py) is readable here and names a vocabulary
    larger than the model's is refused now, not after the job waited in the queue (the job checks
    again: the file may be on storage only the nodes see)."""
    if cfg.data.source != "tokens" or not cfg.data.path:
        return
    try:
        meta = json.loads(Path(cfg.data.path + ".json").read_text())
        vocab = int(meta["vocab_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"data.path={cfg.data.path}: its tokenizer's vocab_size={vocab} is larger than "
                          f"model.vocab_size={cfg.model.vocab_size}; ids past the embedding table would crash "
                          f"the model: set model.vocab_size={vocab} or more")


LEAVE_QUEUE_WAIT_S = 120.0
"""How long a waiting client gives a SLURM job whose ranks are done to leave the queue."""


def _wait_showing_warnings(job: Any, run_dir: Path, executor: str, every_s: float = 1.0) -> None:
    """Until the job is done, print the warnings and errors its ranks log, as they come (on
    stderr: stdout keeps the result).

    On SLURM, done means out of the queue: rank 0's result is written before the batch shell has
    given its verdict, and a client that returned then would have its next submission of the same
    run folder refused (one job per run folder)."""
    follower = LogFollower(Path(run_dir), str(job.job_id))

    def show() -> None:
        for line in follower.new_lines():
            print(f"job {job.job_id}: {line}", file=sys.stderr, flush=True)

    def show_then_sleep(seconds: float) -> None:
        show()
        time.sleep(seconds)

    while not job.done():
        show_then_sleep(every_s)
    if executor == "slurm":
        with contextlib.suppress(slurm.SlurmError):  # squeue cannot answer: the job's own result decides
            slurm.wait_in_queue(str(job.job_id), until=lambda state: not state, timeout_s=LEAVE_QUEUE_WAIT_S,
                                every_s=every_s, sleep=show_then_sleep)
    show()


def main(argv: Sequence[str] | None = None) -> int:
    deny_world_write()  # the run folder it makes: not writable by other users
    args = _parser().parse_intermixed_args(argv)  # options may come between the overrides
    if args.list:
        print(_list())
        return 0
    try:
        cfg, preset, variants = compose_strategies(args.overrides)
        # The planner first: a job that cannot fit is refused before anything else is looked at.
        fit = check_fit(cfg, preset, variants)
        if fit.refuse:
            raise ConfigError(fit.problem)
        if fit.problem:
            print(f"warning: {fit.problem}", file=sys.stderr)
        plan = build_plan(cfg, measured_lead=RunFolder(run_dir_of(cfg)).read_measured_lead())
        if shlex.split(plan.python) == [sys.executable]:  # the job's python is this one: ask it now
            require_logger_packages(cfg.train.loggers, plan.python)
        _check_token_file(cfg)
        # DeepSpeed's own parser, in the job's python (a subprocess: no torch here), before anything
        # is written or queued.
        ds_config = check_at_submit(plan.config, plan.python)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if fit.summary:
            print(f"# {fit.summary}")
        sys.stdout.write(plan.describe())
        if ds_config is not None:
            sys.stdout.write("\n# ---- DeepSpeed config (checked by DeepSpeed's parser) ----\n"
                             f"{json.dumps(ds_config, indent=2)}\n")
        return 0
    try:
        job = submit(plan)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    cfg = plan.config
    print(f"submitted job {job.job_id} ({plan.executor}: {cfg.slurm.nodes} node(s) x "
          f"{cfg.slurm.gpus_per_node} = {cfg.world_size} ranks, exp={cfg.exp})")
    print(f"run folder: {plan.run_dir}")
    print(f"follow the log: tail -f {job.paths.stdout}")
    wait = args.wait if args.wait is not None else plan.executor == "local"
    if not wait:
        return 0
    sys.stdout.flush()
    try:
        _wait_showing_warnings(job, plan.run_dir, plan.executor)
        result = job.results()[0]  # rank 0's return value
    except Exception as err:  # submitit re-raises the job's failure with its traceback text
        print(f"job {job.job_id} failed: {err}", file=sys.stderr)
        return 1
    if isinstance(result, dict):
        print("\n".join(str(result[key]) for key in ("table", "preflight", "summary") if key in result))
        if "train" in result:
            print(f"metrics: {RunFolder(plan.run_dir).metrics}")
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
