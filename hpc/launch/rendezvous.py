"""Rendezvous: where rank 0 listens, which backend and device each rank uses, process-group start.

Everything up to `init_process_group` is pure and torch-free, so it is tested without processes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpc.config import Config
from hpc.files import write_atomically
from hpc.launch.environment import JobEnv
from hpc.launch.network import choose_gloo_interface


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
    """'cuda:<index>' (see `cuda_device`) or 'cpu'."""
    port_candidates: tuple[int, ...] = ()
    """Where rank 0 may listen when master_port is taken, in order (empty: master_port only)."""
    gloo_ifname: str | None = None
    """The interface gloo binds (GLOO_SOCKET_IFNAME; None leaves gloo's default)."""
    gloo_addr: str = ""
    """This rank's address on it."""

    def environ(self, local_world_size: int) -> dict[str, str]:
        """The torch.distributed variables, exported for libraries that read them (DeepSpeed)."""
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(local_world_size)}


PORT_TRIES = 8
PORT_STRIDE = 101  # candidates spread out: a neighbouring job's port is not the next one tried


def master_port(job_id: str, port_min: int, port_max: int, restart: int = 0, attempt: int = 0) -> int:
    """A port every rank computes alike from the job id and the run's restart count (a rerun does
    not meet a lingering listener of the run before it); different jobs rarely share one.
    `attempt` > 0 gives the fallbacks rank 0 tries when the port is taken."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    span = port_max - port_min + 1
    return port_min + (number + restart * 7919 + attempt * PORT_STRIDE) % span


def port_candidates(job_id: str, port_min: int, port_max: int, restart: int = 0) -> tuple[int, ...]:
    ports = (master_port(job_id, port_min, port_max, restart, k) for k in range(PORT_TRIES))
    return tuple(dict.fromkeys(ports))


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
    candidates: tuple[int, ...] = ()
    if env.launcher == "torchrun":  # torchrun already chose the address and port
        host, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    else:
        host = env.hostnames[0]
        candidates = port_candidates(env.job_id, launch.port_min, launch.port_max, env.restart_count)
        port = candidates[0]
    addr = launch.master_addr or resolve_master(host, env.hostnames, resolve)
    if cfg.cluster.accelerator == "cuda":
        backend, device = "nccl", cuda_device(env, cuda_devices)
        if cfg.strategy.name == "fsdp" and cfg.strategy.offload_params == "cpu":
            # Offloaded gradients are CPU tensors: clipping reduces their norm over a CPU group.
            backend = "cuda:nccl,cpu:gloo"
    else:
        backend, device = "gloo", "cpu"
    return Rendezvous(env.rank, env.local_rank, env.world_size, addr, host, port, backend, device,
                      port_candidates=candidates)


def cuda_device(env: JobEnv, visible: int) -> str:
    """The GPU this rank drives, among the `visible` ones (CUDA_VISIBLE_DEVICES as SLURM set it).

    With every GPU of the node visible (--gpu-bind=none) the rank takes the one at its local rank.
    Where the site binds GPUs to tasks, the rank sees only its own (one: index 0) or its socket's
    share (a block of ranks shares the block of GPUs, so it takes local rank modulo that share).
    """
    where = f"rank {env.rank} (local rank {env.local_rank}) on {env.node_name}"
    if visible < 1:
        raise RendezvousError(
            f"{where}: cluster.accelerator=cuda but this process sees 0 GPU(s). "
            "HINT: request GPUs (gpus_per_node) or use a cluster preset with accelerator: cpu")
    per_node = env.tasks_per_node
    if visible >= per_node:
        if env.local_rank >= visible:
            raise RendezvousError(f"{where}: sees {visible} GPU(s), fewer than its local rank needs. "
                                  "HINT: gpus_per_node must not exceed the node's GPUs")
        return f"cuda:{env.local_rank}"
    if per_node % visible == 0:
        return f"cuda:{env.local_rank % visible}"
    raise RendezvousError(
        f"{where}: sees {visible} GPU(s) while its node runs {per_node} ranks, so they cannot share "
        "the GPUs evenly. HINT: set cluster.gpu_bind=none (every rank sees the node's GPUs) or "
        "single:1 (one each)")


def _address_in_use(err: BaseException) -> bool:
    text = str(err).lower()
    return "address already in use" in text or "errno: 98" in text or "eaddrinuse" in text


def host_store(rdzv: Rendezvous, *, timeout_s: float, port_file: Path | None = None) -> tuple[Any, int]:
    """Rank 0: listen on the first free candidate port and, when the others learn it from the run
    folder, publish it there. Returns the store and the port."""
    import torch.distributed as dist

    # Fallbacks need a way to tell the other ranks: the port file, or no other ranks at all.
    can_fall_back = rdzv.port_candidates and (port_file is not None or rdzv.world_size == 1)
    ports = rdzv.port_candidates if can_fall_back else (rdzv.master_port,)
    taken = []
    for port in ports:
        try:
            store = dist.TCPStore(rdzv.master_addr, port, rdzv.world_size, is_master=True,
                                  timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        except Exception as err:  # DistNetworkError
            if not _address_in_use(err):
                raise
            taken.append(port)
            continue
        if port_file is not None:
            publish_port(port_file, rdzv.master_addr, port)
        if taken:
            logging.getLogger("hpc").warning("rendezvous port(s) %s on %s taken; listening on %d",
                                             ", ".join(map(str, taken)), rdzv.master_host, port)
        return store, port
    raise RendezvousError(
        f"rank 0 on {socket.gethostname()}: every rendezvous port tried on {rdzv.master_host} is taken "
        f"({', '.join(map(str, taken))}). HINT: change launch.port_min/port_max")


def publish_port(port_file: Path, addr: str, port: int) -> None:
    """Tell the other ranks where rank 0 listens; files of earlier runs of the job go."""
    port_file.parent.mkdir(parents=True, exist_ok=True)
    for old in port_file.parent.glob("*.port"):
        if old.name != port_file.name:
            old.unlink(missing_ok=True)
    write_atomically(port_file, f"{addr} {port}\n")


FRESH_SLACK_S = 300.0
"""A port file older than this rank's start by more than this is an earlier launch's (the ranks of
one launch start within seconds of each other; rank 0 writes after it started)."""


def read_port(port_file: Path, *, timeout_s: float, started_at: float | None = None,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """The port rank 0 of this launch published, waiting for it up to `timeout_s`. A file written
    before this launch began (`started_at`, wall-clock seconds; a reused run folder whose job ids
    repeat) is not trusted: rank 0 will replace it."""
    deadline = clock() + timeout_s
    while True:
        try:
            # Opening the folder makes an NFS client revalidate it, so a file that another node
            # just created is not hidden by a cached "no such file".
            os.close(os.open(port_file.parent, os.O_RDONLY))
            fresh = started_at is None or port_file.stat().st_mtime >= started_at - FRESH_SLACK_S
            if fresh:
                return int(port_file.read_text().split()[1])
        except (FileNotFoundError, NotADirectoryError, IndexError, ValueError):
            pass
        if clock() > deadline:
            raise RendezvousError(
                f"rank 0 did not publish its rendezvous port in {port_file} within {timeout_s:.0f} s. "
                "HINT: the run folder must be on storage every node shares; check rank 0's log")
        sleep(0.1)


def _process_start() -> float:
    """When this process started (wall clock), from the kernel's record of it."""
    import psutil

    return float(psutil.Process().create_time())


