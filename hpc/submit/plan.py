"""The submission as a value: executor parameters, setup lines, run folder, resolved config.

`build_plan` is pure (no cluster, no files); `--dry-run` prints the plan and `submit(plan)` acts on
the very same value, so what is printed is what is submitted.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string  # the function submitit writes scripts with

from hpc.config import Config, ConfigError, to_yaml
from hpc.run_folder import RunFolder
from hpc.submit.render import render_setup

# The in-allocation entry point, named rather than imported: submit stays left of launch.
ENTRYPOINT = "hpc.job:main"


@dataclass(frozen=True)
class Plan:
    """Everything `submit` needs, computed up front."""

    config: Config
    run_dir: Path
    executor: str
    """'slurm' or 'local' (submitit executor class)."""
    parameters: dict[str, Any] = field(hash=False)
    """Keyword arguments for the executor's update_parameters (its native names)."""
    python: str = "python3"
    """Shell command for the interpreter each rank runs."""
    entrypoint: str = ENTRYPOINT
    lead_s: int = 300
    """Seconds of warning SLURM gives before the time limit (requeue.lead_s, or what earlier runs of
    this run folder measured their saves need, whichever is longer)."""
    lead_note: str = ""

    @property
    def submitit_dir(self) -> Path:
        return RunFolder(self.run_dir).submitit

    @property
    def config_yaml(self) -> str:
        return to_yaml(self.config)

    @property
    def command(self) -> str:
        """What srun starts on every task (submitit's runner unpickles and calls our entry point)."""
        return f"{self.python} -u -m submitit.core._submit {shlex.quote(str(self.submitit_dir))}"

    def sbatch_script(self) -> str:
        """The batch script exactly as submitit will write it for this plan."""
        if self.executor != "slurm":
            raise ValueError("a local run has no sbatch script")
        return _make_sbatch_string(command=self.command, folder=self.submitit_dir, **self.parameters)

    def describe(self) -> str:
        """What --dry-run prints: the script (or the local command) and the resolved config."""
        cfg = self.config
        head = (f"# run folder: {self.run_dir}\n# {cfg.slurm.nodes} node(s) x {cfg.slurm.gpus_per_node} "
                f"rank(s) = world size {cfg.world_size}, executor: {self.executor}\n"
                f"# requeue warning: {cfg.requeue.signal} {self.lead_s} s before the time limit"
                f"{f' ({self.lead_note})' if self.lead_note else ''}\n")
        if self.executor == "slurm":
            body = self.sbatch_script()
        else:
            setup = "\n".join(self.parameters.get("setup", []))
            body = (f"# local executor: {cfg.slurm.gpus_per_node} process(es) on this machine\n"
                    f"{setup}\n{self.command}\n")
        return f"{head}\n{body}\n# ---- resolved config ----\n{self.config_yaml}"


