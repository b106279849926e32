"""Conversion benchmark: `python -m hpc.bench.convert` prints a table and writes JSON.

The real job (`python -m hpc.submit ... cluster=local`, 2 ranks, CPU, fp32) trains a model whose
weights + AdamW state pass 1.5 GB for one step and saves it twice, once with ZeRO (`--zero`, stage
2 by default) and once with FSDP (DCP format); both sources are cached in `--workdir`, so a rerun
goes straight to the measurements. Each measured command is its own process, watched from here:

  reshard  `tools/ckpt_convert reshard --no-verify`: ZeRO at world 3 (also with --workers 2),
           ZeRO -> fsdp_full_shard at world 4, DCP -> ZeRO-3 at world 3
  export   `tools/ckpt_convert export --to hf --dtype fp32 --no-verify` of the ZeRO source
  verify   `tools/ckpt_convert verify` of the ZeRO source against its world-3 reshard
  copy     copyfile + fsync of every file of a source step, one at a time, on the same disk
  ds_to_universal  DeepSpeed's own converter on the ZeRO source, as it ships (4 extract and 2 merge
           processes; --inject_missing_state, without which it refuses any checkpoint not written
           by Megatron-DeepSpeed), and once more followed by an fsync of what it wrote, since it
           leaves its files to the page cache while ours are durable before their manifest

Columns: GB is what the command wrote (verify: both checkpoints it read); s is the wall clock of
the whole command (interpreter start and imports included; median of --repeat runs), `s in tool`
what our command itself reports; `x copy` its GB/s over the copy's GB/s of the same source
(`x copy in tool`: the same from `s in tool`, without the interpreter's start-up); memory the
most the command and its child processes held together, as the sum of their proportional set
sizes (a page several of them share, such as torch's libraries in every worker, counted once),
and never below the kernel's high-water mark of its largest process's RSS; RSS sum the plain sum
of their resident sets (shared pages once per process), both sampled every 50 ms; peak disk the
most its output folder held (DeepSpeed's temporary files included). Goals (from the issue):
reshard and export >= 0.7x copy, memory <= 2x the largest tensor + 1 GB; the first reshard <= 0.5x
the time of ds_to_universal followed by an fsync (ours are durable when they end; the row without
the fsync is shown beside it). Reads may come from the page cache (dropping it needs root). Our
modules' bytecode is compiled before the first measurement, as an installed package's is.

    python -m hpc.bench.convert --workdir /var/tmp/bench-convert --repeat 3
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpc.bench.harness import REPO
from hpc.bench.sampling import Sample, measure, tree_bytes

# ~134 M parameters: 1.61 GB of fp32 weights + exp_avg + exp_avg_sq; the largest tensor (the
# embedding, 16384 x 1024) is 67 MB. One micro-batch of 32 tokens keeps the step to seconds.
MODEL = ("model.dim=1024", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=8", "model.ffn_dim=4096",
         "model.vocab_size=16384", "model.max_seq_len=64", "train.micro_batch_size=1", "train.seq_len=32")
TINY = ("model=tiny", "train.micro_batch_size=1", "train.seq_len=16")
TRAIN = ("train.max_steps=1", "checkpoint.every_steps=1", "train.log_every=1", "strategy.mixed_precision=fp32")
STEP = "step-1"
TOOL = REPO / "tools" / "ckpt_convert"
GB = 1e9


# ---- sources: the real job, cached ------------------------------------------------------------

def make_source(work: Path, name: str, overrides: Sequence[str], *, timeout_s: float) -> Path:
    """The committed step of a local 2-rank run with `overrides`, reused when an earlier run of the
    same overrides left one (a run whose overrides differ is removed and trained again)."""
    run, stamp = work / "runs" / name, work / "runs" / f"{name}.overrides.json"
    step, settings = run / "checkpoints" / STEP, [*overrides, *TRAIN]  # TRAIN last: a preset may not undo it
    if (step / "manifest.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return step
    shutil.rmtree(run, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HPC_FAULTS"}
    env.update(TMPDIR=str(work / "tmp"), PYTHONPATH=str(REPO))
    # DeepSpeed JIT-builds a CPU comm op once (~35 s); the tests keep it in the same place.
    env.setdefault("TORCH_EXTENSIONS_DIR", "/var/tmp/hpc-torch-extensions")
    argv = [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", "gpus_per_node=2",
            f"run.root={work / 'runs'}", f"run.name={name}",
            f"cluster.scratch_dir={work / 'scratch' / name}/{{job_id}}", *settings]
    print(f"training source {name}: {' '.join(overrides)}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout_s)
    shutil.rmtree(work / "scratch" / name, ignore_errors=True)  # a second copy of the step, never read again
    if proc.returncode != 0 or not (step / "manifest.json").is_file():
        raise RuntimeError(f"the {name} source job failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    stamp.write_text(json.dumps(settings))
    return step


def inspect(step: Path, env: dict[str, str]) -> dict[str, Any]:
    """`tools/ckpt_convert inspect --json` (metadata only), or the error when it cannot read the step."""
    proc = subprocess.run([str(TOOL), "inspect", str(step), "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1000:]}
    # DeepSpeed, once imported, prints its accelerator warning to stdout ahead of the JSON.
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _tool_seconds(log: str) -> float | None:
    """The seconds `reshard --json` (open + convert + commit) or `export` (its one line) report."""
    at = log.find("\n{")
    if at >= 0 or log.startswith("{"):
        try:
            report = json.loads(log[at + 1 if at >= 0 else 0:])
            return round(sum(report["seconds"].values()), 3)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    found = re.search(r"\(Hugging Face Llama, \w+\): [\d.]+ GB in ([\d.]+) s", log)
    return float(found[1]) if found else None


def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder` made durable, as ours are before their manifest."""
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def copy_tree(src: Path, dst: Path) -> None:
    """The plainest code moving a step's bytes: copyfile + fsync per file, one file at a time."""
    for root, _, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(root, name), target / name)
            with open(target / name, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the plan: every operation, then the table ----------------------------------------------------

@dataclass
class Op:
    name: str
    source: str
    """zero | dcp: the source whose copy it is compared with."""
    argv: list[str]
    out: Path | None
    """The folder it writes (removed before and after each run); None: it writes nothing."""
    kind: str
    """reshard | export | copy | verify | ds_to_universal"""
    keep: bool = False
    """Leave the output for a later operation (verify reads the world-3 reshard)."""
    read: list[Path] = field(default_factory=list)
    """For verify: the checkpoints it reads (its GB)."""
    durable: bool = False
    """Its output is on disk when it ends (fsynced), as ours always is: the fair comparison."""


def plan(work: Path, zero: Path, dcp: Path, stage: int) -> list[Op]:
    out, me = work / "out", [sys.executable, "-m", "hpc.bench.convert"]

    def reshard(name: str, source: str, step: Path, folder: str, world: int, strategy: str, *extra: str,
                keep: bool = False) -> Op:
        argv = [str(TOOL), "reshard", str(step), str(out / folder), "--world", str(world), "--strategy", strategy,
                "--no-verify", "--json", *extra]
        return Op(name, source, argv, out / folder, "reshard", keep=keep)

    w3 = out / "reshard-zero-w3" / STEP
    # --inject_missing_state: only Megatron-DeepSpeed writes the universal_checkpoint_info it asks for.
    ds = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(zero),
          "--output_folder", str(out / "ds-universal" / STEP), "--inject_missing_state"]
    then_fsync = f'"$0" "$@" && "$0" -m hpc.bench.convert --fsync {shlex.quote(str(out / "ds-universal"))}'
    return [
        Op("copy zero source", "zero", [*me, "--copy", str(zero), str(out / "copy-zero")], out / "copy-zero", "copy"),
        Op("copy dcp source", "dcp", [*me, "--copy", str(dcp), str(out / "copy-dcp")], out / "copy-dcp", "copy"),
        reshard(f"reshard zero{stage} w2 -> zero{stage} w3", "zero", zero, "reshard-zero-w3", 3, f"zero{stage}",
                keep=True),
        Op(f"verify zero{stage} w2 vs its w3 reshard", "zero", [str(TOOL), "verify", str(zero), str(w3)], None,
           "verify", read=[zero, w3]),
        reshard(f"reshard zero{stage} w2 -> zero{stage} w3 --workers 2", "zero", zero, "reshard-zero-w3-workers2", 3,
                f"zero{stage}", "--workers", "2"),
        reshard(f"reshard zero{stage} w2 -> fsdp_full_shard w4", "zero", zero, "reshard-zero-fsdp-w4", 4,
                "fsdp_full_shard"),
        reshard("reshard fsdp_full_shard w2 -> zero3 w3", "dcp", dcp, "reshard-dcp-zero3-w3", 3, "zero3"),
        Op(f"export zero{stage} -> hf fp32", "zero",
           [str(TOOL), "export", str(zero), str(out / "export-hf"), "--to", "hf", "--dtype", "fp32", "--no-verify"],
           out / "export-hf", "export"),
        # Last: DeepSpeed leaves its files to the page cache's writeback, which must not slow ours.
        Op(f"ds_to_universal zero{stage} (DeepSpeed)", "zero", ds, out / "ds-universal", "ds_to_universal"),
        # Ours fsync every file before the manifest says it exists; DeepSpeed does not. The same run
        # followed by an fsync of what it wrote compares like with like.
        Op(f"ds_to_universal zero{stage}, then fsync", "zero", ["sh", "-c", then_fsync, *ds], out / "ds-universal",
           "ds_to_universal", durable=True),
    ]


