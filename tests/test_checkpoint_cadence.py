"""Saves on the clock: the automatic interval's arithmetic (Young/Daly, the 1% cap, the bounds), a
fixed interval on a fake clock, the config's spelling and errors, SLURM's default, the checkpointer's
vote (rank 0's clock only), and one real two-rank run that saves on time without every_steps."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from checkpoint_jobs import committed_steps, ok, rank0_log, submit

from hpc.checkpoint.cadence import CEILING_S, FLOOR_S, START_S, Cadence, auto_interval, save_duration
from hpc.config import ConfigError, available, compose, from_yaml, to_yaml
from hpc.config.schema import CheckpointConfig

DAY_H = 24.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the automatic interval ----

def test_auto_interval_before_any_save_is_the_starting_interval() -> None:
    chosen = auto_interval(None, DAY_H)
    assert chosen.seconds == START_S == 30 * 60
    assert "no save measured yet" in chosen.line(0)


def test_auto_interval_is_young_daly_when_saves_are_cheap() -> None:
    chosen = auto_interval(5.0, DAY_H)
    assert chosen.seconds == pytest.approx(math.sqrt(2 * 5.0 * DAY_H * 3600))  # 929.5 s
    assert chosen.line(0).startswith("checkpoint every 15.5 min (auto, set by Young/Daly: save 5.0 s")


def test_auto_interval_keeps_saves_under_one_percent() -> None:
    # Young/Daly says 44.4 min for 41 s saves at a 24 h MTBF: that would spend 1.5% on saves.
    chosen = auto_interval(41.0, DAY_H)
    assert chosen.seconds == pytest.approx(41.0 / 0.01)
    assert chosen.line(0) == ("checkpoint every 68.3 min (auto, set by the 1% overhead cap: save 41.0 s and "
                              "MTBF 24 h give Young/Daly 44.4 min, 1% overhead cap 68.3 min, bounds 5-120 min)")


def test_auto_interval_stays_within_its_floor_and_ceiling() -> None:
    assert auto_interval(0.1, DAY_H).seconds == FLOOR_S  # Young/Daly: 2.2 min
    assert "set by the floor" in auto_interval(0.1, DAY_H).why
    assert auto_interval(100.0, DAY_H).seconds == CEILING_S  # the 1% cap alone: 166.7 min
    assert auto_interval(5.0, 10_000.0).seconds == CEILING_S  # a very reliable job


def test_a_less_reliable_job_saves_more_often() -> None:
    assert auto_interval(5.0, 2.0).seconds < auto_interval(5.0, DAY_H).seconds


def test_save_duration_does_not_count_the_wait_for_the_previous_save() -> None:
    # The saver measures `write` from save()'s call: it holds `waited` and `blocked` already.
    seconds = {"waited": 3.0, "blocked": 0.5, "write": 10.0, "upload": 4.0, "commit": 1.0}
    assert save_duration(seconds) == pytest.approx(12.0)
    assert save_duration({"blocked": 0.1}) == pytest.approx(0.1)  # an unknown shape: what there is


# ---- the schedule on a fake clock ----

def test_fixed_interval_is_due_once_its_minutes_passed_since_the_last_save() -> None:
    clock = FakeClock()
    cadence = Cadence(CheckpointConfig(interval="fixed", every_minutes=0.5), clock=clock)
    assert cadence.start() == "checkpoint every 30.0 s (fixed: checkpoint.every_minutes=0.5)"
    clock.now += 29.9
    assert not cadence.time_due()
    clock.now += 0.1
    assert cadence.time_due()
    cadence.saved()  # a save began (regular or a stop's): the clock restarts
    assert not cadence.time_due()
    clock.now += 30
    assert cadence.time_due()


def test_every_steps_and_the_clock_each_make_a_save_due() -> None:
    clock = FakeClock()
    cadence = Cadence(CheckpointConfig(every_steps=50, interval="fixed", every_minutes=10), clock=clock)
    assert cadence.start().endswith("; also every 50 steps")
    assert cadence.step_due(100) and not cadence.step_due(101)
    assert not cadence.time_due()
    clock.now += 600
    assert cadence.time_due()


def test_never_saves_on_no_clock() -> None:
    clock = FakeClock()
    cadence = Cadence(CheckpointConfig(interval="never"), clock=clock)
    assert cadence.start() == ("checkpoint only when stopping and at the end (checkpoint.interval=never: "
                               "no saves on the clock)")
    clock.now += 1e9
    assert not cadence.time_due() and not cadence.step_due(100)


def test_auto_starts_from_an_earlier_measurement_and_follows_new_ones() -> None:
    clock = FakeClock()
    cadence = Cadence(CheckpointConfig(interval="auto"), clock=clock)
    assert "set by Young/Daly: save 5.0 s" in cadence.start(measured_s=5.0)
    clock.now += 929
    assert not cadence.time_due()
    clock.now += 1
    assert cadence.time_due()
    # The median of the newest saves: a single slow one does not move it, a trend does (and is logged).
    assert cadence.measured(60.0) is None
    assert cadence.interval.seconds == pytest.approx(math.sqrt(2 * 5.0 * DAY_H * 3600))
    line = cadence.measured(60.0)
    assert line is not None and "set by the 1% overhead cap: save 60.0 s" in line
    assert cadence.measured(61.0) is None  # 60 s either way: nothing material to say


def test_auto_without_measurement_waits_the_starting_interval() -> None:
    clock = FakeClock()
    cadence = Cadence(CheckpointConfig(interval="auto"), clock=clock)
    cadence.start()
    clock.now += START_S - 1
    assert not cadence.time_due()
    clock.now += 1
    assert cadence.time_due()


# ---- the config ----

def _compose(*args: str):
    return compose(["exp=tiny_cpu", *args], which=lambda name: None, environ={})


def test_a_slurm_cluster_saves_on_the_clock_by_default_and_a_local_run_does_not() -> None:
    for cluster in ("slurm", "testcluster"):
        ckpt = _compose(f"cluster={cluster}").checkpoint
        assert ckpt.interval == "auto" and ckpt.every_steps == 0
    for exp in available("exp"):  # no shipped experiment turns it off
        assert _compose(f"exp={exp}", "cluster=slurm").checkpoint.interval == "auto", exp
    assert _compose("cluster=local").checkpoint.interval == "never"
    assert _compose("cluster=slurm", "checkpoint.every_minutes=20").checkpoint.interval == "fixed"
    assert _compose("cluster=slurm", "checkpoint.interval=never").checkpoint.interval == "never"
    # Resolved in the config, so the dry run shows it and a saved config reads back the same.
    cfg = _compose("cluster=slurm")
    assert "interval: auto" in to_yaml(cfg)
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize("args, expected", [
    (["checkpoint.interval=atuo"], "checkpoint.interval='atuo' is not one of auto, fixed, never; did you mean 'auto'?"),
    (["checkpoint.interval=off"], "YAML reads off/no/on/yes as true or false; spell the interval auto, fixed or never"),
    (["checkpoint.interval=30"], "for a fixed number of minutes set checkpoint.every_minutes=30"),
    (["checkpoint.every_minutes=-5"], "checkpoint.every_minutes=-5.0: must be >= 0"),
    (["checkpoint.every_minutes=auto"], "checkpoint.every_minutes='auto': expected a number"),
    (["checkpoint.every_minute=3"],
     "unknown key 'checkpoint.every_minute' in checkpoint; did you mean 'every_minutes'?"),
    (["checkpoint.mtbf_hours=0"], "checkpoint.mtbf_hours=0.0: the mean time between failures must be a positive"),
    (["checkpoint.mtbf_hours=.inf"], "checkpoint.mtbf_hours=inf: expected a number of hours"),
    (["checkpoint.interval=fixed"], "checkpoint.interval=fixed needs checkpoint.every_minutes > 0"),
    (["checkpoint.interval=auto", "checkpoint.every_minutes=5"],
     "checkpoint.every_minutes=5 is a fixed interval, but checkpoint.interval=auto picks its own interval"),
])
def test_bad_interval_settings_get_a_clear_error(args: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        _compose(*args)
    assert expected in str(err.value)


def test_every_minutes_built_in_code_is_checked_for_its_type() -> None:
    with pytest.raises(ConfigError, match=r"every_minutes='auto': expected a number of minutes.*"
                                          r"set checkpoint.interval=auto"):
        CheckpointConfig(every_minutes="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every_minutes=True: expected a number"):
        CheckpointConfig(every_minutes=True)


# ---- the checkpointer: rank 0's clock votes, the resumed step's save time counts ----

def _checkpointer(tmp_path: Path, rank: int, *overrides: str):
    import torch

    from hpc.checkpoint.checkpointer import Checkpointer
    from hpc.train.strategies import World

    cfg = _compose("cluster=local", *overrides)
    world = World(rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=torch.device("cpu"))
    return Checkpointer(cfg, world, location=str(tmp_path / "store"), scratch=tmp_path / "scratch",
                        config_yaml="")


def test_only_rank_0_votes_on_the_clock_and_every_rank_on_steps(tmp_path: Path) -> None:
    clock = FakeClock()
    votes = {}
    for rank in (0, 1):
        checkpointer = _checkpointer(tmp_path, rank, "checkpoint.every_minutes=1", "checkpoint.every_steps=7")
        checkpointer.cadence = Cadence(checkpointer.cfg.checkpoint, clock=clock)
        checkpointer.cadence.start()
        votes[rank] = checkpointer
    clock.now += 61
    assert votes[0].due(3) and not votes[1].due(3)  # the loop ORs them in its all-reduce
    assert votes[0].due(7) and votes[1].due(7)


def test_auto_starts_from_the_save_time_the_resumed_manifest_records(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from hpc.checkpoint.manifest import MANIFEST, Manifest

    checkpointer = _checkpointer(tmp_path, 0, "checkpoint.interval=auto")
    manifest = Manifest(step=10, world_size=2, strategy="ddp", format="dcp", config_hash="0" * 16,
                        data={"consumed_samples": 80}, files=[],
                        save_seconds={"waited": 0.0, "blocked": 0.2, "write": 2.0, "upload": 1.0})
    checkpointer.storage.write_atomic(f"step-10/{MANIFEST}", manifest.to_json())
    checkpointer.restorer.resumed_step = 10
    with caplog.at_level(logging.INFO, logger="hpc"):
        checkpointer._start_clock()
    assert "checkpoint every 12.0 min (auto, set by Young/Daly: save 3.0 s and MTBF 24 h" in caplog.text


# ---- a real run ----

@pytest.mark.dist
def test_a_real_run_saves_on_the_clock_without_every_steps(tmp_path: Path) -> None:
    # 2 ranks, ~0.5 s per step, a save due every 1.2 s: several commits before the last step,
    # each taken by both ranks at the step rank 0's clock chose (else the run would hang or fail).
    # Few steps, each long: on a loaded machine a save can outlast the interval, and then every
    # step saves; 8 steps bound that.
    out = ok(submit(tmp_path, "clock", "train.max_steps=8", "checkpoint.every_minutes=0.02",
                    "checkpoint.keep_last=100", faults="slow@step_end:ms=400"))
    assert ": 8 steps, loss" in out
    steps = committed_steps(tmp_path / "clock")
    assert steps[-1] == 8 and len([s for s in steps if s < 8]) >= 2, steps
    assert "checkpoint every 1.2 s (fixed: checkpoint.every_minutes=0.02)" in rank0_log(tmp_path / "clock")
