"""DeepSpeed ZeRO-1/2/3 step folders, read and written at any world size without DeepSpeed running.

What `engine.save_checkpoint(dir, tag)` leaves in `dir/tag/` (DeepSpeed 0.19), and what
`load_checkpoint` reads back (where each element sits: zero_layout.py):

  ZeRO-1/2  `mp_rank_00_model_states.pt`: "module", the model's state dict in the model's dtype,
            loaded into the module (for fp32 training the master weights themselves, for bf16 their
            bf16 copies); "param_shapes" (per optimizer group, fqn -> shape in flat order);
            global_steps, dp_world_size (must equal the loading world size), ds_config, ...
            `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank (bf16_ when bf16 is on):
            partition R of each group's fp32 master weights ("single_partition_of_fp32_groups":
            ZeRO-1/2 drop its trailing padding; the BF16 optimizer, which ZeRO-1 uses for bf16 with
            fp32 gradient accumulation, keeps it and saves other metadata) and torch AdamW's state
            of that flat partition ("base_optimizer_state": exp_avg, exp_avg_sq of the padded
            partition's size, step per group). The fp32 partitions are what the engine resumes from.
  ZeRO-3    `zero_pp_rank_R_mp_rank_00_model_states.pt` per rank: the same metadata, "module" empty
            placeholders; the optimizer file holds "fp32_flat_groups" (one per sub-group) and the
            AdamW state of each, the weights coming back from them alone.

Reading memory-maps the files and copies out only the slices a tensor needs; writing streams each
rank's files through `torchfile`, so neither ever holds a rank's partition whole. fp16 targets are
refused: their dynamic loss scale is not in the neutral format.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpc.checkpoint.convert.neutral import (ADAM_STATES, MODEL, StepState, TensorInfo, adamw_group_defaults,
                                            model_key, optim_key, split_key)
from hpc.checkpoint.convert.torchfile import Slot, TorchFileWriter
from hpc.checkpoint.convert.zero_pickles import STAND_INS, FragmentAddress, ZeroStage, loss_scaler
from hpc.checkpoint.convert.zero_layout import (MODEL_STATES, Layout, alignment_padding, layout_3, layout_12,
                                                model_dtype, model_states_name, optim_states_name, round_robin,
                                                sub_groups_by_numel, sub_groups_by_size, uses_bf16_optimizer)
from hpc.checkpoint.manifest import CheckpointError

_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_READ_BUDGET = 128 << 20
"""Bytes of mapped file pages read before the open files are dropped: touched pages of a mapping
count in the reader's RSS until it is unmapped, and a whole checkpoint may not fit in memory."""
_SLOTS = ("fp32", "exp_avg", "exp_avg_sq", "step")


# ---- reading --------------------------------------------------------------------------------------

def load_file(path: Path) -> Any:
    """One DeepSpeed file, memory-mapped; a missing, truncated or corrupt file names itself."""
    try:
        with torch.serialization.safe_globals(STAND_INS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the DeepSpeed checkpoint") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable DeepSpeed checkpoint file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); it is truncated or corrupt. "
                              f"HINT: copy the step again from where it was saved, or convert another step") from err


