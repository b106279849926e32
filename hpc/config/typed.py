"""A merged plain dict typed onto the schema: the frozen `Config`, or a ConfigError that names the
key, what the schema wants there and the layer (preset, experiment, command line) that set it.

Every value already of its field's type (what YAML presets and typed overrides give) is built into
the dataclasses directly; anything else (a value to convert, such as `account=123` for a text
field, or one to refuse) goes through one OmegaConf merge, whose conversions and errors are the
schema's rules. The direct path is a tenth of the time: the login node's dry run is dominated by it
otherwise. OmegaConf is imported only then.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hpc.config.errors import ConfigError
from hpc.config.schema import Config

if TYPE_CHECKING:
    from omegaconf.errors import OmegaConfBaseException


def to_config(data: Mapping[str, Any], layers: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> Config:
    """Type-check and convert `data` (keys already checked: compose.check_keys) onto the schema,
    then freeze it; `layers` (name, data), lowest first, name where a bad value came from."""
    built = _build_exact(Config, data)
    if built is not _MISMATCH:
        return built  # type: ignore[return-value]
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(Config)
    OmegaConf.set_readonly(base, False)
    try:
        merged = OmegaConf.merge(base, data)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise _type_error(err, _layer_of(key, layers)) from None


_MISMATCH = object()
"""_build_exact's answer for data it does not take as it is (OmegaConf decides instead)."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_exact(cls: type, data: Any) -> Any:
    """The dataclass `cls` from `data` when every value has exactly its field's type (an int is
    taken for a float), else _MISMATCH. Keys were checked before (check_keys)."""
    if not isinstance(data, Mapping):
        return _MISMATCH
    hints = _hints(cls)
    values = {}
    for name, value in data.items():
        value = _exact(hints[name], value)
        if value is _MISMATCH:
            return _MISMATCH
        values[name] = value
    return cls(**values)


def _exact(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build_exact(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:  # X | None
        return None if value is None and type(None) in args else _exact(args[0], value)
    if hint is Any:
        return copy.deepcopy(value)
    if origin is list:
        items = [_exact(args[0], v) for v in value] if isinstance(value, list) else [_MISMATCH]
        return _MISMATCH if any(v is _MISMATCH for v in items) else items
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return _MISMATCH
        items = {k: _exact(args[1], v) for k, v in value.items()}
        return _MISMATCH if any(v is _MISMATCH for v in items.values()) else items
    if hint is float and type(value) in (int, float):
        return float(value)
    if type(value) is not hint:  # bool is not taken for int, nor int for str
        return _MISMATCH
    if hint is str and "${" in value:  # an interpolation: OmegaConf's to resolve
        return _MISMATCH
    return value


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list",
          dict: "a mapping"}


def _expected(full_key: str) -> str:
    """What the schema wants at a dotted key, in words ('an integer', ...)."""
    cls: Any = Config
    hint: Any = None
    for part in full_key.split("."):
        if not dataclasses.is_dataclass(cls):
            break
        hint = typing.get_type_hints(cls).get(part)
        cls = hint
    args = [a for a in typing.get_args(hint) if a is not type(None)] if hint is not None else []
    base = typing.get_origin(hint) or hint
    if base not in _KINDS and args:  # X | None
        base = typing.get_origin(args[0]) or args[0]
    return _KINDS.get(base, "a value of another type")


def _type_error(err: OmegaConfBaseException, layer: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    match = re.search(r"Value '(.*?)' (?:of type|is not)", str(err))
    shown = f"={match.group(1)!r}" if match else ""
    if match:
        return ConfigError(f"{key}{shown}: expected {_expected(key)} (from {layer})")
    return ConfigError(f"{key}: {str(err).splitlines()[0]} (from {layer})")


def _layer_of(full_key: str, layers: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The last layer that set a dotted key: where the user should look to fix it."""
    for name, data in reversed(layers):
        node: Any = data
        for part in full_key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return name
    return "the composed config"
