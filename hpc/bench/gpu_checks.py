"""The GPU smoke test's checks that run inside local ranks (hpc.bench.gpu_check runs every check, prints
the table and writes JSON; the checks that run the job itself are in hpc.bench.gpu_check_jobs).

    devices     what each rank sees: CUDA_VISIBLE_DEVICES, device count, the GPU the rendezvous picks, CPU affinity
    nccl_gloo   the job's join (NCCL with device_id: eager init) and an all-reduce; a gloo group beside it,
                its all-reduce and the address it connected over
    parity      step-1 loss of each strategy, one process group building each engine in turn
    memory_7b   one DDP step of configs/model/llama2_7b.yaml: the allocator's peaks

The ranks start through the benchmarks' launcher (harness.run_ranks: rank environment, a log per rank,
a timeout, every rank's log tail on failure) and call what a job calls (rendezvous, engines, the loop);
nothing here trains or joins a group by its own means. Expected times are for one H200 (one rank).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpc.bench.harness import join_local, local_config, run_ranks
from hpc.bench.strategies import STRATEGIES, planned_peak_bytes, run_cases
from hpc.launch.network import interface_addresses

PARITY_STRATEGIES = ("ddp", "fsdp_full_shard", "zero2", "zero3")
PARITY_CHOICES = tuple(s for s in STRATEGIES if s != "plain_ddp")
PARITY_TOLERANCE = {"bf16": 1e-3, "fp32": 1e-5}
"""Largest relative step-1 loss difference between strategies. bf16 engines cast at different places
(autocast per op for DDP, bf16 parameters for FSDP2 and DeepSpeed), yet the mean over every token of
the batch agrees far closer than one bf16 ulp (4e-3; 4e-6 on CPU). Kept tight because an untrained
model's loss is near ln(vocab) whatever its weights: all-zero weights would be only 4e-3 off."""
MEMORY_RUN = ("model=llama2_7b", "strategy=ddp", "strategy.mixed_precision=bf16",
              "strategy.activation_checkpointing=all", "train.micro_batch_size=1", "train.grad_accum=1",
              "train.seq_len=4096", "train.max_steps=2", "train.log_every=1")
"""A 7B DDP run's per-GPU settings (bf16 autocast over fp32 weights, activation checkpointing, 1 x 4096 tokens);
the second step is the first with AdamW's state allocated."""
BYTES_PER_PARAM = 20
"""fp32 weight, gradient (DDP's bucket view), AdamW's two moments, and foreach AdamW's one full-size temporary."""
HEADROOM = 6 << 30
"""Activations of 4096 tokens with checkpointing, logits, allocator slack."""


# ---- what a check is given and returns ---------------------------------------------------------

class Skipped(Exception):
    """A check that cannot run here; the message says why (reported as 'skipped', not a failure)."""


