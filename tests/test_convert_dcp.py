"""DCP step folders through the neutral shape (hpc/checkpoint/convert/dcp.py).

The distributed part runs once for the module, in two launches of real gloo ranks:
  2 ranks  a DDP and an FSDP (full_shard) job train two steps, save with StateFormat and dump
           their gathered full state; the FSDP one trains two more steps. Rank 0 converts the
           FSDP step with DcpReader -> DcpWriter into two folders, cut for FSDP@3 in one part and
           for DDP@2 in two parts; the same ranks load them into DDP@2, FSDP hybrid_shard@2 and
           no_shard@2
  3 ranks  FSDP full_shard@3 loads one
and this process loads the other into FSDP (shard_grad_op)@1. Every target dumps its gathered full
state and trains the same two steps as the source went on with.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from hpc.checkpoint.convert.dcp import DcpReader, DcpWriter, row_blocks
from hpc.checkpoint.convert.neutral import StepState, TensorInfo, adamw_group_defaults, model_key, optim_key
from hpc.checkpoint.manifest import CheckpointError
from hpc.config.schema import StrategyConfig

SAVED_STEP = 2
AFTER = (2, 3)
"""The steps trained after the save: the first one's loss shows the weights, the second one's the
optimizer state too."""
BATCH, SEQ = 12, 32
"""Rows of every step's global batch (split evenly over 1, 2 or 3 ranks) and their length."""
SOURCE = "fsdp_full_shard"
TARGETS_AT_2 = [("ddp@2", "ddp", "for-ddp2"), ("hybrid_shard@2", "fsdp_hybrid_shard", "for-fsdp3"),
                ("no_shard@2", "fsdp_no_shard", "for-ddp2")]
TARGETS_AT_3 = [("full_shard@3", "fsdp_full_shard", "for-fsdp3")]
TARGETS_AT_1 = [("shard_grad_op@1", "fsdp_shard_grad_op", "for-ddp2")]
"""(label, strategy preset, converted folder): the folders are cut for FSDP@3 and for DDP@2, and
each is also loaded by other sizes and strategies than the one it was cut for. (shard_grad_op
loads exactly as full_shard does: same mesh, same placements.)"""


def _importable(worker: Callable) -> Callable:
    """run_ranks imports a worker by module name in each new rank, whose path holds only the
    repository root: there this file is tests.<name> (pytest imports it by its bare name)."""
    worker.__module__ = f"tests.{Path(__file__).stem}"
    return worker


# ---- what the ranks run -------------------------------------------------------------------------

def _train(engine: Any, world: Any, step: int, vocab: int) -> float:
    """One optimizer step on this rank's rows of the step's global batch; the mean loss of all rows."""
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    rows = BATCH // world.world_size
    mine = tokens[world.rank * rows:(world.rank + 1) * rows]
    loss = engine.forward_backward(mine[:, :-1], mine[:, 1:], sync=True)
    engine.step()
    dist.all_reduce(loss)
    return loss.item() / world.world_size


