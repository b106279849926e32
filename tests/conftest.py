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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`, as tools/test.sh runs it) the tests that use the
    one local SLURM cluster run on one worker, one after another (they fill its 4 nodes), while the
    other worker runs the rest; every other test file stays whole on one worker, so its module
    fixtures (reference runs) are built once."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