@dataclass(frozen=True)
class Finding:
    """What a check measured: its one-line value for the table, whether it passed, and the details."""

    ok: bool
    value: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What every check is given: where it runs and on what."""

    cuda: bool
    """GPU mode (nccl, one rank per GPU) rather than CPU/gloo mode."""
    world: int
    """Ranks to start."""
    work: Path
    """Scratch folder; each check uses its own subfolder."""
    strategies: tuple[str, ...]
    """Strategies the parity check compares."""
    precision: str = "bf16"
    """Compute dtype of every training check (the shipped large experiments train in bf16)."""

    @property
    def overrides(self) -> list[str]:
        """Config overrides every launch adds to the local presets."""
        return ["cluster.accelerator=cuda"] if self.cuda else []


@dataclass(frozen=True)
class Check:
    """One row of the table."""

    name: str
    run: Callable[[Context, float], Finding]
    """run(context, timeout_s) -> Finding; raises Skipped, or anything else for FAILED."""
    timeout_s: float


# ---- devices: what each rank sees, no collectives ---------------------------------------------

def check_devices(ctx: Context, timeout_s: float) -> Finding:
    # ~10 s: process start, torch import, one CUDA context per rank; the ranks meet on a bare TCPStore,
    # so this row is there even when NCCL is broken.
    ranks = run_ranks(ctx.world, _devices_in_rank, {"overrides": ctx.overrides}, ctx.work / "devices",
                      timeout_s=timeout_s)
    problems = [f"rank {r['rank']}: {r['error']}" for r in ranks if r.get("error")]
    if ctx.cuda:
        uuids = [r.get("uuid") for r in ranks]
        if len(set(uuids)) < len(uuids):
            problems.append(f"ranks share a GPU: {[r.get('device') for r in ranks]} -> {uuids}")
    if any(r["ncpus"] < 1 for r in ranks):
        problems.append("a rank may run on no CPU")

    def same(key: str) -> str:
        values = [str(r.get(key)) for r in ranks]
        return values[0] if len(set(values)) == 1 else "/".join(values)

    value = (f"{len(ranks)} rank(s) on {same('device')}{' (' + same('gpu') + ')' if ctx.cuda else ''}; "
             f"CUDA_VISIBLE_DEVICES={same('CUDA_VISIBLE_DEVICES')}, device_count={same('device_count')}; "
             f"affinity {same('ncpus')} CPU(s) ({same('cpus')})"
             + (f"; GPU-local CPUs {same('gpu_local_cpus')}" if ctx.cuda else ""))
    return Finding(not problems, "; ".join(problems) or value, {"ranks": ranks})


def _cpu_list(cpus: set[int]) -> str:
    """{0,1,2,5} -> '0-2,5'."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def _devices_in_rank(spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    import torch
    import torch.distributed as dist

    from hpc.launch.environment import detect
    from hpc.launch.rendezvous import plan_rendezvous

    env = detect()
    cfg = local_config(env.world_size, spec["overrides"])
    count = torch.cuda.device_count()
    cpus = os.sched_getaffinity(0)
    me: dict[str, Any] = {"rank": env.rank, "local_rank": env.local_rank, "device_count": count,
                          "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
                          "ncpus": len(cpus), "cpus": _cpu_list(cpus)}
    try:
        rdzv = plan_rendezvous(env, cfg, cuda_devices=count if cfg.cluster.accelerator == "cuda" else 0)
        me["device"] = rdzv.device
        if rdzv.device.startswith("cuda"):
            device = torch.device(rdzv.device)
            torch.cuda.set_device(device)
            torch.ones(1, device=device)  # a context on the picked GPU, as training makes
            props = torch.cuda.get_device_properties(device)
            me.update(current=torch.cuda.current_device(), gpu=props.name, uuid=str(props.uuid),
                      memory_gib=round(props.total_memory / 2**30, 1))
            bus = (getattr(props, "pci_domain_id", 0), getattr(props, "pci_bus_id", None),
                   getattr(props, "pci_device_id", 0))
            if bus[1] is not None:  # the CPUs on the GPU's own NUMA node, when the kernel says
                local = Path(f"/sys/bus/pci/devices/{bus[0]:04x}:{bus[1]:02x}:{bus[2]:02x}.0/local_cpulist")
                me["gpu_local_cpus"] = local.read_text().strip() if local.exists() else "unknown"
    except Exception as err:  # noqa: BLE001 - reported in the row, with the other ranks' views
        me["error"] = f"{type(err).__name__}: {err}"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=env.rank == 0, timeout=timedelta(seconds=120), wait_for_workers=False)
    store.set(f"devices/{env.rank}", json.dumps(me))
    if env.rank != 0:
        return None
    return [json.loads(store.get(f"devices/{r}")) for r in range(env.world_size)]


# ---- nccl_gloo: the default group (NCCL, eager) and a gloo group beside it ---------------------

