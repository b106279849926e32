"""Presets on a search path: ./configs, then $HPC_CONFIG_PATH's folders, then the shipped ones; the
first folder holding a preset wins, `--list` says where each comes from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.config import ConfigError, compose
from hpc.config.presets import search_path, shipped_dir

REPO = Path(__file__).resolve().parents[1]
NO_SBATCH = {"which": lambda name: None, "environ": {}}

# The README's example site preset ("Your site's presets"), word for word: tests/test_config_search.py
# composes and dry-runs it.
SITE_PRESET = """\
# Cluster "mysite": 4 x H100 80 GB per node, NDR InfiniBand, node-local NVMe.
kind: slurm
accelerator: cuda
max_gpus_per_node: 4
cpus_per_gpu: 16
mem_per_gpu_gb: 200
partition: gpu
peak_tflops: 989.0            # H100 SXM dense bf16: MFU in the logs is measured against it
gpu_memory_gb: 80
intra_node_gbps: 360
inter_node_gbps: 45
scratch_dir: /local_nvme/{user}/{job_id}
modules: [cuda/12.4, nccl/2.21]
venv: /shared/envs/hpc         # activated by the batch script before the ranks start
nccl:
  socket_ifname: "=ib0"
  ib_hca: "=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1"
"""
SITE_EXP = """\
defaults:
  model: llama3_8b
  strategy: fsdp_full_shard
  cluster: mysite
strategy:
  mixed_precision: bf16
slurm:
  nodes: 2
  gpus_per_node: 4
