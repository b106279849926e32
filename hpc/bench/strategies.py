"""Step benchmark across strategies: `python -m hpc.bench` prints a table and writes JSON.

It starts `--world` local processes (gloo on CPU, or one per GPU with nccl), builds each strategy in
turn inside the same process group, runs `--steps` steps on the same model and data, and reports the
steady-state step time (first `--warmup` steps left out), tokens/s, peak memory and the ratio to our
DDP. `plain_ddp` is a hand-written minimal DDP loop (model, AdamW, backward, clip, step; nothing
else), the yardstick for our own DDP engine's overhead. The equivalence tests reuse `run_cases`:
the same ranks that time the strategies check that they all compute the same losses.

Beside each measurement the planner's prediction (`hpc.estimate`: peak memory per rank, tokens/s)
and the collectives each rank called per step through torch.distributed's functions: all of
FSDP2's, and the loop's one loss all-reduce; DDP's reducer and some of DeepSpeed's calls go to the
process group below them and are not counted (compare FSDP wrappings with it, not engines). On CPU
the measured peak is the rank's resident set, interpreter and imports included (DeepSpeed's
import adds ~0.2 GB the plan's 0.5 GB for a rank's own footprint does not cover).
`--plot out.png` draws tokens/s and peak memory, measured beside planned; `--fsdp-wrap` adds
fsdp_full_shard with the whole model as one unit and with pairs of blocks as units, against one
unit per block (collective count and step time).

    python -m hpc.bench --world 2 --steps 30 model=tiny train.seq_len=256 --plot runs/bench/strategies.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpc.bench.harness import join_local, local_config, run_ranks
from hpc.estimate.shape import shape_of

STRATEGIES = ("plain_ddp", "ddp", "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_no_shard",
              "fsdp_hybrid_shard", "zero1", "zero2", "zero3")


# ---- launching: N local ranks running a list of cases ------------------------------------------

def run_cases(world_size: int, cases: dict[str, list[str]], workdir: Path, *, timeout_s: float = 900,
              extra_env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run each case (label -> config overrides) on `world_size` fresh local ranks; rank 0's results.

    One process group serves every case, so process start-up (seconds) is paid once. Overrides in
    capitals are flags for this harness, not config: PLAIN_DDP runs the yardstick loop instead of an
    engine, SHARDED_INIT builds the engine's parameters sharded from the start.
    Raises RuntimeError with every rank's log tail if any rank fails.
    """
    return run_ranks(world_size, _run_cases_in_rank, cases, workdir, timeout_s=timeout_s, extra_env=extra_env)


