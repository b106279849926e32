"""The plan as text (tables a person reads) and as JSON (for scripts), and the one-line summary the
dry run and the submit-time check print."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpc.config.schema import Config
from hpc.estimate.advisor import Advice, Budget, Option
from hpc.estimate.memory import COMPONENTS, checkpoint_bytes
from hpc.estimate.shape import count_params

GB = 1e9
LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states",
          "activations": "activations", "buffers": "buffers", "overhead": "overhead"}


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _params(cfg: Config) -> str:
    n = count_params(cfg.model)
    return f"{n / 1e9:.2f} B parameters" if n >= 1e9 else f"{n / 1e6:.1f} M parameters"


def job_line(cfg: Config, preset: str) -> str:
    s, t = cfg.strategy, cfg.train
    ckpt = s.activation_checkpointing + (f" (k={s.ac_every_k})" if s.activation_checkpointing == "every_k" else "")
    return (f"exp={cfg.exp}: {cfg.model.name}, {_params(cfg)}; strategy {preset}, {s.mixed_precision}, activation "
            f"checkpointing {ckpt}; {cfg.slurm.nodes} node(s) x {cfg.slurm.gpus_per_node} = {cfg.world_size} "
            f"rank(s); micro-batch {t.micro_batch_size} x {t.seq_len} tokens, grad_accum {t.grad_accum}")


def verdict(option: Option, limit: Budget) -> str:
    assert option.memory is not None
    total = option.memory.total
    if limit.bytes is None:
        return f"{_gb(total)} GB per GPU; fit not checked: {limit.what}"
    word = "fits" if option.fits else "DOES NOT FIT"
    return f"{_gb(total)} GB of {limit.what}: {word} ({100 * total / limit.bytes:.0f}%)"


def summary_line(option: Option, limit: Budget) -> str:
    """One line: the prediction and the verdict (the dry run prints it)."""
    assert option.traffic is not None
    return f"plan: {option.preset}: {verdict(option, limit)}; step ~{option.traffic.step_s:.2f} s, " \
           f"bound by {option.traffic.bottleneck} (python -m hpc.estimate shows the whole plan)"


def _one(cfg: Config, option: Option, limit: Budget) -> list[str]:
    m, t = option.memory, option.traffic
    assert m is not None and t is not None
    lines = ["per GPU (fullest rank):"]
    for key in COMPONENTS:
        lines.append(f"  {LABELS[key]:<18} {_gb(m.gpu[key]):>9} GB")
    lines.append(f"  {'total':<18} {_gb(m.total):>9} GB  {verdict(option, limit)}")
    for note in m.notes:
        lines.append(f"  ({note})")
    if m.host:
        lines.append(f"host memory per rank (offload): {_gb(m.host)} GB")
    if m.nvme:
        lines.append(f"NVMe per rank (offload): {_gb(m.nvme)} GB")
    lines.append(f"checkpoint: {_gb(checkpoint_bytes(cfg))} GB per save, all ranks together")
    lines.append(f"communication per step, per GPU: {_gb(t.intra)} GB intra-node, {_gb(t.inter)} GB inter-node"
                 + (f", {_gb(t.host)} GB to/from the host" if t.host else ""))
    lines.append(f"step time ~{t.step_s:.2f} s: compute {t.compute_s:.2f} s, intra-node {t.intra_s:.2f} s, "
                 f"inter-node {t.inter_s:.2f} s" + (f", host link {t.host_s:.2f} s" if t.host else "")
                 + f"; bound by {t.bottleneck} (collectives assumed to overlap compute)")
    return lines


def _table(options: Sequence[Option]) -> list[str]:
    head = ("strategy", *[LABELS[k].split()[0] for k in COMPONENTS], "total GB", "fits", "host GB", "intra GB",
            "inter GB", "step s", "bound by")
    rows = []
    for o in options:
        if o.error is not None or o.memory is None or o.traffic is None:
            continue
        g, t = o.memory.gpu, o.traffic
        rows.append((o.preset, *[_gb(g[k]) for k in COMPONENTS], _gb(g["total"]),
                     {True: "yes", False: "NO", None: "?"}[o.fits], _gb(o.memory.host), _gb(t.intra), _gb(t.inter),
                     f"{t.step_s:.2f}", t.bottleneck))
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    left = {0, len(head) - 1}

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    out += [f"{o.preset}: not applicable: {o.error}" for o in options if o.error is not None]
    return out


def plan_text(cfg: Config, chosen: str, options: Sequence[Option], limit: Budget, advice: Advice | None,
              hints: Sequence[str]) -> str:
    lines = [job_line(cfg, chosen)]
    own = next(o for o in options if o.preset == chosen)
    if advice is None:
        lines += _one(cfg, own, limit)
    else:
        lines.append(f"per GPU (fullest rank), GB; budget {limit.what}:")
        lines += _table(options)
        lines.append(f"recommended: {advice.recommended or 'none fits'}")
        lines += [f"  {step}" for step in advice.path]
    if hints:
        lines.append(f"{chosen} does not fit; any one of these would:")
        lines += [f"  {hint}" for hint in hints]
    return "\n".join(lines)


def plan_json(cfg: Config, chosen: str, options: Sequence[Option], limit: Budget, advice: Advice | None,
              hints: Sequence[str]) -> dict[str, Any]:
    return {"exp": cfg.exp, "model": cfg.model.name, "parameters": count_params(cfg.model), "configured": chosen,
            "world_size": cfg.world_size, "nodes": cfg.slurm.nodes, "gpus_per_node": cfg.slurm.gpus_per_node,
            "budget_bytes": limit.bytes, "budget": limit.what, "checkpoint_bytes": checkpoint_bytes(cfg),
            "recommended": advice.recommended if advice else None, "decision": advice.path if advice else [],
            "fixes": list(hints), "strategies": [o.to_json() for o in options]}
