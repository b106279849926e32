"""The one seam to SLURM: its commands, its environment (read once, frozen) and nodelist syntax.

Every `sbatch`/`scontrol`/`squeue`/`sacct` call of ours goes through `run()` (argv lists, never a
shell), so tests and the requeue layer have one place to look. Submission itself goes through
submitit, which calls sbatch on its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

SLURM_COMMANDS = ("sbatch", "scontrol", "squeue", "sacct", "scancel", "sinfo", "srun")


class SlurmError(RuntimeError):
    """A SLURM command failed; the message carries its argv and stderr."""


def run(argv: Sequence[str], *, timeout_s: float = 60, check: bool = True,
        env: Mapping[str, str] | None = None, shielded: bool = False) -> str:
    """Run a SLURM client command and return its stdout (env: e.g. another SLURM_CONF).

    shielded: the command ignores SIGTERM. A job that requeues itself is signalled by SLURM while
    `scontrol requeue` is still waiting for its answer; unshielded, it dies with -15 although the
    requeue went through."""
    if not argv or argv[0] not in SLURM_COMMANDS:
        raise ValueError(f"not a SLURM command: {argv!r}")
    # An ignored signal stays ignored across exec (a handler would not); set in the parent, as
    # preexec_fn is unsafe with threads running. Only the main thread may change dispositions.
    shield = shielded and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if shield else None
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              env=None if env is None else dict(env))
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]}: not found on PATH (is this a SLURM login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)}: no answer in {timeout_s:.0f} s") from None
    finally:
        if shield:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def requeue(job_id: str, exclude: Sequence[str] = ()) -> None:
    """Requeue a running job; with `exclude`, the next run avoids those nodes too.

    A running job's ExcNodeList cannot be changed, so: requeue it held, add the nodes to its
    exclusions, release it (released even when the update fails: a held job waits forever)."""
    if not exclude:
        run(["scontrol", "requeue", job_id], shielded=True)
        return
    excluded = expand_nodelist(job_info(job_id).get("ExcNodeList", "") or "")
    run(["scontrol", "requeuehold", job_id], shielded=True)
    try:
        nodes = ",".join(dict.fromkeys([*excluded, *exclude]))
        run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={nodes}"], shielded=True)
    finally:
        run(["scontrol", "release", job_id], shielded=True)


def current_state(job_id: str, env: Mapping[str, str] | None = None) -> str:
    """The job's state as accounting has it, '' when unknown. While a job ends, `scontrol` says
    only COMPLETING; sacct already says why (CANCELLED, TIMEOUT, PREEMPTED, ...)."""
    try:
        return job_state(job_id, env=env).replace("UNKNOWN", "")
    except SlurmError:  # no accounting: scontrol's word, less precise
        return job_info(job_id, env=env).get("JobState", "")


def job_info(job_id: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict (StartTime, EndTime, JobState, ExcNodeList, NodeList, ...);
    values '(null)' become ''. Empty when SLURM no longer knows the job."""
    # Times as ISO local time whatever the user's SLURM_TIME_FORMAT says.
    out = run(["scontrol", "show", "job", "-o", job_id], check=False,
              env={**(os.environ if env is None else env), "SLURM_TIME_FORMAT": "standard"})
    info: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = "" if value in ("(null)", "None", "Unknown") else value
    return info


def parse_time(text: str) -> float | None:
    """A time as `job_info` gives it (ISO local time) as a Unix time; None for none or unknown."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def usable_nodes(partition: str | None = None) -> list[str]:
    """Nodes that could run a job now or later (not down, drained or failing)."""
    argv = ["sinfo", "-h", "-N", "-o", "%N %t"] + (["-p", partition] if partition else [])
    nodes = []
    for line in run(argv).splitlines():
        name, _, state = line.partition(" ")
        if not any(bad in state for bad in ("down", "drain", "fail", "maint", "boot", "futr")):
            nodes.append(name)
    return list(dict.fromkeys(nodes))


def task_steps(job_id: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The job's running steps that run tasks (`4711.0`, ...; not `.batch` or `.extern`)."""
    out = run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i"], check=False, env=env)
    return [s for s in out.split() if s.partition(".")[2].isdigit()]