def _dump_full_state(engine: Any, rank: int, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(engine.model, engine.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": model, "optim": optim}, path)


def _state_format(engine: Any) -> Any:
    from hpc.checkpoint.formats import StateFormat

    return StateFormat(engine, group=dist.group.WORLD, streams=1, async_save=False)


def _config(world_size: int, strategy: str) -> Any:
    from hpc.bench.harness import local_config

    return local_config(world_size, [f"strategy={strategy}"])


def _load_targets(world: Any, work: Path, targets: list) -> dict[str, list[float]]:
    from hpc.train.strategies import build_engine

    losses = {}
    for label, strategy, folder in targets:
        cfg = _config(world.world_size, strategy)
        engine = build_engine(cfg, world)
        _state_format(engine).load(work / folder, saved_world_size=2)
        _dump_full_state(engine, world.rank, work / f"{label}.pt")
        losses[label] = [_train(engine, world, step, cfg.model.vocab_size) for step in AFTER]
        engine.close()
    return losses


def convert(src: Path, dst: Path, state: StepState, *, world_size: int, strategy: str, workers: int) -> None:
    """What tools/ckpt_convert does, in this process: each part (pickled, as for a worker process)
    is given its tensors one at a time, straight from the reader."""
    reader = DcpReader(src, state)
    writer = DcpWriter(dst, state, reader.infos(), world_size=world_size,
                       strategy_cfg=_config(world_size, strategy).strategy)
    records = []
    for part in writer.parts(workers):
        part = pickle.loads(pickle.dumps(part))
        for key in part.keys:
            part.write(key, reader.read(key))
        records.append(part.close())
    writer.finish(records)
    reader.close()


def _source_state(world_size: int = 2) -> StepState:
    from hpc.config import to_yaml

    return StepState(step=SAVED_STEP, world_size=world_size, strategy="fsdp",
                     config_yaml=to_yaml(_config(world_size, SOURCE)))


@_importable
def _source_and_targets_at_2(spec: dict) -> dict[str, list[float]]:
    from hpc.bench.harness import join_local
    from hpc.train.strategies import build_engine

    _, world = join_local([])
    work = Path(spec["work"])
    losses = {}
    for strategy in ("ddp", SOURCE):
        cfg = _config(world.world_size, strategy)
        engine = build_engine(cfg, world)
        for step in range(SAVED_STEP):
            _train(engine, world, step, cfg.model.vocab_size)
        _state_format(engine).save(work / strategy, SAVED_STEP, world.rank).result()
        _dump_full_state(engine, world.rank, work / f"{strategy}.pt")
        if strategy == SOURCE:  # what the targets must reproduce
            losses[strategy] = [_train(engine, world, step, cfg.model.vocab_size) for step in AFTER]
        engine.close()
    if world.rank == 0:  # the converter's turn, between the source job and the target jobs
        state = _source_state()
        convert(work / SOURCE, work / "for-fsdp3", state, world_size=3, strategy="fsdp_full_shard", workers=1)
        convert(work / SOURCE, work / "for-ddp2", state, world_size=2, strategy="ddp", workers=2)
    dist.barrier()
    return {**losses, **_load_targets(world, work, TARGETS_AT_2)}


@_importable
def _targets_at_3(spec: dict) -> dict[str, list[float]]:
    from hpc.bench.harness import join_local

    _, world = join_local([])
    return _load_targets(world, Path(spec["work"]), TARGETS_AT_3)


def _targets_at_1_here(work: Path) -> dict[str, list[float]]:
    from hpc.train.strategies import World

    dist.init_process_group("gloo", store=dist.FileStore(str(work / "store-w1"), 1), rank=0, world_size=1)
    try:
        return _load_targets(World(0, 1, 0, 1, torch.device("cpu")), work, TARGETS_AT_1)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[float]]]:
    from hpc.bench.harness import run_ranks

    work = tmp_path_factory.mktemp("dcp")
    spec = {"work": str(work)}
    losses = run_ranks(2, _source_and_targets_at_2, spec, work / "ranks", timeout_s=300)
    losses.update(run_ranks(3, _targets_at_3, spec, work / "ranks", timeout_s=300))
    losses.update(_targets_at_1_here(work))
    return work, losses


# ---- checks -------------------------------------------------------------------------------------

