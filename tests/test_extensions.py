"""JIT-built DeepSpeed ops go to node-local scratch, and a lock left by a killed build is removed
(real files, real /proc): torch waits forever on a `lock` file in the build folder otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from hpc.launch.extensions import (
    EXTENSIONS_VAR,
    LOCAL_STALE_S,
    SHARED_STALE_S,
    prepare_extension_builds,
    remove_stale_locks,
)


def _build_folder(root: Path, name: str, age_s: float) -> Path:
    """A torch build folder <root>/<op>/ with a lock and a half-built object, last touched age_s ago."""
    folder = root / name
    folder.mkdir(parents=True)
    for file in ("build.ninja", "cpu_adam.o", "lock"):
        (folder / file).write_text("x")
        stamp = time.time() - age_s
        os.utime(folder / file, (stamp, stamp))
    return folder / "lock"


def test_unset_points_builds_at_node_local_scratch_and_removes_a_dead_lock(tmp_path: Path, caplog) -> None:
    environ: dict[str, str] = {}
    chosen = prepare_extension_builds(tmp_path / "scratch", environ)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{metadata.version('torch')}"
    assert chosen == tmp_path / "scratch" / "torch_extensions" / tag
    assert environ == {EXTENSIONS_VAR: str(chosen)}
    # A build killed in the previous run, whose requeue landed on this node a minute later.
    dead = _build_folder(chosen, "cpu_adam", 60)
    with caplog.at_level(logging.WARNING, logger="hpc"):
        assert prepare_extension_builds(tmp_path / "scratch", environ) == chosen
    assert not dead.exists() and (dead.parent / "cpu_adam.o").exists()
    assert f"removed the stale build lock {dead}" in caplog.text


def test_fresh_locks_and_locks_a_live_build_holds_are_kept(tmp_path: Path) -> None:
    fresh = _build_folder(tmp_path, "fresh_op", 1)
    held = _build_folder(tmp_path, "held_op", 3600)
    fd = os.open(held, os.O_RDONLY)  # like torch's FileBaton, which keeps the lock open while it builds
    try:
        removed = remove_stale_locks(tmp_path, stale_after_s=LOCAL_STALE_S)
    finally:
        os.close(fd)
    assert removed == []
    assert fresh.exists() and held.exists()
    # Once the builder is gone the old one goes too.
    assert remove_stale_locks(tmp_path, stale_after_s=LOCAL_STALE_S) == [held]


def test_a_busy_build_folder_keeps_its_lock(tmp_path: Path) -> None:
    lock = _build_folder(tmp_path, "cpu_adam", 3600)
    (lock.parent / "cpu_adam_impl.o").write_text("just written by a compile step")
    assert remove_stale_locks(tmp_path, stale_after_s=LOCAL_STALE_S, held=lambda paths: set()) == []
    assert lock.exists()


@pytest.mark.parametrize("age_s,kept", [(SHARED_STALE_S / 3, True), (SHARED_STALE_S * 2, False)])
def test_a_folder_the_user_set_is_respected(tmp_path: Path, age_s: float, kept: bool) -> None:
    mine = tmp_path / "prebuilt"
    lock = _build_folder(mine / "py311_cu124", "cpu_adam", age_s)
    environ = {EXTENSIONS_VAR: str(mine)}
    assert prepare_extension_builds(tmp_path / "scratch", environ) == mine
    assert environ == {EXTENSIONS_VAR: str(mine)}
    # Possibly shared with other nodes (invisible in /proc): only a long-idle build counts as dead.
    assert lock.exists() == kept
    assert not (tmp_path / "scratch").exists()


def test_no_folder_yet_is_fine(tmp_path: Path) -> None:
    assert remove_stale_locks(tmp_path / "missing", stale_after_s=0) == []