def check_nccl_gloo(ctx: Context, timeout_s: float) -> Finding:
    # ~15 s: process start, NCCL's eager communicator, a gloo group; world 1 has no peer traffic.
    ranks = run_ranks(ctx.world, _groups_in_rank, {"overrides": ctx.overrides}, ctx.work / "nccl_gloo",
                      timeout_s=timeout_s)
    want = ctx.world * (ctx.world + 1) / 2
    r0, problems = ranks[0], []
    for r in ranks:
        if r["default_sum"] != want or r["gloo_sum"] != want:
            problems.append(f"rank {r['rank']}: all-reduce sums {r['default_sum']:g} ({r['backend']}) and "
                            f"{r['gloo_sum']:g} (gloo), expected {want:g}")
        if ctx.cuda and r["bound_device"] in (None, "None"):
            problems.append(f"rank {r['rank']}: NCCL not initialised eagerly (no device_id bound to the group)")
        # Only a named interface is a promise (None leaves gloo to resolve the host name itself).
        seen = {ifname for _, ifname in r["gloo_connections"]}
        if r["planned_gloo_ifname"] and seen and seen != {r["planned_gloo_ifname"]}:
            problems.append(f"rank {r['rank']}: gloo connected over {sorted(seen)}, the rendezvous chose "
                            f"{r['planned_gloo_ifname']} ({r['planned_gloo_addr']})")
    via = ", ".join(sorted({f"{ip} ({ifname})" for r in ranks for ip, ifname in r["gloo_connections"]})) or \
        f"no peer connection (world {ctx.world}: NCCL needs a GPU per rank, so no 2-rank traffic here); " \
        f"host resolves to {r0['host_address']}"
    eager = f", eager on {r0['bound_device']}" if ctx.cuda else " (cpu mode: no NCCL)"
    value = (f"{r0['backend']} init {max(r['init_s'] for r in ranks):.1f} s{eager}, "
             f"all-reduce {r0['default_sum']:g}=={want:g} "
             f"in {max(r['allreduce_ms'] for r in ranks):.1f} ms; gloo group all-reduce {r0['gloo_sum']:g}=={want:g} "
             f"via {via}; the rendezvous chose {r0['planned_gloo_ifname'] or 'default'} ({r0['planned_gloo_addr']}); "
             f"GLOO_SOCKET_IFNAME={r0['GLOO_SOCKET_IFNAME']}, NCCL_SOCKET_IFNAME={r0['NCCL_SOCKET_IFNAME']}")
    return Finding(not problems, "; ".join(problems) or value, {"ranks": ranks})


def _tcp_pairs() -> set[tuple[str, int, str, int]]:
    import psutil

    proc = psutil.Process()
    conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
    return {(c.laddr.ip, c.laddr.port, c.raddr.ip, c.raddr.port) for c in conns if c.raddr}


def _ifname_of(ip: str) -> str:
    return next((name for name, addrs in interface_addresses().items() if ip in addrs), "?")


def _groups_in_rank(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from hpc.launch.environment import detect
    from hpc.launch.rendezvous import ipv4_addresses, join

    env = detect()
    cfg = local_config(env.world_size, spec["overrides"])
    started = time.perf_counter()
    # The job's own join: plan, export, init_process_group (with device_id on NCCL: eager init).
    rdzv = join(env, cfg, local_world_size=env.world_size, rendezvous_timeout_s=120, collective_timeout_s=120)
    init_s = time.perf_counter() - started
    bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", "unknown")
    value = torch.tensor([float(env.rank + 1)], device=rdzv.device)
    started = time.perf_counter()
    dist.all_reduce(value)
    if rdzv.device.startswith("cuda"):
        torch.cuda.synchronize()
    allreduce_ms = (time.perf_counter() - started) * 1e3
    before = _tcp_pairs()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=120))  # as the checkpointer makes its own
    cpu_value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(cpu_value, group=group)
    # gloo connects every pair when the group is made: the new connections (the store's excepted) are gloo's.
    mine = sorted({laddr for laddr, _, _, rport in _tcp_pairs() - before if rport != rdzv.master_port})
    host = socket.gethostname()
    me = {"rank": env.rank, "backend": dist.get_backend(), "device": rdzv.device, "bound_device": str(bound),
          "init_s": round(init_s, 2), "allreduce_ms": round(allreduce_ms, 2), "default_sum": float(value.item()),
          "gloo_sum": float(cpu_value.item()), "gloo_connections": [(ip, _ifname_of(ip)) for ip in mine],
          "planned_gloo_ifname": rdzv.gloo_ifname, "planned_gloo_addr": rdzv.gloo_addr,
          "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "unset"),
          "NCCL_SOCKET_IFNAME": os.environ.get("NCCL_SOCKET_IFNAME", "unset"),
          "host_address": f"{host} -> {','.join(ipv4_addresses(host)) or '?'}"}
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, me, group=group)
    return everyone


# ---- parity: step-1 loss across strategies -----------------------------------------------------

