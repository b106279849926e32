"""The job's entry point inside the allocation: one call per rank (started by srun or submitit).

Order: who am I -> take over the signals -> check what can be checked alone -> where do we meet
-> join the process group -> preflight -> train -> requeue or leave.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc.config import Config
from hpc.config.loggers import require_logger_packages
from hpc.files import deny_world_write
from hpc.launch.environment import JobEnv, detect
from hpc.launch.extensions import prepare_extension_builds
from hpc.launch.preflight import run_preflight, scratch_path
from hpc.launch.rendezvous import broadcast_object, join, shutdown_process_group
from hpc.run_folder import RunFolder

if TYPE_CHECKING:
    from hpc.requeue.supervisor import Supervisor

log = logging.getLogger("hpc")


def _setup_logging(env: JobEnv) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [rank {env.rank} {env.node_name}] %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Run this rank's part of the job; rank 0's return value is the job's result."""
    from hpc.requeue.supervisor import Supervisor

    started = time.perf_counter()
    deny_world_write()  # scratch, staged and committed checkpoints, records: none writable by others
    env = detect()
    _setup_logging(env)
    # First: from here on the warning signal and SIGTERM only set a flag (and submitit's handlers,
    # which save and requeue from inside the handler, are out of the way).
    supervisor = Supervisor(cfg, env, Path(run_dir))
    if env.rank == 0:
        log.info("job %s (%s), run %s, restart %d, world %d on %d node(s)", env.job_id, env.launcher,
                 run_dir, env.restart_count, env.world_size, env.num_nodes)
    try:
        result = _run(cfg, env, supervisor, Path(run_dir))
    except BaseException as err:
        supervisor.failed(err)
        if supervisor.requeue_decided and env.rank == 0:
            supervisor.requeue_now()  # committed and decided; only letting go of the others failed
        raise
    result["seconds"] = time.perf_counter() - started
    if result["ending"] == "requeue":
        # The commit is done and every rank let go of the others: rank 0 hands the job back to
        # SLURM, which ends this run. No result file: a waiting client keeps waiting for the rerun.
        if env.rank == 0 and not supervisor.requeue_now():
            _leave_now(1)
        _leave_now(0)
    if env.launcher != "single":  # a job process, not a library call inside someone's program
        _exit_without_teardown_after_success()
    return result


def _run(cfg: Config, env: JobEnv, supervisor: Supervisor, run_dir: Path) -> dict[str, Any]:
    # Before the process group, on every rank: a logger's missing package stops every rank at once.
    require_logger_packages(cfg.train.loggers, sys.executable)
    if cfg.strategy.name == "deepspeed":
        # Again here, not only at submit: the job's environment may have another DeepSpeed. Before
        # the process group, so a bad key costs seconds, not a rendezvous timeout on other ranks.
        from hpc.config.deepspeed import build_deepspeed_config
        from hpc.config.deepspeed_check import validate_deepspeed_config

        validate_deepspeed_config(build_deepspeed_config(cfg))
        if cfg.cluster.kind == "slurm":
            # DeepSpeed JIT-builds its ops (CPU Adam) on first use: into node-local scratch, not the
            # shared ~/.cache where one killed build's lock hangs every later job. (On a laptop,
            # cluster=local, torch's own cache is already local and outlives the run.)
            prepare_extension_builds(scratch_path(cfg.cluster.scratch_dir, env))
    local_world = env.tasks_per_node
    rdzv = join(env, cfg, local_world_size=local_world, rendezvous_timeout_s=cfg.launch.init_timeout_s,
                collective_timeout_s=cfg.cluster.nccl.timeout_s,
                port_file=RunFolder(run_dir).rendezvous_port(env.job_id, env.restart_count, env.step))
    try:
        result = run_preflight(env, rdzv, cfg) if cfg.launch.preflight else {"summary": "preflight skipped"}
        if env.rank == 0:
            if "table" in result:
                log.info("preflight at %s:%d\n%s", rdzv.master_addr, rdzv.master_port, result["table"])
            log.info(result["summary"])
        result["preflight"] = result.pop("summary")
        result.update(_train(cfg, env, rdzv, local_world, run_dir, supervisor))
    except BaseException:
        # No barrier: the other ranks are stuck in some other collective, and a barrier here
        # would hang until the collective timeout and then bury this error under its own.
        shutdown_process_group(barrier=False)
        raise
    shutdown_process_group()
    return result


def _train(cfg: Config, env: JobEnv, rdzv: Any, local_world: int, run_dir: Path,
           supervisor: Supervisor) -> dict[str, Any]:
    from hpc.checkpoint.checkpointer import Checkpointer
    from hpc.config.compose import to_yaml
    from hpc.train.loop import train
    from hpc.train.strategies import World

    world = World.from_rendezvous(rdzv, local_world_size=local_world)
    checkpointer = Checkpointer(cfg, world, location=RunFolder(run_dir).checkpoint_location(cfg.checkpoint.dir),
                                scratch=scratch_path(cfg.cluster.scratch_dir, env) / "checkpoints",
                                config_yaml=to_yaml(cfg), node_rank=env.node_rank, num_nodes=env.num_nodes,
                                host=env.node_name, restart_count=env.restart_count)
    supervisor.attach(checkpointer)
    try:
        outcome = train(cfg, world, run_dir=run_dir, stop=supervisor.stop, checkpoints=checkpointer)
    finally:
        checkpointer.close()
    ending = supervisor.finish(outcome, broadcast_object)
    summary = outcome.summary
    losses = outcome.losses
    resumed = f" (resumed at step {outcome.start_step})" if outcome.start_step else ""
    line = (f"{cfg.strategy.name}: {outcome.steps} steps{resumed}, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            if losses else f"{cfg.strategy.name}: no steps to run (at step {outcome.steps} of "
            f"{cfg.train.max_steps})")
    if "tokens_per_s" in summary:
        line += (f", {summary['tokens_per_s']:,.0f} tok/s, {summary['step_time_s'] * 1e3:.1f} ms/step, "
                 f"peak {summary['peak_mem_gb']:.2f} GB")
    if env.rank == 0:
        log.info(line)
    return {"summary": line, "steps": outcome.steps, "losses": losses, "train": summary,
            "stopped_early": outcome.stopped_early, "start_step": outcome.start_step,
            "last_committed": checkpointer.last_committed, "ending": ending}


def _leave_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def _exit_without_teardown_after_success() -> None:
    """gloo's threads can abort the interpreter's final teardown (`terminate called without an
    active exception`, ~3% of runs) after all work is done; SLURM would then count a finished job
    as failed. Once this rank returned successfully and its caller (submitit) has written the
    result, skip that teardown: flush and leave from an exit handler, with status 1 if anything
    after us died of an uncaught exception (submitit failing to write the result), else 0."""
    failed = []
    previous_hook = sys.excepthook

    def note_failure(*exc_info: Any) -> None:
        failed.append(exc_info[0])
        previous_hook(*exc_info)

    def leave() -> None:
        _leave_now(1 if failed else 0)

    sys.excepthook = note_failure
    atexit.register(leave)
