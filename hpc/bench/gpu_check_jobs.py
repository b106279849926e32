"""The GPU smoke test's checks that run the job itself, as a user starts it on a machine without SLURM:
`python -m hpc.submit exp=tiny_cpu cluster=local ...` (submitit's local executor -> hpc.job -> rendezvous,
preflight, the loop, the Checkpointer, the requeue supervisor), reading what it leaves in its run folder.

    resume   async saves, a stop, a fresh launch that resumes; its next losses against an uninterrupted run
    signal   the configured requeue signal sent to the running ranks: a committed checkpoint, a clean stop

Expected times are for one H200 (one rank per launch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc.bench.gpu_checks import Context, Finding
from hpc.bench.harness import LOG_TAIL, REPO, local_config
from hpc.checkpoint.manifest import committed
from hpc.checkpoint.storage import open_storage
from hpc.requeue import history
from hpc.run_folder import RunFolder

RESUME_STRATEGY = "fsdp_full_shard"
"""Sharded DCP state, saved asynchronously over the checkpoint's own gloo group while NCCL trains."""
RESUME_TOLERANCE = 1e-3
"""Relative loss difference a resume may show after 6 steps: GPU kernels with atomics (attention's
backward) are not bitwise repeatable; a lost optimizer state or data position differs by far more."""
SIGNAL_STEPS = 200
"""The signal check's run length: with 100 ms per step it outlasts the signal by far; a run that
ignores the signal trains all of them and fails the check."""


LIVE_GROUPS: set[int] = set()
"""Process groups of launches still running (killed by `kill_launches` if the command itself is stopped)."""


def kill_launches() -> None:
    """SIGKILL every launch still running: submit, submitit's controller and the job's ranks."""
    for group in list(LIVE_GROUPS):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        LIVE_GROUPS.discard(group)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL:] if path.exists() else f"({path} missing)"


