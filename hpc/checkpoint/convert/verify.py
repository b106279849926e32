"""Comparing two checkpoints of any formats tensor by tensor, by their neutral names.

Bitwise by default; within `atol + rtol * |a|` when tolerances are given. Where the two hold a
tensor in different dtypes (an export to bf16), A is cast to B's dtype first, so "equal" means
"B is exactly A rounded to B's precision". A side with no optimizer state at all (a Hugging Face
folder, an imported step) is compared on the model only, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hpc.checkpoint.convert.neutral import TensorInfo


@dataclass
class KindStats:
    tensors: int = 0
    equal: int = 0
    """Tensors bitwise equal (after the cast, when the dtypes differ)."""
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""
    """The tensor with the largest absolute difference."""
    outside: list[str] = field(default_factory=list)
    """Tensors outside the tolerance."""


@dataclass
class VerifyResult:
    a: str
    b: str
    kinds: dict[str, KindStats] = field(default_factory=dict)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Whole kinds not compared (one side has none), with why."""
    exact: bool = True
    """Bitwise comparison (no tolerances were given)."""

    @property
    def ok(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.shape_mismatch
                    or any(s.outside for s in self.kinds.values()))

    def summary(self) -> str:
        problems = []
        if self.shape_mismatch:
            problems.append(f"shapes differ: {', '.join(self.shape_mismatch[:3])}")
        if self.only_in_a:
            problems.append(f"only in A: {', '.join(self.only_in_a[:3])}" + (" ..." if len(self.only_in_a) > 3 else ""))
        if self.only_in_b:
            problems.append(f"only in B: {', '.join(self.only_in_b[:3])}" + (" ..." if len(self.only_in_b) > 3 else ""))
        for kind, stats in self.kinds.items():
            if stats.outside:
                problems.append(f"{kind}: {len(stats.outside)} tensors differ (largest {stats.max_abs:.3g} "
                                f"in {stats.worst})")
        return "; ".join(problems) or "equal"

    def table(self) -> str:
        how = "bitwise" if self.exact else "within tolerance"
        lines = [f"A: {self.a}", f"B: {self.b}",
                 f"{'kind':<10} {'tensors':>8} {'bitwise':>8} {'max |a-b|':>11} {'max rel':>10}  largest in"]
        for kind, s in self.kinds.items():
            lines.append(f"{kind:<10} {s.tensors:>8} {s.equal:>8} {s.max_abs:>11.3g} {s.max_rel:>10.3g}  {s.worst}")
        lines += [f"not compared: {note}" for note in self.skipped]
        lines.append(f"result: {'OK' if self.ok else 'DIFFERENT'} ({how}): {self.summary()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "ok": self.ok, "exact": self.exact,
                "kinds": {k: vars(s) for k, s in self.kinds.items()}, "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b, "shape_mismatch": self.shape_mismatch, "skipped": self.skipped}


CHUNK = 1 << 22  # elements compared at a time: the float64 temporaries stay small


def compare(a: torch.Tensor, b: torch.Tensor, *, atol: float, rtol: float) -> tuple[bool, bool, float, float]:
    """(bitwise equal, within tolerance, max abs diff, max rel diff) of a and b (a cast to b's
    dtype), in chunks so that comparing a large tensor needs little memory beyond the two."""
    if a.shape != b.shape:
        return False, False, float("inf"), float("inf")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    equal, close, max_abs, max_rel = True, True, 0.0, 0.0
    for start in range(0, max(flat_a.numel(), 1), CHUNK):
        ca, cb = flat_a[start:start + CHUNK], flat_b[start:start + CHUNK]
        if ca.dtype != cb.dtype:
            ca = ca.to(cb.dtype)
        if ca.is_floating_point():
            same = torch.equal(ca.contiguous().view(torch.uint8), cb.contiguous().view(torch.uint8))
        else:
            same = torch.equal(ca, cb)
        if same:
            continue
        equal = False
        a64, b64 = ca.double(), cb.double()
        diff = (a64 - b64).abs()
        diff = torch.where(torch.isnan(a64) & torch.isnan(b64), torch.zeros_like(diff), diff)
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / a64.abs().clamp_min(1e-30)).max()))
            close = close and bool((diff <= atol + rtol * a64.abs()).all())
    return equal, close, max_abs, max_rel


def verify(a: str, b: str, *, atol: float = 0.0, rtol: float = 0.0, model_cfg: Any = None,
           streams: int = 4) -> VerifyResult:
    """Every tensor of step A against step B (any formats, locations or URLs)."""
    from hpc.checkpoint.convert.pipeline import open_reader
    from hpc.checkpoint.convert.steps import open_source

    result = VerifyResult(a, b, exact=atol == 0 and rtol == 0)
    source_a = open_source(a, streams=streams)
    try:
        source_b = open_source(b, streams=streams)
        try:
            reader_a = open_reader(source_a.format, source_a.folder, source_a.state, model_cfg)
            reader_b = open_reader(source_b.format, source_b.folder, source_b.state, model_cfg)
            try:
                _compare_readers(reader_a, reader_b, result, atol=atol, rtol=rtol)
            finally:
                reader_a.close()
                reader_b.close()
        finally:
            source_b.close()
    finally:
        source_a.close()
    return result


def _compare_readers(reader_a: Any, reader_b: Any, result: VerifyResult, *, atol: float, rtol: float) -> None:
    infos_a: dict[str, TensorInfo] = {i.key: i for i in reader_a.infos()}
    infos_b: dict[str, TensorInfo] = {i.key: i for i in reader_b.infos()}
    for kind in ("model", "optimizer"):
        in_a = [k for k, i in infos_a.items() if i.kind == kind]
        in_b = [k for k, i in infos_b.items() if i.kind == kind]
        if not in_a or not in_b:
            if in_a or in_b:
                side = "B" if in_a else "A"
                result.skipped.append(f"{kind} ({side} holds no {kind} state)")
            continue
        result.only_in_a += [k for k in in_a if k not in infos_b]
        result.only_in_b += [k for k in in_b if k not in infos_a]
        stats = result.kinds.setdefault(kind, KindStats())
        for key in in_a:
            if key not in infos_b:
                continue
            if infos_a[key].shape != infos_b[key].shape:
                result.shape_mismatch.append(f"{key} {tuple(infos_a[key].shape)} vs {tuple(infos_b[key].shape)}")
                continue
            equal, close, max_abs, max_rel = compare(reader_a.read(key), reader_b.read(key), atol=atol, rtol=rtol)
            stats.tensors += 1
            stats.equal += equal
            if max_abs > stats.max_abs or not stats.worst:
                stats.max_abs, stats.worst = max(max_abs, stats.max_abs), key
            stats.max_rel = max(stats.max_rel, max_rel)
            if not (equal if result.exact else close):
                stats.outside.append(key)
