"""What a step holds, from metadata alone: the manifest, DCP's `.metadata` or DeepSpeed's headers
(memory-mapped, so no tensor data is read: seconds on a 70B checkpoint)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from hpc.checkpoint.convert.steps import open_source


def inspect_step(location: str, *, model_cfg: Any = None) -> dict[str, Any]:
    from hpc.checkpoint.convert.pipeline import open_reader

    started = time.perf_counter()
    source = open_source(location, verify=False)
    try:
        reader = open_reader(source.format, source.folder, source.state, model_cfg)
        try:
            infos = reader.infos()
        finally:
            reader.close()
        state, manifest = source.state, source.manifest
        kinds: dict[str, dict[str, Any]] = {}
        for kind in ("model", "optimizer"):
            mine = [i for i in infos if i.kind == kind]
            dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in mine)
            kinds[kind] = {"tensors": len(mine), "bytes": sum(i.nbytes for i in mine), "dtypes": dict(dtypes)}
        total = manifest.total_bytes if manifest else sum(p.stat().st_size for p in source.folder.iterdir()
                                                          if p.is_file())
        tensor_bytes = kinds["model"]["bytes"] + kinds["optimizer"]["bytes"]
        params = [i for i in infos if i.kind == "model"]
        return {
            "location": location,
            "step": state.step,
            "format": source.format,
            "world_size": state.world_size,
            "strategy": state.strategy,
            "zero_stage": state.zero_stage,
            "parameters": sum(i.numel for i in params),
            "largest_tensor": max(((i.key, i.nbytes) for i in infos), key=lambda kv: kv[1], default=("", 0)),
            "bytes": {"model": kinds["model"]["bytes"], "optimizer": kinds["optimizer"]["bytes"],
                      "other": max(total - tensor_bytes, 0), "total": total},
            "tensors": {k: v["tensors"] for k, v in kinds.items()},
            "dtypes": {k: v["dtypes"] for k, v in kinds.items()},
            "data": state.data,
            "config_hash": manifest.config_hash if manifest else None,
            "files": len(manifest.files) if manifest else None,
            "saved_at": manifest.saved_at if manifest else None,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"params": len(g.get("params", []))}
                             for g in state.param_groups],
            "converted_copies": _converted(source.folder),
            "seconds": round(time.perf_counter() - started, 3),
        }
    finally:
        source.close()


def _converted(folder: Any) -> list[str]:
    from hpc.checkpoint.convert.resume import CONVERTED_DIR

    sub = folder / CONVERTED_DIR
    return sorted(p.name for p in sub.iterdir()) if sub.is_dir() else []


def format_inspect(info: dict[str, Any]) -> str:
    gb = 1e9
    b = info["bytes"]
    lines = [
        f"{info['location']}",
        f"  step {info['step']}, saved by {info['strategy']}"
        + (f" ZeRO-{info['zero_stage']}" if info["zero_stage"] else "")
        + f" at world size {info['world_size']} ({info['format']} format)",
        f"  parameters {info['parameters']:,} ({info['tensors']['model']} tensors); largest tensor "
        f"{info['largest_tensor'][0]} {info['largest_tensor'][1] / 1e6:.1f} MB",
        f"  bytes: model {b['model'] / gb:.3f} GB, optimizer {b['optimizer'] / gb:.3f} GB, other "
        f"{b['other'] / gb:.3f} GB, total {b['total'] / gb:.3f} GB",
        f"  dtypes: model {info['dtypes']['model']}, optimizer {info['dtypes']['optimizer']}",
        f"  data position: {info['data']}",
        f"  config hash {info['config_hash']}, {info['files']} files",
    ]
    if info["converted_copies"]:
        lines.append(f"  converted copies: {', '.join(info['converted_copies'])}")
    lines.append(f"  (read in {info['seconds']:.2f} s from metadata only)")
    return "\n".join(lines)
