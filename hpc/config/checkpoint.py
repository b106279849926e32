"""The checkpoint section of the schema (`checkpoint.*`): where checkpoints go, when they are
taken, how many are kept, how a run resumes and what a failed save does. A part of
hpc.config.schema, like cluster.py and slurm.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpc.config.errors import require, require_choice, require_positive, require_single_line


RESUME_MODES = ("auto", "never")
CONVERT_MODES = ("auto", "never")
INTERVALS = ("auto", "fixed", "never")


@dataclass(frozen=True)
class CheckpointConfig:
    """Sharded checkpoints: written to node-local scratch, drained to persistent storage, committed
    by a manifest written last."""

    dir: str | None = None
    """Persistent location: a path (/lustre/...) or an fsspec URL (file://, s3://...);
    default <run folder>/checkpoints."""
    every_steps: int = 0
    """Save every this many steps (0: none by step count; see interval for saves on the clock)."""
    interval: str | None = None
    """Saves on the clock: fixed (every every_minutes) | auto (from the measured save time and
    mtbf_hours by Young/Daly's rule, kept under 1% overhead; hpc/checkpoint/cadence.py) | never (only
    every_steps, stops and the end). Unset: fixed when every_minutes is set, else auto on a SLURM
    cluster (a crash must not lose the whole run) and never with cluster=local (resolved in Config)."""
    every_minutes: float = 0.0
    """interval=fixed: save once this many minutes of training passed since the last save began
    (fractions allowed, e.g. 0.5); 0: not set."""
    mtbf_hours: float = 24.0
    """interval=auto: mean hours between failures that end this job without warning (crash, dead
    node, NCCL abort). 24 is a cautious figure for a multi-node GPU job: the Llama 3 run saw 419
    unexpected interruptions in 54 days on 16,384 H100s (The Llama 3 Herd of Models, 2024, 3.3.4),
    about one per 6,300 node-hours, so 24 h is a job of ~260 such nodes, or of a few dozen on a
    younger cluster. Set your site's figure."""
    keep_last: int = 3
    """Committed checkpoints kept at the persistent location (older ones are deleted)."""
    keep_every: int = 0
    """Also keep every step that is a multiple of this forever (0: none)."""
    resume: str = "auto"
    """auto (newest committed) | never | a step number | the path of a step-N folder."""
    convert: str = "auto"
    """When the step to resume was saved at another world size or by another strategy than this
    job's (DeepSpeed: any change; DDP/FSDP: a switch to or from DeepSpeed): auto converts it in the
    job (once: the copy is committed inside the step folder, the original stays as it was) |
    never (stop with an error naming tools/ckpt_convert)."""
    async_save: bool = True
    """DDP/FSDP: the loop waits only while tensors are copied; the write runs in the background."""
    streams: int = 4
    """Parallel write and upload streams per node."""
    retries: int = 4
    """Upload attempts after the first, with exponential backoff."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled each time."""
    timeout_s: int = 3600
    """Longest a rank waits for the others to finish writing and uploading a checkpoint."""
    on_failure: str = "continue"
    """A save that cannot be committed (scratch full, the store unreachable after the retries):
    continue (the default) logs it and trains on, the next save tries again (the step's files are
    removed from scratch); stop ends the job with an error naming the step and the cause."""
    space_margin: float = 1.25
    """Free space required on scratch and persistent storage, as a multiple of the estimate."""
    init_from: str | None = None
    """A Hugging Face Llama folder (config.json + *.safetensors) whose weights a run starts from when
    it has no committed checkpoint yet; its shapes must match the model preset. None: from the seed."""

    def __post_init__(self) -> None:
        require_single_line("checkpoint.dir", self.dir)
        require(self.dir is None or bool(self.dir.strip()), "checkpoint.dir: must not be empty")
        require_single_line("checkpoint.init_from", self.init_from)
        require(self.init_from is None or bool(self.init_from.strip()),
                "checkpoint.init_from: must not be empty (unset it to start from the seed)")
        require_positive("checkpoint.every_steps", self.every_steps, 0)
        self._check_interval()
        require_positive("checkpoint.keep_last", self.keep_last)
        require_positive("checkpoint.keep_every", self.keep_every, 0)
        require_positive("checkpoint.streams", self.streams)
        require_positive("checkpoint.retries", self.retries, 0)
        require_positive("checkpoint.timeout_s", self.timeout_s)
        require(self.backoff_s >= 0, f"checkpoint.backoff_s={self.backoff_s}: must be >= 0")
        require(self.space_margin >= 1, f"checkpoint.space_margin={self.space_margin}: must be >= 1")
        require_choice("checkpoint.convert", self.convert, CONVERT_MODES)
        require_choice("checkpoint.on_failure", self.on_failure, ("continue", "stop"))
        resume = str(self.resume)
        require_single_line("checkpoint.resume", resume)
        require(resume in RESUME_MODES or resume.isdigit() or "/" in resume,
                f"checkpoint.resume={resume}: use auto, never, a step number (resume=40) or the "
                "path of a step folder (resume=/lustre/run/checkpoints/step-40)")

    def _check_interval(self) -> None:
        # Checked by type too: a CheckpointConfig built in code skips OmegaConf, and 'auto' typed
        # into every_minutes is the likely slip.
        for key, example in (("every_minutes", "minutes, e.g. 30 or 0.5"), ("mtbf_hours", "hours, e.g. 24")):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                    f"checkpoint.{key}={value!r}: expected a number of {example}"
                    + ("; for the automatic interval set checkpoint.interval=auto" if key == "every_minutes" else ""))
        require(self.every_minutes >= 0, f"checkpoint.every_minutes={self.every_minutes}: must be >= 0 "
                "(minutes since the last save; 0: not set)")
        require(self.mtbf_hours > 0, f"checkpoint.mtbf_hours={self.mtbf_hours}: the mean time between "
                "failures must be a positive number of hours, e.g. 24")
        interval = self.interval
        if interval is None:
            return  # Config resolves it by cluster kind
        require(not _is_number(interval), f"checkpoint.interval={interval}: the interval is auto, fixed or "
                f"never; for a fixed number of minutes set checkpoint.every_minutes={interval}")
        require(interval not in ("False", "True"), f"checkpoint.interval={interval}: YAML reads off/no/on/yes "
                "as true or false; spell the interval auto, fixed or never")
        require_choice("checkpoint.interval", interval, INTERVALS)
        if interval == "fixed":
            require(self.every_minutes > 0, "checkpoint.interval=fixed needs checkpoint.every_minutes > 0 "
                    "(e.g. checkpoint.every_minutes=30), or interval=auto to pick it from measured saves")
        else:
            what = "picks its own interval" if interval == "auto" else "turns saves on the clock off"
            require(self.every_minutes == 0,
                    f"checkpoint.every_minutes={self.every_minutes:g} is a fixed interval, but "
                    f"checkpoint.interval={interval} {what}: set one of them (interval=fixed or unset "
                    "with every_minutes, or every_minutes=0)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
