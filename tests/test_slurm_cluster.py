"""Against the real local SLURM cluster (tools/slurm-cluster up): submit, run on two nodes, quote names.

Under CI (CI=true) or HPC_REQUIRE_SLURM=1 these tests fail, not skip, when the cluster is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import slurm
from hpc.config import compose, from_yaml
from hpc.submit.plan import build_plan
from slurm_jobs import ROOT, job_id_of, submit, wait_done
from test_train_job import STRATEGIES, check_trained

pytestmark = pytest.mark.slurm


def _submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return submit(env, *args)


_job_id, _wait_done = job_id_of, wait_done


@pytest.mark.parametrize("gpus_per_node", [1, 2])
def test_tiny_cpu_runs_on_two_nodes_and_the_preflight_spans_them(
        cluster_env: dict[str, str], tmp_path: Path, gpus_per_node: int) -> None:
    args = ["exp=tiny_cpu", "nodes=2", f"gpus_per_node={gpus_per_node}", f"run.root={tmp_path}", "run.name=two"]
    if gpus_per_node == 1:
        # One rank per node with both of the node's cores, bound by srun as on a GPU cluster.
        args += ["slurm.cpus_per_task=2", "cluster.cpu_bind=cores"]
    proc = _submit(cluster_env, *args, "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = 2 * gpus_per_node
    assert f"preflight ok: {world} rank(s) on 2 node(s) (n" in proc.stdout
    job_id = _job_id(proc.stdout)
    log = (tmp_path / "two" / "submitit" / f"{job_id}_0_log.out").read_text()
    rows = [line.split() for line in log.splitlines() if line[:1].isdigit() and "ok" in line.split()]
    node_of = {int(row[0]): row[2] for row in rows}
    assert sorted(node_of) == list(range(world)), log
    # columns: rank local node host pid device cpus gloo-interface gloo-address scratch (free) status
    cpus = {int(row[0]): int(row[6]) for row in rows}
    if gpus_per_node == 1:
        # srun got --cpus-per-task=2: without it SLURM 22.05 binds each rank to one core.
        assert cpus == {0: 2, 1: 2}, log
    # The nodes answer on a routable address, so gloo must not sit on loopback (it would on a
    # host whose own name resolves to 127.0.x.x, like this one, without the derived interface).
    node_addr = slurm.run(["scontrol", "show", "node", "n1"], env=cluster_env).split("NodeAddr=")[1].split()[0]
    gloo_addrs = {row[8] for row in rows}
    if not node_addr.startswith("127."):
        assert gloo_addrs == {node_addr}, log
    assert f"gloo on {', '.join(sorted(gloo_addrs))}" in proc.stdout
    # Block placement: ranks 0..g-1 on the first node, g..2g-1 on the second, two distinct nodes.
    first, second = node_of[0], node_of[world - 1]
    assert first != second and first.startswith("n") and second.startswith("n")
    assert node_of == {rank: first if rank < gpus_per_node else second for rank in range(world)}, log
    assert _wait_done(job_id, cluster_env) == "COMPLETED"
    # What was submitted is byte for byte what --dry-run prints for the same config.
    submitted = (tmp_path / "two" / "submitit" / f"{job_id}_submission.sh").read_text()
    saved = (tmp_path / "two" / "config.yaml").read_text()
    assert submitted == build_plan(from_yaml(saved), cwd=ROOT, python=sys.executable).sbatch_script()


# Every strategy trains on two local ranks in test_train_job and matches DDP in test_equivalence; on
# two SLURM nodes only what a node boundary changes is run here: HYBRID_SHARD's shard groups within
# a node and replica groups across, and DeepSpeed ZeRO-3's multi-node launch (DDP and FULL_SHARD
# cross nodes in the tests above and below). The full matrix was ~7 min of the suite.
MULTI_NODE_STRATEGIES = ["fsdp_hybrid_shard", "zero3"]
assert set(MULTI_NODE_STRATEGIES) <= set(STRATEGIES)


@pytest.mark.parametrize("strategy", MULTI_NODE_STRATEGIES)
def test_two_node_job_trains_with_strategies_a_node_boundary_changes(
        cluster_env: dict[str, str], tmp_path: Path, strategy: str, torch_extensions_dir: Path) -> None:
    env = {**cluster_env, "TORCH_EXTENSIONS_DIR": str(torch_extensions_dir)}
    proc = _submit(env, "exp=tiny_cpu", "nodes=2", f"strategy={strategy}", f"run.root={tmp_path}",
                   "run.name=job", "--wait")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preflight ok: 4 rank(s) on 2 node(s)" in proc.stdout
    check_trained(proc.stdout, tmp_path / "job", world=4)
    assert _wait_done(_job_id(proc.stdout), cluster_env) == "COMPLETED"


def test_hostile_job_name_reaches_slurm_verbatim_and_runs_nothing(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    name = f"a'; touch {marker}; echo \"$(touch {marker})\" #"
    proc = _submit(cluster_env, "exp=tiny_cpu", "nodes=1", "gpus_per_node=1", f"run.root={tmp_path}",
                   "run.name=hostile", f"slurm.job_name={name}", "--no-wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = _job_id(proc.stdout)
    assert _wait_done(job_id, cluster_env) == "COMPLETED"
    # squeue, not sacct: the accounting database stores '"' as '`' (a slurmdbd quirk, not ours).
    shown = subprocess.run(["squeue", "--states=all", "-h", "-o", "%j", "-j", job_id],
                           capture_output=True, text=True, env=cluster_env).stdout.rstrip("\n")
    assert shown == name
    assert not marker.exists()


def test_a_refused_submission_is_a_clear_error(cluster_env: dict[str, str], tmp_path: Path) -> None:
    # A partition the cluster does not have: sbatch refuses, and the user sees sbatch's reason.
    proc = _submit(cluster_env, "exp=tiny_cpu", "partition=nosuch", f"run.root={tmp_path}", "--no-wait")
    assert proc.returncode == 1
    assert "error: submission failed" in proc.stderr and "partition" in proc.stderr.lower()


def test_composed_testcluster_config_matches_the_cluster() -> None:
    cfg = compose(["exp=tiny_cpu", "cluster=testcluster", "nodes=2"], which=lambda n: "/x", environ={})
    assert cfg.cluster.max_nodes == 4 and cfg.cluster.accelerator == "cpu"


def test_two_node_checkpoint_is_staged_per_node_and_resumes_exactly(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    """Each node writes its ranks' shards to its own scratch; each node's first rank uploads them;
    the resubmitted job resumes from the committed step on the same trajectory, bit for bit."""
    args = ["exp=tiny_cpu", "nodes=2", "strategy=fsdp_full_shard", f"run.root={tmp_path}", "train.log_every=1"]
    straight = _submit(cluster_env, *args, "run.name=straight", "--wait")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    first = _submit({**cluster_env, "HPC_FAULTS": "stop@step_end:step=10"}, *args, "run.name=split", "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = _job_id(first.stdout)
    step10 = tmp_path / "split" / "checkpoints" / "step-10"
    manifest = json.loads((step10 / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and manifest["data"]["consumed_samples"] == 10 * 16
    shards = {e["name"] for e in manifest["files"] if e["name"].endswith(".distcp")}
    assert {name.split("_")[2] for name in shards} == {"0", "1", "2", "3"}  # __<rank>_<file>.distcp
    # Node-local scratch: the first node holds ranks 0-1's shards, the second ranks 2-3's.
    scratch = Path("/var/tmp/hpc-slurm/scratch")
    held = {node.name: {p.name.split("_")[2] for p in (node / job_id / "checkpoints" / "step-10").glob("*.distcp")}
            for node in scratch.iterdir() if (node / job_id / "checkpoints" / "step-10").is_dir()}
    assert sorted(held.values(), key=sorted) == [{"0", "1"}, {"2", "3"}], held

    second = _submit(cluster_env, *args, "run.name=split", "--wait")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(resumed at step 10)" in second.stdout
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("straight", "split")}
    assert len(losses["split"]) == 20 and losses["split"] == losses["straight"]


def test_a_scratch_folder_shared_between_nodes_is_refused_before_training(
        cluster_env: dict[str, str], tmp_path: Path) -> None:
    proc = _submit(cluster_env, "exp=tiny_cpu", "nodes=2", f"run.root={tmp_path}", "run.name=job",
                   f"cluster.scratch_dir={tmp_path}/shared/{{job_id}}", "--wait")
    assert proc.returncode != 0
    log = next((tmp_path / "job" / "submitit").glob("*_0_log.out")).read_text()
    assert "cluster.scratch_dir must be node-local" in proc.stdout + proc.stderr + log, log[-3000:]
    assert not (tmp_path / "job" / "metrics.jsonl").exists()
