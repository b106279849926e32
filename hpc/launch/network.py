"""Which network interface gloo uses on this node.

gloo carries more than CPU training here: the checkpoint group, asynchronous DCP saves and FSDP's
CPU offload all run over it, even when NCCL trains on GPUs. Without GLOO_SOCKET_IFNAME gloo binds
whatever this host's own name resolves to, which on Debian-like nodes is 127.0.1.1: the peers on
other nodes then dial themselves and hang until the collective timeout. NCCL's exclusion lists
('^lo,docker') mean nothing to gloo, which takes one interface name.

So each rank picks the interface its kernel would use to reach the rendezvous address (the routable
address of the first node, already checked by `rendezvous.resolve_master`): the one network all the
job's nodes are known to share. Pure apart from the two probes, which are parameters.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Interfaces = Callable[[], Mapping[str, list[str]]]
RouteSource = Callable[[str], str]


class NetworkError(RuntimeError):
    """No usable interface for gloo; the message names the address and the fix."""


@dataclass(frozen=True)
class GlooInterface:
    """The interface gloo binds on this rank, its address and where the choice came from."""

    ifname: str | None
    """None: leave gloo's default (a one-node job whose address is loopback anyway)."""
    address: str
    reason: str


def interface_addresses() -> dict[str, list[str]]:
    """IPv4 addresses of each interface of this host."""
    import psutil  # in-allocation only; the login node never asks

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def route_source(address: str) -> str:
    """The local address the kernel would send from to reach `address` (a UDP connect sends no
    packet; it only routes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return str(probe.getsockname()[0])


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def exact_ifname(nccl_ifname: str | None) -> str | None:
    """The one interface an NCCL_SOCKET_IFNAME names exactly ('=ib0' or a plain 'ib0'), else None
    (a prefix list or an exclusion list names no single interface)."""
    if not nccl_ifname or any(c in nccl_ifname for c in "^,"):
        return None
    return nccl_ifname.removeprefix("=")


def choose_gloo_interface(master_addr: str, *, num_nodes: int, nccl_ifname: str | None,
                          environ: Mapping[str, str], interfaces: Interfaces = interface_addresses,
                          source: RouteSource = route_source) -> GlooInterface:
    """gloo's interface on this rank: GLOO_SOCKET_IFNAME when the environment sets it, else the
    interface NCCL_SOCKET_IFNAME names exactly (if this node has it), else the one that routes to
    the rendezvous address. Loopback is refused for a job on several nodes."""
    table = interfaces()
    given = environ.get("GLOO_SOCKET_IFNAME")
    if given:
        # gloo also takes a comma-separated list (one device per interface): report the first.
        first = given.split(",")[0]
        if not table.get(first):
            raise NetworkError(f"GLOO_SOCKET_IFNAME={given}: this node has no IPv4 address on '{first}' "
                               f"(it has {', '.join(sorted(n for n, a in table.items() if a))}). HINT: "
                               "name an interface every node has, or unset it to let each rank derive one")
        return GlooInterface(given, table[first][0], "GLOO_SOCKET_IFNAME set in the environment")
    named = exact_ifname(nccl_ifname)
    if named and table.get(named):
        return GlooInterface(named, table[named][0], "the interface cluster.nccl.socket_ifname names")
    try:
        local = source(master_addr)
    except OSError as err:
        raise NetworkError(f"no route from this node to the rendezvous address {master_addr}: {err}. "
                           "HINT: set launch.master_addr to an address every node reaches") from err
    owner = next((name for name, addrs in table.items() if local in addrs), None)
    if _loopback(local):
        if num_nodes > 1:
            raise NetworkError(
                f"gloo would bind loopback ({local}, the route to the rendezvous address {master_addr}) in "
                f"a job on {num_nodes} nodes, and the other nodes could not reach it. HINT: set "
                "cluster.nccl.socket_ifname to the interface the nodes share (e.g. '=ib0'), or "
                "cluster.env.GLOO_SOCKET_IFNAME")
        return GlooInterface(None, local, "one node: gloo's default is fine")
    if owner is None:
        return GlooInterface(None, local, f"no interface of this host holds {local}; gloo's default")
    return GlooInterface(owner, local, f"routes to the rendezvous address {master_addr}")

