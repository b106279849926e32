"""Render the job's setup lines from templates/ (Jinja2, every value shell-quoted)."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import jinja2

from hpc.config import Config
from hpc.config.presets import shipped_dir


def templates_dir() -> Path:
    """The templates folder: $HPC_TEMPLATE_DIR, else the shipped one (in the installed package, or
    the checkout's templates/)."""
    env = os.environ.get("HPC_TEMPLATE_DIR")
    return Path(env) if env else shipped_dir("templates")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,  # a misspelt variable fails, never renders as ''
        autoescape=False,  # shell, not HTML: quoting is the `q` filter's job
        keep_trailing_newline=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def render_setup(cfg: Config, run_dir: str, python: str = "python3", lead_s: int | None = None,
                 template: str = "setup.sh.j2") -> list[str]:
    """The setup lines the batch shell runs before srun, for this config, run folder, python (a
    shell word, already quoted) and warning lead (default requeue.lead_s)."""
    context = {
        "cluster": dataclasses.asdict(cfg.cluster),
        "nccl": dataclasses.asdict(cfg.cluster.nccl),
        "requeue": dataclasses.asdict(cfg.requeue),
        "run_dir": run_dir,
        "python": python,
        "lead_s": cfg.requeue.lead_s if lead_s is None else lead_s,
    }
    text = _environment().get_template(template).render(**context)
    return [line for line in text.splitlines() if line.strip()]
