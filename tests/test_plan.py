"""The submission plan and the dry run: golden sbatch scripts, quoting, local plans.

Regenerate the golden files after an intended change with HPC_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.config import ConfigError, compose
from hpc.submit.__main__ import main
from hpc.submit.plan import build_plan
from golden_files import GOLDEN, check_golden

SLURM = {"which": lambda name: f"/usr/bin/{name}", "environ": {}}
FIXED = ["run.root=/shared/runs", "run.name=golden", "run.python=python3"]
HOSTILE = "a'; echo x"


def _script(*args: str) -> str:
    return build_plan(compose([*args, *FIXED], **SLURM)).sbatch_script()


def test_70b_zero3_on_4_nodes_matches_golden() -> None:
    script = _script("exp=70b_zero3", "nodes=4")
    check_golden("70b_zero3_nodes4.sbatch", script)
    lines = script.splitlines()
    for flag in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue",
                 "--signal=USR2@600", "--open-mode=append", "--time=1440"]:
        assert f"#SBATCH {flag}" in lines, flag
    assert "export NCCL_IB_HCA==mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1,mlx5_4:1,mlx5_5:1,mlx5_6:1,mlx5_7:1" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines
    assert "export NCCL_SOCKET_IFNAME==ib0" in lines
    # NCCL names its transports on the first start only (a requeue has SLURM_RESTART_COUNT >= 1).
    assert ('if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET; fi'
            in lines)
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    for flag in ["--kill-on-bad-exit=1", "--cpus-per-task=12", "--cpu-bind=cores", "--distribution=block:block",
                 "--gpu-bind=none"]:
        assert flag in srun, flag
    # Whole nodes get all their memory, and no accounting key the site did not ask for.
    assert "#SBATCH --exclusive" in lines and "#SBATCH --mem=0" in lines
    assert not any("wckey" in line for line in lines)


def test_memory_and_wckey_only_as_asked() -> None:
    shared = _script("exp=tiny_cpu", "cluster=slurm", "gpus_per_node=4", "slurm.wckey=proj-llm").splitlines()
    assert "#SBATCH --mem=880GB" in shared and "#SBATCH --exclusive" not in shared  # 4 x 220 GB
    assert "#SBATCH --wckey=proj-llm" in shared
    sized = _script("exp=70b_zero3", "slurm.exclusive=true", "slurm.mem_gb=500").splitlines()
    assert "#SBATCH --mem=500GB" in sized


def test_cpu_bind_and_gpu_bind_are_checked() -> None:
    with pytest.raises(ConfigError, match="cluster.cpu_bind='core' is not one of cores.*did you mean 'cores'"):
        _script("exp=tiny_cpu", "cluster.cpu_bind=core")
    with pytest.raises(ConfigError, match="cluster.gpu_bind='nearest' is not one of none, closest"):
        _script("exp=tiny_cpu", "cluster.gpu_bind=nearest")
    srun = next(line for line in _script("exp=tiny_cpu", "cluster=slurm", "cluster.gpu_bind=single:1").splitlines()
                if line.startswith("srun "))
    assert "--gpu-bind=single:1" in srun


def test_hostile_names_are_quoted_and_match_golden() -> None:
    script = _script("exp=70b_zero3", "nodes=4", f"slurm.job_name={HOSTILE}",
                     "slurm.constraint=h100&ib", "cluster.env={X: \"$(touch /tmp/pwn)\"}")
    check_golden("hostile_names.sbatch", script)
    # Every non-comment line that carries a hostile value parses back to the exact value.
    job_line = next(line for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
    assert shlex.split(job_line.split("=", 1)[1]) == [HOSTILE]
    env_line = next(line for line in script.splitlines() if line.startswith("export X="))
    assert shlex.split(env_line.split("=", 1)[1]) == ["$(touch /tmp/pwn)"]


def test_hostile_values_do_not_run_when_the_setup_executes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cfg = compose(["exp=tiny_cpu", "cluster=local", f"run.root={tmp_path}/r'; touch {marker}; '",
                   f"cluster.env={{X: \"$(touch {marker})\"}}",
                   f"cluster.scratch_dir={tmp_path}/`touch {marker}`"], which=lambda n: None, environ={})
    setup = build_plan(cfg).parameters["setup"]
    subprocess.run(["bash", "-euc", "\n".join(setup) + "\necho \"$X|$HPC_RUN_DIR\""], check=True,
                   capture_output=True)
    assert not marker.exists()


def test_signal_and_lead_time_come_from_config() -> None:
    script = _script("exp=70b_zero3", "requeue.signal=USR1", "requeue.lead_s=123")
    assert "#SBATCH --signal=USR1@123" in script.splitlines()
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script.splitlines()


def test_cpu_cluster_requests_no_gpus_and_site_settings_flow_through() -> None:
    script = _script("exp=tiny_cpu", "cluster=testcluster", "nodes=2", "slurm.extra={mail-type: END}",
                     "cluster.modules=[cuda/12.4, nccl]", "cluster.venv=/opt/venv")
    lines = script.splitlines()
    assert not any("gpus" in line for line in lines if line.startswith("#SBATCH"))
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --partition=debug" in lines
    assert "#SBATCH --mail-type=END" in lines
    assert "module load cuda/12.4" in lines and "module load nccl" in lines
    assert "source /opt/venv/bin/activate" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--cpus-per-task=1 --cpu-bind=none" in srun and "--gpu-bind" not in srun  # CPU nodes: no GPUs to bind


def test_local_plan_runs_one_process_per_slot_without_comment_lines() -> None:
    plan = build_plan(compose(["exp=tiny_cpu", "cluster=local", "gpus_per_node=3", *FIXED],
                              which=lambda n: None, environ={}))
    assert plan.executor == "local"
    assert plan.parameters["tasks_per_node"] == 3 and plan.parameters["gpus_per_node"] == 0
    assert not any(line.startswith("#") for line in plan.parameters["setup"])
    with pytest.raises(ValueError):
        plan.sbatch_script()


def test_dry_run_prints_script_and_config_and_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HPC_CLUSTER", "slurm")
    code = main(["exp=70b_zero3", "nodes=4", f"run.root={tmp_path}", "run.name=dry", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --nodes=4" in out and "# ---- resolved config ----" in out and "zero_stage: 3" in out
    assert list(tmp_path.iterdir()) == []


def test_cli_config_error_exits_2_with_one_line(capsys) -> None:
    assert main(["exp=tiny_cpu", "nodez=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'nodez'; did you mean 'nodes'?")


def test_dry_run_cli_in_a_fresh_interpreter() -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc.submit", "exp=70b_zero3", "nodes=4", "cluster=slurm",
                           *FIXED, "--dry-run"], capture_output=True, text=True, check=True)
    assert (GOLDEN / "70b_zero3_nodes4.sbatch").read_text() in proc.stdout
