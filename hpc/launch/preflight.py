"""Preflight: before any work, every rank proves its host, device and scratch are usable, the world
is the size the config asked for, and one all-reduce over all ranks gives the right answer.

A failure names the rank and host, so a bad node can be found (and later excluded) at a glance.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpc.config import Config
from hpc.launch.environment import JobEnv
from hpc.launch.rendezvous import Rendezvous


class PreflightError(RuntimeError):
    """One or more ranks failed a check; the message lists them with their hosts, and `nodes` names
    the nodes at fault (the requeue layer leaves them out of the next run)."""

    def __init__(self, message: str, nodes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.nodes = nodes


@dataclass(frozen=True)
class RankReport:
    """One rank's view of itself, gathered on every rank."""

    rank: int
    local_rank: int
    node: str
    host: str
    pid: int
    device: str
    scratch: str
    scratch_free_gb: float
    error: str | None = None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def scratch_path(pattern: str, env: JobEnv) -> Path:
    """The node-local scratch folder: {user}, {job_id} and {node} filled for this node."""
    return Path(pattern.format(user=_user(), job_id=env.job_id, node=env.node_name))


def check_scratch(path: Path, rank: int) -> tuple[float, str | None]:
    """(free GB, error or None): the folder exists (created if needed) and takes a write."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".preflight-rank{rank}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return shutil.disk_usage(path).free / 1e9, None
    except OSError as err:
        return 0.0, f"scratch {path} is not writable: {err.strerror or err}"


WORLD_PROBLEMS = ("world size ", "node(s) allocated")


def check_world(env: JobEnv, cfg: Config) -> str | None:
    """The allocation must match what the config asked for (nodes x gpus_per_node)."""
    expected = cfg.world_size
    if env.world_size != expected:
        return (f"world size {env.world_size} from {env.launcher}, but the config asks for "
                f"{expected} (nodes={cfg.slurm.nodes} x gpus_per_node={cfg.slurm.gpus_per_node})")
    if env.launcher == "slurm" and env.num_nodes != cfg.slurm.nodes:
        return f"{env.num_nodes} node(s) allocated, but the config asks for nodes={cfg.slurm.nodes}"
    return None


def local_report(env: JobEnv, rdzv: Rendezvous, cfg: Config) -> RankReport:
    scratch = scratch_path(cfg.cluster.scratch_dir, env)
    free_gb, error = check_scratch(scratch, env.rank)
    error = check_world(env, cfg) or error
    return RankReport(env.rank, env.local_rank, env.node_name, socket.gethostname(), os.getpid(),
                      rdzv.device, str(scratch), round(free_gb, 1), error)


def format_table(reports: list[RankReport]) -> str:
    rows = [("rank", "local", "node", "host", "pid", "device", "scratch (free GB)", "status")]
    for r in reports:
        rows.append((str(r.rank), str(r.local_rank), r.node, r.host, str(r.pid), r.device,
                     f"{r.scratch} ({r.scratch_free_gb:.1f})", "ok" if r.error is None else "FAILED"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run_preflight(env: JobEnv, rdzv: Rendezvous, cfg: Config) -> dict[str, Any]:
    """Gather every rank's report, fail on any error (naming rank and host), then one all-reduce."""
    import torch
    import torch.distributed as dist

    mine = local_report(env, rdzv, cfg)
    reports: list[Any] = [None] * rdzv.world_size
    dist.all_gather_object(reports, mine)
    failed = [r for r in reports if r.error is not None]
    if failed:
        lines = [f"rank {r.rank} on {r.node} ({r.host}): {r.error}" for r in failed]
        # A world-size mismatch is the allocation's fault, not a node's.
        nodes = tuple(sorted({r.node for r in failed if not (r.error or "").startswith(WORLD_PROBLEMS)}))
        raise PreflightError(f"preflight failed on {len(failed)} of {rdzv.world_size} rank(s):\n  "
                             + "\n  ".join(lines), nodes)

    # Each rank adds rank+1: the sum proves every rank took part exactly once.
    value = torch.tensor([float(rdzv.rank + 1)], device=rdzv.device)
    start = time.perf_counter()
    dist.all_reduce(value)
    if rdzv.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    expected = rdzv.world_size * (rdzv.world_size + 1) / 2
    got = float(value.item())
    if got != expected:
        raise PreflightError(f"all-reduce over {rdzv.world_size} ranks gave {got}, expected {expected} "
                             f"(seen on rank {rdzv.rank}, {mine.node})")
    nodes = sorted({r.node for r in reports})
    summary = (f"preflight ok: {rdzv.world_size} rank(s) on {len(nodes)} node(s) ({', '.join(nodes)}), "
               f"backend {rdzv.backend}, all-reduce sum {got:g} == {expected:g} in {seconds * 1e3:.1f} ms")
    return {"summary": summary, "table": format_table(reports), "world_size": rdzv.world_size,
            "backend": rdzv.backend, "allreduce_ms": seconds * 1e3, "nodes": nodes,
            "ranks": [asdict(r) for r in reports]}