def run_all(ops: list[Op], out: Path, *, env: dict[str, str], logs: Path, repeat: int,
            timeout_s: float) -> dict[str, list[Sample]]:
    """Every operation once per round, `repeat` rounds: a slow spell of a shared machine then
    lands on all of them rather than on one operation's every run. A failed one is not retried."""
    samples: dict[str, list[Sample]] = {op.name: [] for op in ops}
    for i in range(repeat):
        for op in ops:
            if samples[op.name] and samples[op.name][-1].rc != 0:
                continue
            if op.out is not None:
                shutil.rmtree(op.out, ignore_errors=True)
            slug = "".join(c if c.isalnum() else "-" for c in op.name)
            sample = measure(op.argv, env=env, log=logs / f"{slug}-{i}.log", watch=op.out, timeout_s=timeout_s,
                             cwd=REPO, read_seconds=_tool_seconds)
            samples[op.name].append(sample)
            print(f"  {op.name}: {sample.seconds:.2f} s, memory {sample.peak_pss / GB:.2f} GB"
                  + ("" if sample.rc == 0 else f", FAILED (exit {sample.rc}): {sample.log[-400:]}"), flush=True)
            if op.out is not None and not op.keep:
                shutil.rmtree(op.out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)  # what was kept for a later operation of the round
    return samples


