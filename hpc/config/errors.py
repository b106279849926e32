"""Config errors that state the rule, the reason and the fix, plus the checks they come from."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config value or key a user typed is wrong; the message says how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"unknown {what} '{value}'{did_you_mean(value, choices)} (available: {', '.join(choices)})"
    )


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok: keeps __post_init__ checks one line each."""
    if not ok:
        raise ConfigError(message)


def require_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"{key}='{value}' is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
        )


def require_positive(key: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value}: must be at least {minimum}")


# Anything below 0x20 (newline, carriage return, NUL, escape, ...) and DEL could end an `#SBATCH`
# line or a shell line early, and no quoting survives that: such values are rejected, not quoted.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def require_single_line(key: str, value: str | None) -> None:
    if value is not None and _CONTROL.search(value):
        raise ConfigError(
            f"{key}={value!r}: control characters (newline, tab, NUL, ...) are not allowed; "
            "they would break out of the sbatch script line"
        )


# SLURM object names (partition, account, qos, reservation) are plain identifiers; anything else is
# a typo or an injection attempt, so refuse it rather than quote it.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,+-]+$")


def require_slurm_name(key: str, value: str | None) -> None:
    if value is None:
        return
    require_single_line(key, value)
    if not _SLURM_NAME.match(value):
        raise ConfigError(
            f"{key}={value!r}: SLURM names may contain only letters, digits and _ . , + -"
        )


# A run name becomes a folder name: keep it to characters every filesystem and shell takes as is.
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def require_folder_name(key: str, value: str | None) -> None:
    if value is None:
        return
    require_single_line(key, value)
    if not _FOLDER_NAME.match(value):
        raise ConfigError(
            f"{key}={value!r}: use letters, digits and _ . + - (it names a folder; no '/' and no "
            "leading '.')"
        )
