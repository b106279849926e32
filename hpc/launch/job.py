"""The job's entry point inside the allocation: one call per rank (started by srun or submitit).

Order: who am I -> where do we meet -> join the process group -> preflight -> work -> leave.
Until the trainer lands, the preflight is the job.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from hpc.config import Config
from hpc.launch.environment import JobEnv, detect
from hpc.launch.preflight import run_preflight
from hpc.launch.rendezvous import init_process_group, plan_rendezvous, shutdown_process_group

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
    started = time.perf_counter()
    env = detect()
    _setup_logging(env)
    import torch  # here, not at module level: the login node pickles a reference to this module

    if env.rank == 0:
        log.info("job %s (%s), run %s, restart %d, world %d on %d node(s)", env.job_id, env.launcher,
                 run_dir, env.restart_count, env.world_size, env.num_nodes)
    cuda = torch.cuda.device_count() if cfg.cluster.accelerator == "cuda" else 0
    rdzv = plan_rendezvous(env, cfg, cuda_devices=cuda)
    os.environ.update(rdzv.environ(local_world_size=max(env.world_size // env.num_nodes, 1)))
    init_process_group(rdzv, rendezvous_timeout_s=cfg.launch.init_timeout_s,
                       collective_timeout_s=cfg.cluster.nccl.timeout_s)
    try:
        result = run_preflight(env, rdzv, cfg) if cfg.launch.preflight else {"summary": "preflight skipped"}
        if env.rank == 0:
            if "table" in result:
                log.info("preflight at %s:%d\n%s", rdzv.master_addr, rdzv.master_port, result["table"])
            log.info(result["summary"])
    finally:
        shutdown_process_group()
    result["seconds"] = time.perf_counter() - started
    return result
