"""Checkpoint benchmark: `python -m hpc.checkpoint.bench` prints a table and writes JSON.

`--world` local ranks (gloo on CPU) train a model whose state (weights + AdamW moments) is a few
hundred MB, save it `--saves` times through hpc.checkpoint.Checkpointer, and compare each phase
with the plainest code that moves the same bytes on the same disk:

  blocked  the loop's time inside an async save() (median; training steps run while it writes,
           and each save is waited for before the next, outside the timing) vs a synchronous save
           of the same state (checkpoint.async_save=false: save() + wait() = write + upload + commit)
  write    bytes / write phase of the synchronous saves vs os.write + os.fsync of files of the same
           number and sizes, each rank its own with checkpoint.streams threads, next to scratch
  upload   bytes / upload phase of the synchronous saves vs shutil.copyfile + fsync of the same
           files with checkpoint.streams threads
  restore  Checkpointer.restore() into a fresh engine, files linked from persistent storage, and
           again from the scratch copy

Without root the page cache cannot be dropped: every read (upload, copy, restore) may come from
memory. Writes are fsynced on both sides of each comparison.

    python -m hpc.checkpoint.bench --world 2 --saves 3 --strategy fsdp_full_shard
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hpc.bench import BASE

STATE = ("model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=1536",
         "model.vocab_size=8192", "train.micro_batch_size=2", "train.seq_len=64")


# ---- one rank ---------------------------------------------------------------------------------------

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


def _timed(fn: Any) -> float:
    """Seconds of fn() on the slowest rank, all ranks starting together."""
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    fn()
    return max(_gather(time.perf_counter() - started))


def _saves(cfg: Any, world: Any, engine: Any, batches: Any, folder: Path, saves: int, steps: int) -> dict[str, Any]:
    """Save `saves` times; async: train `steps` steps while each save writes and uploads."""
    from hpc.checkpoint import Checkpointer
    from hpc.config import to_yaml

    ckpt = Checkpointer(cfg, world, location=str(folder / "persistent"), scratch=folder / "scratch",
                        config_yaml=to_yaml(cfg))
    ckpt.restore(engine, batches)
    blocked, total, phases, step = [], [], [], 0
    for _ in range(saves):
        _train(engine, batches, steps)
        step += steps
        blocked.append(_timed(lambda: ckpt.save(step, engine, batches)))
        started = time.perf_counter()
        if cfg.checkpoint.async_save:
            _train(engine, batches, steps)
            step += steps
        outcome = ckpt.wait()
        assert outcome is not None and outcome.committed, f"step {step} did not commit: {outcome}"
        total.append(blocked[-1] + max(_gather(time.perf_counter() - started)))
        phases.append(outcome.seconds)
    ckpt.close()
    return {"blocked": blocked, "total": total, "phases": phases, "bytes": outcome.bytes, "step": step,
            "scratch": str(folder / "scratch" / f"step-{step}")}


def _raw_write(sizes: list[int], folder: Path, streams: int) -> None:
    """Files of these sizes written with os.write and fsynced, `streams` at a time."""
    from hpc.checkpoint.storage import CHUNK

    folder.mkdir(parents=True, exist_ok=True)
    data = memoryview(os.urandom(min(max(sizes, default=0), CHUNK)))

    def one(i: int) -> None:
        fd = os.open(folder / f"file-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = sizes[i]
            while left:
                left -= os.write(fd, data[:min(left, len(data))])
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(len(sizes))))


def _plain_copy(src: Path, names: list[str], dst: Path, streams: int) -> None:
    """shutil.copyfile of every file, each destination fsynced, `streams` at a time."""
    def one(name: str) -> None:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
        fd = os.open(dst / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, names))


def _owner(name: str) -> int:
    """The rank that writes a file of a DCP step folder (`__R_i.distcp`, `rng/rank-R.pt`; the rest: 0)."""
    match = re.match(r"(?:__|rng/rank-)(\d+)", name)
    return int(match[1]) if match else 0


def _worker(spec_path: Path) -> None:
    import torch
    import torch.distributed as dist

    from hpc.checkpoint import Checkpointer
    from hpc.checkpoint.drain import local_files
    from hpc.config import compose, to_yaml
    from hpc.launch.environment import detect
    from hpc.launch.rendezvous import join
    from hpc.train.data import GlobalBatches, open_source
    from hpc.train.strategies import World, build_engine

    spec = json.loads(spec_path.read_text())
    work, saves, steps = Path(spec["work"]), spec["saves"], spec["steps"]
    env = detect()

    def config(*extra: str) -> Any:
        return compose([*BASE, f"gpus_per_node={env.world_size}", *spec["overrides"], *extra],
                       which=lambda name: None, environ={})

    def batches_of(cfg: Any, world: Any) -> GlobalBatches:
        t = cfg.train
        source = open_source(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len, seed=t.seed)
        return GlobalBatches(source, seed=t.seed, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                             dp_rank=world.rank, dp_size=world.world_size)

    cfg = config("checkpoint.resume=never")
    rdzv = join(env, cfg, local_world_size=env.world_size, rendezvous_timeout_s=120, collective_timeout_s=600)
    world = World.from_rendezvous(rdzv, local_world_size=env.world_size)
    engine = build_engine(cfg, world)
    batches = batches_of(cfg, world)
    streams = cfg.checkpoint.streams
    res: dict[str, Any] = {"async": _saves(cfg, world, engine, batches, work / "async", saves, steps)}
    sync_cfg = config("checkpoint.resume=never", "checkpoint.async_save=false")
    res["sync"] = sync = _saves(sync_cfg, world, engine, batches, work / "sync", saves, steps)
    scratch = Path(sync["scratch"])
    names = local_files(scratch)
    res["files"] = {name: (scratch / name).stat().st_size for name in names}
    mine = [size for name, size in res["files"].items() if _owner(name) == world.rank]
    res["raw_write"], res["plain_copy"] = [], []
    for i in range(saves):
        res["raw_write"].append(_timed(lambda: _raw_write(mine, work / "raw" / f"run-{i}", streams)))
        res["plain_copy"].append(_timed(lambda: world.rank == 0 and _plain_copy(
            scratch, names, work / "copy" / f"run-{i}", streams)))
        dist.barrier()
        if world.rank == 0:
            shutil.rmtree(work / "raw" / f"run-{i}")
            shutil.rmtree(work / "copy" / f"run-{i}")

    # Restore into a fresh engine: files linked from persistent storage, then from scratch.
    fresh = build_engine(cfg, world)
    for label, scratch_dir in (("restore_linked", work / "restore-scratch"), ("restore_scratch", scratch.parent)):
        ckpt = Checkpointer(config("checkpoint.resume=auto"), world, location=str(work / "sync" / "persistent"),
                            scratch=scratch_dir, config_yaml=to_yaml(cfg))
        fresh_batches = batches_of(cfg, world)
        res[label] = _timed(lambda: ckpt.restore(fresh, fresh_batches))
        ckpt.close()

    def local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if hasattr(p, "to_local") else p

    same = all(torch.equal(local(a), local(b)) for a, b in zip(engine.module.parameters(), fresh.module.parameters()))
    res["restored_equal"] = all(_gather(same))
    if world.rank == 0:
        Path(spec["out"]).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo can abort there after all work is done


# ---- the command ------------------------------------------------------------------------------------

def _spawn(world_size: int, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    """Run the worker on `world_size` local ranks; rank 0's results."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TMPDIR=str(work), PYTHONPATH=str(repo))
        logs.append(work / f"rank{rank}.log")
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "hpc.checkpoint.bench", "--worker", str(spec_path)],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo))
    deadline, codes = time.monotonic() + timeout_s, []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        codes += [None] * (len(procs) - len(codes))
    finally:
        for proc in procs:
            proc.kill()
    if any(code != 0 for code in codes) or not Path(spec["out"]).exists():
        tails = "\n".join(f"--- rank {r} (exit {c})\n{logs[r].read_text()[-3000:]}" for r, c in enumerate(codes))
        raise RuntimeError(f"{world_size} local rank(s) failed:\n{tails}")
    return json.loads(Path(spec["out"]).read_text())


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: measure, ours, baseline, ratio (ours/baseline), goal."""
    mb = res["sync"]["bytes"] / 1e6
    med = statistics.median
    sync = {k: [p[k] for p in res["sync"]["phases"]] for k in ("write", "upload")}
    blocked, sync_total = med(res["async"]["blocked"]), med(res["sync"]["total"])
    write, raw = mb / med(sync["write"]), mb / med(res["raw_write"])
    upload, copy = mb / med(sync["upload"]), mb / med(res["plain_copy"])
    rows = [
        {"measure": "loop blocked per save, s (async vs sync save)", "ours": blocked, "baseline": sync_total,
         "ratio": blocked / sync_total, "goal": "<= 0.05", "met": blocked / sync_total <= 0.05},
        {"measure": "write to scratch, MB/s (vs os.write+fsync)", "ours": write, "baseline": raw,
         "ratio": write / raw, "goal": ">= 0.80", "met": write / raw >= 0.80},
        {"measure": "upload, MB/s (vs copyfile+fsync)", "ours": upload, "baseline": copy,
         "ratio": upload / copy, "goal": ">= 0.90", "met": upload / copy >= 0.90},
    ]
    for key, what in (("restore_linked", "linked from persistent"), ("restore_scratch", "from scratch copy")):
        rows.append({"measure": f"restore {what}, MB/s ({res[key]:.2f} s)", "ours": mb / res[key],
                     "baseline": None, "ratio": None, "goal": "", "met": None})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    head = f"| {'measure':<48} | {'ours':>8} | {'baseline':>8} | {'ratio':>6} | {'goal':<7} |"
    lines = [head, "|" + "|".join("-" * (len(c) + 2) for c in head.strip("|").split("|")[:-1]) + "|"]
    for r in rows:
        mark = {True: " ok", False: " MISSED", None: ""}[r["met"]]
        lines.append(f"| {r['measure']:<48} | {num(r['ours'], '8.3f' if r['ours'] < 10 else '8.0f')} | "
                     f"{num(r['baseline'], '8.3f' if (r['baseline'] or 99) < 10 else '8.0f')} | "
                     f"{num(r['ratio'], '6.3f')} | {r['goal']:<7} |{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.checkpoint.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--strategy", default="ddp", help="strategy preset: ddp, fsdp_full_shard, ...")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode (default 3); medians are reported")
    parser.add_argument("--steps", type=int, default=2, help="training steps before each save and, async, "
                        "while it writes (default 2)")
    parser.add_argument("--workdir", help="scratch and persistent folders go here (default: a new /var/tmp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--out", default="runs/bench/checkpoint.json", help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. model.n_layers=4")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(Path(args.worker))
        return 0

    from hpc.config import ConfigError, compose
    from hpc.train.model import count_params

    overrides = [*STATE, f"strategy={args.strategy}", *args.overrides]
    try:
        cfg = compose([*BASE, f"gpus_per_node={args.world}", *overrides], which=lambda name: None, environ={})
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hpc-ckpt-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        res = _spawn(args.world, {"work": str(work), "out": str(work / "result.json"), "saves": args.saves,
                                  "steps": args.steps, "overrides": overrides}, work, timeout_s=900)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarise(res)
    seconds = time.perf_counter() - started
    print(f"state: {res['sync']['bytes'] / 1e6:.1f} MB ({count_params(cfg.model) / 1e6:.1f} M params + AdamW) in "
          f"{len(res['files'])} files; strategy {args.strategy}, world {args.world}, {args.saves} saves, "
          f"streams {cfg.checkpoint.streams}; workdir {work}{' (kept)' if args.keep else ''}")
    print(format_table(rows))
    print(f"restored state equals the saved one: {res['restored_equal']}. Reads may come from the page cache "
          f"(it cannot be dropped without root); writes are fsynced. Took {seconds:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"world": args.world, "strategy": args.strategy, "saves": args.saves,
                               "overrides": overrides, "rows": rows, "raw": res, "seconds": seconds}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
