"""Opening a committed step as a source, and describing what a conversion is to produce.

A source is a step folder or an fsspec URL of one (`/lustre/run/checkpoints/step-40`,
`s3://bucket/run/checkpoints/step-40`), or a Hugging Face folder. A step must be committed and
every file must match its manifest (size and checksum) before anything is read: a converter that
reads a half-written shard produces a checkpoint that resumes wrong, which is worse than none.
Object-store steps are downloaded (checksummed on the way) into a local folder first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc.checkpoint.convert.neutral import StepState
from hpc.checkpoint.manifest import (
    CONFIG_FILE,
    MANIFEST,
    TRAINER_FILE,
    CheckpointError,
    Manifest,
    parse_step_dir,
    read_manifest,
    step_dir,
)
from hpc.checkpoint.storage import Storage, open_storage
from hpc.checkpoint.transfer import ChecksumMismatch, stage_view, verify_checksums
from hpc.config import Config
from hpc.config.schema import StrategyConfig

HF_CONFIG = "config.json"
_CONVERTED = re.compile(r"^(?P<root>.*)/step-(?P<step>\d+)/converted/(?P<key>[^/]+)$")


def split_location(location: str) -> tuple[str, str]:
    """`.../checkpoints/step-40` -> (`.../checkpoints`, `step-40`)."""
    location = location.rstrip("/")
    parent, _, name = location.rpartition("/")
    if "://" in location and "://" not in parent:  # s3://bucket/step-40: the root is the bucket
        parent = location[: len(location) - len(name) - 1]
    return parent or ".", name


def is_hf_folder(location: str) -> bool:
    path = Path(location)
    return "://" not in location and (path / HF_CONFIG).is_file() and not (path / MANIFEST).exists() \
        and any(path.glob("*.safetensors"))


@dataclass
class Source:
    """A committed step, verified, readable from a local folder."""

    location: str
    format: str
    """dcp | deepspeed | hf"""
    folder: Path
    """Local and complete: the step folder itself, or a verified download of it."""
    state: StepState
    manifest: Manifest | None = None
    temporary: Path | None = None
    """A download folder to delete when done."""
    storage: Storage | None = None
    """Where the step lives, and its folder there (`step-N`, or `step-N/converted/<target>`)."""
    name: str = ""

    def close(self) -> None:
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def open_source(location: str, *, verify: bool = True, streams: int = 4, tmp_dir: str | None = None) -> Source:
    """The step at `location`, checked against its manifest (sizes always, checksums unless
    verify=False); a partial, uncommitted or corrupt step is refused naming the file."""
    if is_hf_folder(location):
        return Source(location, "hf", Path(location), StepState(step=0, world_size=1, strategy="hf"))
    parent, name = split_location(location)
    step = parse_step_dir(name)
    converted = _CONVERTED.match(location.rstrip("/"))
    if converted:  # a job's converted copy inside its step: .../step-40/converted/<target>
        parent, step = converted["root"] or ".", int(converted["step"])
        name = f"step-{step}/converted/{converted['key']}"
    if step is None:
        if "://" not in location and Path(location, HF_CONFIG).is_file():
            raise CheckpointError(f"{location}: a Hugging Face folder needs its *.safetensors files "
                                  "next to config.json")
        raise CheckpointError(f"{location}: not a step folder (its name must be step-N, e.g. "
                              ".../checkpoints/step-40) nor a Hugging Face folder (config.json + *.safetensors)")
    try:
        storage = open_storage(parent)
        candidate = read_manifest(storage, step, name)
    except (OSError, ValueError, ImportError) as err:
        raise CheckpointError(f"{location}: cannot be read ({err}). HINT: check the path or URL and "
                              "your credentials for it") from None
    if candidate.manifest is None or candidate.problem:
        if not candidate.has_manifest and storage.size(f"{name}/{TRAINER_FILE}") is None \
                and not storage.listdir(name):
            raise CheckpointError(f"{location}: no such step folder. HINT: check the path (a run's "
                                  "steps are in <run folder>/checkpoints/step-N)")
        raise CheckpointError(f"{location} is not a committed checkpoint: {candidate.problem}. HINT: "
                              "convert a committed step (python -m hpc.status RUN lists them)")
    manifest = candidate.manifest
    entries = {e.name: e for e in manifest.files}
    local = storage.local_path(name)
    temporary = None
    try:
        if local is not None:
            if verify:
                refuse_unverified(location, verify_checksums(storage, step, entries, list(entries),
                                                             streams=streams, prefix=name))
            folder = local
        else:  # an object store: a verified local copy (stage_view checks every download)
            temporary = Path(tempfile.mkdtemp(prefix="hpc-convert-src-", dir=tmp_dir))
            folder = temporary / name.replace("/", "_")
            stage_view(manifest.files, storage, step, folder, retries=2, backoff_s=1.0, streams=streams,
                       prefix=name)
    except ChecksumMismatch as err:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(f"{location} does not verify against its manifest: {err}") from None
    except CheckpointError:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    return Source(location, manifest.format, folder, state_of(folder, manifest), manifest, temporary, storage, name)


def refuse_unverified(location: str, problem: str | None) -> None:
    """Raise the one-line refusal of a source whose files do not match its manifest (`problem`, from
    verify_checksums); nothing when they match."""
    if problem:
        raise CheckpointError(f"{location} does not verify against its manifest: {problem}. HINT: restore the "
                              "file, or convert an older committed step") from None


def verify_source_async(source: Source, *, streams: int = 4) -> Future:
    """Check the source's files against its manifest in the background: a future of the first
    problem, or None. (A downloaded source was checked on the way; an HF folder has no manifest.)"""
    if source.manifest is None or source.temporary is not None or source.storage is None:
        done: Future = Future()
        done.set_result(None)
        return done
    entries = {e.name: e for e in source.manifest.files}
    pool = ThreadPoolExecutor(1, thread_name_prefix="hpc-convert-verify")
    future = pool.submit(verify_checksums, source.storage, source.state.step, entries, list(entries),
                         streams=streams, prefix=source.name)
    pool.shutdown(wait=False)
    return future


def state_of(folder: Path, manifest: Manifest) -> StepState:
    """The step's non-tensor state from its manifest, trainer.json and config.yaml (readers add
    the optimizer's param_groups)."""
    config_yaml = (folder / CONFIG_FILE).read_text() if (folder / CONFIG_FILE).is_file() else ""
    trainer: dict[str, Any] = {}
    if (folder / TRAINER_FILE).is_file():
        trainer = json.loads((folder / TRAINER_FILE).read_text())
    return StepState(step=manifest.step, world_size=manifest.world_size, strategy=manifest.strategy,
                     zero_stage=manifest.zero_stage, data=dict(trainer.get("data", manifest.data)),
                     config_yaml=config_yaml)


