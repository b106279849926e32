"""What a rank stages for a DCP save, and the host memory it stages into.

Two costs of the obvious way (every rank copies its whole state dict into per-tensor pinned buffers):

* Under DDP every rank holds the whole replica, but DCP writes each replicated tensor once (its
  planner deduplicates plain tensors by key). Copying the rest to host memory is wasted time on the
  loop's critical path and wasted RAM. `rank_share` gives each rank only the plain tensors it will
  write, balanced by bytes, so the ranks' copies together are one replica. The assignment is the
  same pure function of the (identical) keys and sizes on every rank; DTensor shards are this
  rank's own and always kept, and small non-tensor entries (param_groups) stay everywhere (DCP
  deduplicates them as it does tensors).
* `Tensor.pin_memory()` goes through the caching host allocator, which rounds every block up to a
  power of two, and keeps it pinned for the whole job. `FlatStager` allocates one flat buffer of
  exactly the share's size (64-byte aligned views per tensor) and, on a GPU machine, pins exactly
  that range with cudaHostRegister, released on close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

ALIGN = 64


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _leaves(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every leaf under nested dicts (lists and other values are leaves)."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, (*path, key))]
    return [(path, tree)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def assign_plain_tensors(sizes: dict[tuple, int], world: int) -> dict[tuple, int]:
    """Which rank writes each replicated tensor: largest first onto the least loaded rank (ties:
    the lower rank, then the path), so every rank computes the same answer."""
    load = [0] * world
    owner: dict[tuple, int] = {}
    for path, size in sorted(sizes.items(), key=lambda item: (-item[1], repr(item[0]))):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[path] = rank
        load[rank] += size
    return owner


def rank_share(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """The part of `state` this rank writes (see the module docstring); `state` itself when alone."""
    if world <= 1:
        return state
    plain = {path: _nbytes(value) for path, value in _leaves(state)
             if isinstance(value, torch.Tensor) and not _is_dtensor(value)}
    owner = assign_plain_tensors(plain, world)

    def keep(tree: Any, path: tuple) -> Any:
        if isinstance(tree, dict):
            kept = {}
            for key, value in tree.items():
                sub = keep(value, (*path, key))
                if sub is not _DROP:
                    kept[key] = sub
            return kept
        if path in owner and owner[path] != rank:
            return _DROP
        return tree

    return keep(state, ())


_DROP = object()


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return tree


class FlatStager:
    """DCP's async stager: copies the share into one flat host buffer, allocated at the first save
    (and again only if the tensors' shapes change) and reused by every later save. Safe to reuse
    because a save starts only after the previous one finished writing."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.flat: torch.Tensor | None = None
        self.buffers: Any = None
        self.layout: list[tuple] | None = None
        self.pinned = False

    @staticmethod
    def _layout(state: Any) -> list[tuple]:
        return [(path, tuple(_local(v).shape), _local(v).dtype) for path, v in _leaves(state)
                if isinstance(v, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel()

    def _allocate(self, state: Any) -> None:
        self.close()
        total = sum(_aligned(_nbytes(_local(v))) for _, v in _leaves(state) if isinstance(v, torch.Tensor))
        self.flat = torch.empty(max(total, 1), dtype=torch.uint8)
        if self.pin:
            self.pinned = _register(self.flat)
        offset = 0

        def view_of(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal offset
            local = _local(tensor)
            size = _nbytes(local)
            assert self.flat is not None
            view = self.flat[offset:offset + size].view(local.dtype).view(local.shape)
            offset += _aligned(size)
            if _is_dtensor(tensor):
                from torch.distributed.tensor import DTensor

                # The same sharding spec around the host view (no temporary copy of the shard).
                return DTensor(view, tensor._spec, requires_grad=False)
            return view

        self.buffers = _map_tensors(state, view_of)
        self.layout = self._layout(state)

    def stage(self, state: Any) -> Any:
        if self.buffers is None or self._layout(state) != self.layout:
            self._allocate(state)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []

        def pair(source: Any, target: Any) -> Any:
            if isinstance(source, dict):
                return {key: pair(value, target[key]) for key, value in source.items()}
            if isinstance(source, torch.Tensor):
                copies.append((_local(target), _local(source)))
                return target
            return source  # param_groups and other objects: written as they are

        staged = pair(state, self.buffers)
        cuda = False
        for target, source in copies:
            target.copy_(source.detach(), non_blocking=source.is_cuda)
            cuda = cuda or source.is_cuda
        if cuda:
            torch.cuda.synchronize()
        return staged

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        if self.flat is not None and self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
        self.flat, self.buffers, self.layout, self.pinned = None, None, None, False


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if _is_dtensor(tensor) else tensor


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


CUDA_HOST_REGISTER_PORTABLE = 1
"""Pinned for every CUDA context of the process, as torch's own pinned memory is."""


def _register(flat: torch.Tensor) -> bool:
    """Pin exactly this range (no power-of-two rounding). A failure is cleared from CUDA's sticky
    last-error slot (else the next kernel launch would report it as its own) and staging goes on
    unpinned, slower but correct."""
    cudart = torch.cuda.cudart()
    try:
        error = cudart.cudaHostRegister(flat.data_ptr(), flat.numel(), CUDA_HOST_REGISTER_PORTABLE)
    except (RuntimeError, AttributeError):
        return False
    if int(error) == 0:
        return True
    _clear_cuda_error()
    import logging

    logging.getLogger("hpc").warning("could not pin %.1f GB of checkpoint staging memory (CUDA error %d); "
                                     "staging unpinned", flat.numel() / 1e9, int(error))
    return False


def _clear_cuda_error() -> None:
    import ctypes

    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except OSError:
            continue
