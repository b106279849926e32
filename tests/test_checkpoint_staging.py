"""Staging for a DCP save: each rank copies only what it writes, into one flat host buffer; the
writer checksums each file as it writes it."""

from __future__ import annotations

import os

import pytest
import torch

from hpc.checkpoint.staging import ALIGN, FlatStager, assign_plain_tensors, rank_share


def _ddp_like_state() -> dict:
    """What get_state_dict returns for a replicated (DDP) model: plain tensors everywhere."""
    torch.manual_seed(0)
    model = {f"layers.{i}.w": torch.randn(16 * (i + 1), 8) for i in range(5)}
    model["tok.weight"] = torch.randn(64, 8)
    state = {name: {"exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t), "step": torch.tensor(7.0)}
             for name, t in model.items()}
    return {"model": model, "optim": {"state": state, "param_groups": [{"lr": 1e-3, "params": sorted(model)}]}}


def _flat(tree: dict, path: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*path, key)))
        else:
            out[(*path, key)] = value
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_ranks_shares_together_are_one_replica_balanced_by_bytes(world: int) -> None:
    state = _ddp_like_state()
    shares = [_flat(rank_share(state, rank, world)) for rank in range(world)]
    tensors = {k for k, v in _flat(state).items() if isinstance(v, torch.Tensor)}
    held = [{k for k, v in share.items() if isinstance(v, torch.Tensor)} for share in shares]
    assert set().union(*held) == tensors
    assert sum(len(h) for h in held) == len(tensors)  # each tensor on exactly one rank
    sizes = [sum(v.numel() * v.element_size() for v in share.values() if isinstance(v, torch.Tensor))
             for share in shares]
    largest = max(v.numel() * v.element_size() for v in _flat(state).values() if isinstance(v, torch.Tensor))
    assert max(sizes) - min(sizes) <= largest  # greedy balance: within one tensor of even
    for share in shares:  # objects (param_groups) stay on every rank; DCP writes them once
        assert share[("optim", "param_groups")] == state["optim"]["param_groups"]
    assert rank_share(state, 0, 1) is state


def test_every_rank_computes_the_same_assignment() -> None:
    sizes = {("a",): 100, ("b",): 100, ("c",): 50, ("d",): 50, ("e",): 1}
    assert assign_plain_tensors(dict(reversed(list(sizes.items()))), 2) == assign_plain_tensors(sizes, 2)
    assert assign_plain_tensors(sizes, 2) == {("a",): 0, ("b",): 1, ("c",): 0, ("d",): 1, ("e",): 0}


def test_flat_stager_copies_into_one_exact_buffer_and_reuses_it() -> None:
    state = rank_share(_ddp_like_state(), 1, 2)
    stager = FlatStager(pin=False)
    staged = stager.stage(state)
    leaves = [v for v in _flat(state).values() if isinstance(v, torch.Tensor)]
    need = sum(-(-v.numel() * v.element_size() // ALIGN) * ALIGN for v in leaves)
    assert stager.nbytes == need  # one buffer, exactly the share (aligned), not a power of two
    first = stager.flat.data_ptr()
    for key, value in _flat(state).items():
        got = _flat(staged)[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value) and got.data_ptr() != value.data_ptr()
            assert first <= got.data_ptr() < first + stager.nbytes
        else:
            assert got == value
    for value in leaves:
        value.add_(1.0)  # the next save sees new values in the same buffer
    again = stager.stage(state)
    assert stager.flat.data_ptr() == first
    assert all(torch.equal(_flat(again)[k], v) for k, v in _flat(state).items() if isinstance(v, torch.Tensor))
    stager.close()
    assert stager.nbytes == 0


def test_flat_stager_keeps_a_dtensor_shard_and_its_sharding(tmp_path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.arange(24.0).reshape(6, 4), mesh, [Shard(0)])
        state = {"model": {"w": weight}, "optim": {"state": {"w": {"step": torch.tensor(3.0)}}}}
        assert rank_share(state, 0, 2)["model"]["w"] is weight  # a shard is this rank's own
        stager = FlatStager(pin=False)
        staged = stager.stage(state)["model"]["w"]
        assert isinstance(staged, DTensor) and staged.placements == weight.placements
        assert torch.equal(staged.to_local(), weight.to_local())
        assert staged.to_local().data_ptr() != weight.to_local().data_ptr()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("streams", [1, 3])
def test_the_dcp_writer_checksums_each_file_as_it_writes_it(tmp_path, streams: int) -> None:
    import torch.distributed.checkpoint as dcp

    from hpc.checkpoint.formats import _dcp_writer
    from hpc.checkpoint.storage import FileEntry, file_checksum
    from hpc.checkpoint.transfer import local_files

    written: dict[str, FileEntry] = {}
    dcp.save(_ddp_like_state(), storage_writer=_dcp_writer(tmp_path, streams, 7, 0, written), no_dist=True)
    shards = [name for name in local_files(tmp_path) if name.endswith(".distcp")]
    assert len(shards) == streams
    assert set(written) == set(local_files(tmp_path))  # .metadata too (written as .metadata.tmp, then renamed)
    for name, entry in written.items():
        assert entry == FileEntry(name, *file_checksum(tmp_path / name))


def test_a_stream_seeked_back_into_is_not_trusted(tmp_path) -> None:
    from hpc.checkpoint.formats import _ChecksummedStream

    with open(tmp_path / "f", "wb") as raw:
        stream = _ChecksummedStream(raw, "f", 1, 0, faults=False)
        stream.write(b"x" * 100)
        stream.seek(10)
        stream.write(b"y")
        stream.close()
    assert stream.entry is None

    with open(tmp_path / "g", "wb") as raw:
        stream = _ChecksummedStream(raw, "g", 1, 0, faults=False)
        stream.write(memoryview(torch.arange(10, dtype=torch.int64).numpy()))  # not a byte view: cast
        stream.close()
    assert stream.entry is not None and stream.entry.size == 80
