"""`tools/ckpt_convert` (= `python -m hpc.checkpoint.convert`): inspect, reshard, export, import, verify.

Every error is one line naming the problem and the fix (exit 2); nothing is ever written into a
source, and an output is committed (manifest last) only once all of it is written and verified.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  tools/ckpt_convert inspect runs/R/checkpoints/step-400
  tools/ckpt_convert reshard runs/R/checkpoints/step-400 runs/R2/checkpoints --world 8
  tools/ckpt_convert reshard runs/R/checkpoints/step-400 /lustre/R-fsdp/checkpoints --world 16 --strategy fsdp_full_shard
  tools/ckpt_convert export runs/R/checkpoints/step-400 hf/R-400 --to hf --dtype bf16
  tools/ckpt_convert import hf/Llama-3-8B runs/R3/checkpoints --world 8 --strategy zero3 --model llama3_8b
  tools/ckpt_convert verify runs/R/checkpoints/step-400 runs/R2/checkpoints/step-400
A step is a step-N folder or an fsspec URL of one; OUT is a step-N folder or the checkpoint folder
to write step-N into. A job resumes a converted step with checkpoint.dir=<that checkpoint folder>.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/ckpt_convert", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reshard a checkpoint to any world size and strategy, export it to Hugging Face "
                    "or import from it, compare two checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="what a step holds, from metadata only")
    p.add_argument("step")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("reshard", help="a committed step for N ranks and a strategy")
    p.add_argument("step")
    p.add_argument("out")
    p.add_argument("--world", type=int, required=True, help="ranks of the job that will load it")
    p.add_argument("--strategy", help="a configs/strategy/ preset (default: the source's)")
    _common(p)

    p = sub.add_parser("export", help="a Hugging Face Llama folder (safetensors)")
    p.add_argument("step")
    p.add_argument("out")
    p.add_argument("--to", choices=["hf"], default="hf")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    _common(p, workers=False)

    p = sub.add_parser("import", help="a Hugging Face Llama folder as a committed step 0")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--strategy", required=True, help="a configs/strategy/ preset")
    p.add_argument("--model", help="a configs/model/ preset the weights must match (default: "
                                   "the shape in the folder's config.json)")
    p.add_argument("--exp", default="tiny_cpu", help="the experiment preset recorded with the step")
    _common(p)

    p = sub.add_parser("verify", help="compare every tensor of two checkpoints (any formats)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    return parser


def _common(p: argparse.ArgumentParser, *, workers: bool = True) -> None:
    if workers:
        p.add_argument("--workers", type=int, default=1, help="processes that split the tensors")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy.* override of the target, e.g. strategy.mixed_precision=bf16")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the output with the source")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tmp-dir", help="local folder for downloads of object-store steps (default: $TMPDIR)")


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        emit(json.dumps(report.to_dict(), indent=1, default=str))
        return
    gb = report.bytes / 1e9
    total = sum(v for k, v in report.seconds.items() if k != "verify")
    emit(f"{report.source} -> {report.output}")
    emit(f"  step {report.step} for {report.target}: {report.tensors} tensors, {gb:.3f} GB, {report.files} "
          f"files in {total:.2f} s ({gb / max(report.seconds.get('convert', total), 1e-9):.2f} GB/s converting)")
    for note in report.notes:
        emit(f"  note: {note}")
    if report.verified is not None:
        kinds = report.verified["kinds"]
        checked = ", ".join(f"{k} {v['equal']}/{v['tensors']} bitwise equal" for k, v in kinds.items())
        emit(f"  verified against the source in {report.seconds.get('verify', 0):.2f} s: {checked}"
              + "".join(f"; not compared: {s}" for s in report.verified["skipped"]))


def main(argv: Sequence[str] | None = None) -> int:
    from hpc.files import deny_world_write

    deny_world_write()  # a converted step is read by later jobs: nobody else may write into it
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from hpc.checkpoint.manifest import CheckpointError
    from hpc.config import ConfigError

    _OUTPUT.clear()
    try:
        # Only the command's own output goes to stdout: libraries (DeepSpeed) print lines of their
        # own to stdout on import, which would break --json.
        with contextlib.redirect_stdout(sys.stderr):
            code = COMMANDS[args.command](args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for text in _OUTPUT:
        print(text)
    return code


_OUTPUT: list[str] = []


def emit(text: str) -> None:
    """A line of the command's output (printed to stdout once the command is done)."""
    _OUTPUT.append(text)


