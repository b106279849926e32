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
