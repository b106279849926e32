"""The DeepSpeed config, checked by DeepSpeed's own parser, at submit time and again in the job.

`check_at_submit(cfg, python)` runs `python -m hpc.config.deepspeed_check` with the job's
interpreter, which parses the JSON from `build_deepspeed_config` with
`deepspeed.runtime.config.DeepSpeedConfig`: a typo in a passed-through key fails on the login node,
not after hours in the queue, and the submitting process itself never imports torch or deepspeed
(a login node stays light). `validate_deepspeed_config` is that parse in-process (the job calls it).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable, KeysView, Mapping
from pathlib import Path
from typing import Any

from hpc.config.deepspeed import PREFIX, build_deepspeed_config, key_name, lookup
from hpc.config.deepspeed_cache import CheckCache, cache_dir
from hpc.config.errors import ConfigError, did_you_mean
from hpc.config.schema import Config

CHECK_TIMEOUT_S = 180
"""Seconds the submit-time check may take (importing torch + deepspeed from a cold shared disk is slow)."""
EXIT_INVALID = 2
EXIT_NO_DEEPSPEED = 3
EXIT_NOT_HPC = 4
HPC_REQUIREMENTS = ("omegaconf", "submitit", "yaml", "jinja2")
"""Modules every interpreter that runs hpc has (pyproject.toml): one without them is not the job's."""
MAX_LISTED = 15
"""Valid keys listed in an error when a did-you-mean already points at one."""
DOCS = "https://www.deepspeed.ai/docs/config-json/"

# Top-level keys DeepSpeed reads that a parse without a process group does not look up, verified
# in 0.19.8's source: deepspeed.initialize() reads data_parallel_size and sequence_parallel_size to
# build its mesh; DeepSpeedConfig reads sequence_parallel_size only once dist.get_rank() works.
ALSO_READ = frozenset({"data_parallel_size", "sequence_parallel_size"})