def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where}: differs (max abs {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _neutral(full: dict) -> dict[str, torch.Tensor]:
    """An engine's gathered full state under the neutral keys."""
    tensors = {model_key(fqn): t for fqn, t in full["model"].items()}
    for fqn, states in full["optim"]["state"].items():
        tensors.update({optim_key(fqn, name): t for name, t in states.items()})
    return tensors


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", SOURCE])
def test_reader_gives_the_engines_full_state(jobs, strategy: str) -> None:
    work, _ = jobs
    full = torch.load(work / f"{strategy}.pt", weights_only=False)
    state = _source_state()
    reader = DcpReader(work / strategy, state)
    infos = reader.infos()
    expected = _neutral(full)
    model_keys = [model_key(fqn) for fqn in full["model"]]  # the model's own parameter order
    assert [i.key for i in infos][:len(model_keys)] == model_keys
    assert {i.key for i in infos} == set(expected)
    for info in infos:
        tensor = reader.read(info.key)
        assert (tuple(tensor.shape), tensor.dtype) == (info.shape, info.dtype), info.key
        assert_bitwise_equal(tensor, expected[info.key], info.key)
    assert_bitwise_equal(state.param_groups, full["optim"]["param_groups"], "param_groups")
    assert {t.dtype for t in expected.values()} == {torch.float32}  # fp32 masters, moments and step


@pytest.mark.dist
@pytest.mark.parametrize("label", [t[0] for t in TARGETS_AT_1 + TARGETS_AT_2 + TARGETS_AT_3])
def test_written_step_loads_exactly_into_other_sizes_and_strategies(jobs, label: str) -> None:
    work, losses = jobs
    source = torch.load(work / f"{SOURCE}.pt", weights_only=False)
    assert_bitwise_equal(torch.load(work / f"{label}.pt", weights_only=False), source, label)
    # Same weights and optimizer state; only the order of the ranks' sums differs from the source.
    assert losses[label] == pytest.approx(losses[SOURCE], rel=1e-5, abs=0)


@pytest.mark.dist
def test_parts_split_the_files_and_change_nothing_read_back(jobs) -> None:
    work, _ = jobs
    one, two = work / "for-fsdp3", work / "for-ddp2"
    assert sorted(p.name for p in two.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp", "__param_groups.distcp"]
    source = DcpReader(work / SOURCE, _source_state())
    for folder in (one, two):
        state = _source_state()
        reader = DcpReader(folder, state)
        assert reader.infos() == source.infos()
        for info in source.infos():
            assert_bitwise_equal(reader.read(info.key), source.read(info.key), f"{folder.name} {info.key}")
        assert state.param_groups == source.state.param_groups


# ---- without ranks: the writer's encoding, layout and checks, and damaged folders ----------------

def _tiny(seed: int = 0) -> tuple[StepState, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (10, 4), "layers.0.w": (5, 4), "norm.weight": (4,)}
    tensors = {}
    for fqn, shape in shapes.items():
        tensors[model_key(fqn)] = torch.randn(shape, generator=g)
        tensors[optim_key(fqn, "exp_avg")] = torch.randn(shape, generator=g)
        tensors[optim_key(fqn, "exp_avg_sq")] = torch.rand(shape, generator=g)
        tensors[optim_key(fqn, "step")] = torch.tensor(7.0)
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    groups = [{**hyper, "weight_decay": 0.1, "params": ["emb.weight", "layers.0.w"]},
              {**hyper, "weight_decay": 0.0, "params": ["norm.weight"]}]
    return StepState(step=7, world_size=1, strategy="deepspeed", param_groups=groups), tensors


def _infos(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]


def _write(folder: Path, state: StepState, tensors: dict[str, torch.Tensor], *, world_size: int = 3,
           strategy: str = "fsdp_full_shard", workers: int = 2) -> None:
    writer = DcpWriter(folder, state, _infos(tensors), world_size=world_size,
                       strategy_cfg=_config(world_size, strategy).strategy)
    records = []
    for part in writer.parts(workers):
        for key in part.keys:
            part.write(key, tensors[key])
        records.append(part.close())
    writer.finish(records)


def test_torchs_own_reader_loads_what_the_writer_wrote(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state, tensors = _tiny()
    _write(tmp_path, state, tensors)
    # The nested shape get_state_dict gives a job, to be filled in place (no process group).
    target: dict[str, Any] = {"model": {}, "optim": {"state": {}, "param_groups": []}}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            target["model"][rest] = torch.zeros_like(t)
        else:
            fqn, _, name = rest.rpartition("/")
            target["optim"]["state"].setdefault(fqn, {})[name] = torch.zeros_like(t)
    target["optim"]["param_groups"] = [{name: None for name in group} for group in state.param_groups]
    dcp.load(target, checkpoint_id=str(tmp_path), no_dist=True)
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        got = target["model"][rest] if kind == "model" else \
            target["optim"]["state"][rest.rpartition("/")[0]][rest.rpartition("/")[2]]
        assert_bitwise_equal(got, t, key)
    assert target["optim"]["param_groups"] == state.param_groups
    read = DcpReader(tmp_path, StepState(step=7, world_size=3, strategy="fsdp"))
    # Without a config the model's order is unknown: the metadata's, model keys first.
    assert [i.key for i in read.infos()] == sorted(tensors, key=lambda k: not k.startswith("model/"))
    # AdamW's other hyperparameters, which a torch AdamW load asks for, filled in.
    assert read.state.param_groups[0]["foreach"] is True and read.state.param_groups[0]["lr"] == 1e-3


def test_tensors_are_cut_into_the_targets_shards() -> None:
    assert row_blocks((10, 4), 3) == [((0, 0), (4, 4)), ((4, 0), (4, 4)), ((8, 0), (2, 4))]
    assert row_blocks((2, 4), 3) == [((0, 0), (1, 4)), ((1, 0), (1, 4))]  # FSDP2 leaves rank 2 empty
    assert row_blocks((), 4) == [((), ())]
    assert row_blocks((10, 4), 1) == [((0, 0), (10, 4))]


def test_writer_refuses_what_a_job_could_not_load(tmp_path: Path) -> None:
    state, tensors = _tiny()
    with pytest.raises(ValueError, match=r"hsdp_shard_size=4 must divide the world size 6.*set "
                                         r"strategy.hsdp_shard_size=3"):
        DcpWriter(tmp_path, state, _infos(tensors), world_size=6,
                  strategy_cfg=StrategyConfig(name="fsdp", sharding="hybrid_shard", hsdp_shard_size=4))
    with pytest.raises(ValueError, match="DeepSpeed loads its own format"):
        DcpWriter(tmp_path, state, _infos(tensors), world_size=2, strategy_cfg=_config(2, "zero2").strategy)
    # Weights alone are a step to start from (an import); a partial optimizer state is refused.
    partial = {k: t for k, t in tensors.items() if not k.endswith("/exp_avg_sq")}
    with pytest.raises(ValueError, match="optimizer tensors missing.*fresh optimizer state"):
        DcpWriter(tmp_path, state, _infos(partial), world_size=2, strategy_cfg=_config(2, "ddp").strategy)
    state.param_groups[1]["params"] = []
    with pytest.raises(ValueError, match=r"every parameter exactly once: not listed \['norm.weight'\]"):
        DcpWriter(tmp_path, state, _infos(tensors), world_size=2, strategy_cfg=_config(2, "ddp").strategy)


def _damaged(tmp_path: Path) -> tuple[DcpReader, Path, Any]:
    state, tensors = _tiny()
    _write(tmp_path, state, tensors, workers=1)
    reader = DcpReader(tmp_path, StepState(step=7, world_size=3, strategy="fsdp"))
    flat = "model.emb.weight"
    index = next(i for i in reader.metadata.storage_data if i.fqn == flat and i.offset[0] == 4)
    return reader, tmp_path / "__0_0.distcp", reader.metadata.storage_data[index]


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    reader, path, item = _damaged(tmp_path)
    os.truncate(path, item.offset + item.length // 2)
    with pytest.raises(CheckpointError, match=rf"{path}: truncated: .*model.emb.weight"):
        reader.read("model/emb.weight")


def test_a_corrupt_item_is_named(tmp_path: Path) -> None:
    reader, path, item = _damaged(tmp_path)
    with path.open("r+b") as f:
        f.seek(item.offset)
        f.write(b"\0" * 64)  # the archive's first header
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt: the item model.emb.weight at byte {item.offset}"):
        reader.read("model/emb.weight")
    reader.read("model/layers.0.w")  # the rest of the file is still read


def test_a_missing_or_corrupt_metadata_is_named(tmp_path: Path) -> None:
    state, tensors = _tiny()
    _write(tmp_path, state, tensors)
    (tmp_path / ".metadata").write_bytes((tmp_path / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable .*truncated or corrupt"):
        DcpReader(tmp_path, state)
    (tmp_path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: missing, so .* is not a complete DCP"):
        DcpReader(tmp_path, state)


def test_adamw_group_defaults_are_what_the_trainers_adamw_keeps() -> None:
    # The converters read the defaults off the signatures (no optimizer built: that imports dynamo).
    group = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], foreach=True).param_groups[0]
    assert adamw_group_defaults() == {name: value for name, value in group.items() if name != "params"}
