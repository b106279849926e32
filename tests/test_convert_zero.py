"""DeepSpeed ZeRO checkpoints read and written without DeepSpeed (hpc.checkpoint.convert.zero).

Real engines over gloo on CPU: two ranks train the tiny Llama a few steps at ZeRO-1, 2 and 3 and
save; what ZeroReader reads must equal, bit for bit, the full fp32 weights and Adam states the
engines report themselves. ZeroWriter then writes those states for 3 ranks and for 1 (other stages
too), real engines of that size load them the way the job does, and their full states must equal
the source's. The streaming torch.save writer is tested on its own.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from hpc.checkpoint.convert import torchfile
from hpc.checkpoint.convert.neutral import StepState
from hpc.checkpoint.convert.torchfile import Slot, TorchFileWriter
from hpc.checkpoint.convert.zero import ZeroReader, ZeroWriter
from hpc.checkpoint.convert.zero_layout import layout_3, layout_12, sub_groups_by_size
from hpc.checkpoint.manifest import CheckpointError

COMMON = ["train.seq_len=16", "train.micro_batch_size=2", "train.seed=3"]
STEPS = 2
# source stage -> (target world, target stage): every stage is a target, padding at world 3.
CONVERSIONS = {3: [(1, 3), (1, 1), (3, 2)], 1: [(3, 3)], 2: [(3, 1)]}


# ---- inside the ranks -------------------------------------------------------------------------------

def _full_state(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's own view of its state, gathered whole (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its Adam state fragments only after a step, and a
        # load re-links the weights alone; link them now or safe_get_full_optimizer_state fails.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)
    if flats is None:  # ZeRO-1/2: one flat partition per group
        steps = [float(opt.optimizer.state[g["params"][0]]["step"]) for g in opt.optimizer.param_groups]
    else:
        first = {opt.sub_group_to_group_id[i]: flat for i, flat in reversed(list(enumerate(flats)))}
        steps = [float(opt.optimizer.state[first[g]]["step"]) for g in sorted(first)]
    out = {}
    for name, param in engine.module.named_parameters():
        out[f"model/{name}"] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for state in ("exp_avg", "exp_avg_sq"):
            out[f"optim/{name}/{state}"] = safe_get_full_optimizer_state(param, state).detach().cpu().clone()
        group = 0 if len(getattr(param, "ds_shape", param.shape)) >= 2 else 1  # hpc.train.optim.param_groups
        out[f"optim/{name}/step"] = torch.tensor(steps[group], dtype=torch.float32)
    return out


def _in_rank(spec: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from hpc.bench.harness import join_local, local_config
    from hpc.checkpoint.formats import StateFormat
    from hpc.train.optim import set_lr
    from hpc.train.strategies import build_engine

    _, world = join_local(COMMON)
    for job in spec["jobs"]:
        cfg = local_config(world.world_size, [*COMMON, f"strategy=zero{job['stage']}"])
        engine = build_engine(cfg, world)
        folder = Path(job["folder"])
        if job["train"]:
            tokens = torch.randint(0, cfg.model.vocab_size, (STEPS, 2, 17),
                                   generator=torch.Generator().manual_seed(world.rank))
            for step in range(STEPS):
                set_lr(engine.optimizer, 1e-3 * (step + 1))
                engine.forward_backward(tokens[step, :, :-1], tokens[step, :, 1:], sync=True)
                engine.step()
            engine.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        else:  # exactly the job's resume
            StateFormat(engine, group=None, streams=1, async_save=False).load(folder, world.world_size)
        full = _full_state(engine)
        if world.rank == 0:
            torch.save(full, job["full"])
        engine.close()
        dist.barrier()
    return {}


def _run(world: int, jobs: list[dict[str, Any]], work: Path, extensions: Path) -> None:
    from hpc.bench.harness import run_ranks

    # The ranks import this file from the repository root (their cwd), where it is tests/...;
    # pytest imported it under its bare name.
    _in_rank.__module__ = "tests.test_convert_zero"
    run_ranks(world, _in_rank, {"jobs": jobs}, work, timeout_s=300,
              extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)})


# ---- fixtures -----------------------------------------------------------------------------------------

def _convert(source: Path, target: Path, world: int, stage: int, workers: int = 2) -> None:
    from hpc.bench.harness import local_config
    from hpc.config.deepspeed import build_deepspeed_config

    state = StepState(step=STEPS, world_size=2, strategy="deepspeed")
    reader = ZeroReader(source, state)
    ds_config = build_deepspeed_config(local_config(world, [*COMMON, f"strategy=zero{stage}"]))
    writer = ZeroWriter(target, state, reader.infos(), world_size=world, zero_stage=stage, ds_config=ds_config)
    records = []
    for part in writer.parts(workers):
        for key in part.keys:
            part.write(key, reader.read(key))
        records.append(part.close())
    writer.finish(records)
    reader.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, torch_extensions_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("zero")
    _run(2, [{"stage": s, "train": True, "folder": str(root / "src" / f"zero{s}"), "full": str(root / f"src{s}.pt")}
             for s in (1, 2, 3)], root / "work", torch_extensions_dir)
    loads: dict[int, list[dict[str, Any]]] = {1: [], 3: []}
    for source, targets in CONVERSIONS.items():
        for world, stage in targets:
            name = f"zero{source}-to-w{world}-zero{stage}"
            _convert(root / "src" / f"zero{source}", root / "out" / name, world, stage, workers=world)
            loads[world].append({"stage": stage, "train": False, "folder": str(root / "out" / name),
                                 "full": str(root / f"{name}.pt")})
    # Side by side: each rank spends most of its time importing torch and DeepSpeed, on one core.
    with ThreadPoolExecutor(len(loads)) as pool:
        for done in [pool.submit(_run, world, jobs, root / "work", torch_extensions_dir)
                     for world, jobs in loads.items()]:
            done.result()
    return root


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert set(got) == set(want), f"{where}: keys differ: {sorted(set(got) ^ set(want))[:6]}"
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, f"{where}: {key}"
        assert torch.equal(got[key], tensor), f"{where}: {key} differs"


# ---- the tests -----------------------------------------------------------------------------------------

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_reader_gives_the_engines_own_full_state(runs: Path, stage: int) -> None:
    state = StepState(step=STEPS, world_size=2, strategy="deepspeed")
    reader = ZeroReader(runs / "src" / f"zero{stage}", state)
    infos = reader.infos()
    got = {info.key: reader.read(info.key) for info in infos}
    want = torch.load(runs / f"src{stage}.pt", weights_only=True)
    _assert_equal(got, want, f"zero{stage}")
    assert [i.key for i in infos][:3] == ["model/tok_embeddings.weight", "model/layers.0.attention_norm.weight",
                                          "model/layers.0.attention.wq.weight"]  # the model's own order
    assert all(i.dtype == torch.float32 and tuple(got[i.key].shape) == i.shape for i in infos)
    assert state.zero_stage == stage
    assert state.param_groups[1]["params"][-1] == "norm.weight" and state.param_groups[1]["weight_decay"] == 0.0
    assert float(got["optim/norm.weight/step"]) == STEPS  # the engines really stepped
    assert not torch.equal(got["optim/output.weight/exp_avg"], torch.zeros_like(got["optim/output.weight/exp_avg"]))


@pytest.mark.parametrize("source,world,stage", [(s, w, t) for s, targets in CONVERSIONS.items() for w, t in targets])
def test_written_checkpoint_loads_bitwise_in_an_engine_of_another_size(runs: Path, source: int, world: int,
                                                                       stage: int) -> None:
    want = torch.load(runs / f"src{source}.pt", weights_only=True)
    got = torch.load(runs / f"zero{source}-to-w{world}-zero{stage}.pt", weights_only=True)
    _assert_equal(got, want, f"zero{source} at world 2 -> zero{stage} at world {world}")


def test_truncated_or_corrupt_file_is_named(runs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "zero2"
    shutil.copytree(runs / "src" / "zero2", folder)
    victim = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    reader = ZeroReader(folder, StepState(step=STEPS, world_size=2, strategy="deepspeed"))
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt.*truncated or corrupt"):
        reader.read("model/output.weight")  # the second half of the flat group: rank 1's
    first = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    first.write_bytes(b"not a zip" + first.read_bytes()[9:])
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt"):
        ZeroReader(folder, StepState(step=STEPS, world_size=2, strategy="deepspeed"))
    with pytest.raises(CheckpointError, match="world size 4"):
        ZeroReader(runs / "src" / "zero2", StepState(step=STEPS, world_size=4, strategy="deepspeed"))


# ---- no ranks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("zip64", [False, True])
def test_streaming_writer_is_read_by_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                zip64: bool) -> None:
    if zip64:  # every size and offset takes the zip64 fields, as in a file past 4 GiB
        monkeypatch.setattr(torchfile, "ZIP64_LIMIT", 1)
    odd = torch.randn(3, 7)
    half = torch.randn(13).to(torch.bfloat16)
    inline = torch.arange(10.0)
    slots = {"odd": Slot((3, 7), torch.float32), "half": Slot((13,), torch.bfloat16),
             "zero_d": Slot((), torch.float32), "empty": Slot((0,), torch.float16), "padded": Slot((9,), torch.float32)}
    obj = {"a": slots["odd"], "nested": [slots["half"], {"s": slots["zero_d"]}], "empty": slots["empty"],
           "padded": slots["padded"], "inline": inline, "view": inline[3:6], "text": "x", "n": 7}
    path = tmp_path / "f.pt"
    with TorchFileWriter(path, obj) as out:
        out.append(slots["half"], half[:5])  # slots in any order, each in pieces
        out.append(slots["half"], half[5:])
        out.append(slots["odd"], odd[:1])
        out.append(slots["odd"], odd[1:])
        out.append(slots["zero_d"], torch.tensor(2.5))
        out.append(slots["empty"], torch.empty(0, dtype=torch.float16))
        out.append(slots["padded"], torch.ones(4))
        out.append(slots["padded"], zeros=5)
    for mmap in (False, True):
        loaded = torch.load(path, mmap=mmap, weights_only=True)
        assert torch.equal(loaded["a"], odd) and torch.equal(loaded["nested"][0], half)
        assert loaded["nested"][1]["s"].shape == () and float(loaded["nested"][1]["s"]) == 2.5
        assert loaded["empty"].shape == (0,) and loaded["empty"].dtype == torch.float16
        assert torch.equal(loaded["padded"], torch.cat([torch.ones(4), torch.zeros(5)]))
        assert torch.equal(loaded["view"], inline[3:6]) and (loaded["text"], loaded["n"]) == ("x", 7)
    import zipfile

    assert zipfile.ZipFile(path).testzip() is None  # every CRC right


def test_streaming_writer_refuses_short_or_long_slots(tmp_path: Path) -> None:
    slot = Slot((4,), torch.float32)
    out = TorchFileWriter(tmp_path / "f.pt", {"x": slot})
    with pytest.raises(ValueError, match="overflows"):
        out.append(slot, torch.ones(5))
    out.abort()
    slot = Slot((4,), torch.float32)
    with pytest.raises(ValueError, match="got 8 of 16 bytes"):
        with TorchFileWriter(tmp_path / "g.pt", {"x": slot}) as out:
            out.append(slot, torch.ones(2))
            out.close()
    assert not (tmp_path / "g.pt").exists()


def test_layouts_pad_as_deepspeed_does() -> None:
    shapes = {"a": (5,), "b": (3, 3), "c": (1,)}
    # ZeRO-1/2: 15 elements padded to 18 (a multiple of 2 x 3), 6 per rank; c ends rank 2's real data.
    z12 = layout_12([["a", "b", "c"]], shapes, 3)
    assert z12.flat_numel == [6] and z12.saved_numel == [[6], [6], [3]]
    assert [(p.rank, p.offset, p.start, p.count) for p in z12.pieces["b"]] == [(0, 5, 0, 1), (1, 0, 1, 6), (2, 0, 7, 2)]
    # ZeRO-3: every parameter padded to a multiple of 3: a 2+2+1(+1), b 3+3+3, c 1 on rank 0 only.
    z3 = layout_3([["a", "b", "c"]], shapes, 3, sub_groups_by_size([["a", "b", "c"]], shapes, 3, 10**9))
    assert z3.flat_numel == [6] and [(p.rank, p.offset, p.start, p.count) for p in z3.pieces["a"]] == \
        [(0, 0, 0, 2), (1, 0, 2, 2), (2, 0, 4, 1)]
    assert [(p.rank, p.offset) for p in z3.pieces["c"]] == [(0, 5)]
    assert [m for _, m in sub_groups_by_size([["a", "b", "c"]], shapes, 3, 4)] == [["a", "b"], ["c"]]