def queue_state(job_id: str, env: Mapping[str, str] | None = None) -> str:
    """The job's state while squeue lists it (PENDING, RUNNING, COMPLETING: its processes are still
    being ended, ...); "" once it has left the queue or SLURM does not know it."""
    out = run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False, env=env)
    states = out.split()
    return states[0] if states else ""


def wait_in_queue(job_id: str, *, until: Callable[[str], bool], timeout_s: float, every_s: float = 1.0,
                  sleep: Callable[[float], None] = time.sleep, env: Mapping[str, str] | None = None) -> str:
    """Ask `queue_state` every `every_s` until `until(state)` holds or `timeout_s` passed; returns
    the last state ("" once the job has left the queue)."""
    deadline = time.monotonic() + timeout_s
    state = queue_state(job_id, env=env)
    while not until(state) and time.monotonic() < deadline:
        sleep(every_s)
        state = queue_state(job_id, env=env)
    return state


def node_states(nodes: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each node's state as sinfo spells it (idle, mixed, allocated, draining, drained, down, ...),
    with the reason an admin or SLURM gave, if any: {"n2": "drained (reason: bad GPU)"}."""
    if not nodes:
        return {}
    out = run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N|%T|%E"], env=env)
    states: dict[str, str] = {}
    for line in out.splitlines():
        name, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if name and name not in states:
            reason = reason.strip()
            states[name] = state.strip() + (f" (reason: {reason})" if reason and reason != "none" else "")
    return states


def job_state(job_id: str, env: Mapping[str, str] | None = None) -> str:
    """The job's state from sacct (needs accounting), e.g. RUNNING, COMPLETED, REQUEUED."""
    out = run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], env=env)
    states = [line.split()[0] for line in out.splitlines() if line.strip()]
    return states[-1] if states else "UNKNOWN"


# ---- nodelist syntax: "n[1-3,7],gpu-a[01-02]-ib" -> n1 n2 n3 n7 gpu-a01-ib gpu-a02-ib ----

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range '{item}' in nodelist")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)  # keep zero padding: 01-03 -> 01 02 03
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if not match:
        return [name]
    head, tail = name[: match.start()], name[match.end():]
    return [head + n + rest for n in _expand_range(match.group(1)) for rest in _expand_one(tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names in a SLURM nodelist, in order (what `scontrol show hostnames` prints)."""
    return [host for part in _split_top_level(nodelist.strip()) for host in _expand_one(part)]


# ---- the job's environment, read once ----

def job_id_from(environ: Mapping[str, str]) -> str:
    """The job's id as SLURM commands take it: 'array_task' for an array task, else SLURM_JOB_ID."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{environ.get('SLURM_ARRAY_TASK_ID', '0')}" if array else environ["SLURM_JOB_ID"]


def task_place(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What SLURM tells one task of a job (srun step) about itself and the allocation, by the names
    of hpc.launch.environment.JobEnv's fields (the one record of a rank's place, whatever launched
    it). A missing variable is an error that names it and the fix."""
    def need(name: str) -> str:
        if name not in environ:
            raise SlurmError(
                f"{name} is not set: this is not a task of a SLURM job step. "
                "HINT: launch each rank with srun (sbatch alone sets only job variables)"
            )
        return environ[name]

    nodelist = environ.get("SLURM_STEP_NODELIST") or need("SLURM_JOB_NODELIST")
    hosts = tuple(expand_nodelist(nodelist))
    need("SLURM_JOB_ID")
    return dict(
        job_id=job_id_from(environ),
        rank=int(need("SLURM_PROCID")),
        local_rank=int(need("SLURM_LOCALID")),
        world_size=int(environ.get("SLURM_STEP_NUM_TASKS") or need("SLURM_NTASKS")),
        node_rank=int(need("SLURM_NODEID")),
        num_nodes=int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or len(hosts)),
        hostnames=hosts,
        node_name=environ.get("SLURMD_NODENAME") or hosts[int(need("SLURM_NODEID"))],
        restart_count=int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
        step=environ.get("SLURM_STEP_ID", "0") or "0",
    )
