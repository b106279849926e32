"""Compose `configs/` presets, the experiment file and CLI overrides into one frozen `Config`.

Layers, lowest first:
  1. schema defaults (hpc.config.schema)
  2. the presets the experiment names under `defaults:` (configs/model|strategy|cluster/NAME.yaml),
     replaced by a CLI choice such as `strategy=zero3` or `cluster=local`
  3. the experiment's own sections (configs/exp/NAME.yaml: `train:`, `slurm:`, ...)
  4. CLI overrides: dotted (`train.lr=3e-4`) or shorthand (`nodes=4`, `time=04:00:00`, ...)

Every key is checked against the schema before merging, so a typo fails with the closest valid key.
Presets are read from a search path (./configs, $HPC_CONFIG_PATH, the shipped ones: hpc.config.presets);
the merged result is typed onto the schema by hpc.config.typed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hpc.config.errors import ConfigError, did_you_mean, unknown_choice
from hpc.config.presets import SearchPath, search_path
from hpc.config.schema import Config, StrategyConfig
from hpc.config.typed import to_config

# Preset groups: a bare `model=NAME` picks configs/model/NAME.yaml.
GROUPS = ("model", "strategy", "cluster")
# Top-level shorthands for the keys people type most.
SHORTHANDS = {
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "time": "slurm.time",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
}
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "exp")
# Values that must reach the schema as the exact text typed (YAML would read 1:30:00 as base 60).
_LITERAL_KEYS = {"slurm.time", "slurm.job_name", "slurm.partition", "slurm.account", "slurm.qos",
                 "run.name"}


Presets = SearchPath | Path | None
"""Where compose reads presets: a search path, one folder, or None for this process's search path."""


def _search(presets: Presets) -> SearchPath:
    if presets is None:
        return search_path()
    return presets if isinstance(presets, SearchPath) else SearchPath.single(presets)


def available(group: str, root: Presets = None) -> list[str]:
    """Every preset name of `group` on the search path (or in `root`)."""
    return _search(root).names(group)


def _load_yaml(group: str, name: str, root: Presets) -> dict[str, Any]:
    presets = _search(root)
    path = presets.find(group, name)
    if path is None:
        err = unknown_choice(group, name, presets.names(group))
        raise ConfigError(f"{err}; looked for {group}/{name}.yaml in: {presets.describe()}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise ConfigError(f"{path}: cannot read: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """Split `key=value` tokens; anything else is an error that shows the expected form."""
    pairs = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"'{arg}': expected key=value, e.g. exp=70b_zero3 nodes=4 train.lr=3e-4")
        pairs.append((key.strip(), value))
    return pairs


def _parse_value(key: str, text: str) -> Any:
    if key in _LITERAL_KEYS or any(ord(c) < 0x20 for c in text):
        return text  # control characters stay, to be refused by the schema (YAML would fold them)
    # YAML typing for everything else: 3e-4 -> float, true -> bool, [a,b] -> list, null -> None.
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML: the schema judges the text as typed


def _dict_fields(cls: type) -> set[str]:
    """Fields of a dataclass typed as free-form dicts (extra keys passed through unchecked)."""
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is dict}


def _nested(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def check_keys(data: Mapping[str, Any], cls: type, prefix: str) -> None:
    """Raise ConfigError for the first key of `data` that `cls` lacks, with the closest valid key."""
    names = [f.name for f in dataclasses.fields(cls)]
    nested, free = _nested(cls), _dict_fields(cls)
    for key, value in data.items():
        if key not in names:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {where}{did_you_mean(str(key), names)} "
                f"(valid keys: {', '.join(names)})"
            )
        if key in nested and isinstance(value, Mapping):
            check_keys(value, nested[key], f"{prefix}{key}.")
        elif key in free and value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{prefix}{key}: expected a mapping of keys to values, got {value!r}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def resolve_cluster(name: str, which: Callable[[str], str | None] = shutil.which,
                    environ: Mapping[str, str] = os.environ) -> str:
    """`auto` is $HPC_CLUSTER if set, else `slurm` when sbatch is on PATH, else `local`."""
    if name != "auto":
        return name
    if environ.get("HPC_CLUSTER"):
        return environ["HPC_CLUSTER"]
    return "slurm" if which("sbatch") else "local"


def compose(
    overrides: Sequence[str] = (),
    *,
    root: Presets = None,
    which: Callable[[str], str | None] = shutil.which,
    environ: Mapping[str, str] = os.environ,
    now: Callable[[], float] = time.time,
) -> Config:
    """Build the frozen Config for `exp=NAME key=value ...` (see the module docstring)."""
    return _compose(overrides, root=root, which=which, environ=environ, now=now)[0]


StrategyVariants = Callable[[Sequence[str]], dict[str, Config | ConfigError]]
"""names -> the composed job over each of those strategy presets (see compose_strategies)."""


