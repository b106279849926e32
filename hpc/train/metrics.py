"""Training metrics: throughput, MFU, memory; one JSONL record and one human line per log step."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hpc.config import Config
from hpc.estimate.shape import flops_per_token


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's high-water mark. CPU: the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_reserved_bytes(device: torch.device) -> int | None:
    """CUDA: the caching allocator's reserved high-water mark (None elsewhere). Reserved minus
    allocated is memory held in cached blocks and lost to fragmentation: an OOM while the allocated
    peak looks fine shows up here."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark (per benchmark case)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current resident set
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


@dataclass(frozen=True)
class StepMetrics:
    step: int
    """Optimizer steps completed."""
    loss: float
    """Mean loss over the global batch of the last step."""
    lr: float
    grad_norm: float
    tokens_per_s: float
    """Global tokens per second, averaged since the previous record."""
    step_time_s: float
    """Mean seconds per step since the previous record."""
    mfu: float
    """Model FLOPs utilisation: achieved FLOP/s over world_size x cluster.peak_tflops."""
    peak_mem_gb: float
    """This rank's (rank 0's) peak memory: CUDA max_memory_allocated, CPU peak resident set."""
    consumed_samples: int
    """Global samples consumed: the data position."""
    time: float
    """Unix time of the record."""
    peak_reserved_gb: float | None = None
    """CUDA: this rank's max_memory_reserved (the allocator's cache included); None on CPU."""

    def line(self, max_steps: int) -> str:
        reserved = "" if self.peak_reserved_gb is None else f" (reserved {self.peak_reserved_gb:.2f} GB)"
        return (f"step {self.step}/{max_steps} loss {self.loss:.4f} lr {self.lr:.2e} "
                f"gnorm {self.grad_norm:.3f} | {self.tokens_per_s:,.0f} tok/s "
                f"{self.step_time_s * 1e3:.1f} ms/step MFU {self.mfu:.2%} | mem {self.peak_mem_gb:.2f} GB"
                f"{reserved}")

    def record(self) -> dict[str, float | int]:
        """The JSONL record; a CPU record has no peak_reserved_gb key at all."""
        fields = asdict(self)
        if self.peak_reserved_gb is None:
            del fields["peak_reserved_gb"]
        return fields


class Meter:
    """Accumulates step times between records and turns them into StepMetrics."""

    def __init__(self, cfg: Config, world_size: int, device: torch.device) -> None:
        self.device = device
        self.tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size * cfg.train.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak_flops = cfg.cluster.peak_tflops * 1e12 * world_size
        self.max_steps = cfg.train.max_steps
        self.step_times: list[float] = []
        """Every step's seconds this run (the benchmark reads them)."""
        self._since_record: list[float] = []

    def add(self, seconds: float) -> None:
        self.step_times.append(seconds)
        self._since_record.append(seconds)

    def record(self, step: int, loss: float, lr: float, grad_norm: float, consumed: int) -> StepMetrics:
        window = self._since_record or [float("nan")]
        self._since_record = []
        step_time = sum(window) / len(window)
        tokens_per_s = self.tokens_per_step / step_time
        return StepMetrics(
            step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
            step_time_s=step_time, mfu=tokens_per_s * self.flops_per_token / self.peak_flops,
            peak_mem_gb=peak_memory_bytes(self.device) / 2**30, consumed_samples=consumed,
            time=time.time(), peak_reserved_gb=_gb(peak_reserved_bytes(self.device)))

    def summary(self, skip_first: int = 1) -> dict[str, float]:
        """Steady-state means, leaving out the first step(s) (allocator warm-up, lazy init)."""
        times = self.step_times[skip_first:] or self.step_times
        if not times:
            return {"steps": 0}
        step_time = sum(times) / len(times)
        tokens_per_s = self.tokens_per_step / step_time
        summary = {"steps": len(self.step_times), "step_time_s": step_time, "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                   "peak_mem_gb": peak_memory_bytes(self.device) / 2**30}
        reserved = peak_reserved_bytes(self.device)
        if reserved is not None:
            summary["peak_reserved_gb"] = reserved / 2**30
        return summary


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**30


class MetricsLog:
    """Appends records to <run_dir>/metrics.jsonl (rank 0 only; append survives requeues)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, metrics: StepMetrics) -> None:
        if self.path is None:
            return
        with self.path.open("a") as out:
            out.write(json.dumps(metrics.record()) + "\n")