def check_parity(ctx: Context, timeout_s: float) -> Finding:
    # ~60 s: one process group builds each engine in turn (DeepSpeed's import and engine set-up dominate),
    # two steps each on the tiny model; ZeRO runs at world 1 too.
    common = [f"strategy.mixed_precision={ctx.precision}", "train.max_steps=2", "train.log_every=1", *ctx.overrides]
    results = run_cases(ctx.world, {name: [f"strategy={name}", *common] for name in ctx.strategies},
                        ctx.work / "parity", timeout_s=timeout_s)
    first = {name: res["losses"][0] for name, res in results.items()}
    second = {name: res["losses"][1] for name, res in results.items()}

    def spread(losses: dict[str, float]) -> float:
        ref = losses[ctx.strategies[0]]
        return max(abs(v - ref) / abs(ref) for v in losses.values())

    tolerance = PARITY_TOLERANCE[ctx.precision]
    value = (f"{ctx.precision}, world {ctx.world}, step-1 loss " + ", ".join(f"{n} {v:.5f}" for n, v in first.items())
             + f": max rel diff {spread(first):.1e} (tolerance {tolerance:.0e}); step 2: {spread(second):.1e}")
    return Finding(spread(first) <= tolerance, value, {"step1": first, "step2": second, "tolerance": tolerance,
                                                       "results": results})


# ---- throughput: each strategy on a ~1B Llama, against the plan --------------------------------

THROUGHPUT_STRATEGIES = ("ddp", "fsdp_full_shard", "fsdp_shard_grad_op", "zero2", "zero3")
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 TFLOP/s by GPU name (for MFU); another GPU gets no MFU."""


def peak_tflops(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)


def check_throughput(ctx: Context, timeout_s: float) -> Finding:
    # ~150 s on one H200: one process group builds each engine in turn on configs/model/llama_1b.yaml
    # (1.1 B parameters), 6 steps of 2 x 2048 tokens in bf16; on CPU the tiny model.
    import torch

    model = ["model=llama_1b", "train.micro_batch_size=2", "train.seq_len=2048"] if ctx.cuda else \
        ["model=tiny", "train.seq_len=64"]
    steps = 6 if ctx.cuda else 3
    peak = peak_tflops(torch.cuda.get_device_name(0)) if ctx.cuda else None
    common = [*model, f"strategy.mixed_precision={ctx.precision}", f"train.max_steps={steps}",
              f"train.log_every={steps}", *ctx.overrides, *([f"cluster.peak_tflops={peak}"] if peak else [])]
    cases = {name: [f"strategy={name}", *common] for name in THROUGHPUT_STRATEGIES}
    results = run_cases(ctx.world, cases, ctx.work / "throughput", timeout_s=timeout_s)
    rows = {}
    for name, res in results.items():
        cfg = local_config(ctx.world, cases[name])
        summary = res.get("summary", {})
        rows[name] = {"tokens_per_s": summary.get("tokens_per_s"), "mfu": summary.get("mfu") if peak else None,
                      "peak_gib": summary.get("peak_mem_gb"), "planned_gib": planned_peak_bytes(cfg) / 2**30}
    # The plan must not be under the measured peak by more than 10% (it adds no allocator slack).
    off = {n: r["peak_gib"] / r["planned_gib"] - 1 for n, r in rows.items() if r["peak_gib"] and ctx.cuda}
    value = "; ".join(f"{n} {r['tokens_per_s'] or 0:,.0f} tok/s"
                      + (f" MFU {r['mfu']:.0%}" if r["mfu"] else "")
                      + f" peak {r['peak_gib'] or 0:.2f} GiB (plan {r['planned_gib']:.2f})" for n, r in rows.items())
    return Finding(all(abs(e) <= 0.10 for e in off.values()),
                   f"{model[0]}, {ctx.precision}, world {ctx.world}: {value}", {"rows": rows, "peak_vs_plan": off})


# ---- memory_7b: one DDP step of the 7B preset ----------------------------------------------------

def fitting_layers(model: Any, total_bytes: int) -> int:
    """How many of the model's layers a DDP replica with AdamW fits in `total_bytes` (an estimate)."""
    from hpc.estimate.shape import count_params

    one, two = (count_params(dataclasses.replace(model, n_layers=n)) for n in (1, 2))
    per_layer, fixed = two - one, 2 * one - two  # embeddings, output, final norm
    layers = (total_bytes - HEADROOM - fixed * BYTES_PER_PARAM) // (per_layer * BYTES_PER_PARAM)
    return int(max(0, min(model.n_layers, layers)))


