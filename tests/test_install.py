"""The toolkit as a user installs it: a wheel built from this repository, installed into a fresh
virtual environment, run from an empty folder through its console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "hpc", "configs", "templates")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of a copy of the sources (a build in the checkout would leave build/ there)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (path,) = out.glob("hpc-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed. Its dependencies (torch, DeepSpeed,
    submitit, ...) are this environment's, put on its path by a .pth file rather than installed
    again (gigabytes); hpc itself comes only from the wheel."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.run([str(env / "bin" / "python"), "-c", purelib],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = sysconfig.get_path("purelib")
    (site / "zz_dependencies.pth").write_text(f"{ours}\n")
    # The new environment's python runs pip (found through the .pth): the console scripts' first
    # line names that python. The editable hpc of this environment is outside it: pip leaves it be.
    proc = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                           "--force-reinstall", "-q", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return env


def test_the_wheel_carries_presets_templates_and_console_scripts(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("exp/tiny_cpu.yaml", "exp/70b_zero3.yaml", "cluster/slurm.yaml", "strategy/zero3.yaml",
                   "model/llama3_70b.yaml"):
        assert f"hpc/_shipped/configs/{preset}" in names
    assert "hpc/_shipped/templates/setup.sh.j2" in names
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert {n.removeprefix("hpc/_shipped/") for n in names if n.startswith("hpc/_shipped/configs/")} == shipped
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("hpc-submit", "hpc-status", "hpc-bench", "hpc-ckpt-convert", "hpc-estimate"):
        assert f"{script} = " in scripts


def test_installed_toolkit_works_from_an_empty_folder(venv, tmp_path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_CONFIG_DIR", "HPC_CONFIG_PATH",
                                                            "HPC_TEMPLATE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["HPC_CACHE_DIR"] = str(tmp_path / "cache")

    def run(*argv: str, timeout: float = 120) -> str:
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    where = run(str(venv / "bin" / "python"), "-c", "import hpc; print(hpc.__file__)")
    assert where.startswith(str(venv)), f"hpc imported from {where}, not the wheel"

    listing = run("hpc-submit", "--list")
    assert "shipped" in listing and "tiny_cpu" in listing and str(venv) in listing

    dry = run("hpc-submit", "exp=tiny_cpu", "cluster=local", "--dry-run")
    assert "hpc.job" in dry or "submitit" in dry, dry
    assert "exp: tiny_cpu" in dry

    out = run("hpc-submit", "exp=tiny_cpu", "cluster=local", "train.max_steps=4", "run.name=wheel", timeout=300)
    assert "submitted job" in out
    run_dir = work / "runs" / "wheel"
    assert (run_dir / "metrics.jsonl").is_file(), out
    status = run("hpc-status", str(run_dir))
    assert "COMPLETED" in status and "step 4 of 4" in status, status
