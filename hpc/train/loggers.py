"""Rank 0's metric sinks: metrics.jsonl always, TensorBoard and Weights & Biases when
`train.loggers` names them (hpc.config.loggers has their settings and the package check).

A sink that cannot start raises ConfigError before the first step (the job stops with the reason,
and the batch shell does not requeue a set-up error). A sink that fails later is dropped with one
warning: losing a dashboard must never cost training time.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Protocol

import yaml

from hpc.config import Config, ConfigError
from hpc.config.compose import to_yaml
from hpc.files import write_atomically
from hpc.run_folder import RunFolder
from hpc.train.metrics import MetricsLog, StepMetrics

log = logging.getLogger(__name__)

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "peak_mem_gb", "peak_reserved_gb",
           "consumed_samples")
"""The record's fields every dashboard gets, under `train/`."""


class Sink(Protocol):
    name: str

    def write(self, record: StepMetrics) -> None: ...

    def close(self) -> None: ...


class Loggers:
    """The sinks of one run; `write` never raises."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def write(self, record: StepMetrics) -> None:
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as err:  # noqa: BLE001 - any failure of a dashboard, whatever its kind
                log.warning("logger %s failed at step %d and is off for the rest of this run: %s: %s",
                            sink.name, record.step, type(err).__name__, err)
                self.sinks.remove(sink)
                _close_quietly(sink)

    def close(self) -> None:
        for sink in self.sinks:
            _close_quietly(sink)
        self.sinks = []

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(sink: Sink) -> None:
    try:
        sink.close()
    except Exception as err:  # noqa: BLE001
        log.warning("logger %s did not close cleanly: %s: %s", sink.name, type(err).__name__, err)


def scalars(record: StepMetrics) -> dict[str, float]:
    fields = record.record()
    return {f"train/{key}": float(fields[key]) for key in SCALARS if fields.get(key) is not None}


class JsonlSink:
    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.log = MetricsLog(path)

    def write(self, record: StepMetrics) -> None:
        self.log.write(record)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Event files in `<run folder>/tensorboard/`, one per start. A resumed run purges the steps
    after its checkpoint that an earlier start had already logged (TensorBoard's purge_step), so a
    plot shows each step once."""

    name = "tensorboard"

    def __init__(self, folder: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)

    def write(self, record: StepMetrics) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.step, walltime=record.time)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run for the whole run folder: its id is made at the first start and kept in
    `<run folder>/wandb/hpc-run-id`; every restart resumes it (`resume="allow"`). In offline mode
    each start leaves a folder `wandb/offline-run-*-<id>`; `wandb sync` puts them into the one run."""

    name = "wandb"

    def __init__(self, cfg: Config, run: RunFolder) -> None:
        import wandb

        run_id = _wandb_id(run)
        settings = cfg.train.wandb
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, id=run_id, resume="allow", name=cfg.run.name,
            dir=str(run.root), mode=settings.mode, tags=list(settings.tags) or None,
            config=yaml.safe_load(to_yaml(cfg)),
            # The job's output is the job's: W&B wrapping stdout/stderr would interleave with the
            # ranks' logs and the signal handling around them.
            settings=wandb.Settings(console="off"))

    def write(self, record: StepMetrics) -> None:
        self.run.log(scalars(record), step=record.step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run: RunFolder) -> str:
    try:
        return run.wandb_id.read_text().strip()
    except FileNotFoundError:
        run_id = secrets.token_hex(8)
        run.wandb_id.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(run.wandb_id, run_id + "\n")
        return run_id


def open_loggers(cfg: Config, run_dir: Path | None, *, start_step: int) -> Loggers:
    """Rank 0's sinks for a run in `run_dir` (none without one: a benchmark's run)."""
    if run_dir is None:
        return Loggers([])
    run = RunFolder(run_dir)
    sinks: list[Sink] = [JsonlSink(run.metrics)]
    for name in dict.fromkeys(cfg.train.loggers):
        try:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run.tensorboard, start_step))
            elif name == "wandb":
                sinks.append(WandbSink(cfg, run))
        except Exception as err:  # noqa: BLE001 - an import, a network or a permissions error alike
            for sink in sinks:
                _close_quietly(sink)
            raise ConfigError(f"train.loggers: {name} could not start: {type(err).__name__}: "
                              f"{' '.join(str(err).split())}") from err
    return Loggers(sinks)