def format_of_strategy(strategy: StrategyConfig) -> str:
    return "deepspeed" if strategy.name == "deepspeed" else "dcp"


@dataclass(frozen=True)
class Target:
    """What a conversion produces: the format a job with `world_size` ranks and this strategy loads."""

    strategy: StrategyConfig
    world_size: int
    ds_config: dict[str, Any] | None = None
    """The DeepSpeed JSON of the target job (deepspeed only)."""
    gpus_per_node: int = 0
    """For HSDP's default shard group (a node); 0: unknown."""

    @property
    def format(self) -> str:
        return format_of_strategy(self.strategy)

    @property
    def key(self) -> str:
        """Names the converted copy: DCP loads at any world size, DeepSpeed only at its own."""
        if self.format == "dcp":
            return "dcp"
        return f"deepspeed-zero{self.strategy.zero_stage}-w{self.world_size}"

    def describe(self) -> str:
        if self.format == "dcp":
            what = "ddp" if self.strategy.name == "ddp" else f"fsdp {self.strategy.sharding}"
        else:
            what = f"deepspeed zero{self.strategy.zero_stage}"
        return f"{what} at world size {self.world_size}"

    def check(self) -> None:
        """A world size this strategy cannot take is refused before anything is written."""
        if self.world_size < 1:
            raise CheckpointError(f"--world {self.world_size}: must be at least 1")
        strategy = self.strategy
        if strategy.name == "fsdp" and strategy.sharding == "hybrid_shard":
            shard = strategy.hsdp_shard_size or self.gpus_per_node or self.world_size
            if self.world_size % shard:
                raise CheckpointError(
                    f"strategy {strategy.sharding} shards over groups of {shard} ranks, which does not "
                    f"divide world size {self.world_size}. HINT: use a world size that is a multiple of "
                    f"{shard}, or set strategy.hsdp_shard_size to a divisor of {self.world_size}")


