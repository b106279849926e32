"""Preflight: before any work, every rank proves its host, device and scratch are usable, the world
is the size the config asked for, and one all-reduce over all ranks gives the right answer.

A failure names the rank and host, so a bad node can be found (and later excluded) at a glance.
"""

from __future__ import annotations

import getpass
import ipaddress
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
    gloo: str = ""
    """gloo's interface and this rank's address on it (the checkpoint group and async saves use it)."""
    cpus: int = 0
    """CPUs this rank may run on (its affinity): 1 where several were asked means srun bound it short."""
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
    error = error or check_gloo_address(env, rdzv)
    gloo = f"{rdzv.gloo_ifname or 'default'} {rdzv.gloo_addr}".strip()
    return RankReport(env.rank, env.local_rank, env.node_name, socket.gethostname(), os.getpid(),
                      rdzv.device, str(scratch), round(free_gb, 1), gloo, len(os.sched_getaffinity(0)), error)


def check_gloo_address(env: JobEnv, rdzv: Rendezvous) -> str | None:
    """On several nodes gloo must not sit on loopback: its peers would dial themselves."""
    if env.num_nodes > 1 and rdzv.gloo_addr and ipaddress.ip_address(rdzv.gloo_addr).is_loopback:
        return (f"gloo is on loopback ({rdzv.gloo_addr}) in a job on {env.num_nodes} nodes. HINT: set "
                "cluster.nccl.socket_ifname to the interface the nodes share")
    return None


def format_table(reports: list[RankReport]) -> str:
    rows = [("rank", "local", "node", "host", "pid", "device", "cpus", "gloo", "scratch (free GB)", "status")]
    for r in reports:
        rows.append((str(r.rank), str(r.local_rank), r.node, r.host, str(r.pid), r.device, str(r.cpus), r.gloo,
                     f"{r.scratch} ({r.scratch_free_gb:.1f})", "ok" if r.error is None else "FAILED"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _gloo_all_reduce(rdzv: Rendezvous) -> float:
    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    value = torch.tensor([float(rdzv.rank + 1)])
    dist.all_reduce(value, group=group)
    dist.barrier(group=group)  # no rank tears the group down under a peer still talking
    dist.destroy_process_group(group)
    return float(value.item())


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
    if "gloo" not in rdzv.backend or "nccl" in rdzv.backend:
        # Training runs on NCCL, but checkpoints and async saves talk over gloo: prove it too.
        gloo_sum = _gloo_all_reduce(rdzv)
        if gloo_sum != expected:
            raise PreflightError(f"gloo all-reduce over {rdzv.world_size} ranks gave {gloo_sum}, expected "
                                 f"{expected} (seen on rank {rdzv.rank}, {mine.node}, gloo {mine.gloo})")
    nodes = sorted({r.node for r in reports})
    summary = (f"preflight ok: {rdzv.world_size} rank(s) on {len(nodes)} node(s) ({', '.join(nodes)}), "
               f"backend {rdzv.backend}, all-reduce sum {got:g} == {expected:g} in {seconds * 1e3:.1f} ms")
    gloo_addrs = sorted({r.gloo.split()[-1] for r in reports if r.gloo})
    summary += f"; gloo on {', '.join(gloo_addrs) or 'default'}"
    return {"summary": summary, "table": format_table(reports), "world_size": rdzv.world_size,
            "backend": rdzv.backend, "allreduce_ms": seconds * 1e3, "nodes": nodes,
            "ranks": [asdict(r) for r in reports]}