class ZeroReader:
    """A DeepSpeed ZeRO step folder, any stage and world size, read one whole tensor at a time."""

    def __init__(self, folder: Path, state: StepState) -> None:
        self.folder, self.state = Path(folder), state
        self._open: dict[int, Any] = {}
        self._read_bytes = 0
        names = {int(m[2]): p.name for p in self.folder.iterdir() if (m := _OPTIM_FILE.match(p.name))}
        world = len(names)
        if not world or sorted(names) != list(range(world)):
            raise CheckpointError(f"{self.folder}: expected zero_pp_rank_R_mp_rank_00_optim_states.pt for ranks "
                                  f"0..N-1, found ranks {sorted(names)}; is this a DeepSpeed ZeRO step folder?")
        if state.world_size and state.world_size != world:
            raise CheckpointError(f"{self.folder}: holds {world} ranks' optimizer files, but its manifest says "
                                  f"world size {state.world_size}; files are missing or left over from another save")
        self._names = [names[r] for r in range(world)]
        first = self._osd(0)
        stage3 = "fp32_flat_groups" in first
        model_file = self.folder / (model_states_name(0, 3) if stage3 else MODEL_STATES)
        with self._context(model_file):
            meta = load_file(model_file)
            shape_groups = meta["param_shapes"]
            module_order = list(meta["module"].keys())
        del meta
        groups = [list(g.keys()) for g in shape_groups]
        shapes = {fqn: tuple(int(d) for d in s) for g in shape_groups for fqn, s in g.items()}
        with self._context(self.folder / self._names[0]):
            if stage3:
                base = first["optimizer_state_dict"]
                numel = [t.numel() for t in first["fp32_flat_groups"]]
                self.layout = layout_3(groups, shapes, world,
                                       sub_groups_by_numel(groups, shapes, world, numel, model_file))
            else:
                base = first["base_optimizer_state"]
                self.layout = layout_12(groups, shapes, world, param_padding=first.get("param_alignment_paddings"),
                                        keep_padding="zero_stage" not in first)
            self._check_sizes(first, stage3)
            self._state_ids = [i for g in base["param_groups"] for i in g["params"]] \
                if isinstance(base, dict) else list(range(len(groups)))
            hyper = base["param_groups"] if isinstance(base, dict) else None
        self.stage = 3 if stage3 else int(first.get("zero_stage", 1))
        self.model_order = [f for f in module_order if f in shapes]
        state.world_size, state.strategy, state.zero_stage = world, "deepspeed", self.stage
        order = {fqn: i for i, fqn in enumerate(self.model_order)}
        state.param_groups = [
            {**({k: v for k, v in hyper[g].items() if k != "params"} if hyper else {}),
             "params": sorted(group, key=order.__getitem__)} for g, group in enumerate(groups)]
        self._has_adam = bool(self._adam_state(first, 0))

    @contextlib.contextmanager
    def _context(self, path: Path) -> Iterator[None]:
        try:
            yield
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}: not laid out as a DeepSpeed ZeRO checkpoint of this version "
                                  f"({type(err).__name__}: {err})") from err

    def _osd(self, rank: int) -> dict[str, Any]:
        if rank not in self._open:
            path = self.folder / self._names[rank]
            with self._context(path):
                self._open[rank] = load_file(path)["optimizer_state_dict"]
        return self._open[rank]

    def _adam_state(self, osd: dict[str, Any], flat: int) -> dict[str, Any]:
        base = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
        if isinstance(base, list):  # an elastic save: one unpadded state per group
            return base[flat]
        return base["state"].get(self._state_ids[flat], {})

    def _check_sizes(self, first: dict[str, Any], stage3: bool) -> None:
        saved = [t.numel() for t in first["fp32_flat_groups" if stage3 else "single_partition_of_fp32_groups"]]
        if saved != self.layout.saved_numel[0]:
            raise CheckpointError(
                f"{self.folder / self._names[0]}: fp32 partitions of {saved} elements, but the saved parameter "
                f"shapes and world size {self.layout.world} give {self.layout.saved_numel[0]}; a DeepSpeed "
                f"layout this reader does not know (round_robin_gradients is read from param_shapes' order)")

    def infos(self) -> list[TensorInfo]:
        shapes = self.layout.shapes
        out = [TensorInfo(model_key(f), shapes[f], torch.float32) for f in self.model_order]
        if self._has_adam:
            for name in ADAM_STATES:
                out += [TensorInfo(optim_key(f, name), () if name == "step" else shapes[f], torch.float32)
                        for f in self.model_order]
        return out

    def read(self, key: str) -> torch.Tensor:
        kind, fqn, name = split_key(key)
        if fqn not in self.layout.pieces or (kind != MODEL and (name not in ADAM_STATES or not self._has_adam)):
            raise KeyError(f"{key}: not in the DeepSpeed checkpoint {self.folder}")
        if name == "step":
            flat = self.layout.pieces[fqn][0].flat
            with self._context(self.folder / self._names[0]):
                osd = self._osd(0)
                step = osd["base_optimizer_state_step"] if isinstance(osd.get("base_optimizer_state"), list) \
                    else self._adam_state(osd, flat)["step"]
            return torch.as_tensor(step, dtype=torch.float32).clone().reshape(())
        out = torch.empty(math.prod(self.layout.shapes[fqn]), dtype=torch.float32)
        for piece in self.layout.pieces[fqn]:
            with self._context(self.folder / self._names[piece.rank]):
                osd = self._osd(piece.rank)
                if kind == MODEL:
                    source = osd["fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"]
                    source = source[piece.flat]
                else:
                    source = self._adam_state(osd, piece.flat)[name]
            out[piece.start:piece.start + piece.count] = source[piece.offset:piece.offset + piece.count]
            self._read_bytes += piece.count * source.element_size()
        if self._read_bytes > _READ_BUDGET:
            self._open.clear()  # unmaps them; reopened (the small pickle only) when next needed
            self._read_bytes = 0
        return out.view(self.layout.shapes[fqn])

    def close(self) -> None:
        self._open.clear()


