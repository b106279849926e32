"""The one launcher of local ranks for the benchmarks (and the multi-process tests that reuse them).

`run_ranks(n, worker, spec, workdir)` starts n fresh Python processes on this machine with the
environment a launcher would give them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT on a free port), each calling `worker(spec)`; rank 0's return value comes back.
Fresh processes rather than threads or fork: every rank must own its process group, CUDA context
and RNG state, as in a real job. Each rank logs to its own file, and a failure or a timeout raises
with every rank's log tail, since the rank that failed first is rarely the one that reports it.

Inside a rank, `join_local` builds the config and joins the process group the way a job does, but
with the local presets in `BASE` and no cluster or environment lookups.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hpc.config import Config, compose

if TYPE_CHECKING:  # torch is imported only inside the ranks
    from hpc.train.strategies import World

BASE = ("exp=tiny_cpu", "cluster=local")
"""Presets every benchmark starts from: a tiny CPU experiment on the local 'cluster'."""
REPO = Path(__file__).resolve().parents[2]
LOG_TAIL = 3000


def local_config(world_size: int, overrides: Iterable[str]) -> Config:
    """The config of a run on `world_size` local ranks; no executables or environment looked up, so
    the parent and every rank compose the same config whatever machine they are on."""
    return compose([*BASE, f"gpus_per_node={world_size}", *overrides], which=lambda name: None, environ={})


def join_local(overrides: Iterable[str]) -> tuple[Config, World]:
    """In a rank: the config for `overrides` and this rank's place in the default process group, joined now."""
    from hpc.launch.environment import detect
    from hpc.launch.rendezvous import join
    from hpc.train.strategies import World

    env = detect()
    cfg = local_config(env.world_size, overrides)
    rdzv = join(env, cfg, local_world_size=env.world_size, rendezvous_timeout_s=120, collective_timeout_s=600)
    return cfg, World.from_rendezvous(rdzv, local_world_size=env.world_size)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _target(worker: Callable[[Any], Any]) -> str:
    """`module:function` naming `worker` so a new process can import it; a module run with `python -m`
    is `__main__` here but must be imported under its real name there."""
    module = worker.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"{worker.__qualname__} lives in a script run by path; run it with python -m")
        module = spec.name
    return f"{module}:{worker.__qualname__}"


def run_ranks(world_size: int, worker: Callable[[Any], Any], spec: Any, workdir: Path, *,
              timeout_s: float = 900, extra_env: dict[str, str] | None = None) -> Any:
    """Run `worker(spec)` on `world_size` fresh local ranks and return rank 0's (JSON) result.

    `spec` and the result travel as JSON files in `workdir`, beside `rank{r}-w{n}.log`; names carry the
    world size so runs of different sizes can share a workdir. Raises RuntimeError with every rank's
    log tail if any rank fails, or if they are not all done within `timeout_s`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out = workdir / f"spec-w{world_size}.json", workdir / f"result-w{world_size}.json"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)  # a result left by an earlier run must not pass for this one's
    port, procs, logs = _free_port(), [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TMPDIR=str(workdir), PYTHONPATH=str(REPO), **(extra_env or {}))
        logs.append(workdir / f"rank{rank}-w{world_size}.log")
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", __name__, _target(worker), str(spec_path), str(out)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    deadline = time.monotonic() + timeout_s
    try:
        codes: list[int | None] = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    except subprocess.TimeoutExpired:
        codes = [proc.poll() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # a rank stuck in a collective never ends by itself
    if any(code != 0 for code in codes) or not out.exists():
        tails = "\n".join(f"--- rank {r} ({'timed out' if c is None else f'exit {c}'})\n"
                          f"{logs[r].read_text()[-LOG_TAIL:]}" for r, c in enumerate(codes))
        late = f" or ran past {timeout_s:.0f} s" if None in codes else ""
        raise RuntimeError(f"{world_size} local rank(s) failed{late}:\n{tails}")
    return json.loads(out.read_text())


def _rank_main(target: str, spec_path: str, out: str) -> NoReturn:
    """One rank: run the worker, rank 0 writes its result, then leave together without teardown."""
    module, _, name = target.partition(":")
    result = getattr(importlib.import_module(module), name)(json.loads(Path(spec_path).read_text()))
    if os.environ["RANK"] == "0":
        Path(out).write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank leaves while another still needs the group
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo can abort there after all work is done


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
