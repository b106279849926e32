"""The GPU smoke test: `python -m hpc.bench.gpu_check` (or tools/gpu_check.sh) runs six checks of the
CUDA/NCCL path on one machine, prints one table and writes JSON.

    devices     each rank's CUDA_VISIBLE_DEVICES, visible GPU count, the device the rendezvous picks, CPU affinity
    nccl_gloo   NCCL eager init (init_process_group with device_id) + all-reduce; a gloo group's all-reduce
                and the address/interface gloo really connected over
    parity      step-1 loss of ddp, fsdp_full_shard, zero2, zero3 in bf16, equal within a bf16 tolerance
    throughput  ddp, fsdp_full_shard, fsdp_shard_grad_op, zero2, zero3 on a 1.1B Llama in bf16: tokens/s, MFU
                and the allocator's peak next to the planner's (hpc.estimate; within 10%)
    resume      the real job (python -m hpc.submit, cluster=local): async saves, a stop, a fresh launch that
                resumes; its next losses against an uninterrupted run
    signal      the configured requeue signal (USR2) sent to the running job's ranks: a committed checkpoint
                and a clean stop
    memory_7b   one DDP step of configs/model/llama2_7b.yaml (bf16 autocast, fp32 weights + AdamW):
                torch.cuda.max_memory_reserved / max_memory_allocated

One rank per visible GPU (at least one). With no GPU it says so and exits 0; with --cpu the same
checks run on gloo with 2 CPU ranks and the tiny model (memory_7b is skipped), so the script itself
is exercised anywhere. Each check
is independent (a failure or a timeout is its row, the next check still runs) and has its own timeout,
all within one budget (--budget-s, default 450 s: the GPU session allows ~8 minutes). The JSON is
rewritten after every check, so a run cut short still leaves the rows it finished. Exit status 1 when
any check FAILED. The checks live in hpc.bench.gpu_checks (inside local ranks) and
hpc.bench.gpu_check_jobs (through the job itself).

    python -m hpc.bench.gpu_check                       # every check, one rank per GPU
    python -m hpc.bench.gpu_check --cpu --checks devices,nccl_gloo,parity --strategies ddp,fsdp_full_shard
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hpc.bench.gpu_check_jobs import check_resume, check_signal, kill_launches
from hpc.bench.gpu_checks import (
    PARITY_CHOICES,
    PARITY_STRATEGIES,
    Check,
    Context,
    Finding,
    Skipped,
    check_devices,
    check_memory_7b,
    check_nccl_gloo,
    check_parity,
    check_throughput,
)
from hpc.files import write_atomically

CHECKS = (
    # In the order they run; the timeout is a few times the expected time on one H200 (in each check's comment).
    Check("devices", check_devices, 60),
    Check("nccl_gloo", check_nccl_gloo, 90),
    Check("parity", check_parity, 180),
    Check("resume", check_resume, 180),
    Check("signal", check_signal, 120),
    Check("memory_7b", check_memory_7b, 240),
    Check("throughput", check_throughput, 200),  # last: the earlier checks keep their share of the budget
)
NAMES = tuple(check.name for check in CHECKS)
MIN_START_S = 15
"""A check that would get less than this of the budget is skipped rather than started to be killed."""
GRACE_S = 30
"""How long past its timeout a check may take to clean up (kill its ranks) before it is abandoned."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def run_check(check: Check, ctx: Context, timeout_s: float) -> dict[str, Any]:
    """One row: run the check in a thread (so a check that hangs past its own timeout is abandoned,
    not waited for) and turn what it returned or raised into ok / FAILED / skipped."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["finding"] = check.run(ctx, timeout_s)
        except BaseException as err:  # noqa: BLE001 - every failure becomes the row's text
            box["error"] = err

    started = time.perf_counter()
    thread = threading.Thread(target=target, name=f"gpu-check-{check.name}", daemon=True)
    thread.start()
    thread.join(timeout_s + GRACE_S)
    seconds = round(time.perf_counter() - started, 1)
    row: dict[str, Any] = {"check": check.name, "seconds": seconds, "timeout_s": round(timeout_s)}
    if thread.is_alive():
        return {**row, "result": "FAILED", "value": f"did not return within {timeout_s + GRACE_S:.0f} s",
                "details": {}}
    if "finding" in box:
        finding: Finding = box["finding"]
        return {**row, "result": "ok" if finding.ok else "FAILED", "value": finding.value,
                "details": finding.details}
    err = box["error"]
    if isinstance(err, Skipped):
        return {**row, "result": "skipped", "value": str(err), "details": {}}
    return {**row, "result": "FAILED", "value": _one_line(err), "details": {"error": str(err)[-12000:]}}


def run_checks(checks: list[Check], ctx: Context, *, budget_s: float,
               on_row: Callable[[dict[str, Any]], None] = lambda row: None,
               clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """Every check in turn, each with min(its timeout, what is left of the budget); rows in order."""
    deadline = clock() + budget_s
    rows = []
    for check in checks:
        left = deadline - clock() - GRACE_S
        if left < MIN_START_S:
            row = {"check": check.name, "result": "skipped", "seconds": 0.0, "timeout_s": 0,
                   "value": f"not started: {max(left + GRACE_S, 0):.0f} s left of the {budget_s:.0f} s budget",
                   "details": {}}
        else:
            row = run_check(check, ctx, min(check.timeout_s, left))
        rows.append(row)
        on_row(row)
    return rows


WIDTH = max(len(name) for name in NAMES)


def format_row(row: dict[str, Any]) -> str:
    return f"{row['check']:<{WIDTH}}  {row['result']:<8} {row['value']}  [{row['seconds']:.1f} s]"


def format_table(rows: list[dict[str, Any]]) -> str:
    """check, result, value, seconds: one line per check (the value is as long as it needs)."""
    head = f"{'check':<{WIDTH}}  {'result':<8} value  [seconds]"
    return "\n".join([head, "-" * 72, *(format_row(r) for r in rows)])


def default_out(environ: Mapping[str, str] = os.environ) -> Path:
    """$OUT/gpu_check.json when $OUT names a folder (the GPU session brings it back), else ./gpu_check.json."""
    return Path(environ["OUT"]) / "gpu_check.json" if environ.get("OUT") else Path("gpu_check.json")


def _machine() -> dict[str, Any]:
    """Versions and what this process sees; no CUDA context here (that is each rank's, on its GPU)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpus": len(os.sched_getaffinity(0)),
                            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}
    try:
        info["deepspeed"] = version("deepspeed")
    except PackageNotFoundError:
        info["deepspeed"] = "not installed"
    return info


