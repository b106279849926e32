"""Checkpoint benchmark: `python -m hpc.bench.checkpoints` prints a table and writes JSON.

`--world` ranks (gloo, CPU) train a model with a few hundred MB of state (weights + AdamW), save it
`--saves` times per mode, and set each phase (median) against the plainest code moving the same bytes:

  blocked  the loop's time in an async save() (training runs while it writes; each save is waited
           for before the next, untimed) vs a sync save (async_save=false: save() + wait())
  write    bytes / write phase of the sync saves vs os.write + fsync of files of the same names and
           sizes, each rank its own, checkpoint.streams threads, in the same parent folder
  upload   bytes / upload phase of the sync saves vs shutil.copyfile + fsync of those raw files,
           checkpoint.streams at a time (so both copy files written a moment before)
  restore  Checkpointer.restore() into fresh engines: linked from persistent, from scratch (and the
           first restore of the process, which also pays one-time costs)
Baselines follow as many training steps as their save (idle memory is slow on some VMs); reads may
come from the page cache (dropping it needs root). It lives with the benchmarks, not in the
checkpoint stage, because it also trains and compares against plain file copies: a job never runs it.

    python -m hpc.bench.checkpoints --world 2 --saves 3 --strategy fsdp_full_shard
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hpc.bench.harness import join_local, local_config, run_ranks

STATE = ("model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=1536",
         "model.vocab_size=8192", "train.micro_batch_size=2", "train.seq_len=64", "checkpoint.keep_last=1")


def _train(engine: Any, batches: Any, steps: int) -> None:
    for _ in range(steps):
        micro = batches.next_step()
        for i, (inputs, targets) in enumerate(micro):
            engine.forward_backward(inputs, targets, sync=i == len(micro) - 1)
        engine.step()


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _timed(fn: Callable[[], Any]) -> float:  # seconds of fn() on the slowest rank, all starting together
    _gather(None)  # a barrier
    started = time.perf_counter()
    fn()
    return max(_gather(time.perf_counter() - started))


def _saves(cfg: Any, world: Any, engine: Any, batches: Any, folder: Path, saves: int, steps: int,
           after: Callable[[Path], None] = lambda folder: None) -> dict[str, Any]:
    """Save `saves` times (async: `steps` steps train while it writes); after(step folder) once each committed."""
    from hpc.checkpoint.checkpointer import Checkpointer
    from hpc.config import to_yaml

    ckpt = Checkpointer(cfg, world, location=str(folder / "persistent"), scratch=folder / "scratch",
                        config_yaml=to_yaml(cfg))
    ckpt.restore(engine, batches)  # resume=never: checks free space and sets up the format
    blocked, total, phases, step = [], [], [], 0
    for _ in range(saves):
        _train(engine, batches, steps)
        step += steps
        blocked.append(_timed(lambda: ckpt.save(step, engine, batches)))
        started = time.perf_counter()
        if cfg.checkpoint.async_save:
            _train(engine, batches, steps)
        outcome = ckpt.wait()
        assert outcome is not None and outcome.committed, f"step {step} did not commit: {outcome}"
        total.append(blocked[-1] + max(_gather(time.perf_counter() - started)))
        phases.append(outcome.seconds)
        after(folder / "scratch" / f"step-{step}")
        step += steps if cfg.checkpoint.async_save else 0
    ckpt.close()
    return {"blocked": blocked, "total": total, "phases": phases, "bytes": outcome.bytes}


def _raw_write(files: dict[str, int], folder: Path, streams: int) -> None:  # os.write + fsync, `streams` at a time
    data = memoryview(os.urandom(min(max(files.values(), default=0), 8 << 20)))  # written 8 MiB at a time

    def one(name: str) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb", buffering=0) as f:  # unbuffered: each write is one os.write
            left = files[name]
            while left:
                left -= f.write(data[:min(left, len(data))])
            os.fsync(f.fileno())

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, files))


def _copy(src: Path, names: list[str], dst: Path, streams: int) -> None:  # copyfile + fsync, `streams` at a time
    def one(name: str) -> None:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
        with open(dst / name, "rb") as f:
            os.fsync(f.fileno())

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, names))


def _measure_in_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: every measurement in turn; the harness returns rank 0's samples."""
    from hpc.checkpoint.checkpointer import Checkpointer
    from hpc.checkpoint.transfer import local_files
    from hpc.config import to_yaml
    from hpc.train.data import batches_for
    from hpc.train.strategies import build_engine

    work, saves, steps = Path(spec["work"]), spec["saves"], spec["steps"]
    cfg, world = join_local([*spec["overrides"], "checkpoint.resume=never"])

    def config(*extra: str) -> Any:
        return local_config(world.world_size, [*spec["overrides"], *extra])

    engine, streams = build_engine(cfg, world), cfg.checkpoint.streams
    batches = batches_for(cfg, world.rank, world.world_size)
    res: dict[str, Any] = {"params": sum(p.numel() for p in engine.module.parameters()), "raw_write": [],
                           "plain_copy": [], "async": _saves(cfg, world, engine, batches, work / "async", saves, steps)}
    if world.rank == 0:
        shutil.rmtree(work / "async")

    saved: list[Any] = []  # the parameters the last save holds (FSDP: this rank's shards)

    def baselines(scratch: Path) -> None:
        saved[:] = [getattr(p, "to_local", lambda: p)().detach().clone() for p in engine.module.parameters()]
        _train(engine, batches, steps)  # as before each save (some VMs make memory idle a while slow)
        names = local_files(scratch)
        res["files"] = {name: (scratch / name).stat().st_size for name in names}
        # Each rank writes its own shards (DCP `__R_i.distcp`, DeepSpeed `zero_pp_rank_R_...`) and `rng/rank-R.pt`.
        owner = {n: int(m[1]) if (m := re.match(r"(?:__|rng/rank-|zero_pp_rank_)(\d+)", n)) else 0 for n in names}
        mine = {name: size for name, size in res["files"].items() if owner[name] == world.rank}
        res["raw_write"].append(_timed(lambda: _raw_write(mine, work / "raw", streams)))
        # Copied right after they were written, as the upload copies the files DCP just wrote.
        res["plain_copy"].append(_timed(lambda: world.rank == 0 and _copy(work / "raw", names, work / "copy", streams)))
        for name in ("raw", "copy") if world.rank == 0 else ():
            shutil.rmtree(work / name)

    sync_cfg = config("checkpoint.resume=never", "checkpoint.async_save=false")
    res["sync"] = _saves(sync_cfg, world, engine, batches, work / "sync", saves, steps, after=baselines)

    # Restores into fresh engines, as a restarted job does; the first in a process also pays one-time costs.
    res["restore"], res["restore_equal"] = {}, {}
    for label, scratch in (("first", work / "sync" / "scratch"), ("linked", work / "restore"),
                           ("scratch", work / "sync" / "scratch")):
        fresh, fresh_batches = build_engine(cfg, world), batches_for(cfg, world.rank, world.world_size)
        ckpt = Checkpointer(config("checkpoint.async_save=false"), world, location=str(work / "sync" / "persistent"),
                            scratch=scratch, config_yaml=to_yaml(sync_cfg))
        res["restore"][label] = _timed(lambda: ckpt.restore(fresh, fresh_batches))
        ckpt.close()
        same = all(a.equal(getattr(b, "to_local", lambda: b)()) for a, b in zip(saved, fresh.module.parameters()))
        res["restore_equal"][label] = all(_gather(same))
        fresh.close()
    return res


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: measure, ours, baseline, ratio = ours / baseline, goal, met."""
    mb, med = res["sync"]["bytes"] / 1e6, statistics.median
    phase = {(m, k): med(p[k] for p in res[m]["phases"]) for m in ("sync", "async") for k in ("write", "upload")}
    raw, copy, sync = mb / med(res["raw_write"]), mb / med(res["plain_copy"]), med(res["sync"]["total"])

    def row(measure: str, ours: float, baseline: float | None = None, goal: str = "") -> dict[str, Any]:
        ratio = None if baseline is None else ours / baseline
        met = None if ratio is None else (ratio <= float(goal[3:]) if goal[0] == "<" else ratio >= float(goal[3:]))
        return {"measure": measure, "ours": ours, "baseline": baseline, "ratio": ratio, "goal": goal, "met": met}

    return [
        row("loop blocked per save, s (async vs sync save)", med(res["async"]["blocked"]), sync, "<= 0.05"),
        row("write to scratch, MB/s (vs os.write+fsync)", mb / phase["sync", "write"], raw, ">= 0.80"),
        row("upload, MB/s (vs copyfile+fsync)", mb / phase["sync", "upload"], copy, ">= 0.90"),
        row("async: write while training, MB/s", mb / phase["async", "write"]),
        row("async: upload while training, MB/s", mb / phase["async", "upload"]),
        *(row(f"restore, {what}, MB/s ({res['restore'][k]:.2f} s)", mb / res["restore"][k]) for k, what in (
            ("first", "1st in process, scratch"), ("linked", "linked from persistent"), ("scratch", "from scratch"))),
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    def cells(measure: str, *rest: Any) -> str:
        text = ["-" if x is None else x if isinstance(x, str) else f"{x:.{3 if x < 10 else 0}f}" for x in rest]
        return f"| {measure:<52} | {text[0]:>7} | {text[1]:>8} | {text[2]:>5} | {text[3]:<7} |"

    head = cells("measure", "ours", "baseline", "ratio", "goal")
    body = [cells(*(r[k] for k in ("measure", "ours", "baseline", "ratio", "goal")))
            + {True: " met", False: " MISSED", None: ""}[r["met"]] for r in rows]
    return "\n".join([head, re.sub(r"[^|]", "-", head), *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.bench.checkpoints", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--strategy", default="ddp", help="strategy preset: ddp, fsdp_full_shard, ...")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode (default 3); medians are reported")
    parser.add_argument("--steps", type=int, default=2, help="training steps between saves (default 2)")
    parser.add_argument("--workdir", help="scratch and persistent go here (default: new /var/tmp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--out", default="runs/bench/checkpoint.json", help="JSON results file")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. checkpoint.streams=2")
    args = parser.parse_args(argv)

    from hpc.config import ConfigError

    overrides = [*STATE, f"strategy={args.strategy}", *args.overrides]
    try:
        cfg = local_config(args.world, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hpc-ckpt-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        res = run_ranks(args.world, _measure_in_rank, {"work": str(work), "saves": args.saves, "steps": args.steps,
                                                       "overrides": overrides}, work, timeout_s=900)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows, seconds = summarise(res), time.perf_counter() - started
    print(f"state: {res['sync']['bytes'] / 1e6:.1f} MB ({res['params'] / 1e6:.1f} M params + AdamW) in "
          f"{len(res['files'])} files; strategy {args.strategy}, world {args.world}, {args.saves} saves per mode, "
          f"streams {cfg.checkpoint.streams}; workdir {work}{' (kept)' if args.keep else ''}")
    print(format_table(rows))
    print(f"restored state equals the saved one: {res['restore_equal']}; reads may come from the page cache (it "
          f"cannot be dropped without root); writes are fsynced. Took {seconds:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"world": args.world, "strategy": args.strategy, "saves": args.saves, "steps": args.steps,
                               "overrides": overrides, "rows": rows, "samples": res, "seconds": seconds}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