def compose_strategies(
    overrides: Sequence[str],
    *,
    root: Presets = None,
    which: Callable[[str], str | None] = shutil.which,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Config, str, StrategyVariants]:
    """The config for `overrides`, the name of its strategy preset, and a function that gives, for
    each strategy preset it is asked for, the same experiment and command line over that preset
    instead: what `compose([*overrides, f"strategy={name}"])` gives, without composing everything
    again (a tenth of a second each), and only when asked. A combination the schema refuses (an
    offload DDP cannot do, say) comes back as its ConfigError."""
    cfg, (chosen, exp_keys, cli_keys, root) = _compose(overrides, root=root, which=which, environ=environ,
                                                       now=time.time)

    def variants(names: Sequence[str]) -> dict[str, Config | ConfigError]:
        out: dict[str, Config | ConfigError] = {}
        for name in names:
            preset = _load_yaml("strategy", name, root)
            out[name] = _with_strategy(cfg, name, _deep_merge(_deep_merge(preset, exp_keys), cli_keys))
            if isinstance(out[name], ConfigError):
                # Keys of another engine (an HSDP group size, an offload) do not carry over; what
                # every engine has (precision, activation checkpointing) does.
                shared = {k: v for layer in (exp_keys, cli_keys) for k, v in layer.items()
                          if k in SHARED_STRATEGY_KEYS}
                retry = _with_strategy(cfg, name, _deep_merge(preset, shared))
                out[name] = retry if not isinstance(retry, ConfigError) else out[name]
        return out

    return cfg, chosen, variants


SHARED_STRATEGY_KEYS = ("mixed_precision", "activation_checkpointing", "ac_every_k")
"""Strategy keys every engine has: compose_strategies carries them to another preset even when the
experiment's other strategy keys do not apply there."""


def _with_strategy(cfg: Config, name: str, data: dict[str, Any]) -> Config | ConfigError:
    try:
        check_keys(data, StrategyConfig, "strategy.")
        return dataclasses.replace(cfg, strategy=StrategyConfig(**data))
    except ConfigError as err:
        return err
    except TypeError as err:  # a value of a type the dataclass does not take
        return ConfigError(f"strategy={name}: {err}")


def _compose(overrides: Sequence[str], *, root: Presets, which: Callable[[str], str | None],
             environ: Mapping[str, str], now: Callable[[], float]) -> tuple[Config, tuple[str, Any, Any, SearchPath]]:
    """The config, and how its strategy section was made: the preset's name, the strategy keys the
    experiment and the command line set, and the configs folder."""
    root = _search(root)
    choices: dict[str, str] = {}
    dotted: list[tuple[str, Any]] = []
    exp = "tiny_cpu"
    valid_top = list(dict.fromkeys(["exp", *GROUPS, *SHORTHANDS, *SECTIONS]))
    for key, text in parse_overrides(overrides):
        head = key.split(".")[0]
        if key == "exp":
            exp = text
        elif key in GROUPS:
            choices[key] = text
        elif key in SHORTHANDS:
            dotted.append((SHORTHANDS[key], _parse_value(SHORTHANDS[key], text)))
        elif "." in key and head in SECTIONS:
            dotted.append((key, _parse_value(key, text)))
        elif key in SECTIONS:
            raise ConfigError(f"'{key}' is a section; set its keys one by one, e.g. {key}.KEY=VALUE")
        else:
            hint = did_you_mean(head, valid_top) if "." in key else did_you_mean(key, valid_top)
            raise ConfigError(f"unknown key '{key}'{hint} (top-level keys: {', '.join(valid_top)})")

    exp_data = _load_yaml("exp", exp, root)
    exp_file = root.find("exp", exp)
    picks = exp_data.pop("defaults", {}) or {}
    for key in exp_data:
        if key not in SECTIONS:
            raise ConfigError(f"{exp_file}: unknown section '{key}'"
                              f"{did_you_mean(key, SECTIONS)} (sections: defaults, {', '.join(SECTIONS)})")
    for group in picks:
        if group not in GROUPS:
            raise ConfigError(f"{exp_file}: defaults.{group} is not a preset group "
                              f"({', '.join(GROUPS)})")
    picks = {"model": "tiny", "strategy": "ddp", "cluster": "auto", **picks, **choices}
    picks["cluster"] = resolve_cluster(str(picks["cluster"]), which, environ)

    presets = {group: _load_yaml(group, str(picks[group]), root) for group in GROUPS}
    for group in ("model", "cluster"):  # their `name` records the preset (strategy.name is the engine)
        presets[group]["name"] = str(picks[group])
    cli: dict[str, Any] = {}
    for key, value in dotted:
        _set_dotted(cli, key, value)

    layers = [("presets", presets), (str(exp_file), exp_data), ("the command line", cli)]
    merged: dict[str, Any] = {"exp": exp}
    for _, data in layers:
        check_keys(data, Config, "")
        merged = _deep_merge(merged, data)
    if merged.get("run", {}).get("name") is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now()))
        merged = _deep_merge(merged, {"run": {"name": f"{exp}-{stamp}"}})
    strategy_layers = (str(picks["strategy"]), exp_data.get("strategy") or {}, cli.get("strategy") or {}, root)
    return to_config(merged, layers), strategy_layers


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into the run folder, printed by --dry-run)."""
    # Plain PyYAML over the frozen dataclasses: a third of the dry run's time went to OmegaConf here.
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False)


def from_yaml(text: str) -> Config:
    """Read back a resolved config written by to_yaml (e.g. from a run folder)."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError("a resolved config must be a mapping of sections")
    check_keys(data, Config, "")
    return to_config(data, [("the saved config", data)])