class _Recorder(dict):  # type: ignore[type-arg]
    """A dict that logs every key path DeepSpeed looks up; '*' marks a level read as a whole."""

    def __init__(self, data: Mapping[str, Any], path: tuple[str, ...], log: set[tuple[str, ...]]):
        super().__init__({k: _Recorder(v, (*path, k), log) if isinstance(v, dict) else v
                          for k, v in data.items()})
        self._path, self._log = path, log

    def _read(self, key: Any) -> None:
        self._log.add((*self._path, str(key)))

    def __getitem__(self, key: Any) -> Any:
        self._read(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._read(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._read(key)
        return super().__contains__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self._read(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._read(key)
        return super().setdefault(key, default)

    def keys(self) -> KeysView[Any]:  # `k in d.keys()` must reach __contains__
        return KeysView(self)

    def __iter__(self) -> Any:  # also how `**d` and dict(d) read a dict subclass
        self._read("*")
        return super().__iter__()

    def items(self) -> Any:
        self._read("*")
        return super().items()

    def values(self) -> Any:
        self._read("*")
        return super().values()

    def __copy__(self) -> _Recorder:
        # DeepSpeedConfig copies the top level only to keep the caller's dict unmodified; deeper
        # down a copy passes every key on (e.g. data_efficiency.data_sampling).
        if self._path:
            self._read("*")
        new = _Recorder({}, self._path, self._log)
        dict.update(new, dict.items(self))
        return new


def _parse(ds: Mapping[str, Any]) -> tuple[set[tuple[str, ...]], Exception | None]:
    """Run DeepSpeedConfig over ds: the key paths it looked up, and what it raised (if anything)."""
    from deepspeed.runtime.config import DeepSpeedConfig  # lazy: imports torch

    log: set[tuple[str, ...]] = set()
    try:
        # With no process group DeepSpeedConfig takes world size 1 (dist.get_rank() asserts, it
        # catches that); with train_batch_size absent its batch check cannot disagree with it.
        DeepSpeedConfig(_Recorder(ds, (), log))
    except Exception as err:  # pydantic, assertions, ValueError, DeepSpeedConfigError: all a "no"
        return log, err
    return log, None


def _removed_keys() -> dict[str, str]:
    """Top-level keys DeepSpeed 0.19 looks up only to refuse them (features removed)."""
    from deepspeed.runtime import config as ds_config

    return dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))


def deepspeed_top_level_keys() -> set[str]:
    """Every top-level key DeepSpeed reads: those DeepSpeedConfig looks up, plus ALSO_READ.

    Taken from DeepSpeed itself by parsing a minimal config through a dict that logs lookups.
    deepspeed.runtime.constants would not do: it mixes top-level and nested names ('enabled',
    'type', 'params') and lacks whole sections (zero_optimization, activation_checkpointing,
    tensorboard, ...), which live in sub-packages. DeepSpeedConfig ignores a top-level key it does
    not look up, so this is exactly the set it can act on.
    """
    log, err = _parse({"train_micro_batch_size_per_gpu": 1})
    assert err is None, f"DeepSpeed refused a minimal config: {err}"
    return {path[0] for path in log if len(path) == 1} | ALSO_READ


def validate_deepspeed_config(ds: Mapping[str, Any]) -> None:
    """Parse ds with DeepSpeed's own parser; ConfigError naming the full key path when it says no.

    Checks, in order: unknown top-level keys (DeepSpeed ignores those silently), whatever
    DeepSpeedConfig raises (its pydantic sections forbid unknown keys), then unknown keys inside
    sections DeepSpeed reads key by key without a schema (activation_checkpointing, checkpoint, ...).
    Creates no process group; imports deepspeed (and torch).
    """
    log, err = _parse(ds)
    removed = _removed_keys()
    known = deepspeed_top_level_keys() | {p[0] for p in log if len(p) == 1}
    if ("*",) not in log:
        for key in ds:
            if key not in known:
                hint = did_you_mean(key, sorted(known - set(removed) - {"*"}))
                raise ConfigError(f"{key_name((key,))}: DeepSpeed has no top-level key '{key}'{hint} "
                                  f"(DeepSpeed would ignore it; its keys: {DOCS})")
    if err is not None:
        raise _explain(err, ds, removed)
    for key, value in ds.items():
        if isinstance(value, Mapping):
            _refuse_unread(value, log, (str(key),))


def _refuse_unread(node: Mapping[str, Any], log: set[tuple[str, ...]], path: tuple[str, ...]) -> None:
    """Keys in sections that DeepSpeed read key by key, but never this key."""
    if (*path, "*") in log:
        return  # read as a whole (a pydantic model, or passed on): DeepSpeed judged every key
    looked_up = sorted(p[-1] for p in log if len(p) == len(path) + 1 and p[:-1] == path)
    if not looked_up:
        return  # not opened in Python (e.g. a nested pydantic model): its schema judged it
    for key, value in node.items():
        here = (*path, str(key))
        if here not in log:
            raise ConfigError(f"{key_name(here)}: DeepSpeed has no key '{key}' in "
                              f"{'.'.join(path)}{did_you_mean(str(key), looked_up)} "
                              f"(keys it reads there: {', '.join(looked_up)})")
        if isinstance(value, Mapping):
            _refuse_unread(value, log, here)


def _explain(err: Exception, ds: Mapping[str, Any], removed: Mapping[str, str]) -> ConfigError:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return _explain_pydantic(err, ds)
    for key, message in removed.items():
        if key in ds:
            return ConfigError(f"{key_name((key,))}: {_one_line(message)}")
    text = _one_line(str(err)) or type(err).__name__
    return ConfigError(f"{PREFIX}: DeepSpeed refuses the config: {text}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _explain_pydantic(err: Any, ds: Mapping[str, Any]) -> ConfigError:
    # An unknown key (a typo) first: it is the likeliest cause of the others.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first, more = errors[0], len(errors) - 1
    loc = tuple(str(part) for part in first["loc"])
    model = _model_named(err.title)
    section = _section_of(ds, loc, model)
    full = key_name((*section, *loc))
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first["type"] == "extra_forbidden":
        valid = _field_names(model, loc[:-1])
        hint = did_you_mean(loc[-1], valid)
        listed = f" (valid keys: {', '.join(valid)})" if valid else ""
        if hint and len(valid) > MAX_LISTED:  # the hint says it; 47 ZeRO keys would bury it
            listed = f" ({len(valid)} valid keys: {DOCS})"
        return ConfigError(f"{full}: DeepSpeed has no such key{hint}{listed}{tail}")
    shown = f"={first['input']!r}" if first["type"] != "missing" else ""
    return ConfigError(f"{full}{shown}: {_one_line(first['msg'])}{tail}")


def _model_named(title: str) -> Any:
    """The DeepSpeed pydantic model class a ValidationError names (by its title)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _field_names(model: Any, within: tuple[str, ...]) -> list[str]:
    """Keys a model accepts (name and alias, deprecated ones left out), after walking `within`."""
    import typing

    from pydantic import BaseModel

    for part in within:
        if model is None:
            return []
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    if model is None:
        return []
    names: set[str] = set()
    for name, field in model.model_fields.items():
        if not (field.json_schema_extra or {}).get("deprecated", False):
            names.update(n for n in (name, field.alias) if n)
    return sorted(names)


def _section_of(ds: Mapping[str, Any], loc: tuple[str, ...], model: Any) -> tuple[str, ...]:
    """Where in ds the model that raised was fed from: the mapping in which `loc` resolves."""
    candidates: list[tuple[str, ...]] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        candidates.append(path)
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*path, str(key)))

    walk(ds, ())
    fits = [c for c in candidates if lookup(ds, (*c, *loc)) is not None
            or isinstance(lookup(ds, (*c, *loc[:-1])), Mapping)]
    if not fits:
        return ()
    fields = set(_field_names(model, ()))
    # Several may fit ('enabled' is in many sections): take the one that looks most like the model.
    return max(fits, key=lambda c: (lookup(ds, (*c, *loc)) is not None,
                                    len(fields & set(lookup(ds, c) or ds))))


# ---- the submit-time check: the job's python, in a subprocess ----

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def check_at_submit(cfg: Config, python: str, *, timeout_s: float = CHECK_TIMEOUT_S,
                    run: Runner = subprocess.run, fallback: str | None = None,
                    cache: CheckCache | None = None) -> dict[str, Any] | None:
    """For strategy.name=deepspeed: the DeepSpeed JSON, checked by DeepSpeed in the job's python.

    `python` is the job's interpreter as a shell command (Plan.python). The parse runs in a
    subprocess, so this process never imports torch or deepspeed, and it uses the DeepSpeed the job
    will use. A check that passed once for this JSON and this DeepSpeed is not run again (`cache`,
    by default the user's: deepspeed_cache.py). A job's python that cannot run here at all (a path
    that exists only on the cluster, or `python3` that only the job's venv gives hpc's packages) is
    replaced by `fallback` (default: the interpreter running this); one that runs but lacks
    deepspeed is an error, as the job would fail the same way. Returns None for other strategies;
    raises ConfigError naming the key.
    """
    if cfg.strategy.name != "deepspeed":
        return None
    ds = build_deepspeed_config(cfg)  # owned-key errors need no subprocess
    text = json.dumps(ds)
    cache = cache if cache is not None else CheckCache(cache_dir())
    try:
        _check(text, python, cfg.cluster.accelerator, timeout_s, run, cache)
    except _CannotRun as job_err:
        ours = fallback if fallback is not None else shlex.quote(sys.executable)
        if shlex.split(ours) == shlex.split(python):
            raise ConfigError(f"{PREFIX}: cannot check the DeepSpeed config: {job_err}") from None
        try:
            _check(text, ours, cfg.cluster.accelerator, timeout_s, run, cache)
        except _CannotRun as our_err:
            raise ConfigError(f"{PREFIX}: cannot check the DeepSpeed config: {job_err}; nor with "
                              f"{our_err}") from None
    return ds


class _CannotRun(Exception):
    """The interpreter could not run the check here (not found, or hpc's imports fail)."""


def _check(text: str, python: str, accelerator: str, timeout_s: float, run: Runner, cache: CheckCache) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p),
           # The job's accelerator, named: no probing of this machine's devices (aio.use_gds checks it).
           "DS_ACCELERATOR": accelerator}
    interpreter = shlex.split(python)
    key = cache.key(interpreter, text, accelerator, env, run, str(root))
    if cache.passed(key):
        return
    argv = [*interpreter, "-m", "hpc.config.deepspeed_check"]
    try:
        proc = run(argv, input=text, capture_output=True, text=True, timeout=timeout_s,
                   cwd=str(root), env=env)
    except (FileNotFoundError, PermissionError) as err:
        raise _CannotRun(f"{python}: {err.strerror or type(err).__name__}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{PREFIX}: checking the DeepSpeed config with {python} took over "
                          f"{timeout_s:g} s (importing deepspeed); try again, or check that "
                          f"'{python} -c \"import deepspeed\"' works") from None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}, no message"
    if proc.returncode == 0:
        cache.remember(key, {"python": python, "accelerator": accelerator, "config": json.loads(text)})
        return
    if proc.returncode == EXIT_INVALID:
        raise ConfigError(last)
    if proc.returncode == EXIT_NO_DEEPSPEED:
        raise ConfigError(f"strategy.name=deepspeed: {python} cannot import deepspeed ({last}); "
                          "install deepspeed where the job runs, or set run.python to an "
                          "interpreter that has it")
    raise _CannotRun(f"{python} exits with status {proc.returncode}: {last}")


def main() -> int:
    """`python -m hpc.config.deepspeed_check < ds.json`: exit 0 silently, or one line on stderr and 2."""
    warnings.simplefilter("ignore")  # the last stderr line is the message; keep it the only one
    try:
        ds = json.loads(sys.stdin.read())
    except json.JSONDecodeError as err:
        print(f"{PREFIX}: not JSON: {err}", file=sys.stderr)
        return EXIT_INVALID
    if not isinstance(ds, dict):
        print(f"{PREFIX}: expected a JSON object of DeepSpeed keys", file=sys.stderr)
        return EXIT_INVALID
    try:
        # An interpreter without hpc's own requirements is not the job's environment (the system
        # python3 that the job's venv replaces): it cannot say which DeepSpeed the job will have,
        # and the submit checks with its own python instead (_CannotRun).
        for module in HPC_REQUIREMENTS:
            importlib.import_module(module)
    except ImportError as err:
        print(_one_line(f"{type(err).__name__}: {err}"), file=sys.stderr)
        return EXIT_NOT_HPC
    try:
        # A missing deepspeed is the environment's problem, not a typo: its own exit status.
        importlib.import_module("deepspeed")
    except ImportError as err:
        print(_one_line(f"{type(err).__name__}: {err}"), file=sys.stderr)
        return EXIT_NO_DEEPSPEED
    try:
        validate_deepspeed_config(ds)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_INVALID
    return 0


if __name__ == "__main__":
    sys.exit(main())