def init_process_group(rdzv: Rendezvous, *, rendezvous_timeout_s: float,
                       collective_timeout_s: float, port_file: Path | None = None) -> Rendezvous:
    """Join the default process group: rank 0 hosts a TCPStore at the master address (falling back
    to the next candidate port when one is taken, and publishing it in `port_file`; the other ranks
    read it there). Returns the rendezvous with the port actually used."""
    import torch
    import torch.distributed as dist

    if rdzv.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(rdzv.device))
    publish = port_file if rdzv.world_size > 1 and rdzv.port_candidates else None
    port = rdzv.master_port  # until rank 0 chose, or the others read, the one actually used
    try:
        if rdzv.rank == 0:
            store, port = host_store(rdzv, timeout_s=rendezvous_timeout_s, port_file=publish)
        else:
            if publish is not None:
                port = read_port(publish, timeout_s=rendezvous_timeout_s, started_at=_process_start())
            store = dist.TCPStore(rdzv.master_addr, port, rdzv.world_size, is_master=False,
                                  timeout=timedelta(seconds=rendezvous_timeout_s))
    except RendezvousError:
        raise
    except Exception as err:  # RuntimeError/DistNetworkError: bind or connect failed
        raise RendezvousError(
            f"rank {rdzv.rank} on {socket.gethostname()}: cannot reach the rendezvous at "
            f"{rdzv.master_host} ({rdzv.master_addr}:{port}): {err}. HINT: check "
            "that the port is free and the first node is reachable, or change launch.port_min/"
            "port_max") from err
    rdzv = dataclasses.replace(rdzv, master_port=port)
    kwargs: dict[str, Any] = {}
    if rdzv.backend == "nccl":
        kwargs["device_id"] = torch.device(rdzv.device)
    dist.init_process_group(rdzv.backend, store=store, rank=rdzv.rank, world_size=rdzv.world_size,
                            timeout=timedelta(seconds=collective_timeout_s), **kwargs)
    # The store must outlive this call (rank 0 serves it); the process group holds a reference.
    return rdzv


def join(env: JobEnv, cfg: Config, *, local_world_size: int, rendezvous_timeout_s: float,
         collective_timeout_s: float, port_file: Path | None = None) -> Rendezvous:
    """Plan this rank's rendezvous, pick gloo's interface, export both for libraries that read
    them, share the CPU fairly between the ranks of a node when training on CPU, and join the
    default process group (`port_file`: where rank 0 publishes its port, in the run folder)."""
    import torch

    cuda = torch.cuda.device_count() if cfg.cluster.accelerator == "cuda" else 0
    rdzv = plan_rendezvous(env, cfg, cuda_devices=cuda)
    gloo = choose_gloo_interface(rdzv.master_addr, num_nodes=env.num_nodes,
                                 nccl_ifname=cfg.cluster.nccl.socket_ifname, environ=os.environ)
    if gloo.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = gloo.ifname
    rdzv = dataclasses.replace(rdzv, gloo_ifname=gloo.ifname, gloo_addr=gloo.address)
    os.environ.update(rdzv.environ(local_world_size=local_world_size))
    if rdzv.device == "cpu":
        # Ranks sharing a CPU would each start one thread per core and fight over them.
        torch.set_num_threads(max(len(os.sched_getaffinity(0)) // local_world_size, 1))
    rdzv = init_process_group(rdzv, rendezvous_timeout_s=rendezvous_timeout_s,
                              collective_timeout_s=collective_timeout_s, port_file=port_file)
    os.environ["MASTER_PORT"] = str(rdzv.master_port)
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