def _run_cases_in_rank(cases: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """One rank: join the group, run every case in turn; the harness returns rank 0's results."""
    import torch.distributed as dist

    from hpc.train.loop import train
    from hpc.train.strategies import build_engine

    _, world = join_local([o for o in next(iter(cases.values()), []) if not o.isupper()])
    results: dict[str, Any] = {}
    for label, overrides in cases.items():
        _release_memory(world)
        # Harness flags: PLAIN_DDP, SHARDED_INIT, WRAP_MODEL / WRAP_SIZE (FSDP's units of sharding:
        # the whole model, or pairs of blocks as a size-based policy would group them).
        flags = {o for o in overrides if o.isupper()}
        cfg = local_config(world.world_size, [o for o in overrides if o not in flags])
        if "PLAIN_DDP" in flags:
            results[label] = plain_ddp_loop(cfg, world)
        else:
            wrap = "model" if "WRAP_MODEL" in flags else f"size:{2 * shape_of(cfg.model).block}" \
                if "WRAP_SIZE" in flags else "block"
            engine = build_engine(cfg, world, sharded_init=True if "SHARDED_INIT" in flags else None, wrap=wrap)
            param_bytes = engine.local_param_bytes()
            with count_collectives() as calls:
                outcome = train(cfg, world, engine=engine)
            engine.close()
            del engine
            _release_memory(world)
            results[label] = {"losses": outcome.losses, "param_bytes": param_bytes,
                              "step_times": outcome.step_times, "summary": outcome.summary,
                              "collectives_per_step": sum(calls.values()) / max(len(outcome.step_times), 1),
                              "collectives": dict(calls)}
        dist.barrier()
    return results


COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_reduce", "all_gather", "reduce_scatter", "broadcast")


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count this rank's torch.distributed collective calls, by name, while the block runs (FSDP2 calls
    them through the module at call time, so the module's functions are wrapped for the while)."""
    import torch.distributed as dist

    calls: Counter = Counter()
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _release_memory(world: Any) -> None:
    """Free one case's engine before the next is built, so peaks are per case."""
    import gc

    import torch

    from hpc.train.metrics import reset_peak_memory

    gc.collect()
    if world.is_cuda:
        torch.cuda.empty_cache()
    reset_peak_memory(world.device)


# ---- the yardstick --------------------------------------------------------------------------------

def plain_ddp_loop(cfg: Any, world: Any) -> dict[str, Any]:
    """The shortest correct DDP training loop on our model and data: what our DDP engine must match."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hpc.train.data import batches_for
    from hpc.train.model import Transformer, loss_fn
    from hpc.train.optim import build_optimizer, lr_at, set_lr

    with world.device:
        model = Transformer(cfg.model)
    torch.manual_seed(cfg.train.seed)
    model.init_weights()
    # Same DDP options as our engine, so the ratio measures the engine and loop, not DDP settings.
    ddp = DistributedDataParallel(model, device_ids=[world.device.index] if world.is_cuda else None,
                                  gradient_as_bucket_view=True, broadcast_buffers=False)
    optimizer = build_optimizer(model, cfg.train)
    t = cfg.train
    batches = batches_for(cfg, world.rank, world.world_size)
    losses, times = [], []
    for step in range(t.max_steps):
        started = time.perf_counter()
        set_lr(optimizer, lr_at(step, t))
        reported = torch.zeros((), device=world.device)
        micro_batches = batches.next_step()
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = loss_fn(ddp(inputs.to(world.device)), targets.to(world.device))
                (loss / len(micro_batches)).backward()
            reported += loss.detach() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(reported)
        losses.append(float(reported) / world.world_size)
        times.append(time.perf_counter() - started)
    from hpc.train.metrics import peak_memory_bytes

    return {"losses": losses, "step_times": times,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "summary": {"peak_mem_gb": peak_memory_bytes(world.device) / 2**30}}


# ---- the command ----------------------------------------------------------------------------------

def _steady(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times
    kept = sorted(kept)[: max(len(kept) * 9 // 10, 1)]  # drop the slowest tenth (scheduler noise)
    return sum(kept) / len(kept)


def summarise(results: dict[str, dict], *, tokens_per_step: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for label, res in results.items():
        step = _steady(res["step_times"], warmup)
        rows.append({"strategy": label, "step_ms": step * 1e3, "tokens_per_s": tokens_per_step / step,
                     "peak_mem_gb": res.get("summary", {}).get("peak_mem_gb", float("nan")),
                     "param_mb_per_rank": res["param_bytes"] / 1e6, "final_loss": res["losses"][-1],
                     "collectives_per_step": res.get("collectives_per_step")})
    ddp = next((r for r in rows if r["strategy"] == "ddp"), None)
    for row in rows:
        row["vs_ddp"] = row["tokens_per_s"] / ddp["tokens_per_s"] if ddp else float("nan")
    return rows


def planned_peak_bytes(cfg: Any) -> int:
    """The planner's (hpc.estimate) per-rank peak as the benchmarks measure it: on a GPU the
    allocator's peak, which does not see the reserved CUDA context and NCCL overhead; on CPU the
    rank's resident set, which includes the process's own footprint (the same reserve)."""
    from hpc.estimate.memory import estimate_memory

    memory = estimate_memory(cfg)
    return memory.total - (memory.gpu["overhead"] if cfg.cluster.accelerator == "cuda" else 0)


def add_plan(rows: list[dict[str, Any]], cases: dict[str, list[str]], world: int, tokens_per_step: int) -> None:
    """The planner's prediction beside each measurement (hpc.estimate): peak memory per rank (GiB,
    as measured: planned_peak_bytes) and tokens/s from its step time."""
    from hpc.estimate.comm import traffic

    for row in rows:
        if any(o.startswith("WRAP_") for o in cases[row["strategy"]]):
            continue  # the planner models one unit per block
        overrides = [o for o in cases[row["strategy"]] if not o.isupper()]
        cfg = local_config(world, overrides)
        step = traffic(cfg)
        row["predicted_mem_gb"] = planned_peak_bytes(cfg) / 2**30
        row["predicted_tokens_per_s"] = tokens_per_step / step.step_s if step.step_s else float("nan")
        row["predicted_bound_by"] = step.bottleneck


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([20, *(len(r["strategy"]) + 2 for r in rows)])
    head = (f"{'strategy':<{width}}{'step ms':>9}{'tokens/s':>11}{'plan tok/s':>11}{'vs ddp':>8}{'peak GB':>9}"
            f"{'plan GB':>9}{'coll/step':>10}{'param MB/rank':>15}{'loss':>8}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        lines.append(f"{r['strategy']:<{width}}{r['step_ms']:>9.1f}{r['tokens_per_s']:>11,.0f}"
                     f"{r.get('predicted_tokens_per_s', nan):>11,.0f}{r['vs_ddp']:>8.3f}"
                     f"{r['peak_mem_gb']:>9.2f}{r.get('predicted_mem_gb', nan):>9.2f}"
                     f"{r.get('collectives_per_step') or nan:>10.1f}{r['param_mb_per_rank']:>15.2f}"
                     f"{r['final_loss']:>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="steps per strategy (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the means")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole sweep this many times, "
                        "interleaved, and keep each strategy's best mean (less noise)")
    parser.add_argument("--out", default="runs/bench/strategies.json", help="JSON results file")
    parser.add_argument("--fsdp-wrap", action="store_true", help="also run fsdp_full_shard with the whole model as "
                        "one unit and with pairs of blocks as units (a size-based policy), beside one unit per block")
    parser.add_argument("--plot", metavar="PNG", help="also draw tokens/s and peak memory per strategy, measured "
                        "beside planned (needs matplotlib: pip install -e '.[plot]')")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny train.seq_len=256")
    args = parser.parse_args(argv)

    from hpc.config import ConfigError

    common = [f"train.max_steps={args.steps}", f"train.log_every={args.steps}", *args.overrides]
    try:
        cfg = local_config(args.world, common)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        print(f"error: unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    cases = {name: (["PLAIN_DDP", *common] if name == "plain_ddp" else [f"strategy={name}", *common])
             for name in names}
    if args.fsdp_wrap:
        for flag, label in (("WRAP_MODEL", "fsdp_full_shard wrap=model"),
                            ("WRAP_SIZE", "fsdp_full_shard wrap=2blocks")):
            cases[label] = [flag, "strategy=fsdp_full_shard", *common]
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * args.world * cfg.train.seq_len
    out = Path(args.out)
    best: dict[str, dict] = {}
    for round_ in range(args.repeat):
        results = run_cases(args.world, cases, out.parent / "work")
        for row in summarise(results, tokens_per_step=tokens_per_step, warmup=args.warmup):
            if row["strategy"] not in best or row["step_ms"] < best[row["strategy"]]["step_ms"]:
                best[row["strategy"]] = row
    rows = list(best.values())
    ddp = best.get("ddp")
    for row in rows:
        row["vs_ddp"] = row["tokens_per_s"] / ddp["tokens_per_s"] if ddp else float("nan")
    add_plan(rows, {name: ["strategy=ddp", *common] if name == "plain_ddp" else case
                    for name, case in cases.items()}, args.world, tokens_per_step)
    rows.sort(key=lambda r: list(cases).index(r["strategy"]))
    print(f"model {cfg.model.name} ({cfg.model.dim}d x {cfg.model.n_layers}), world {args.world}, "
          f"batch {cfg.train.micro_batch_size}x{cfg.train.seq_len} per rank, {args.steps} steps "
          f"(first {args.warmup} left out), best of {args.repeat}")
    print(format_table(rows))
    if ddp and "plain_ddp" in best:
        print(f"our DDP vs hand-written DDP loop: {ddp['tokens_per_s'] / best['plain_ddp']['tokens_per_s']:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"world": args.world, "steps": args.steps, "warmup": args.warmup,
                               "overrides": args.overrides, "model": cfg.model.name, "rows": rows}, indent=2))
    print(f"wrote {out}")
    if args.plot:
        from hpc.bench.plot import plot_strategies

        title = (f"{cfg.model.name}, world {args.world}, {cfg.train.micro_batch_size}x{cfg.train.seq_len} tokens "
                 f"per rank, {cfg.strategy.mixed_precision}")
        print(f"wrote {plot_strategies(rows, Path(args.plot), title=title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