# ---- writing --------------------------------------------------------------------------------------

def _adamw_defaults(state: StepState) -> dict[str, Any]:
    """AdamW's hyperparameters for a source that kept none (e.g. weights imported from Hugging Face):
    torch's defaults with the step's config's lr, betas and weight decay."""
    defaults = adamw_group_defaults()
    if state.config_yaml:
        import yaml

        train = (yaml.safe_load(state.config_yaml) or {}).get("train", {})
        defaults.update(lr=float(train.get("lr", defaults["lr"])),
                        betas=(float(train.get("beta1", 0.9)), float(train.get("beta2", 0.999))),
                        weight_decay=float(train.get("weight_decay", defaults["weight_decay"])))
    return defaults


@dataclass
class _Plan:
    """Everything a part needs to write its files: picklable, no open files."""

    folder: Path
    layout: Layout
    stage: int
    dtype: torch.dtype
    bf16_files: bool
    bf16_optimizer: bool
    ds_config: dict[str, Any]
    hyper: list[dict[str, Any]]
    has_adam: bool
    meta: dict[str, Any]
    """The model-states fields other than "module"."""


class ZeroWriter:
    """A DeepSpeed ZeRO step folder for `world_size` ranks at `zero_stage`, as `load_checkpoint` reads it."""

    def __init__(self, folder: Path, state: StepState, infos: list[TensorInfo], *, world_size: int,
                 zero_stage: int, ds_config: dict[str, Any]) -> None:
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage}: DeepSpeed ZeRO checkpoints have stage 1, 2 or 3")
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: a checkpoint needs at least one rank")
        dtype = model_dtype(ds_config)
        if dtype == torch.float16:
            raise CheckpointError("fp16 targets are not supported: their dynamic loss scale is not in the neutral "
                                  "format. HINT: convert for strategy.mixed_precision=bf16 or fp32")
        self.folder = Path(folder)
        shapes = {split_key(i.key)[1]: tuple(i.shape) for i in infos if i.key.startswith(MODEL + "/")}
        order = list(shapes)
        keys = {i.key for i in infos}
        has_adam = all(optim_key(f, s) in keys for f in order for s in ADAM_STATES)
        if not has_adam and any(i.kind == "optimizer" for i in infos):
            raise CheckpointError("the source has Adam state for some parameters only; DeepSpeed needs all or none")
        groups, hyper = self._groups(state, order, shapes)
        zero = ds_config.get("zero_optimization") or {}
        if zero_stage == 3:
            layout = layout_3(groups, shapes, world_size, sub_groups_by_size(
                groups, shapes, world_size, int(zero.get("sub_group_size", 10**9))))
        else:
            if zero.get("round_robin_gradients"):
                groups = [round_robin(g, world_size) for g in groups]
            align = 16 // math.gcd(16, dtype.itemsize) if zero.get("parameter_alignment") else 1
            layout = layout_12(groups, shapes, world_size, param_padding=alignment_padding(groups, shapes, align),
                               keep_padding=uses_bf16_optimizer(ds_config, zero_stage))
        layout.stage = zero_stage
        batch = int(ds_config.get("train_micro_batch_size_per_gpu", 1)) * \
            int(ds_config.get("gradient_accumulation_steps", 1)) * world_size
        meta = {"global_steps": state.step,
                "global_samples": int(state.data.get("consumed_samples", state.step * batch)),
                "dp_world_size": world_size}
        self.plan = _Plan(self.folder, layout, zero_stage, dtype, model_dtype(ds_config) == torch.bfloat16,
                          uses_bf16_optimizer(ds_config, zero_stage), ds_config, hyper, has_adam, meta)

    @staticmethod
    def _groups(state: StepState, order: list[str], shapes: dict[str, tuple[int, ...]]
                ) -> tuple[list[list[str]], list[dict[str, Any]]]:
        """The optimizer groups in model order: the source's, else hpc.train.optim's rule (decay
        matrices, not vectors)."""
        if state.param_groups:
            seen = {f for g in state.param_groups for f in g["params"]}
            if seen != set(order):
                raise CheckpointError(f"the source's optimizer groups name {len(seen)} parameters, its model has "
                                      f"{len(order)}: {sorted(seen ^ set(order))[:4]}")
            index = {fqn: i for i, fqn in enumerate(order)}
            groups = [sorted(g["params"], key=index.__getitem__) for g in state.param_groups]
            defaults = _adamw_defaults(state)
            hyper = [{**defaults, **{k: v for k, v in g.items() if k != "params"}} for g in state.param_groups]
        else:
            defaults = _adamw_defaults(state)
            groups = [[f for f in order if len(shapes[f]) >= 2], [f for f in order if len(shapes[f]) < 2]]
            hyper = [dict(defaults), {**defaults, "weight_decay": 0.0}]
        for h in hyper:
            h["betas"] = tuple(h["betas"])  # a JSON round trip makes it a list; AdamW unpacks either
        return groups, hyper

    def parts(self, workers: int) -> list[ZeroPart]:
        world = self.plan.layout.world
        module_alone = self.plan.stage < 3 and workers >= 2
        count = max(1, min(world, workers - int(module_alone)))
        bounds = [world * i // count for i in range(count + 1)]
        parts = [ZeroPart(self.plan, range(bounds[i], bounds[i + 1]),
                          module=self.plan.stage < 3 and not module_alone and i == 0) for i in range(count)]
        if module_alone:
            parts.insert(0, ZeroPart(self.plan, range(0), module=True))
        return parts

    def finish(self, records: list[Any]) -> None:
        world = self.plan.layout.world
        ranks = sorted(r for rec in records for r in rec["ranks"])
        if ranks != list(range(world)) or (self.plan.stage < 3 and not any(rec["module"] for rec in records)):
            raise CheckpointError(f"{self.folder}: parts wrote ranks {ranks} of {world}; a part is missing")
        if self.plan.stage == 3:
            # ZeRO-3 restores the weights from the optimizer files; the module entries are placeholders.
            module = OrderedDict((f, torch.empty(0, dtype=self.plan.dtype)) for f in self.plan.layout.shapes)
            self.folder.mkdir(parents=True, exist_ok=True)
            for rank in range(world):
                with TorchFileWriter(self.folder / model_states_name(rank, 3), _model_states(self.plan, module)):
                    pass


def _version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


def _model_states(plan: _Plan, module: Any) -> dict[str, Any]:
    layout = plan.layout
    frozen = OrderedDict() if plan.stage >= 2 else None
    return {"module": module, "buffer_names": [], "optimizer": None,
            "param_shapes": [OrderedDict((f, torch.Size(layout.shapes[f])) for f in g) for g in layout.groups],
            "frozen_param_shapes": frozen, "shared_params": {}, "frozen_param_fragments": frozen,
            "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
            **plan.meta, "mp_world_size": 1, "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
            "ds_config": plan.ds_config, "ds_version": _version()}


class _RankFile:
    """One rank's optimizer-states file: its slots filled strictly in order, gaps with zeros."""

    def __init__(self, plan: _Plan, rank: int) -> None:
        layout, flats = plan.layout, range(len(plan.layout.flat_numel))
        self.slots = {("fp32", f): Slot((layout.saved_numel[rank][f],), torch.float32) for f in flats}
        for name in ("exp_avg", "exp_avg_sq"):
            self.slots.update({(name, f): Slot((layout.flat_numel[f],), torch.float32) for f in flats})
        self.slots.update({("step", f): Slot((), torch.float32) for f in flats})
        self.order = [(name, f) for name in _SLOTS for f in flats]
        self.at, self.filled = 0, 0
        state = {f: {"step": self.slots["step", f], "exp_avg": self.slots["exp_avg", f],
                     "exp_avg_sq": self.slots["exp_avg_sq", f]} for f in flats}
        groups = [{**h, "params": [f for f in flats if layout.flat_group[f] == g]} for g, h in enumerate(plan.hyper)]
        base = {"state": state, "param_groups": groups}
        fp32 = [self.slots["fp32", f] for f in flats]
        world = layout.world
        if plan.stage == 3:
            osd: dict[str, Any] = {"zero_stage": ZeroStage(3), "loss_scaler": loss_scaler(),
                                   "dynamic_loss_scale": False, "overflow": False, "partition_count": world,
                                   "optimizer_state_dict": base, "fp32_flat_groups": fp32}
        else:
            mappings = [OrderedDict((fqn, FragmentAddress(numel=p.count, start=p.offset))
                                    for fqn in group for p in layout.pieces[fqn] if p.rank == rank)
                        for group in layout.groups]
            clip = float(plan.ds_config.get("gradient_clipping", 0.0))
            if plan.bf16_optimizer:  # its padding is all counted on the last rank
                paddings = [layout.flat_numel[f] * world - layout.used[f] if rank == world - 1 else 0 for f in flats]
                osd = {"clip_grad": clip, "base_optimizer_state": base, "single_partition_of_fp32_groups": fp32,
                       "group_paddings": paddings, "partition_count": [world] * len(flats),
                       "ds_version": _version(), "param_slice_mappings": mappings}
            else:
                paddings = [layout.flat_numel[f] - min(max(layout.used[f] - rank * layout.flat_numel[f], 0),
                                                       layout.flat_numel[f]) for f in flats]
                osd = {"loss_scaler": loss_scaler(), "dynamic_loss_scale": False, "overflow": False,
                       "clip_grad": clip, "base_optimizer_state": base, "single_partition_of_fp32_groups": fp32,
                       "zero_stage": ZeroStage(plan.stage), "group_paddings": paddings,
                       "param_alignment_paddings": layout.param_padding, "partition_count": [world] * len(flats),
                       "ds_version": _version(), "param_slice_mappings": mappings}
        self.name = optim_states_name(rank, plan.bf16_files)
        self.out = TorchFileWriter(plan.folder / self.name, {"optimizer_state_dict": osd,
                                                             "ds_config": plan.ds_config, "ds_version": _version()})

    def put(self, name: str, flat: int, offset: int, data: torch.Tensor) -> None:
        target = self.order.index((name, flat))
        if target < self.at or (target == self.at and offset < self.filled):
            raise RuntimeError(f"{self.name}: {name} of flat {flat} at {offset} arrived out of order")
        while self.at < target:
            self._pad_to_end()
        slot = self.slots[self.order[self.at]]
        if offset > self.filled:
            self.out.append(slot, zeros=offset - self.filled)
        self.out.append(slot, data)
        self.filled = offset + data.numel()

    def _pad_to_end(self) -> None:
        slot = self.slots[self.order[self.at]]
        self.out.append(slot, zeros=slot.numel - self.filled)
        self.at, self.filled = self.at + 1, 0

    def close(self) -> None:
        while self.at < len(self.order):
            self._pad_to_end()
        self.out.close()


class ZeroPart:
    """The files of some ranks (and, for ZeRO-1/2, maybe the model-states file)."""

    def __init__(self, plan: _Plan, ranks: range, *, module: bool) -> None:
        self.plan, self.ranks, self.module = plan, ranks, module
        layout = plan.layout
        flat_order = layout.fqns()
        mine = [f for f in flat_order if layout.on_ranks(f, ranks)]
        self.keys = [model_key(f) for f in (flat_order if module else mine)]
        if plan.has_adam and len(ranks):
            for name in ("exp_avg", "exp_avg_sq"):
                self.keys += [optim_key(f, name) for f in mine]
            self.keys += [optim_key(g[0], "step") for g in layout.groups if g]
        self._files: list[_RankFile] | None = None
        self._module: tuple[TorchFileWriter, dict[str, Slot]] | None = None

    def _open(self) -> None:
        if self._files is not None:
            return
        self.plan.folder.mkdir(parents=True, exist_ok=True)
        if self.module:
            shapes = self.plan.layout.shapes
            slots = OrderedDict((f, Slot(shapes[f], self.plan.dtype)) for f in shapes)
            self._module = (TorchFileWriter(self.plan.folder / MODEL_STATES, _model_states(self.plan, slots)), slots)
        self._files = [_RankFile(self.plan, r) for r in self.ranks]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._open()
        kind, fqn, name = split_key(key)
        layout = self.plan.layout
        if fqn not in layout.shapes or tuple(tensor.shape) != (() if name == "step" else layout.shapes[fqn]):
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} does not fit the DeepSpeed layout being "
                                  f"written ({layout.shapes.get(fqn)})")
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1)
        if kind == MODEL and self._module is not None:
            out, slots = self._module
            out.append(slots[fqn], flat.to(self.plan.dtype))
        assert self._files is not None
        if name == "step":
            group = next(g for g, members in enumerate(layout.groups) if fqn in members)
            for file in self._files:
                for f, g in enumerate(layout.flat_group):
                    if g == group:
                        file.put("step", f, 0, flat)
            return
        slot = "fp32" if kind == MODEL else name
        for piece in layout.on_ranks(fqn, self.ranks):
            self._files[piece.rank - self.ranks.start].put(slot, piece.flat, piece.offset,
                                                           flat[piece.start:piece.start + piece.count])

    def close(self) -> dict[str, Any]:
        self._open()
        assert self._files is not None
        if self._module is not None:
            self._module[0].close()
        for file in self._files:
            file.close()
        return {"ranks": list(self.ranks), "module": self.module,
                "files": [f.name for f in self._files] + ([MODEL_STATES] if self.module else [])}
