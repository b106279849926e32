"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def torch_extensions_dir() -> Path:
    """Where DeepSpeed keeps its JIT-built ops (its CPU shared-memory comm op takes ~35 s to build
    once): $TORCH_EXTENSIONS_DIR, else a folder that outlives one test run."""
    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "/var/tmp/hpc-torch-extensions"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, str]:
    """Client environment for the real local SLURM cluster (fails under CI when it is down)."""
    from slurm_jobs import client_env

    return client_env()


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, torch_extensions_dir: Path):
    """`uninterrupted_run(strategy)`: the run folder of one uninterrupted 20-step local run (2 ranks,
    12 sequences per step, saving steps 10 and 20), trained once per session and strategy and
    shared by the tests that compare a stopped, resumed or converted run against it. Read only."""
    from checkpoint_jobs import REFERENCE_RUN, ok, submit

    root = tmp_path_factory.mktemp("uninterrupted")
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            ok(submit(root, strategy, *REFERENCE_RUN, f"strategy={strategy}", extensions=torch_extensions_dir))
            done[strategy] = root / strategy
        return done[strategy]

    return get
