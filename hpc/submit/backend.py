"""Act on a plan: write the run folder and submit through submitit (the only side effects here)."""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpc import slurm
from hpc.config import Config
from hpc.files import write_atomically
from hpc.run_folder import RunFolder
from hpc.submit.plan import Plan


@dataclass(frozen=True)
class Entrypoint:
    """The callable submitit pickles: resolves the in-allocation entry point by name, in the job.

    Naming it (`module:function`) keeps torch and the launch stage out of the login node's imports.
    """

    target: str
    config: Config
    run_dir: str

    def __call__(self) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(self.config, self.run_dir)


class SubmitError(RuntimeError):
    """The plan could not be submitted (no scheduler, sbatch refused it, ...)."""


def _executor(plan: Plan) -> Any:
    import submitit  # imported here: the dry run does not need it

    timeouts = plan.config.requeue.max_requeues
    if plan.executor == "slurm":
        if shutil.which("srun") is None or shutil.which("sbatch") is None:
            raise SubmitError(
                f"cluster={plan.config.cluster.name} submits with sbatch, which is not on PATH. "
                "HINT: run on a SLURM login node, or use cluster=local to run on this machine"
            )
        executor: Any = submitit.SlurmExecutor(folder=plan.submitit_dir, python=plan.python,
                                               max_num_timeout=timeouts)
    else:
        executor = submitit.LocalExecutor(folder=plan.submitit_dir, python=plan.python,
                                          max_num_timeout=timeouts)
    executor.update_parameters(**plan.parameters)
    return executor


COMPLETING_WAIT_S = 60.0
"""How long a submit waits for the run's previous job to finish COMPLETING before refusing."""


def refuse_a_live_job(plan: Plan, *, wait_s: float = COMPLETING_WAIT_S,
                      sleep: Callable[[float], None] = time.sleep) -> None:
    """One job per run folder: a second one would train the same run beside the first and the two
    would overwrite each other's checkpoints and history. The run's last job still in SLURM's
    queue (pending, running, requeued, held) refuses the submission. A COMPLETING job is waited for
    up to `wait_s`: SLURM is ending its processes, and ranks that outlived their batch shell take
    that for a preemption, save and requeue the job."""
    if plan.executor != "slurm":
        return
    job = RunFolder(plan.run_dir).latest_job_id()
    if job is None:
        return
    try:
        state = slurm.wait_in_queue(job, until=lambda s: s != "COMPLETING", timeout_s=wait_s, sleep=sleep)
    except slurm.SlurmError as err:
        raise SubmitError(f"cannot tell whether job {job} of {plan.run_dir} is still queued: {err}") from None
    if state:
        raise SubmitError(
            f"{plan.run_dir} is the run folder of job {job}, which is still {state}: a second job would train "
            f"the same run beside it and overwrite its checkpoints. HINT: wait for it "
            f"(python -m hpc.status {plan.run_dir} --watch), end it first (scancel {job}), "
            "or give this run another run.name")


def submit(plan: Plan) -> Any:
    """Write the run folder (resolved config) and submit; returns the submitit Job."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = _executor(plan)
    refuse_a_live_job(plan)
    fresh = not plan.run_dir.exists()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    RunFolder(plan.run_dir).rendezvous.mkdir(exist_ok=True)
    write_atomically(RunFolder(plan.run_dir).config, plan.config_yaml)
    try:
        return executor.submit(Entrypoint(plan.entrypoint, plan.config, str(plan.run_dir)))
    except (FailedJobError, FailedSubmissionError, OSError) as err:
        if fresh:  # nothing ran: leave no empty run folder behind
            shutil.rmtree(plan.run_dir, ignore_errors=True)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise SubmitError(f"submission failed: {reason}") from None