def _end_children() -> None:
    """Kill what the checks started and left running (only after a timeout or an outside stop): the
    launches' process groups, then this process's own children, by their ids."""
    import psutil

    kill_launches()
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU/gloo mode even when a GPU is visible")
    parser.add_argument("--checks", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--strategies", default=",".join(PARITY_STRATEGIES),
                        help="strategies the parity check compares (default: %(default)s)")
    parser.add_argument("--world", type=int, help="ranks (default: one per visible GPU; 2 in CPU mode)")
    parser.add_argument("--budget-s", type=float, default=450, help="time for all checks together (default 450)")
    parser.add_argument("--out", type=Path, help="JSON file (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new one under /var/tmp, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (rank logs, run folders)")
    args = parser.parse_args(argv)

    names = [n for n in args.checks.split(",") if n]
    unknown = [n for n in names if n not in NAMES]
    strategies = tuple(s for s in args.strategies.split(",") if s)
    bad = [s for s in strategies if s not in PARITY_CHOICES]
    if unknown or bad or not names:
        print(f"error: unknown checks {unknown} (choose from {', '.join(NAMES)}) or strategies {bad} "
              f"(choose from {', '.join(PARITY_CHOICES)})", file=sys.stderr)
        return 2
    import torch

    cuda = not args.cpu and torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("gpu_check: no NVIDIA GPU visible here (torch.cuda.is_available() is False), nothing to measure; "
              "--cpu runs the same checks on CPU ranks")
        return 0
    world = args.world or (max(torch.cuda.device_count(), 1) if cuda else 2)
    out = args.out or default_out()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hpc-gpu-check-",
                                                 dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    work.mkdir(parents=True, exist_ok=True)
    # DeepSpeed's JIT-built ops (on CPU: its shared-memory comm) are cached across runs, as in the tests.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/var/tmp/hpc-torch-extensions")
    ctx = Context(cuda=cuda, world=world, work=work, strategies=strategies)
    report: dict[str, Any] = {"mode": "cuda" if cuda else "cpu", "world": world, "budget_s": args.budget_s,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine(),
                              "checks": []}
    print(f"gpu_check: {report['mode']} mode, {world} rank(s), torch {report['machine']['torch']}, "
          f"deepspeed {report['machine']['deepspeed']}; budget {args.budget_s:.0f} s; JSON -> {out}", flush=True)
    print(format_table([]), flush=True)
    started = time.perf_counter()

    def on_row(row: dict[str, Any]) -> None:
        print(format_row(row), flush=True)  # as it ends: a run cut short still shows what it did
        report["checks"].append(row)
        report["seconds"] = round(time.perf_counter() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, json.dumps(report, indent=1, default=str))

    chosen = [c for c in CHECKS if c.name in names]
    # Stopped from outside (the session's time limit): leave through `finally`, taking the ranks along.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        rows = run_checks(chosen, ctx, budget_s=args.budget_s, on_row=on_row)
    except (SystemExit, KeyboardInterrupt):
        print(f"stopped from outside after {len(report['checks'])} check(s); {out} holds them", flush=True)
        raise
    finally:
        _end_children()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{format_table(rows)}")
    failed = [r["check"] for r in rows if r["result"] == "FAILED"]
    print(f"{len(rows)} check(s) in {time.perf_counter() - started:.0f} s: "
          f"{'FAILED: ' + ', '.join(failed) if failed else 'none failed'}; JSON {out}"
          f"{'; scratch kept in ' + str(work) if args.keep else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
