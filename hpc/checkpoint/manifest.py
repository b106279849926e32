"""The commit protocol. A checkpoint is the folder `step-N/` at the persistent location, and it
exists only once `step-N/manifest.json` is there: written last, atomically, listing every file
with its size and checksum. "Latest" is the highest step whose manifest verifies; anything else
(no manifest, a missing or short file, a checksum that differs) is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field

from hpc.checkpoint.storage import FileEntry, Storage, open_storage

log = logging.getLogger("hpc")

MANIFEST = "manifest.json"
RETIRED = "manifest.retired.json"
"""A manifest set aside when an older step was resumed explicitly: that step no longer counts."""
CONFIG_FILE = "config.yaml"
TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(step: int) -> str:
    return f"step-{step}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match[1]) if match else None


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint holds and how to check it."""

    step: int
    world_size: int
    strategy: str
    """ddp | fsdp | deepspeed (with `format` this decides who can load it)."""
    format: str
    """dcp (torch.distributed.checkpoint: loads at any world size) | deepspeed (world-size-bound)."""
    config_hash: str
    data: dict[str, int]
    """The data position: {consumed_samples, seed, num_samples}."""
    files: list[FileEntry]
    zero_stage: int = 0
    saved_at: float = 0.0
    save_seconds: dict[str, float] = field(default_factory=dict)
    """How long each phase took: blocked, write, upload, commit."""
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        body = asdict(self)
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError(f"expected a JSON object, got {type(body).__name__}")
        if body.get("version") != FORMAT_VERSION:
            raise ValueError(f"manifest version {body.get('version')}, this code reads {FORMAT_VERSION}")
        body["files"] = [FileEntry(**f) for f in body["files"]]
        for entry in body["files"]:
            # Names are joined to local folders and deleted there: never outside the step folder.
            if entry.name.startswith("/") or ".." in entry.name.split("/") or not entry.name:
                raise ValueError(f"file name {entry.name!r} leaves the step folder")
        return cls(**body)


@dataclass
class Candidate:
    """A step folder at the persistent location and what is known about it."""

    step: int
    manifest: Manifest | None
    problem: str | None = None
    has_manifest: bool = True
    """False: never committed (an interrupted save), not a broken checkpoint."""


def read_manifest(storage: Storage, step: int, folder: str | None = None) -> Candidate:
    """The step's manifest, checked for shape and file sizes (cheap); checksums come later.
    `folder`: where the step's files are, when not `step-N/` (a converted copy inside a step)."""
    folder = folder or step_dir(step)
    raw = storage.read_bytes(f"{folder}/{MANIFEST}")
    if raw is None:
        return Candidate(step, None, "no manifest: the save never committed (interrupted?)", has_manifest=False)
    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError, KeyError) as err:
        return Candidate(step, None, f"unreadable manifest ({err})")
    if manifest.step != step:
        return Candidate(step, None, f"manifest says step {manifest.step}")
    for entry in manifest.files:
        size = storage.size(f"{folder}/{entry.name}")
        if size is None:
            return Candidate(step, manifest, f"file {entry.name} is missing")
        if size != entry.size:
            return Candidate(step, manifest, f"file {entry.name} has {size} bytes, the manifest says {entry.size}")
    return Candidate(step, manifest)


def list_steps(storage: Storage) -> list[int]:
    """Step numbers of every step folder, committed or not, newest first."""
    steps = (parse_step_dir(name) for name in storage.listdir())
    return sorted((s for s in steps if s is not None), reverse=True)


def scan(storage: Storage, *, warn: bool = True) -> list[Candidate]:
    """Every step folder, newest first, with its manifest checked for shape and file sizes; the
    ones with a problem are reported (once, by the caller's rank)."""
    found = [read_manifest(storage, step) for step in list_steps(storage)]
    if warn:
        for candidate in found:
            if candidate.problem:
                log.warning("checkpoint %s/%s skipped: %s", storage.url, step_dir(candidate.step),
                            candidate.problem)
    return found


def committed(storage: Storage, *, warn: bool = True) -> list[Candidate]:
    """Steps whose manifest reads and whose files have the listed sizes, newest first."""
    return [c for c in scan(storage, warn=warn) if c.problem is None]


def newest_committed(location: str) -> Candidate | None:
    """The highest committed step at `location` (manifests only; files are not verified)."""
    return max(committed(open_storage(location), warn=False), key=lambda c: c.step, default=None)
