"""SLURM environment, nodelists and rendezvous derivation: pure functions, no processes."""

from __future__ import annotations

import pytest

from hpc.config import compose
from hpc.launch.environment import detect
from hpc.launch.rendezvous import RendezvousError, master_port, plan_rendezvous, resolve_master
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
    assert (rdzv.backend, rdzv.device, rdzv.master_addr, rdzv.master_port) == ("gloo", "cpu", "10.0.0.1", 24242)
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
