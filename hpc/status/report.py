"""Where a run stands, from its run folder and SLURM (no torch): the job and its state, restarts by
reason, the last committed checkpoint and when, the latest throughput, and an ETA to
train.max_steps that counts the requeues still ahead."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hpc import slurm
from hpc.config import Config, from_yaml
from hpc.requeue import history, policy
from hpc.run_folder import RunFolder, folder_of_task_log


class StatusError(RuntimeError):
    pass


def find_run_dir(target: str) -> Path:
    path = Path(target)
    if path.is_dir():
        if not RunFolder(path).is_run_folder():
            raise StatusError(f"{path} is not a run folder (no config.yaml)")
        return path
    if not target.replace("_", "").isdigit():
        raise StatusError(f"'{target}' is neither a run folder nor a SLURM job id")
    try:
        out = slurm.job_info(target).get("StdOut", "")
    except slurm.SlurmError as err:
        raise StatusError(f"job {target}: {err}") from None
    # submitit writes <run folder>/submitit/<job id>_0_log.out
    folder = folder_of_task_log(Path(out)) if out else None
    if folder is not None:
        return folder
    raise StatusError(f"SLURM does not know job {target} (any more), or it is not an hpc job. "
                      "HINT: pass its run folder instead")


def _last_metrics(run_dir: Path) -> dict[str, Any] | None:
    try:
        lines = RunFolder(run_dir).metrics.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _last_checkpoint(cfg: Config, run_dir: Path) -> dict[str, Any] | None:
    from hpc.checkpoint.manifest import newest_committed

    try:
        newest = newest_committed(RunFolder(run_dir).checkpoint_location(cfg.checkpoint.dir))
    except Exception as err:  # noqa: BLE001 - the status of the rest is still worth showing
        return {"error": f"{type(err).__name__}: {err}"}
    if newest is None or newest.manifest is None:
        return None
    return {"step": newest.step, "saved_at": newest.manifest.saved_at}


def _job_id(run_dir: Path, events: list[dict[str, Any]]) -> str | None:
    latest = RunFolder(run_dir).latest_job_id()
    if latest is not None:
        return latest
    return events[-1].get("job_id") if events else None


def _job(job_id: str | None, events: list[dict[str, Any]]) -> tuple[str, float | None]:
    """(state, end of the current run's time limit when running)."""
    if job_id is None:
        return "UNKNOWN", None
    try:
        info = slurm.job_info(job_id)
        state = info.get("JobState") or slurm.job_state(job_id)
    except slurm.SlurmError:
        info, state = {}, ""
    if state:
        return state, slurm.parse_time(info.get("EndTime", "")) if state == "RUNNING" else None
    ends = [e for e in events if e.get("job_id") == job_id and e["event"] in history.ENDINGS]
    return {"finished": "COMPLETED", "gave_up": "STOPPED", "requeued": "REQUEUED"}.get(
        ends[-1]["event"] if ends else "", "UNKNOWN"), None


def gather(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    cfg = from_yaml(RunFolder(run_dir).config.read_text())
    events = history.read_events(run_dir)
    job_id = _job_id(run_dir, events)
    state, ends_at = _job(job_id, events)
    requeues = [e for e in events if e["event"] == history.REQUEUED and e.get("job_id") == job_id]
    by_reason = Counter(e.get("reason", "?") for e in requeues)
    starts = [e for e in events if e["event"] == history.STARTED]
    gave_up = [e for e in events if e["event"] == history.GAVE_UP and e.get("job_id") == job_id]
    metrics = _last_metrics(run_dir)
    step = metrics["step"] if metrics else 0
    out: dict[str, Any] = {
        "run_dir": str(run_dir), "job_id": job_id, "state": state, "ends_at": ends_at,
        "restarts": dict(by_reason), "restart_count": len(requeues),
        "budgets": {b: {"used": policy.used(events, job_id or "", b), "limit": limit}
                    for b, limit in policy.limits(cfg.requeue).items()},
        "excluded": sorted({n for e in requeues for n in e.get("excluded", [])}),
        "checkpoint": _last_checkpoint(cfg, run_dir), "step": step, "max_steps": cfg.train.max_steps,
        "tokens_per_s": metrics.get("tokens_per_s") if metrics else None,
        "step_time_s": metrics.get("step_time_s") if metrics else None,
        "metrics_at": metrics.get("time") if metrics else None,
        "gave_up": gave_up[-1].get("detail") if gave_up else None,
    }
    out["timelines"] = [{"restart": e["restart"], "reason": e.get("reason"), "step": e.get("step"),
                         **e["timeline"]} for e in starts
                        if e.get("job_id") == job_id and (e.get("timeline") or {}).get("total") is not None]
    restarts_s = [e["timeline"]["total"] for e in starts if (e.get("timeline") or {}).get("total")]
    out["restart_s"] = sum(restarts_s) / len(restarts_s) if restarts_s else None
    # A job that has ended trains no more until it is submitted again: no ETA to show.
    out["eta"] = None if (state.split() or [""])[0] in ENDED or gave_up else _eta(cfg, out, now)
    out["nodes"] = _nodes_of_latest_start(starts)
    out["unexplained_end"] = _unexplained_end(state, job_id, events)
    return out


UNSUCCESSFUL = ("FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
"""Job states of a job that ended without finishing its work."""
ENDED = ("COMPLETED", "STOPPED", *UNSUCCESSFUL)
"""Job states after which nothing more happens (a requeued job goes PENDING again)."""


def _unexplained_end(state: str, job_id: str | None, events: list[dict[str, Any]]) -> str | None:
    """The job's final state when its last run left no ending of its own (finished, requeued, gave
    up): the batch shell that gives the verdict was killed, or the node under it died."""
    # COMPLETING: the batch shell has exited and SLURM is ending the job's processes; the verdict, if
    # any, is written, but ranks that outlived the shell take SLURM's SIGTERM for a preemption.
    if job_id is None or not state.startswith((*UNSUCCESSFUL, "COMPLETING")):
        return None
    mine = [e for e in events if e.get("job_id") == job_id]
    starts = [e.get("restart", 0) for e in mine if e["event"] == history.STARTED]
    if not starts:
        return None
    last = max(starts)
    ended = [e for e in mine if e.get("restart") == last and e["event"] in history.ENDINGS]
    return None if ended else state.split()[0]


def _nodes_of_latest_start(starts: list[dict[str, Any]]) -> dict[str, str]:
    """The nodes the run last started on and what SLURM says of them now (a node drained or down
    since is where the next start will not go); empty outside SLURM."""
    nodes = next((e.get("nodes") for e in reversed(starts) if e.get("nodes")), None) or []
    try:
        return slurm.node_states(nodes)
    except slurm.SlurmError:
        return {}


def _eta(cfg: Config, status: dict[str, Any], now: float) -> dict[str, Any] | None:
    """Training still to do, plus the requeues the time limit will force on the way: what this run
    can still train before its warning, then full runs of (limit - lead - restart) each."""
    if status["step_time_s"] is None or status["step"] >= status["max_steps"]:
        return None
    train_s = (status["max_steps"] - status["step"]) * status["step_time_s"]
    measured = RunFolder(Path(status["run_dir"])).read_measured_lead() if cfg.requeue.auto_lead else None
    lead = max(cfg.requeue.lead_s, measured["needed_s"] if measured else 0)
    restart_s = status["restart_s"] or 60.0
    per_run_s = cfg.slurm.time_min * 60 - lead - restart_s
    left_s = max(0.0, status["ends_at"] - lead - now) if status["ends_at"] else per_run_s
    requeues = math.ceil((train_s - left_s) / per_run_s) if train_s > left_s and per_run_s > 0 else 0
    total = train_s + requeues * restart_s
    return {"seconds": round(total, 1), "train_s": round(train_s, 1), "requeues": requeues,
            "restart_s": round(restart_s, 1), "at": round(now + total, 1)}


def _ago(then: float, now: float) -> str:
    return f"{_duration(now - then)} ago"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"run         {status['run_dir']}",
             f"job         {status['job_id'] or '-'}  {status['state']}"]
    restarts = status["restarts"]
    text = ", ".join(f"{reason} {count}" for reason, count in sorted(restarts.items())) or "none"
    budgets = ", ".join(f"{k} {v['used']}/{v['limit']}" for k, v in status["budgets"].items())
    lines.append(f"restarts    {status['restart_count']} ({text}); budgets {budgets}")
    if status["excluded"]:
        lines.append(f"excluded    {', '.join(status['excluded'])}")
    if status.get("nodes"):
        lines.append("nodes       " + ", ".join(f"{n} {state}" for n, state in status["nodes"].items()))
    ckpt = status["checkpoint"]
    if ckpt is None:
        lines.append("checkpoint  none committed yet")
    elif "error" in ckpt:
        lines.append(f"checkpoint  cannot read the store: {ckpt['error']}")
    else:
        lines.append(f"checkpoint  step {ckpt['step']}, committed {_clock(ckpt['saved_at'])} "
                     f"({_ago(ckpt['saved_at'], now)})")
    progress = f"step {status['step']} of {status['max_steps']}"
    if status["tokens_per_s"] is not None:
        progress += (f", {status['tokens_per_s']:,.0f} tokens/s, {status['step_time_s'] * 1e3:.0f} ms/step "
                     f"(at {_clock(status['metrics_at'])})")
    lines.append(f"progress    {progress}")
    eta = status["eta"]
    if eta is not None:
        more = (f" + {eta['requeues']} requeue(s) x ~{eta['restart_s']:.0f} s" if eta["requeues"] else "")
        lines.append(f"eta         {_clock(eta['at'])} (in {_duration(eta['seconds'])}: "
                     f"{_duration(eta['train_s'])} of training{more})")
    elif status["step"] >= status["max_steps"]:
        lines.append("eta         done")
    if status["gave_up"]:
        lines.append(f"stopped     {status['gave_up']}")
    if status.get("unexplained_end"):
        step = f"last committed step {ckpt['step']}" if ckpt and "step" in ckpt else "no committed step"
        if status["unexplained_end"] == "COMPLETING":  # SLURM is still ending the ranks: they may save and requeue
            lines.append(f"ending      without the batch shell's verdict (COMPLETING): its batch shell or node died; "
                         f"{step} so far; the ranks may still save and requeue the job: submit again only "
                         "once it has left the queue")
        else:
            lines.append(f"ended       without the batch shell's verdict ({status['unexplained_end']}): its batch "
                         f"shell or node died; {step}; submit the same command again to resume")
    if status["timelines"]:
        lines.append("")
        lines.append(timeline_table(status["timelines"]))
    return "\n".join(lines) + "\n"


PHASES = ("stop", "save", "commit", "scheduler_wait", "start_up", "load", "first_step", "total")


def timeline_table(rows: list[dict[str, Any]]) -> str:
    """Seconds from the stop request (signal, or the failure's verdict) to training again, per restart."""
    head = ["restart", "reason", "step", *(p.replace("_", " ") for p in PHASES)]
    body = [[str(r["restart"]), str(r["reason"]), str(r["step"]),
             *("-" if r.get(p) is None else f"{r[p]:.2f}" for p in PHASES)] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])