def target_for_job(cfg: Config, world_size: int) -> Target:
    """The target a running job needs: its own strategy, world size and DeepSpeed JSON."""
    ds_config = None
    if cfg.strategy.name == "deepspeed":
        from hpc.config.deepspeed import build_deepspeed_config

        ds_config = build_deepspeed_config(cfg)
    return Target(cfg.strategy, world_size, ds_config, cfg.slurm.gpus_per_node)


def target_from_preset(source_config_yaml: str, strategy: str, world_size: int,
                       overrides: list[str] = ()) -> tuple[Target, str]:
    """The target for `--strategy NAME --world N` (a configs/strategy/ preset), for a step saved
    with `source_config_yaml`: the preset replaces the strategy, keeping the run's precision
    unless an override (`strategy.mixed_precision=bf16`) says otherwise. Returns the target and
    the config the converted step records."""
    import yaml

    from hpc.config.compose import _load_yaml, _parse_value, _set_dotted, parse_overrides, to_yaml
    from hpc.config.typed import to_config

    data = yaml.safe_load(source_config_yaml) if source_config_yaml else {}
    if not isinstance(data, dict):
        data = {}
    try:
        preset = _load_yaml("strategy", strategy, None)  # the search path, as at submit
    except Exception as err:  # noqa: BLE001 - ConfigError names the choices
        raise CheckpointError(f"--strategy {strategy}: {err}") from None
    old = data.get("strategy") or {}
    preset.setdefault("mixed_precision", old.get("mixed_precision", "fp32"))
    for key in ("activation_checkpointing", "ac_every_k"):
        if key in old:
            preset.setdefault(key, old[key])
    data["strategy"] = preset
    for key, text in parse_overrides(list(overrides)):
        if not key.startswith("strategy."):
            raise CheckpointError(f"--set {key}={text}: only strategy.* keys can be set for a conversion")
        _set_dotted(data, key, _parse_value(key, text))
    try:
        strategy_cfg = StrategyConfig(**{k: v for k, v in data["strategy"].items()})
        cfg = to_config(data) if data.get("model") else None
    except Exception as err:  # noqa: BLE001 - a config error is the user's to fix
        raise CheckpointError(f"--strategy {strategy}: {err}") from None
    if cfg is not None:
        cfg = dataclasses.replace(cfg, strategy=strategy_cfg)
    ds_config = None
    if strategy_cfg.name == "deepspeed":
        if cfg is None:
            raise CheckpointError("the source has no config.yaml: cannot build the DeepSpeed config of "
                                  "the target")
        from hpc.config.deepspeed import build_deepspeed_config

        ds_config = build_deepspeed_config(cfg)
    gpus = int((data.get("slurm") or {}).get("gpus_per_node") or 0)
    target = Target(strategy_cfg, world_size, ds_config, gpus)
    target.check()
    return target, (to_yaml(cfg) if cfg is not None else source_config_yaml)


def destination(location: str, step: int) -> tuple[Storage, str, int]:
    """OUT is a step folder (`.../step-40`) or a checkpoint folder the step goes into."""
    parent, name = split_location(location)
    out_step = parse_step_dir(name)
    if out_step is None:
        return open_storage(location), step_dir(step), step
    return open_storage(parent), name, out_step
