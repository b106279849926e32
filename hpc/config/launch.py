"""Rendezvous and preflight inside the allocation. Part of the one schema (hpc.config.schema imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from hpc.config.errors import require, require_positive, require_single_line


@dataclass(frozen=True)
class LaunchConfig:
    """Rendezvous and preflight inside the allocation."""

    master_addr: str | None = None
    """Override the rendezvous host (default: the first node of the allocation)."""
    port_min: int = 20000
    """Lowest rendezvous port; the port is port_min + job_id mod the range size."""
    port_max: int = 29999
    """Highest rendezvous port."""
    init_timeout_s: int = 600
    """How long ranks wait for each other at process-group start."""
    preflight: bool = True
    """Check every rank (host, device, scratch, one all-reduce) before work starts."""

    def __post_init__(self) -> None:
        require_single_line("launch.master_addr", self.master_addr)
        require(1024 <= self.port_min <= self.port_max <= 65535,
                f"launch.port_min={self.port_min}, launch.port_max={self.port_max}: need "
                "1024 <= port_min <= port_max <= 65535")
        require_positive("launch.init_timeout_s", self.init_timeout_s)
