"""The run folder's layout: every file a run keeps, named once (a base module every stage may import).

    <run folder>/                     run.root / run name (hpc.submit.plan.run_dir_of)
        config.yaml                   the resolved config, written at submit, read by the job and status
        submitit/                     submitit's folder: batch script, pickles, per-task logs
        metrics.jsonl                 one JSON line per logged step (rank 0)
        tensorboard/                  TensorBoard event files, one per start (train.loggers)
        wandb/                        W&B's run folders (offline-run-*: `wandb sync` uploads them);
        wandb/hpc-run-id              the W&B run id every restart of this run continues
        checkpoints/step-N/           committed checkpoints, unless checkpoint.dir says elsewhere
        requeue/history.jsonl         one JSON line per run outcome: started, requeued, gave_up, finished
        requeue/ranks/<job>.<restart>/rank-R.json   each rank's record of one run
        requeue/lead.json             the warning lead measured saves need; the next submit reads it
        rendezvous/<job>.<restart>.<step>.port   where rank 0 of that launch listens (the others read it)

The login node (submit, status), the job and the batch shell all reach the same folder on shared
storage, so they agree on these names by importing them from here, never by spelling them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc.files import write_atomically


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder (nothing is created until a stage writes there)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        """W&B makes its wandb/ in the `dir` it is given: the run folder."""
        return self.root / "wandb" / "hpc-run-id"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def requeue(self) -> Path:
        return self.root / "requeue"

    @property
    def history(self) -> Path:
        return self.requeue / "history.jsonl"

    @property
    def lead(self) -> Path:
        return self.requeue / "lead.json"

    def ranks(self, job_id: str, restart: int) -> Path:
        """The folder of one run's per-rank records."""
        return self.requeue / "ranks" / f"{job_id}.{restart}"

    @property
    def rendezvous(self) -> Path:
        """Made at submit: on NFS a folder another node creates later can stay hidden for a minute."""
        return self.root / "rendezvous"

    def rendezvous_port(self, job_id: str, restart: int, step: str = "0") -> Path:
        """Where rank 0 of one launch (job step of a run) publishes its rendezvous address and port."""
        return self.rendezvous / f"{job_id}.{restart}.{step}.port"

    def task_log(self, job_id: str, task: int = 0, stream: str = "out") -> Path:
        """submitit's log of one task (`out` or `err`)."""
        return self.submitit / f"{job_id}_{task}_log.{stream}"

    def latest_job_id(self) -> str | None:
        """The job submitted last into this folder (submitit keeps one `<job>_submitted.pkl` per
        submission); None before the first."""
        pickles = sorted(self.submitit.glob("*_submitted.pkl"), key=lambda p: p.stat().st_mtime)
        return pickles[-1].name.split("_submitted")[0] if pickles else None

    def is_run_folder(self) -> bool:
        return self.config.is_file()

    def checkpoint_location(self, checkpoint_dir: str | None) -> str:
        """Where this run's checkpoints are committed: checkpoint.dir (a path or an fsspec URL), else
        the run folder's checkpoints/."""
        return checkpoint_dir or str(self.checkpoints)

    # The measured lead is the one file two stages exchange (the job writes it, the next submit
    # reads it), so its reader and writer live beside its name rather than in either stage.
    def read_measured_lead(self) -> dict[str, Any] | None:
        """{'needed_s': int, 'save_s': float, 'step_s': float, ...} or None (never measured)."""
        try:
            body = json.loads(self.lead.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return body if isinstance(body, dict) and isinstance(body.get("needed_s"), int) else None

    def write_measured_lead(self, body: dict[str, Any]) -> None:
        write_atomically(self.lead, json.dumps(body, sort_keys=True))


def folder_of_task_log(path: Path) -> Path | None:
    """The run folder that holds a submitit task log (`<run>/submitit/<job>_0_log.out`), if it is one."""
    path = Path(path)
    if len(path.parents) < 2:
        return None
    run = RunFolder(path.parents[1])
    return run.root if path.parent == run.submitit and run.is_run_folder() else None