def _inspect(args: argparse.Namespace) -> int:
    from hpc.checkpoint.convert.inspect import format_inspect, inspect_step

    info = inspect_step(args.step)
    emit(json.dumps(info, indent=1, default=str) if args.json else format_inspect(info))
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from hpc.checkpoint.convert.pipeline import reshard

    report = reshard(args.step, args.out, world=args.world, strategy=args.strategy, overrides=args.set,
                     workers=args.workers, force=args.force, verify=args.verify, tmp_dir=args.tmp_dir)
    _print_report(report, args.json)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from hpc.checkpoint.convert.verify import verify

    result = verify(args.a, args.b, atol=args.atol, rtol=args.rtol)
    emit(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0 if result.ok else 1


def _export(args: argparse.Namespace) -> int:
    import torch

    from hpc.checkpoint.convert.hf import export_hf
    from hpc.checkpoint.convert.pipeline import open_reader
    from hpc.checkpoint.convert.steps import open_source, refuse_unverified, verify_source_async
    from hpc.checkpoint.manifest import CheckpointError
    from hpc.config.compose import from_yaml

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise CheckpointError(f"{out} already exists. HINT: pick another output, or pass --force to replace it")
        shutil.rmtree(out)
    started = time.perf_counter()
    # The source's checksums are checked while it is exported (an export reads a part of it: the
    # model's weights); the export is removed unless they match.
    source = open_source(args.step, tmp_dir=args.tmp_dir, verify=False)
    checking = verify_source_async(source)
    try:
        if not source.state.config_yaml:
            raise CheckpointError(f"{args.step} has no config.yaml: the model's shape is unknown")
        model_cfg = from_yaml(source.state.config_yaml).model
        reader = open_reader(source.format, source.folder, source.state)
        try:
            try:
                export_hf(reader, out, model_cfg, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                          max_shard_bytes=int(args.max_shard_gb * 1e9))
            except Exception:
                refuse_unverified(args.step, checking.result())  # a corrupt file is best named by its checksum
                raise
            refuse_unverified(args.step, checking.result())
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # a half-written folder must not look exported
            raise
        finally:
            reader.close()
    finally:
        source.close()
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    emit(f"{args.step} -> {out} (Hugging Face Llama, {args.dtype}): {size / 1e9:.3f} GB in {seconds:.2f} s")
    if args.verify:
        from hpc.checkpoint.convert.verify import verify

        result = verify(args.step, str(out), model_cfg=model_cfg)
        if not result.ok:
            shutil.rmtree(out, ignore_errors=True)
            raise CheckpointError(f"the export does not match its source ({result.summary()}); it was removed")
        stats = result.kinds.get("model")
        emit(f"  verified: model {stats.equal if stats else 0}/{stats.tensors if stats else 0} tensors equal "
              f"to the source{' rounded to bf16' if args.dtype == 'bf16' else ''}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from hpc.checkpoint.convert.imports import import_hf

    report = import_hf(args.hf_dir, args.out, world=args.world, strategy=args.strategy, model=args.model,
                       exp=args.exp, overrides=args.set, workers=args.workers, force=args.force,
                       verify=args.verify)
    _print_report(report, args.json)
    return 0


COMMANDS = {"inspect": _inspect, "reshard": _reshard, "verify": _verify, "export": _export, "import": _import}

if __name__ == "__main__":
    sys.exit(main())
