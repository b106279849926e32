"""Soak the requeue path on the project's local SLURM cluster (tools/slurm-cluster up, as root).

    python3 tools/soak.py [--cycles 30] [--parallel 8] [--root /var/tmp/hpc-soak] [--out soak.json]

1. `--parallel` small runs submitted at once, sharing the cluster's 4 nodes: every one completes.
2. One small run (2 nodes, 1 rank each, tiny_cpu with slowed steps) with a one-minute time limit and
   requeue.max_requeues=CYCLES, so that it requeues itself CYCLES times at its time limit and
   then stops with its budget spent. After every requeue, while the job waits in the queue, the
   soak counts what the run left behind: committed steps (retention keeps checkpoint.keep_last),
   bytes of the run folder outside its logs, bytes of every node's scratch for the job, processes
   still naming the run folder, and open files into the run folder or the scratch.
3. The same run uninterrupted (no slowed steps, no time limit to speak of): every step's loss of
   the soaked run must equal its loss there, bit for bit.

Prints a table per cycle (signal -> training again, and its phases) and a summary with the median
and the maximum; writes JSON. Exit status 0 only when every check held. About CYCLES + 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc import slurm  # noqa: E402
from hpc.requeue import history  # noqa: E402

CLUSTER = ROOT / "tools" / "slurm_cluster.py"
STATE = Path(os.environ.get("HPC_SLURM_STATE", "/var/tmp/hpc-slurm"))
BASE = ["exp=tiny_cpu", "cluster=testcluster", "train.log_every=1", "checkpoint.every_steps=10",
        "checkpoint.keep_last=3"]
SOAKED = ["nodes=2", "gpus_per_node=1", "time=1", "requeue.lead_s=20"]
GROWING_BY_DESIGN = ("submitit", "metrics.jsonl", "history.jsonl")
"""Run folder entries that grow with the work done: the ranks' logs, one metrics line per logged
step, one history line per start and end."""
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def client_env() -> dict[str, str]:
    """This environment pointed at the local cluster (what `tools/slurm-cluster env` exports)."""
    status = subprocess.run([sys.executable, str(CLUSTER), "status"], capture_output=True, text=True)
    if status.returncode != 0:
        raise SystemExit(f"soak: the local SLURM cluster is not up: {status.stdout.strip()[-300:]}")
    sys.path.insert(0, str(ROOT / "tools"))
    from localslurm.conf import HPC_CLUSTER
    from localslurm.paths import state_paths

    env = {k: v for k, v in os.environ.items() if k != "HPC_FAULTS"}
    return {**env, "SLURM_CONF": str(state_paths().slurm_conf), "HPC_CLUSTER": HPC_CLUSTER}


def submit(env: dict[str, str], root: Path, name: str, *overrides: str, faults: str | None = None) -> str:
    run_env = {**env, "HPC_FAULTS": faults} if faults else env
    proc = subprocess.run([sys.executable, "-m", "hpc.submit", *BASE, f"run.root={root}", f"run.name={name}",
                           *overrides, "--no-wait"], capture_output=True, text=True, env=run_env, cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"soak: submitting {name} failed:\n{proc.stdout}\n{proc.stderr}")
    return next(line.split()[2] for line in proc.stdout.splitlines() if line.startswith("submitted job "))


def state_of(job_id: str, env: dict[str, str]) -> str:
    info = slurm.job_info(job_id, env=env)
    return info.get("JobState") or slurm.job_state(job_id, env=env)


def _wait_state(job_id: str, env: dict[str, str], want: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state_of(job_id, env).split()[0] == want:
            return True
        time.sleep(0.3)
    return False


def wait_ended(job_id: str, env: dict[str, str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = slurm.job_state(job_id, env=env)
        if state.split()[0] in ENDED:
            return state.split()[0]
        time.sleep(2)
    return "TIMED OUT WAITING"


def losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss; a step a restart ran again must have logged the same loss both times."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] in out and out[record["step"]] != record["loss"]:
            raise AssertionError(f"step {record['step']} logged two losses: {out[record['step']]} and {record['loss']}")
        out[record["step"]] = record["loss"]
    return out


def folder_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not any(part in skip for part in p.relative_to(path).parts):
            total += p.stat().st_size
    return total


def leftovers(run_dir: Path, scratch_dirs: list[Path]) -> tuple[list[int], int]:
    """Processes naming the run folder, and open files into it or the scratch, on this machine."""
    processes, files = [], 0
    targets = [str(run_dir)] + [str(s) for s in scratch_dirs]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(run_dir) in cmdline:
                processes.append(int(proc.name))
            for fd in (proc / "fd").iterdir():
                try:
                    if any(os.readlink(fd).startswith(t) for t in targets):
                        files += 1
                except OSError:
                    continue
        except OSError:
            continue
    return processes, files


def parallel_runs(env: dict[str, str], root: Path, count: int) -> dict:
    started = time.monotonic()
    jobs = {f"p{i}": submit(env, root, f"p{i}", "nodes=1", "gpus_per_node=2", "train.max_steps=30", "time=10")
            for i in range(count)}
    states = {name: wait_ended(job, env, 900) for name, job in jobs.items()}
    return {"runs": count, "states": states, "seconds": round(time.monotonic() - started, 1),
            "ok": all(s == "COMPLETED" for s in states.values())}


def soak(env: dict[str, str], root: Path, cycles: int) -> dict:
    run_dir = root / "soak"
    steps = 40 * (cycles + 2)  # more than the run can train in CYCLES + 1 time limits
    job = submit(env, root, "soak", *SOAKED, f"train.max_steps={steps}", f"requeue.max_requeues={cycles}",
                 faults="slow@step_end:ms=600")
    reference = submit(env, root, "reference", "nodes=2", "gpus_per_node=1", f"train.max_steps={steps}",
                       "time=30", f"requeue.max_requeues={cycles}")
    rows: list[dict] = []
    seen = 0
    deadline = time.monotonic() + (cycles + 3) * 150
    print(f"soak: job {job}, run {run_dir}; reference job {reference}", flush=True)
    while time.monotonic() < deadline:
        events = history.read_events(run_dir) if run_dir.exists() else []
        requeued = [e for e in events if e["event"] == history.REQUEUED]
        while seen < len(requeued):
            event = requeued[seen]
            seen += 1
            # Between runs (the job pending again, before the next one starts): what the last run
            # left behind.
            pending = _wait_state(job, env, "PENDING", 30)
            scratch = sorted(STATE.glob(f"scratch/*/{job}"))
            procs, files = leftovers(run_dir, scratch) if pending else (None, None)
            committed = sorted(int(p.parent.name.split("-")[1])
                               for p in (run_dir / "checkpoints").glob("step-*/manifest.json"))
            rows.append({"cycle": seen, "step": event["step"], "reason": event.get("reason"),
                         "committed": committed,
                         # What grows with the work done (the logs, metrics and history, one line per
                         # step or event) is counted apart from what must stay bounded.
                         "run_folder_bytes": folder_bytes(run_dir, GROWING_BY_DESIGN + ("checkpoints",)),
                         "log_bytes": sum(folder_bytes(run_dir / n) if (run_dir / n).is_dir() else
                                          (run_dir / n).stat().st_size for n in GROWING_BY_DESIGN
                                          if (run_dir / n).exists()),
                         "run_folder_files": sum(1 for p in run_dir.rglob("*") if p.is_file()
                                                 and p.relative_to(run_dir).parts[0] != "checkpoints"),
                         "checkpoint_bytes": folder_bytes(run_dir / "checkpoints"),
                         "scratch_bytes": sum(folder_bytes(s) for s in scratch), "processes": procs,
                         "open_files": files})
        ended = [e for e in events if e["event"] in (history.GAVE_UP, history.FINISHED)]
        if ended and state_of(job, env).split()[0] in ENDED + ("PENDING",):
            break
        time.sleep(2)
    starts = [e for e in history.read_events(run_dir) if e["event"] == history.STARTED]
    for row, start in zip(rows, starts[1:]):
        row["timeline"] = start.get("timeline") or {}
        row["resumed_at"] = start.get("step")
    slurm.run(["scancel", job], env=env, check=False)
    ref_state = wait_ended(reference, env, 900)
    soaked, straight = losses(run_dir), losses(root / "reference")
    mismatched = [s for s in soaked if s in straight and soaked[s] != straight[s]]
    totals = [r["timeline"].get("total") for r in rows if r.get("timeline", {}).get("total") is not None]
    checks = {
        "cycles": len(rows) >= cycles,
        "all timeouts": all(r["reason"] == "timeout" for r in rows),
        "every resume at the committed step": all(r.get("resumed_at") == r["step"] for r in rows),
        "losses equal the uninterrupted run": ref_state == "COMPLETED" and not mismatched and len(soaked) > 0,
        "retention holds": all(len(r["committed"]) <= 4 for r in rows),
        "no processes left between runs": all(not r["processes"] for r in rows if r["processes"] is not None),
        "no open files left between runs": all(r["open_files"] == 0 for r in rows if r["open_files"] is not None),
        "checked between runs at least half the time": sum(r["processes"] is not None for r in rows) * 2 >= len(rows),
        "run folder does not grow (besides logs, metrics, history)": _flat([r["run_folder_bytes"] for r in rows]),
        "run folder's file count does not grow (checkpoints apart)":
            _flat([r["run_folder_files"] for r in rows], slack=6),
        "scratch does not grow": _flat([r["scratch_bytes"] for r in rows]),
    }
    return {"job": job, "cycles": len(rows), "rows": rows, "checks": checks,
            "signal_to_training_s": {"median": statistics.median(totals) if totals else None,
                                     "max": max(totals) if totals else None},
            "steps_compared": len([s for s in soaked if s in straight]), "mismatched_steps": mismatched[:10]}


def _flat(values: list[int], slack: int = 4096) -> bool:
    """No growth beyond the first cycles' level (some files settle after the first requeues)."""
    return len(values) < 4 or max(values[3:]) <= max(values[:4]) * 1.1 + slack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/hpc-soak"))
    parser.add_argument("--out", type=Path, default=Path("runs/soak.json"))
    args = parser.parse_args(argv)
    env = client_env()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    result: dict = {}
    if args.parallel:
        result["parallel"] = parallel_runs(env, args.root / "parallel", args.parallel)
        print(f"{args.parallel} runs at once on 4 nodes: {result['parallel']['states']} "
              f"in {result['parallel']['seconds']} s", flush=True)
    result["soak"] = soak(env, args.root, args.cycles)
    phases = ("stop", "save", "commit", "scheduler_wait", "start_up", "load", "first_step", "total")
    print(f"{'cycle':>5} {'step':>5} " + " ".join(f"{p:>14}" for p in phases)
          + f" {'committed':>14} {'scratch MB':>10}")
    for row in result["soak"]["rows"]:
        t = row.get("timeline", {})
        print(f"{row['cycle']:>5} {row['step']:>5} " + " ".join(
            f"{t.get(p):>14.2f}" if t.get(p) is not None else f"{'-':>14}" for p in phases)
              + f" {str(row['committed'][-3:]):>14} {row['scratch_bytes'] / 1e6:>10.1f}")
    s = result["soak"]
    print(f"signal -> training again: median {s['signal_to_training_s']['median']} s, "
          f"max {s['signal_to_training_s']['max']} s over {s['cycles']} cycles; "
          f"{s['steps_compared']} steps compared with the uninterrupted run")
    for check, ok in s["checks"].items():
        print(f"  {'ok ' if ok else 'FAILED'} {check}")
    ok = all(s["checks"].values()) and result.get("parallel", {}).get("ok", True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}; soak {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