def summarise(ops: list[Op], samples: dict[str, list[Sample]], sources: dict[str, dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """One row per operation: bytes, median seconds, GB/s, ratio to the copy, peak RSS, goals."""
    rows: list[dict[str, Any]] = []
    for op in ops:
        runs, src = samples[op.name], sources[op.source]
        ok = bool(runs) and all(s.rc == 0 for s in runs)
        seconds = statistics.median(s.seconds for s in runs) if runs else None
        tool = [s.tool_seconds for s in runs if s.tool_seconds is not None]
        nbytes = sum(map(tree_bytes, op.read)) if op.read else runs[-1].out_bytes if runs else 0
        largest = src.get("largest_tensor")
        rows.append({"operation": op.name, "kind": op.kind, "source": op.source, "ok": ok, "bytes": nbytes,
                     "seconds": seconds, "seconds_in_tool": statistics.median(tool) if tool else None,
                     "gb_per_s": nbytes / GB / seconds if ok and seconds else None,
                     "gb_per_s_in_tool": nbytes / GB / statistics.median(tool) if ok and tool else None,
                     "peak_rss_gb": max((s.peak_rss for s in runs), default=0) / GB,
                     "peak_anon_gb": max((s.peak_anon for s in runs), default=0) / GB,
                     "peak_pss_gb": max((s.peak_pss for s in runs), default=0) / GB,
                     "largest_process_rss_gb": max((s.largest_process_rss for s in runs), default=0) / GB,
                     "peak_disk_gb": max((s.peak_tree_bytes for s in runs), default=0) / GB,
                     "largest_tensor_gb": largest / GB if largest else None, "checkpoint_gb": src["bytes"] / GB,
                     "error": None if ok else runs[-1].log[-1500:] if runs else "not run", "goals": []})
    copies = {r["source"]: r for r in rows if r["kind"] == "copy"}
    ours = next((r for r in rows if r["kind"] == "reshard" and r["source"] == "zero"), None)
    durable = {op.name: op.durable for op in ops}
    for row in rows:
        copy = copies.get(row["source"])
        row["x_copy"] = row["gb_per_s"] / copy["gb_per_s"] if row["gb_per_s"] and copy and copy["gb_per_s"] else None
        # The same without our start-up (interpreter, torch import): the conversion's own throughput.
        row["x_copy_in_tool"] = row["gb_per_s_in_tool"] / copy["gb_per_s"] \
            if row["gb_per_s_in_tool"] and copy and copy["gb_per_s"] else None
        if row["kind"] in ("reshard", "export"):
            row["goals"].append(_goal("x copy", row["x_copy"], ">=", 0.7))
            if row["largest_tensor_gb"] is not None:
                bound = round(2 * row["largest_tensor_gb"] + 1, 2)
                row["goals"].append(_goal("memory GB", row["peak_pss_gb"], "<=", bound))
        if row["kind"] == "ds_to_universal" and ours is not None:
            ratio = ours["seconds"] / row["seconds"] if ours["ok"] and row["ok"] and row["seconds"] else None
            row["ours"], row["our_time_over_its"] = ours["operation"], ratio
            if durable[row["operation"]]:  # like with like: both outputs on disk when the command ends
                row["goals"].append(_goal("our time / its", ratio, "<=", 0.5))
        met = [g["met"] for g in row["goals"]]
        row["met"] = None if not met else all(m is True for m in met)
    return rows


def _goal(what: str, value: float | None, op: str, bound: float) -> dict[str, Any]:
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"goal": what, "value": value, "op": op, "bound": bound, "met": met}


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(x: Any, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    head = ("operation", "GB", "s", "s in tool", "GB/s", "x copy", "x copy in tool", "memory GB", "RSS sum GB",
            "peak disk GB", "largest GB", "ckpt GB", "goals", "met")
    body = []
    for r in rows:
        goals = "; ".join(f"{g['goal']} {num(g['value'])} {g['op']} {g['bound']:g}" for g in r["goals"])
        if not r["goals"] and r.get("our_time_over_its") is not None:
            goals = f"(our time / its {num(r['our_time_over_its'])}: its files not yet on disk)"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]] if r["ok"] else "FAILED"
        body.append((r["operation"], num(r["bytes"] / GB, 3), num(r["seconds"], 1), num(r["seconds_in_tool"], 1),
                     num(r["gb_per_s"], 3), num(r["x_copy"]), num(r["x_copy_in_tool"]), num(r["peak_pss_gb"]),
                     num(r["peak_rss_gb"]), num(r["peak_disk_gb"]),
                     num(r["largest_tensor_gb"], 3), num(r["checkpoint_gb"], 3), goals, met))
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    left = (0, len(head) - 2)

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc.bench.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="sources, outputs and logs (default: $TMPDIR/hpc-bench-convert; "
                                          "the sources are kept there for the next run)")
    parser.add_argument("--out", help="JSON results file (default: bench-convert.json in the workdir)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per operation (default 1); medians are reported")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage of the ZeRO source")
    parser.add_argument("--tiny", action="store_true", help="a model of a few MB (seconds): checks the plumbing")
    parser.add_argument("--layers", type=int, default=6,
                        help="transformer blocks of the model (default 6: 2.1 GB of ZeRO-2 checkpoint; each block "
                             "adds ~0.27 GB): a larger checkpoint shows throughput with the fixed start-up "
                             "(interpreter, imports) weighing less; use another --workdir per size")
    parser.add_argument("--clean", action="store_true", help="remove the workdir at the end (JSON aside)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per command")
    parser.add_argument("--copy", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--fsync", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.copy:  # the plain-copy baseline, as a process of its own like every measured command
        copy_tree(Path(args.copy[0]), Path(args.copy[1]))
        return 0
    if args.fsync:
        fsync_tree(Path(args.fsync))
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    work = Path(args.workdir or Path(tempfile.gettempdir()) / "hpc-bench-convert").resolve()
    for sub in ("tmp", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "out", ignore_errors=True)  # outputs of an interrupted run
    started = time.perf_counter()
    model = TINY if args.tiny else (*MODEL, f"model.n_layers={args.layers}")
    jobs = {"zero": (f"zero{args.zero}", [*model, f"strategy=zero{args.zero}"]),
            "dcp": ("fsdp_full_shard", [*model, "strategy=fsdp_full_shard"])}
    # Tiny sources train side by side (their time is all start-up); big ones one at a time, as
    # two 2-rank jobs of a 1.6 GB state together would need ~10 GB of memory.
    with ThreadPoolExecutor(2 if args.tiny else 1) as pool:
        made = {key: pool.submit(make_source, work, name, overrides, timeout_s=args.timeout)
                for key, (name, overrides) in jobs.items()}
        zero, dcp = made["zero"].result(), made["dcp"].result()
    env = dict(os.environ, TMPDIR=str(work / "tmp"), PYTHONPATH=str(REPO), PYTHON=sys.executable)
    sources: dict[str, dict[str, Any]] = {}
    for key, step in (("zero", zero), ("dcp", dcp)):
        info = inspect(step, env)
        largest = info.get("largest_tensor")
        sources[key] = {"path": str(step), "bytes": tree_bytes(step), "inspect": info,
                        "largest_tensor": largest[1] if largest else None}
        print(f"source {key}: {step}, {sources[key]['bytes'] / GB:.3f} GB"
              + (f", largest tensor {largest[0]} {largest[1] / GB:.3f} GB" if largest else
                 f" (inspect failed: {info.get('error', '')[-300:]})"), flush=True)

    # PYTHONDONTWRITEBYTECODE (set on some machines) would have every measured command compile our
    # modules again: an installed package's bytecode is compiled once, at install.
    compileall.compile_dir(str(REPO / "hpc"), quiet=1)
    ops = plan(work, zero, dcp, args.zero)
    samples = run_all(ops, work / "out", env=env, logs=work / "logs", repeat=args.repeat, timeout_s=args.timeout)
    rows = summarise(ops, samples, sources)
    seconds = time.perf_counter() - started
    print(f"sources: ZeRO-{args.zero} {sources['zero']['bytes'] / GB:.3f} GB and DCP {sources['dcp']['bytes'] / GB:.3f}"
          f" GB (2 ranks, fp32 weights + AdamW, one step); {args.repeat} run(s) per operation; workdir {work}")
    print(format_table(rows))
    print("GB: written (verify: read); s: wall clock, median; s in tool: what ours reports (no start-up); memory: PSS "
          "with child processes; our time / its: the first reshard's over DeepSpeed's (python -m hpc.bench.convert "
          "--help says more)")
    out = Path(args.out) if args.out else work / "bench-convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"zero_stage": args.zero, "tiny": args.tiny, "repeat": args.repeat,
                               "model": list(model), "sources": sources, "rows": rows,
                               "samples": {k: [asdict(s) for s in v] for k, v in samples.items()},
                               "seconds": seconds}, indent=1, default=str))
    print(f"wrote {out} in {seconds:.0f} s")
    if args.clean:
        for path in work.iterdir():
            if path != out.resolve():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not any(work.iterdir()):
            work.rmdir()
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