def check_memory_7b(ctx: Context, timeout_s: float) -> Finding:
    # ~60-90 s: 27 GB of fp32 weights built and initialised on the GPU, two steps of 4096 tokens, process start;
    # when the estimate fits but the GPU runs out anyway, once more at 3/4 of the layers.
    if not ctx.cuda:
        raise Skipped("needs a GPU: a 7B fp32 DDP replica with AdamW is ~108 GB per GPU")
    deadline = time.monotonic() + timeout_s
    spec = {"overrides": [*MEMORY_RUN, *ctx.overrides], "layers": None}
    attempts = [run_ranks(ctx.world, _memory_in_rank, spec, ctx.work / "memory_7b", timeout_s=timeout_s)]
    if attempts[0].get("oom") and deadline - time.monotonic() > 60 and attempts[0]["layers"] > 4:
        spec["layers"] = attempts[0]["layers"] * 3 // 4
        attempts.append(run_ranks(ctx.world, _memory_in_rank, spec, ctx.work / "memory_7b",
                                  timeout_s=deadline - time.monotonic()))
    res = attempts[-1]
    if res["layers"] < 1:
        raise Skipped(f"{res['total_gib']:.0f} GiB per GPU holds no layer of the 7B model with DDP + AdamW")
    shape = f"llama2_7b, {res['layers']} of {res['full_layers']} layers ({res['params'] / 1e9:.2f} B params)"
    if res["layers"] != res["full_layers"]:
        first = attempts[0]
        why = [f"the full model needs ~{res['estimate_full_gib']:.0f} GiB by estimate"] * (
            first["layers"] < res["full_layers"])
        why += [f"{first['layers']} layers ran out at {first['reserved_gib']:.1f} GiB reserved"] * (len(attempts) > 1)
        shape += f" REDUCED ({'; '.join(why)})"
    if res.get("oom"):
        return Finding(False, f"{shape}: out of memory at {res['reserved_gib']:.1f} GiB reserved of "
                       f"{res['total_gib']:.1f} GiB", {"attempts": attempts})
    value = (f"{shape}, DDP bf16 autocast + AC, 1x4096 tokens, {ctx.world} rank(s): max reserved "
             f"{res['reserved_gib']:.1f} GiB, allocated {res['allocated_gib']:.1f} GiB (planned "
             f"{res.get('planned_gib', float('nan')):.1f}) of {res['total_gib']:.1f} GiB; "
             f"step {res['step_times'][-1]:.2f} s, loss {res['losses'][0]:.3f}")
    return Finding(True, value, {"attempts": attempts})


def _memory_in_rank(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from hpc.estimate.shape import count_params
    from hpc.train.loop import train
    from hpc.train.strategies import build_engine

    cfg, world = join_local(spec["overrides"])
    total = torch.cuda.get_device_properties(world.device).total_memory
    full = cfg.model.n_layers
    layers = spec["layers"] if spec["layers"] is not None else fitting_layers(cfg.model, total)
    me: dict[str, Any] = {"layers": layers, "full_layers": full, "total_gib": total / 2**30,
                          "estimate_full_gib": (count_params(cfg.model) * BYTES_PER_PARAM + HEADROOM) / 2**30}
    if layers < 1:
        return me
    if layers != full:
        cfg = local_config(world.world_size, [*spec["overrides"], f"model.n_layers={layers}"])
    me["params"] = count_params(cfg.model)
    me["planned_gib"] = planned_peak_bytes(cfg) / 2**30
    torch.cuda.reset_peak_memory_stats(world.device)
    try:
        outcome = train(cfg, world, engine=build_engine(cfg, world))
        me.update(losses=outcome.losses, step_times=outcome.step_times)
    except torch.cuda.OutOfMemoryError as err:
        me["oom"] = str(err).splitlines()[0][:300]
    me.update(reserved_gib=torch.cuda.max_memory_reserved(world.device) / 2**30,
              allocated_gib=torch.cuda.max_memory_allocated(world.device) / 2**30)
    gc.collect()  # after an OOM: free the half-built step, so the gather below finds memory
    torch.cuda.empty_cache()
    everyone: list[Any] = [None] * world.world_size
    dist.all_gather_object(everyone, me)
    worst = max(everyone, key=lambda r: r["reserved_gib"])
    return {**worst, "oom": next((r["oom"] for r in everyone if r.get("oom")), None), "ranks": everyone}