def _launch(ctx: Context, root: Path, name: str, overrides: list[str], deadline: float, *,
            faults: str | None = None, while_running: Callable[[int], None] | None = None) -> str:
    """Run the job as a user does (one run folder per name: a second launch resumes it); its output.
    The launch gets its own process group, so at the deadline submit, submitit's controller and the
    ranks are all killed by that group's id, and nothing of it outlives the check."""
    env = {k: v for k, v in os.environ.items() if k != "HPC_FAULTS"}
    env.update(TMPDIR=str(root), PYTHONPATH=str(REPO))
    if faults:
        env["HPC_FAULTS"] = faults  # the project's fault injection points (hpc/faults.py)
    cmd = [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", f"run.root={root}", f"run.name={name}",
           f"cluster.scratch_dir={root}/scratch/{{job_id}}", f"gpus_per_node={ctx.world}", "train.log_every=1",
           *ctx.overrides, *overrides]
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{name}.submit.log"
    start = out.stat().st_size if out.exists() else 0
    with out.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    LIVE_GROUPS.add(proc.pid)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch '{name}' ran past the check's timeout:\n{_tail(out)}")
            if while_running is not None:
                while_running(proc.pid)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        LIVE_GROUPS.discard(proc.pid)
    text = out.read_bytes()[start:].decode(errors="replace")
    if proc.returncode != 0:
        logs = sorted(RunFolder(root / name).submitit.glob("*_0_log.*"), key=lambda p: p.stat().st_mtime)[-2:]
        raise RuntimeError(f"launch '{name}' (python -m hpc.submit) exited {proc.returncode}:\n{text[-LOG_TAIL:]}\n"
                           + "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs))
    return text


def _metrics(run: Path) -> list[dict[str, Any]]:
    records = []
    path = RunFolder(run).metrics
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return records


def _committed(run: Path) -> list[int]:
    location = RunFolder(run).checkpoint_location(None)
    return sorted(c.step for c in committed(open_storage(location), warn=False))


def _rank_records(run: Path) -> dict[int, dict[str, Any]]:
    """Every rank's record of every run of the job in `run` (the latest run's wins)."""
    records: dict[int, dict[str, Any]] = {}
    runs = [folder.name.rpartition(".") for folder in (RunFolder(run).requeue / "ranks").glob("*.*")]
    for job_id, _, restart in sorted((r for r in runs if r[2].isdigit()), key=lambda r: int(r[2])):
        records.update(history.read_ranks(run, job_id, int(restart)))
    return records


def check_resume(ctx: Context, timeout_s: float) -> Finding:
    # ~60 s: three launches of the real job (~15-20 s each: submit, process start, NCCL, preflight, DCP).
    deadline = time.monotonic() + timeout_s
    root = ctx.work / "resume"
    run = [f"strategy={RESUME_STRATEGY}", f"strategy.mixed_precision={ctx.precision}", "train.max_steps=12",
           "checkpoint.every_steps=4", "checkpoint.async_save=true"]
    _launch(ctx, root, "straight", run, deadline)
    _launch(ctx, root, "split", run, deadline, faults="stop@step_end:step=6")
    first = _committed(root / "split")
    second = _launch(ctx, root, "split", run, deadline)
    straight = {r["step"]: r["loss"] for r in _metrics(root / "straight")}
    resumed = {r["step"]: r["loss"] for r in _metrics(root / "split") if r["step"] > 6}
    problems = []
    if first[-2:] != [4, 6]:
        problems.append(f"the first launch committed steps {first}, expected 4 (async, while training) and 6 (stop)")
    if "(resumed at step 6)" not in second:
        problems.append("the second launch did not say it resumed at step 6")
    if sorted(resumed) != list(range(7, 13)) or any(s not in straight for s in resumed):
        problems.append(f"steps after the resume {sorted(resumed)}, uninterrupted {sorted(straight)}")
    diffs = [abs(resumed[s] - straight[s]) / abs(straight[s]) for s in sorted(resumed) if s in straight]
    worst = max(diffs, default=float("inf"))
    if worst > RESUME_TOLERANCE:
        problems.append(f"losses after the resume differ from the uninterrupted run's by up to {worst:.1e} "
                        f"(tolerance {RESUME_TOLERANCE:.0e})")
    value = (f"{RESUME_STRATEGY} {ctx.precision}, world {ctx.world}: stop at 6 (committed {first}), "
             "relaunch resumed at 6; steps 7-12 "
             + ("bitwise equal to the uninterrupted run" if worst == 0 else f"max rel loss diff {worst:.1e}"))
    return Finding(not problems, "; ".join(problems) or value,
                   {"committed_first_launch": first, "straight": straight, "resumed": resumed})


def check_signal(ctx: Context, timeout_s: float) -> Finding:
    # ~25 s: one launch of the real job; the signal after step 3, a stop at the next step boundary, the commit.
    deadline = time.monotonic() + timeout_s
    name = local_config(ctx.world, ctx.overrides).requeue.signal
    signum = getattr(signal, f"SIG{name}")
    root = ctx.work / "signal"
    run = root / "run"
    sent: dict[str, Any] = {}

    def send_when_training(group: int) -> None:
        if sent:
            return
        steps = [r["step"] for r in _metrics(run)]
        pids = {rank: body["pid"] for rank, body in _rank_records(run).items()}
        if not steps or max(steps) < 3 or len(pids) < ctx.world:
            return
        signalled = []
        for rank, pid in sorted(pids.items()):
            try:
                if os.getpgid(pid) == group:  # only the ranks this check started
                    os.kill(pid, signum)
                    signalled.append(rank)
            except ProcessLookupError:
                pass
        sent.update(at=time.time(), after_step=max(steps), ranks=signalled)

    out = _launch(ctx, root, "run", ["strategy=ddp", f"strategy.mixed_precision={ctx.precision}",
                                     f"train.max_steps={SIGNAL_STEPS}"], deadline,
                  faults="slow@step_end:ms=100", while_running=send_when_training)
    if not sent:
        return Finding(False, "the run ended before the signal was sent (it needs 3 steps)",
                       {"output": out[-LOG_TAIL:]})
    last = max((r["step"] for r in _metrics(run)), default=0)
    committed = _committed(run)
    statuses = {rank: body.get("status") for rank, body in sorted(_rank_records(run).items())}
    logs = "".join(p.read_text(errors="replace") for p in RunFolder(run).submitit.glob("*_0_log.out"))
    problems = []
    if last >= SIGNAL_STEPS:
        problems.append(f"the run trained all {SIGNAL_STEPS} steps: the signal did not stop it")
    if last not in committed:
        problems.append(f"stopped at step {last} but committed {committed}")
    if sent["ranks"] != list(range(ctx.world)):
        problems.append(f"the signal reached ranks {sent['ranks']} of {ctx.world}")
    if set(statuses.values()) != {"stopped"}:
        problems.append(f"rank records say {statuses}, expected every rank 'stopped'")
    if f"stopped at step {last} (warning signal" not in logs:
        problems.append("rank 0's log does not name the warning signal as the reason to stop")
    manifest = RunFolder(run).checkpoints / f"step-{last}" / "manifest.json"
    commit_s = manifest.stat().st_mtime - sent["at"] if manifest.exists() else float("nan")
    value = (f"{name} to {len(sent['ranks'])} rank(s) after step {sent['after_step']}: stopped at step {last} "
             f"(warning signal), step-{last} committed {commit_s:.1f} s after the signal, clean exit (every rank "
             "'stopped')")
    return Finding(not problems, "; ".join(problems) or value,
                   {"signal": name, "sent_after_step": sent["after_step"], "stopped_at": last, "committed": committed,
                    "rank_status": statuses, "commit_s": commit_s})
