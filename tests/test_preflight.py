"""Preflight on real torch.distributed processes (gloo, CPU): success, and failures that name the rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

RANK_SCRIPT = """
import sys
from hpc.config import compose
from hpc.job import main
cfg = compose(sys.argv[2:], which=lambda n: None, environ={})
print("RESULT", main(cfg, sys.argv[1])["preflight"])
"""


def _run_ranks(tmp_path: Path, per_rank_args: list[list[str]], job_id: str) -> list[subprocess.CompletedProcess]:
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = dict(os.environ, SUBMITIT_LOCAL_JOB_ID=job_id, SUBMITIT_LOCAL_GLOBALID=str(rank),
                   SUBMITIT_LOCAL_LOCALID=str(rank), SUBMITIT_LOCAL_NTASKS=str(len(per_rank_args)),
                   TMPDIR=str(tmp_path))
        argv = [sys.executable, "-c", RANK_SCRIPT, str(tmp_path / "run"), "exp=tiny_cpu", "cluster=local",
                "train.max_steps=2",
                f"cluster.scratch_dir={tmp_path}/scratch/{{node}}", "launch.init_timeout_s=60", *args]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results


def test_preflight_passes_on_two_ranks(tmp_path: Path) -> None:
    results = _run_ranks(tmp_path, [[], []], job_id=str(40000 + os.getpid() % 5000))
    for r in results:
        assert r.returncode == 0, r.stdout
        assert "RESULT preflight ok: 2 rank(s) on 1 node(s)" in r.stdout
    assert "all-reduce sum 3 == 3" in results[0].stdout
    assert "rank  local  node" in results[0].stdout  # rank 0 logs the table


def test_unwritable_scratch_on_one_rank_fails_every_rank_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    results = _run_ranks(tmp_path, [[], [f"cluster.scratch_dir={blocker}/scratch"]],
                         job_id=str(45000 + os.getpid() % 5000))
    for r in results:
        assert r.returncode != 0
        assert "preflight failed on 1 of 2 rank(s)" in r.stdout, r.stdout
        assert f"rank 1 on {os.uname().nodename}" in r.stdout
        assert f"scratch {blocker}/scratch is not writable" in r.stdout


def test_world_size_mismatch_is_reported(tmp_path: Path) -> None:
    results = _run_ranks(tmp_path, [["gpus_per_node=3"], ["gpus_per_node=3"]],
                         job_id=str(50000 + os.getpid() % 5000))
    for r in results:
        assert r.returncode != 0
        assert "world size 2 from local, but the config asks for 3 (nodes=1 x gpus_per_node=3)" in r.stdout