def _slurm_parameters(cfg: Config, setup: list[str], lead_s: int) -> dict[str, Any]:
    slurm, cluster, requeue = cfg.slurm, cfg.cluster, cfg.requeue
    extra: dict[str, Any] = {
        # Always present: requeue on node failure/preemption, output kept across requeues, and the
        # warning signal to the ranks (no 'B:': the python processes, not the batch shell, act on it).
        "requeue": True,
        "signal": f"{requeue.signal}@{lead_s}",
    }
    if slurm.reservation:
        extra["reservation"] = slurm.reservation
    extra.update({name: str(value) for name, value in slurm.extra.items()})
    cpus_per_task = slurm.cpus_per_task or cluster.cpus_per_gpu
    params: dict[str, Any] = {
        "job_name": slurm.job_name or cfg.run_name,
        "time": slurm.time_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.gpus_per_node,  # one rank per GPU
        "signal_delay_s": lead_s,
        "setup": setup,
        "srun_args": _srun_args(cfg, cpus_per_task),
        "additional_parameters": extra,
        # submitit tags every job with --wckey=submitit; sites that account by wckey reject
        # unknown keys, so it is there only when asked for.
        "wckey": slurm.wckey,
    }
    if cluster.accelerator == "cuda":
        params["gpus_per_node"] = slurm.gpus_per_node
    optional = {
        "partition": slurm.partition or cluster.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "exclude": slurm.exclude,
        "cpus_per_task": cpus_per_task,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    mem_gb = slurm.mem_gb or (not slurm.exclusive and cluster.mem_per_gpu_gb
                              and cluster.mem_per_gpu_gb * slurm.gpus_per_node)
    if mem_gb:
        params["mem"] = f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"
    if slurm.exclusive:
        params["exclusive"] = True
        if not slurm.mem_gb:
            # All of the node's memory: a size computed from the preset may be more than a node has
            # after the OS's share, and the job would never start.
            params["mem"] = "0"
    return params


def _srun_args(cfg: Config, cpus_per_task: int | None) -> list[str]:
    """How srun places the ranks: one dead rank ends the step at once (instead of leaving the others
    hung in a collective); CPUs per rank given again (SLURM 22.05-23.02 srun does not inherit
    --cpus-per-task from the allocation, so every rank would get one core, which starves the
    checkpoint writers and CPU Adam); consecutive ranks packed on a node and on a socket (block:block,
    so a node's local ranks follow its GPU numbering); explicit CPU and GPU binding."""
    cluster = cfg.cluster
    args = ["--kill-on-bad-exit=1"]
    if cpus_per_task:
        args.append(f"--cpus-per-task={cpus_per_task}")
    args += [f"--cpu-bind={cluster.cpu_bind}", "--distribution=block:block"]
    if cluster.accelerator == "cuda":
        args.append(f"--gpu-bind={cluster.gpu_bind}")
    return args


def _local_parameters(cfg: Config, setup: list[str], lead_s: int) -> dict[str, Any]:
    return {
        "timeout_min": cfg.slurm.time_min,
        "tasks_per_node": cfg.slurm.gpus_per_node,
        "gpus_per_node": cfg.slurm.gpus_per_node if cfg.cluster.accelerator == "cuda" else 0,
        "signal_delay_s": lead_s,
        # The local executor joins setup lines with '&&': comments would swallow what follows.
        "setup": [line for line in setup if not line.lstrip().startswith("#")],
    }


def lead_time(cfg: Config, measured: dict[str, Any] | None) -> tuple[int, str]:
    """The warning lead for this submission and a note saying where it came from; an error when
    the measured need does not fit in the time limit."""
    lead = cfg.requeue.lead_s
    if not measured or not cfg.requeue.auto_lead:
        return lead, ""
    needed = int(measured["needed_s"])
    note = (f"earlier saves took up to {measured.get('save_s', 0):.1f} s, steps "
            f"{measured.get('step_s', 0):.1f} s: they need {needed} s")
    if needed <= lead:
        return lead, note
    if needed >= cfg.slurm.time_min * 60:
        raise ConfigError(
            f"this run's saves need a {needed} s warning before the time limit ({note}), but "
            f"time={cfg.slurm.time} leaves no room to train. HINT: raise time, or set "
            "requeue.auto_lead=false to keep requeue.lead_s")
    return needed, f"raised from requeue.lead_s={lead}: {note}"


def run_dir_of(cfg: Config, cwd: Path | None = None) -> Path:
    """The run folder: run.root (relative to the working directory) / run name."""
    root = Path(cfg.run.root)
    if not root.is_absolute():
        root = (cwd or Path.cwd()) / root
    return root / cfg.run_name


def build_plan(cfg: Config, *, cwd: Path | None = None, python: str | None = None,
               measured_lead: dict[str, Any] | None = None) -> Plan:
    """The plan for a composed config (pure: reads no cluster and writes no file; the measured
    lead, if any, is read by the caller from the run folder: RunFolder.read_measured_lead)."""
    run_dir = run_dir_of(cfg, cwd)
    interpreter = shlex.quote(cfg.run.python or python or sys.executable)
    lead_s, note = lead_time(cfg, measured_lead)
    setup = render_setup(cfg, str(run_dir), interpreter, lead_s)
    executor = cfg.cluster.kind
    params = (_slurm_parameters(cfg, setup, lead_s) if executor == "slurm"
              else _local_parameters(cfg, setup, lead_s))
    return Plan(config=cfg, run_dir=run_dir, executor=executor, parameters=params,
                python=interpreter, lead_s=lead_s, lead_note=note)
