"""Run training cases on N real torch.distributed processes (gloo, CPU) and collect rank 0's results.

One process group serves many cases: each case composes `exp=tiny_cpu cluster=local` plus its
overrides, builds its engine, trains, and releases it. Starting processes costs seconds; a case on
the tiny model costs well under one.

    results = run_world(2, {"ddp": ["strategy=ddp"], "zero2": ["strategy=zero2"]}, tmp_path)
    results["ddp"]["losses"]  # the global loss of every step
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world_size: int, cases: dict[str, list[str]], tmp_path: Path, *,
              timeout_s: float = 600, extra_env: dict[str, str] | None = None) -> dict[str, dict]:
    spec, out = tmp_path / f"cases-{world_size}.json", tmp_path / f"results-{world_size}.json"
    spec.write_text(json.dumps(cases))
    port = free_port()
    procs = []
    logs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   **(extra_env or {}))
        log = (tmp_path / f"rank{rank}-{world_size}.log").open("w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, str(spec), str(out)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        codes = [proc.wait(timeout=timeout_s) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        for log in logs:
            log.close()
    if any(codes) or not out.exists():
        tails = "\n".join(f"--- rank {r} (exit {c})\n" + (tmp_path / f"rank{r}-{world_size}.log").read_text()[-3000:]
                          for r, c in enumerate(codes))
        raise AssertionError(f"world {world_size} failed:\n{tails}")
    return json.loads(out.read_text())


def _worker(spec: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from hpc.config import compose
    from hpc.launch.environment import detect
    from hpc.launch.rendezvous import init_process_group, plan_rendezvous
    from hpc.train.loop import train
    from hpc.train.strategies import World, build_engine

    torch.set_num_threads(1)
    env = detect()
    base = ["exp=tiny_cpu", "cluster=local", f"gpus_per_node={env.world_size}"]
    cfg0 = compose(base, which=lambda name: None, environ={})
    rdzv = plan_rendezvous(env, cfg0)
    init_process_group(rdzv, rendezvous_timeout_s=60, collective_timeout_s=300)
    world = World(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                  local_world_size=env.world_size, device=torch.device("cpu"))
    results = {}
    for label, overrides in json.loads(spec.read_text()).items():
        sharded_init = None
        if "SHARDED_INIT" in overrides:  # harness flag, not a config key
            overrides = [o for o in overrides if o != "SHARDED_INIT"]
            sharded_init = True
        cfg = compose([*base, *overrides], which=lambda name: None, environ={})
        engine = build_engine(cfg, world, sharded_init=sharded_init)
        param_bytes = engine.local_param_bytes()
        outcome = train(cfg, world, engine=engine)
        engine.close()
        results[label] = {"losses": outcome.losses, "param_bytes": param_bytes, "steps": outcome.steps,
                          "summary": outcome.summary}
        dist.barrier()
    if env.rank == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo can abort there (see notes)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
