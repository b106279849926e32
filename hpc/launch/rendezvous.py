"""Rendezvous: where rank 0 listens, which backend and device each rank uses, process-group start.

Everything up to `init_process_group` is pure and torch-free, so it is tested without processes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from hpc.config import Config
from hpc.launch.environment import JobEnv


class RendezvousError(RuntimeError):
    """The ranks cannot meet; the message names the host and the fix."""


@dataclass(frozen=True)
class Rendezvous:
    """What one rank needs to join the process group."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_host: str
    """The node name the address was resolved from (for messages)."""
    master_port: int
    backend: str
    """nccl on GPUs, gloo on CPU."""
    device: str
    """'cuda:<local_rank>' or 'cpu'."""

    def environ(self, local_world_size: int) -> dict[str, str]:
        """The torch.distributed variables, exported for libraries that read them (DeepSpeed)."""
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(local_world_size)}


def master_port(job_id: str, port_min: int, port_max: int) -> int:
    """A port every rank computes alike from the job id; different jobs rarely share one."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return port_min + number % (port_max - port_min + 1)


Resolver = Callable[[str], Sequence[str]]


def ipv4_addresses(host: str) -> list[str]:
    """IPv4 addresses of a host name, in resolver order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def resolve_master(host: str, hostnames: Sequence[str], resolve: Resolver = ipv4_addresses) -> str:
    """The address rank 0 listens on: not loopback, unless the whole job is on one host.

    A Debian node often maps its own name to 127.0.1.1; handing that to the other nodes would make
    them dial themselves. Loopback is accepted only when every node of the job resolves to
    loopback too, i.e. the "cluster" really is this one machine.
    """
    addrs = resolve(host)
    if not addrs:
        raise RendezvousError(f"cannot resolve the first node '{host}' to an IPv4 address. "
                              "HINT: fix name resolution or set launch.master_addr=<ip>")
    routable = [a for a in addrs if not _is_loopback(a)]
    if routable:
        return routable[0]
    others = [h for h in dict.fromkeys(hostnames) if h != host]
    if all(resolve(h) and all(_is_loopback(a) for a in resolve(h)) for h in others):
        return addrs[0]
    raise RendezvousError(
        f"the first node '{host}' resolves only to loopback ({', '.join(addrs)}), which the other "
        f"nodes cannot reach. HINT: map '{host}' to its network address in DNS or /etc/hosts, "
        "or set launch.master_addr=<ip>")


def plan_rendezvous(env: JobEnv, cfg: Config, *, cuda_devices: int = 0,
                    environ: Mapping[str, str] = os.environ,
                    resolve: Resolver = ipv4_addresses) -> Rendezvous:
    """Derive this rank's rendezvous from the job environment and the config (no torch)."""
    launch = cfg.launch
    if env.launcher == "torchrun":  # torchrun already chose the address and port
        host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    else:
        host = env.hostnames[0]
        port = master_port(env.job_id, launch.port_min, launch.port_max)
    addr = launch.master_addr or resolve_master(host, env.hostnames, resolve)
    if cfg.cluster.accelerator == "cuda":
        if env.local_rank >= cuda_devices:
            raise RendezvousError(
                f"rank {env.rank} (local rank {env.local_rank}) on {env.node_name}: "
                f"cluster.accelerator=cuda but this process sees {cuda_devices} GPU(s). "
                "HINT: request GPUs (gpus_per_node) or use a cluster preset with accelerator: cpu")
        backend, device = "nccl", f"cuda:{env.local_rank}"
        if cfg.strategy.name == "fsdp" and cfg.strategy.offload_params == "cpu":
            # Offloaded gradients are CPU tensors: clipping reduces their norm over a CPU group.
            backend = "cuda:nccl,cpu:gloo"
    else:
        backend, device = "gloo", "cpu"
    return Rendezvous(env.rank, env.local_rank, env.world_size, addr, host, port, backend, device)


def init_process_group(rdzv: Rendezvous, *, rendezvous_timeout_s: float,
                       collective_timeout_s: float) -> Any:
    """Join the default process group: rank 0 hosts a TCPStore at the master address."""
    import torch
    import torch.distributed as dist

    if rdzv.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rdzv.device))
    try:
        store = dist.TCPStore(rdzv.master_addr, rdzv.master_port, rdzv.world_size,
                              is_master=rdzv.rank == 0,
                              timeout=timedelta(seconds=rendezvous_timeout_s),
                              wait_for_workers=False)
    except Exception as err:  # RuntimeError/DistNetworkError: bind or connect failed
        raise RendezvousError(
            f"rank {rdzv.rank} on {socket.gethostname()}: cannot reach the rendezvous at "
            f"{rdzv.master_host} ({rdzv.master_addr}:{rdzv.master_port}): {err}. HINT: check "
            "that the port is free and the first node is reachable, or change launch.port_min/"
            "port_max") from err
    kwargs: dict[str, Any] = {}
    if rdzv.backend == "nccl":
        kwargs["device_id"] = torch.device(rdzv.device)
    dist.init_process_group(rdzv.backend, store=store, rank=rdzv.rank, world_size=rdzv.world_size,
                            timeout=timedelta(seconds=collective_timeout_s), **kwargs)
    return store


def join(env: JobEnv, cfg: Config, *, local_world_size: int, rendezvous_timeout_s: float,
         collective_timeout_s: float) -> Rendezvous:
    """Plan this rank's rendezvous, export it for libraries that read it, share the CPU fairly
    between the ranks of a node when training on CPU, and join the default process group."""
    import torch

    cuda = torch.cuda.device_count() if cfg.cluster.accelerator == "cuda" else 0
    rdzv = plan_rendezvous(env, cfg, cuda_devices=cuda)
    os.environ.update(rdzv.environ(local_world_size=local_world_size))
    if rdzv.device == "cpu":
        # Ranks sharing a CPU would each start one thread per core and fight over them.
        torch.set_num_threads(max(len(os.sched_getaffinity(0)) // local_world_size, 1))
    init_process_group(rdzv, rendezvous_timeout_s=rendezvous_timeout_s,
                       collective_timeout_s=collective_timeout_s)
    return rdzv


def shutdown_process_group(*, barrier: bool = True) -> None:
    """Leave cleanly: a barrier first, so no rank tears gloo down under a peer still talking.
    `barrier=False` after a failure: the peers may never reach the barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank, over the default process group (or `obj` itself when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
