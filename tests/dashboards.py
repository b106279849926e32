"""Read back what the dashboards wrote, with their own packages: TensorBoard's event files through
its EventAccumulator, W&B's offline `.wandb` files record by record (a LevelDB-style log of W&B's
protobuf records; wandb 0.31 ships no Python reader for it)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file in `folder` (a resumed start's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = 7, b""  # after the file header: magic, version
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


@dataclass
class WandbStart:
    """One offline-run folder: what one start of a job logged."""
    folder: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def wandb_starts(run_dir: Path) -> list[WandbStart]:
    """Every offline-run folder under `<run_dir>/wandb/`, oldest first."""
    starts = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        start = WandbStart(folder)
        for record in _records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                start.run_id, start.project, start.name = record.run.run_id, record.run.project, record.run.display_name
                start.config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                start.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                      for i in record.history.item})
        starts.append(start)
    return starts