"""


@pytest.fixture
def site(tmp_path, monkeypatch) -> dict[str, Path]:
    """A site repository (the current folder, with configs/) and a shared folder on $HPC_CONFIG_PATH."""
    work = tmp_path / "site-repo"
    (work / "configs" / "cluster").mkdir(parents=True)
    (work / "configs" / "exp").mkdir()
    (work / "configs" / "cluster" / "mysite.yaml").write_text(SITE_PRESET)
    (work / "configs" / "exp" / "my8b.yaml").write_text(SITE_EXP)
    shared = tmp_path / "shared"
    (shared / "cluster").mkdir(parents=True)
    # Shadowed by ./configs' mysite; shadows the shipped slurm.
    (shared / "cluster" / "mysite.yaml").write_text("kind: slurm\naccelerator: cuda\nmax_gpus_per_node: 2\n")
    (shared / "cluster" / "slurm.yaml").write_text("kind: slurm\naccelerator: cuda\nmax_gpus_per_node: 6\n"
                                                   "gpu_memory_gb: 80\n")
    second = tmp_path / "second"
    (second / "cluster").mkdir(parents=True)
    (second / "cluster" / "slurm.yaml").write_text("kind: slurm\nmax_gpus_per_node: 7\n")
    (second / "cluster" / "only_second.yaml").write_text("kind: slurm\nmax_gpus_per_node: 3\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HPC_CONFIG_PATH", f"{shared}{os.pathsep}{second}")
    monkeypatch.delenv("HPC_CONFIG_DIR", raising=False)
    return {"work": work, "shared": shared, "second": second}


def test_the_search_path_order(site) -> None:
    folders = search_path().folders
    assert [f.origin for f in folders] == ["./configs", "$HPC_CONFIG_PATH", "$HPC_CONFIG_PATH", "shipped"]
    assert [f.path for f in folders][:3] == [Path("configs").absolute(), site["shared"], site["second"]]
    assert folders[3].path == shipped_dir("configs")


def test_a_site_experiment_uses_its_cluster_preset_and_the_shipped_ones(site) -> None:
    cfg = compose(["exp=my8b"], **NO_SBATCH)
    assert cfg.cluster.name == "mysite"
    assert cfg.cluster.max_gpus_per_node == 4  # ./configs' mysite, not $HPC_CONFIG_PATH's (2)
    assert cfg.cluster.nccl.ib_hca == "=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1"
    assert cfg.cluster.modules == ["cuda/12.4", "nccl/2.21"] and cfg.cluster.venv == "/shared/envs/hpc"
    assert cfg.model.dim == 4096 and cfg.strategy.name == "fsdp"  # shipped llama3_8b, fsdp_full_shard


def test_override_order_per_preset(site) -> None:
    # $HPC_CONFIG_PATH's first folder shadows the second and the shipped slurm preset.
    assert compose(["exp=tiny_cpu", "cluster=slurm"], **NO_SBATCH).cluster.max_gpus_per_node == 6
    # A preset only the second folder has is found there.
    assert compose(["exp=tiny_cpu", "cluster=only_second"], **NO_SBATCH).cluster.max_gpus_per_node == 3
    # Shipped presets no folder shadows are still there.
    assert compose(["exp=tiny_cpu", "cluster=local"], **NO_SBATCH).cluster.kind == "local"
    # ./configs shadows everything: a user's own slurm preset wins over the site's.
    (site["work"] / "configs" / "cluster" / "slurm.yaml").write_text("kind: slurm\nmax_gpus_per_node: 1\n")
    assert compose(["exp=tiny_cpu", "cluster=slurm", "gpus_per_node=1"], **NO_SBATCH).cluster.max_gpus_per_node == 1


def test_list_shows_every_preset_its_origin_and_what_it_shadows(site) -> None:
    out = subprocess.run([sys.executable, "-m", "hpc.submit", "--list"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    lines = out.splitlines()
    assert lines[0] == "search path, first match wins:"
    assert lines[1].split() == ["[1]", "./configs", str(site["work"] / "configs")]
    assert lines[2].split() == ["[2]", "$HPC_CONFIG_PATH", str(site["shared"])]
    assert lines[3].split() == ["[3]", "$HPC_CONFIG_PATH", str(site["second"])]
    assert lines[4].split() == ["[4]", "shipped", str(shipped_dir("configs"))]
    entry = {line.split()[0]: " ".join(line.split()[1:]) for line in lines
             if line.startswith("  ") and "[" not in line.split()[0]}
    assert entry["mysite"] == "[1] ./configs; shadows [2] $HPC_CONFIG_PATH"
    assert entry["slurm"] == "[2] $HPC_CONFIG_PATH; shadows [3] $HPC_CONFIG_PATH; shadows [4] shipped"
    assert entry["only_second"] == "[3] $HPC_CONFIG_PATH"
    assert entry["my8b"] == "[1] ./configs"
    assert entry["llama3_70b"] == "[4] shipped"


def test_an_unknown_preset_names_the_search_path(site) -> None:
    with pytest.raises(ConfigError) as err:
        compose(["exp=my8b", "cluster=mysit"], **NO_SBATCH)
    text = str(err.value)
    assert "unknown cluster 'mysit'; did you mean 'mysite'?" in text
    assert f"looked for cluster/mysit.yaml in: {site['work'] / 'configs'} (./configs); {site['shared']} " \
           f"($HPC_CONFIG_PATH); {site['second']} ($HPC_CONFIG_PATH); {shipped_dir('configs')} (shipped)" in text


def test_the_site_experiment_dry_runs_from_the_command_line(site) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc.submit", "exp=my8b", "run.root=/shared/runs", "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    for line in ("module load cuda/12.4", "module load nccl/2.21", "source /shared/envs/hpc/bin/activate",
                 "export NCCL_IB_HCA==mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1", "export NCCL_SOCKET_IFNAME==ib0",
                 "#SBATCH --partition=gpu"):
        assert line in proc.stdout.splitlines(), line
    assert proc.stdout.startswith("# plan: fsdp_full_shard: ") and "(cluster mysite): fits" in proc.stdout


def test_missing_folders_on_the_path_are_left_out(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./configs here
    monkeypatch.setenv("HPC_CONFIG_PATH", f"{tmp_path / 'nowhere'}{os.pathsep}")
    monkeypatch.delenv("HPC_CONFIG_DIR", raising=False)
    assert [f.origin for f in search_path().folders] == ["shipped"]
