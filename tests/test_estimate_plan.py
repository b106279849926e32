"""`python -m hpc.estimate` and the fit check at submit, as a user meets them: the tables and the
JSON, the advisor's choices on the usual cases, the refusal (pinned), warn and off, cpu presets
checked against host memory, and no torch on the login node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from golden_files import check_golden

from hpc.estimate.__main__ import main as estimate
from hpc.estimate.advisor import STRATEGY_PRESETS
from hpc.submit.__main__ import main as submit

NO_TORCH = """
import sys
from hpc.estimate.__main__ import main
code = main(sys.argv[1:])
print("HEAVY", sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')))
sys.exit(code)
"""


def _run(capsys: pytest.CaptureFixture, fn, *args: str) -> tuple[int, str, str]:
    code = fn(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_prints_every_strategy_and_a_recommendation_without_torch(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "exp=70b_zero3", "nodes=4", "cluster=slurm", "--compare"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    for name in STRATEGY_PRESETS:
        assert f"\n{name} " in proc.stdout
    # 70.55B parameters on 32 x 80 GB: ZeRO-3 fits (18 bytes per parameter over 32 ranks, plus
    # activations); FSDP full_shard's gathered root unit and fp32 reduce buffer push it over.
    assert "recommended: zero3\n" in proc.stdout
    assert "everything sharded? yes: zero3 fits" in proc.stdout


def test_json_has_one_object_per_preset_with_the_documented_keys(capsys) -> None:
    code, out, _ = _run(capsys, estimate, "exp=70b_fsdp", "nodes=1", "cluster=slurm", "--compare", "--json")
    plan = json.loads(out)
    assert code == 0
    assert plan["recommended"] == "zero3_offload"  # on one node of 8 x 80 GB only offloading fits
    assert [s["strategy"] for s in plan["strategies"]] == list(STRATEGY_PRESETS)
    for entry in plan["strategies"]:
        gpu = entry["gpu_bytes"]
        assert set(gpu) == {"params", "grads", "optimizer", "activations", "buffers", "overhead", "total"}
        assert gpu["total"] == sum(v for k, v in gpu.items() if k != "total")
        assert set(entry["comm_bytes_per_step"]) >= {"intra", "inter"}
        assert isinstance(entry["fits"], bool) and isinstance(entry["host_bytes"], int)
    by_name = {s["strategy"]: s for s in plan["strategies"]}
    assert by_name["zero3_offload"]["host_bytes"] > 0 and by_name["ddp"]["host_bytes"] == 0
    # Without --compare: the configured strategy only.
    code, out, _ = _run(capsys, estimate, "exp=70b_fsdp", "nodes=1", "cluster=slurm", "--json")
    assert [s["strategy"] for s in json.loads(out)["strategies"]] == ["fsdp_full_shard"]


def test_shard_grad_op_is_not_advised_where_it_keeps_too_much_gathered(capsys) -> None:
    """The usual advice puts SHARD_GRAD_OP on 40 GB GPUs; it keeps every block gathered from
    forward to backward, which for 13B is 26 GB of bf16 weights on each GPU."""
    code, out, _ = _run(capsys, estimate, "exp=13b_fsdp_grad_op", "cluster=slurm", "cluster.gpu_memory_gb=40",
                        "--compare", "--json")
    plan = json.loads(out)
    by_name = {s["strategy"]: s for s in plan["strategies"]}
    grad_op, full = by_name["fsdp_shard_grad_op"], by_name["fsdp_full_shard"]
    assert not grad_op["fits"]
    assert grad_op["gpu_bytes"]["buffers"] > 26e9 > full["gpu_bytes"]["buffers"]
    assert plan["recommended"] != "fsdp_shard_grad_op"
    assert any("fsdp_shard_grad_op" in step and "no:" in step for step in plan["decision"])


def test_a_job_that_cannot_fit_is_refused_at_submit_with_the_numbers_and_what_would_fit(capsys) -> None:
    code, out, err = _run(capsys, submit, "exp=70b_fsdp", "nodes=1", "gpus_per_node=8", "cluster=slurm", "--dry-run")
    assert code == 2 and out == ""
    check_golden("refusal_70b_fsdp_nodes1.txt", err)
    # warn: the same words as a warning, and the job goes on (here: the dry run prints its script).
    code, out, err = _run(capsys, submit, "exp=70b_fsdp", "nodes=1", "gpus_per_node=8", "cluster=slurm",
                          "plan.check=warn", "--dry-run")
    assert code == 0 and err.startswith("warning: 70b_fsdp with strategy=fsdp_full_shard does not fit")
    assert out.startswith("# plan: fsdp_full_shard: 190.59 GB of 80 GB per GPU (cluster slurm): DOES NOT FIT")
    assert "#SBATCH --nodes=1" in out
    code, out, err = _run(capsys, submit, "exp=70b_fsdp", "nodes=1", "gpus_per_node=8", "cluster=slurm",
                          "plan.check=off", "--dry-run")
    assert code == 0 and err == "" and "# plan:" not in out
    # One of the hints, taken: it fits and is submitted.
    code, out, err = _run(capsys, submit, "exp=70b_fsdp", "nodes=5", "cluster=slurm", "--dry-run")
    assert code == 0, err
    assert out.startswith("# plan: fsdp_full_shard: 77.7")


def test_a_gpu_preset_without_its_memory_is_not_refused(capsys) -> None:
    code, out, err = _run(capsys, submit, "exp=70b_fsdp", "nodes=1", "cluster=slurm", "cluster.gpu_memory_gb=null",
                          "--dry-run")
    assert code == 0, err
    assert out.startswith("# plan: fsdp_full_shard: 190.59 GB per GPU; fit not checked: cluster slurm does not "
                          "state its GPU memory (cluster.gpu_memory_gb)")


def test_cpu_presets_are_checked_against_this_machines_memory(capsys) -> None:
    code, out, err = _run(capsys, submit, "exp=tiny_cpu", "cluster=local", "model=llama2_7b", "--dry-run")
    assert code == 2 and "does not fit" in err and "GB of host memory over 2 rank(s) on this machine" in err
    code, out, err = _run(capsys, submit, "exp=tiny_cpu", "cluster=local", "--dry-run")
    assert code == 0 and out.startswith("# plan: ddp: ") and ": fits (" in out.splitlines()[0]


def test_deepspeed_bucket_sizes_come_from_the_config_however_they_are_written() -> None:
    from hpc.config import compose
    from hpc.estimate.memory import estimate_memory

    base = ["exp=70b_zero3", "nodes=4", "cluster=slurm"]
    default = estimate_memory(compose(base)).gpu["buffers"]
    for written in ("5e7", "50000000", "'5e7'"):
        smaller = estimate_memory(compose([*base, f"strategy.deepspeed.zero_optimization.reduce_bucket_size={written}"]))
        assert default - smaller.gpu["buffers"] == 2 * (500_000_000 - 50_000_000)  # bf16 bucket
    auto = estimate_memory(compose([*base, "strategy.deepspeed.zero_optimization.reduce_bucket_size=auto"]))
    assert auto.gpu["buffers"] == default


def test_the_planner_is_a_console_script_too(tmp_path: Path) -> None:
    """pip installs `hpc-estimate` beside `hpc-submit` (pyproject's [project.scripts])."""
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("hpc-")}
    assert scripts["hpc-estimate"] == "hpc.estimate.__main__:main"
    proc = subprocess.run([str(Path(sys.executable).parent / "hpc-estimate"), "exp=tiny_cpu", "cluster=local", "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["strategies"][0]["strategy"] == "ddp"
