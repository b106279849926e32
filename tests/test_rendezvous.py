"""SLURM environment, nodelists and rendezvous derivation: pure functions, no processes."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from datetime import timedelta

import pytest

from hpc.config import compose
from hpc.launch.environment import detect
from hpc.launch.environment import JobEnv
from hpc.launch.network import NetworkError, choose_gloo_interface, exact_ifname
from hpc.launch.rendezvous import (Rendezvous, RendezvousError, cuda_device, host_store, master_port, plan_rendezvous,
                                   port_candidates, publish_port, read_port, resolve_master)
from hpc.slurm import SlurmError, expand_nodelist


@pytest.mark.parametrize("nodelist,hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2,5]", ["n1", "n2", "n5"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[1-2],b3,c[09-10]", ["a1", "a2", "b3", "c09", "c10"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("gpu-a[01-02]-ib", ["gpu-a01-ib", "gpu-a02-ib"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(bad)


SLURM_TASK = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n2",
    "SLURM_RESTART_COUNT": "2",
}


def test_slurm_env_is_read_once_into_a_frozen_value() -> None:
    env = detect(SLURM_TASK)
    assert (env.job_id, env.rank, env.local_rank, env.world_size, env.node_rank, env.num_nodes) == (
        "4242", 3, 1, 4, 1, 2)
    assert env.hostnames == ("n1", "n2") and env.node_name == "n2" and env.restart_count == 2
    assert env.tasks_per_node == 2
    with pytest.raises(Exception):
        env.rank = 0  # type: ignore[misc]


def test_missing_slurm_variable_says_how_to_launch() -> None:
    partial = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_LOCALID"}
    partial["SLURM_PROCID"] = "0"
    with pytest.raises(SlurmError, match="SLURM_LOCALID is not set.*HINT: launch each rank with srun"):
        detect(partial)


def test_detect_picks_the_launcher() -> None:
    assert detect(SLURM_TASK).launcher == "slurm"
    local = detect({"SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_GLOBALID": "1",
                    "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2"})
    assert (local.launcher, local.rank, local.world_size, local.job_id) == ("local", 1, 2, "77")
    torchrun = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (torchrun.launcher, torchrun.node_rank, torchrun.num_nodes) == ("torchrun", 1, 2)
    assert detect({}).launcher == "single"


def test_master_port_is_deterministic_and_in_range() -> None:
    assert master_port("4242", 20000, 29999) == master_port("4242", 20000, 29999) == 24242
    assert master_port("4243", 20000, 29999) != master_port("4242", 20000, 29999)
    assert 30000 <= master_port("123_4", 30000, 30010) <= 30010


def _resolver(table: dict[str, list[str]]):
    return lambda host: table.get(host, [])


def test_master_address_prefers_a_routable_address() -> None:
    resolve = _resolver({"n1": ["127.0.1.1", "10.0.0.1"], "n2": ["10.0.0.2"]})
    assert resolve_master("n1", ["n1", "n2"], resolve) == "10.0.0.1"


def test_loopback_master_is_refused_when_other_nodes_are_real_hosts() -> None:
    resolve = _resolver({"n1": ["127.0.1.1"], "n2": ["10.0.0.2"]})
    with pytest.raises(RendezvousError, match="resolves only to loopback.*HINT: map 'n1'"):
        resolve_master("n1", ["n1", "n2"], resolve)


def test_loopback_master_is_fine_when_the_cluster_is_one_host() -> None:
    resolve = _resolver({"n1": ["127.0.0.1"], "n2": ["127.0.0.1"]})
    assert resolve_master("n1", ["n1", "n2"], resolve) == "127.0.0.1"
    assert resolve_master("n1", ["n1"], resolve) == "127.0.0.1"


def test_unresolvable_master_names_the_host() -> None:
    with pytest.raises(RendezvousError, match="cannot resolve the first node 'nx'"):
        resolve_master("nx", ["nx"], _resolver({}))


def test_plan_rendezvous_picks_backend_and_device() -> None:
    env = detect(SLURM_TASK)
    resolve = _resolver({"n1": ["10.0.0.1"], "n2": ["10.0.0.2"]})
    cpu = compose(["exp=tiny_cpu", "cluster=testcluster", "nodes=2"], which=lambda n: "/x", environ={})
    rdzv = plan_rendezvous(env, cpu, resolve=resolve)
    assert (rdzv.backend, rdzv.device, rdzv.master_addr) == ("gloo", "cpu", "10.0.0.1")
    assert rdzv.master_port == master_port("4242", 20000, 29999, restart=2) == rdzv.port_candidates[0]
    gpu = compose(["exp=tiny_cpu", "cluster=slurm", "nodes=2"], which=lambda n: "/x", environ={})
    rdzv = plan_rendezvous(env, gpu, cuda_devices=2, resolve=resolve)
    assert (rdzv.backend, rdzv.device) == ("nccl", "cuda:1")
    assert rdzv.environ(2)["LOCAL_RANK"] == "1" and rdzv.environ(2)["WORLD_SIZE"] == "4"
    with pytest.raises(RendezvousError, match="rank 3 .* on n2: cluster.accelerator=cuda but this process sees 0 GPU"):
        plan_rendezvous(env, gpu, cuda_devices=0, resolve=resolve)


def test_master_addr_override_wins() -> None:
    env = detect(SLURM_TASK)
    cfg = compose(["exp=tiny_cpu", "cluster=testcluster", "nodes=2", "launch.master_addr=192.168.5.5"],
                  which=lambda n: "/x", environ={})
    assert plan_rendezvous(env, cfg, resolve=_resolver({})).master_addr == "192.168.5.5"


def test_a_rerun_and_the_fallbacks_get_other_ports() -> None:
    first, rerun = master_port("4242", 20000, 29999, restart=0), master_port("4242", 20000, 29999, restart=1)
    assert first != rerun
    candidates = port_candidates("4242", 20000, 29999, restart=1)
    assert candidates[0] == rerun and len(set(candidates)) == len(candidates) == 8
    assert all(20000 <= p <= 29999 for p in candidates)
    assert port_candidates("7", 30000, 30000) == (30000,)  # a one-port range has no fallback


def _env(local_rank: int, per_node: int = 8) -> JobEnv:
    return JobEnv(launcher="slurm", job_id="1", rank=8 + local_rank, local_rank=local_rank,
                  world_size=2 * per_node, node_rank=1, num_nodes=2, hostnames=("n1", "n2"), node_name="n2")


@pytest.mark.parametrize("local_rank,visible,device", [
    (5, 8, "cuda:5"),   # --gpu-bind=none: every GPU of the node visible
    (5, 1, "cuda:0"),   # one GPU bound to each task
    (5, 4, "cuda:1"),   # --gpu-bind=closest: the socket's 4 GPUs, ranks 4-7 share them
    (3, 4, "cuda:3"),
])
def test_the_device_follows_what_the_rank_sees(local_rank: int, visible: int, device: str) -> None:
    assert cuda_device(_env(local_rank), visible) == device


def test_gpus_that_cannot_be_shared_evenly_are_refused() -> None:
    with pytest.raises(RendezvousError, match="sees 3 GPU.*runs 8 ranks.*cluster.gpu_bind"):
        cuda_device(_env(0), 3)


IFACES = {"lo": ["127.0.0.1"], "eth0": ["10.0.0.7"], "ib0": ["172.16.0.7"], "docker0": ["172.17.0.1"]}


def _gloo(master: str = "172.16.0.1", *, nodes: int = 2, nccl: str | None = "^lo,docker",
          environ: dict[str, str] | None = None, routes: dict[str, str] | None = None):
    routes = routes or {"172.16.0.1": "172.16.0.7", "10.0.0.1": "10.0.0.7", "127.0.1.1": "127.0.0.1"}
    return choose_gloo_interface(master, num_nodes=nodes, nccl_ifname=nccl, environ=environ or {},
                                 interfaces=lambda: IFACES, source=routes.__getitem__)


def test_gloo_takes_the_interface_that_routes_to_the_rendezvous_address() -> None:
    # An NCCL exclusion list names no interface gloo could take: derive from the route.
    assert (_gloo().ifname, _gloo().address) == ("ib0", "172.16.0.7")
    assert _gloo("10.0.0.1").ifname == "eth0"


def test_gloo_takes_an_exactly_named_nccl_interface_or_the_environment() -> None:
    assert exact_ifname("=ib0") == exact_ifname("ib0") == "ib0"
    assert exact_ifname("^lo,docker") is None and exact_ifname("ib0,ib1") is None
    assert _gloo("10.0.0.1", nccl="=ib0").ifname == "ib0"
    assert _gloo("10.0.0.1", nccl="=ib9").ifname == "eth0"  # not on this node: fall back to the route
    chosen = _gloo(environ={"GLOO_SOCKET_IFNAME": "eth0"})
    assert (chosen.ifname, chosen.address) == ("eth0", "10.0.0.7")
    listed = _gloo(environ={"GLOO_SOCKET_IFNAME": "ib0,eth0"})  # gloo takes a list too
    assert (listed.ifname, listed.address) == ("ib0,eth0", "172.16.0.7")
    with pytest.raises(NetworkError, match="GLOO_SOCKET_IFNAME=ib9: this node has no IPv4 address on 'ib9'"):
        _gloo(environ={"GLOO_SOCKET_IFNAME": "ib9"})


def test_gloo_on_loopback_is_refused_on_several_nodes_only() -> None:
    with pytest.raises(NetworkError, match="gloo would bind loopback .*2 nodes.*cluster.nccl.socket_ifname"):
        _gloo("127.0.1.1")
    assert _gloo("127.0.1.1", nodes=1).ifname is None


def test_gloo_interface_of_this_machine_is_real() -> None:
    """The probes themselves, on this machine: the route to its own routable address stays on it."""
    from hpc.launch.network import interface_addresses, route_source

    table = interface_addresses()
    assert "127.0.0.1" in table.get("lo", [])
    assert route_source("127.0.0.1") == "127.0.0.1"


def test_the_port_file_carries_rank_0s_port(tmp_path) -> None:
    folder = tmp_path / "rendezvous"
    folder.mkdir()
    (folder / "9.0.0.port").write_text("10.0.0.1 20001\n")  # the run before
    publish_port(folder / "9.1.0.port", "10.0.0.1", 20123)
    assert read_port(folder / "9.1.0.port", timeout_s=1) == 20123
    assert not (folder / "9.0.0.port").exists()
    clock = iter(range(100)).__next__
    with pytest.raises(RendezvousError, match="did not publish its rendezvous port .*shares"):
        read_port(folder / "9.2.0.port", timeout_s=3, clock=clock, sleep=lambda s: None)


def test_a_port_file_from_before_this_launch_is_not_trusted(tmp_path) -> None:
    """A reused run folder whose job ids repeat: the file of the same name is days old."""
    import os
    import time

    stale = tmp_path / "rendezvous" / "9.0.0.port"
    stale.parent.mkdir()
    stale.write_text("10.0.0.1 20001\n")
    os.utime(stale, (time.time() - 86400, time.time() - 86400))
    clock = iter(range(100)).__next__
    with pytest.raises(RendezvousError, match="did not publish"):
        read_port(stale, timeout_s=3, started_at=time.time(), clock=clock, sleep=lambda s: None)
    publish_port(stale, "10.0.0.1", 20555)  # this launch's rank 0 replaces it
    assert read_port(stale, timeout_s=1, started_at=time.time()) == 20555


@contextlib.contextmanager
def _a_taken_and_a_free_port() -> Iterator[tuple[int, int]]:
    """A port someone else listens on, and one nobody does."""
    with socket.socket() as blocker, socket.socket() as probe:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        probe.bind(("0.0.0.0", 0))
        free = probe.getsockname()[1]
        probe.close()
        yield blocker.getsockname()[1], free


def test_rank_0_listens_on_the_next_port_when_one_is_taken(tmp_path) -> None:
    """Real TCPStores: the first candidate is held by someone else; rank 0 takes the next one and
    publishes it, and a client that read the file meets it there."""
    import torch.distributed as dist

    port_file = tmp_path / "rendezvous" / "1.0.0.port"
    with _a_taken_and_a_free_port() as (taken, free):
        rdzv = Rendezvous(0, 0, 2, "127.0.0.1", "n1", taken, "gloo", "cpu", port_candidates=(taken, free))
        store, port = host_store(rdzv, timeout_s=10, port_file=port_file)
        assert port == free and read_port(port_file, timeout_s=1) == free
        client = dist.TCPStore("127.0.0.1", read_port(port_file, timeout_s=1), 2, is_master=False,
                               timeout=timedelta(seconds=10))
        client.set("hello", "rank1")
        assert store.get("hello") == b"rank1"


def test_a_lone_rank_falls_back_without_a_port_file() -> None:
    with _a_taken_and_a_free_port() as (taken, free):
        rdzv = Rendezvous(0, 0, 1, "127.0.0.1", "n1", taken, "gloo", "cpu", port_candidates=(taken, free))
        _, port = host_store(rdzv, timeout_s=10, port_file=None)
        assert port == free
