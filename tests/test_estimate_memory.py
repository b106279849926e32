"""The planner's memory numbers against the real thing: the model's parameter shapes, the bytes
autograd saves for backward (counted with saved_tensors_hooks), and the model states each engine
really holds on every rank (counted from the engines' own tensors, DeepSpeed's partitions
included) at world sizes 1, 2 and 4."""

from __future__ import annotations

import pytest
import torch

from hpc.bench.harness import local_config
from hpc.config import compose
from hpc.estimate.activations import activations, autocast_weight_copies
from hpc.estimate.shape import count_params, tensor_shapes
from hpc.train.model import Transformer, loss_fn, parameter_shapes


@pytest.mark.parametrize("model", ["tiny", "small", "llama3_70b"])
def test_the_planner_knows_every_parameter_of_the_model(model: str) -> None:
    cfg = local_config(1, [f"model={model}"]).model
    assert list(tensor_shapes(cfg).items()) == list(parameter_shapes(cfg).items())
    if model == "llama3_70b":
        assert round(count_params(cfg) / 1e9, 2) == 70.55


def _saved_bytes(model_name: str, mode: str, policy: str, batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward over one forward and the loss: every saved tensor's storage
    once, the model's own parameters and rotary table left out."""
    m = local_config(1, [f"model={model_name}"]).model
    torch.manual_seed(0)
    model = Transformer(m)
    model.init_weights()
    model.set_activation_checkpointing(policy, 2)
    if mode == "half":
        model.to(torch.bfloat16)
        model.rope.data = model.rope.float()  # as FSDP and DeepSpeed keep it
    own = {p.untyped_storage().data_ptr() for p in model.parameters()} | {model.rope.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, m.vocab_size, (batch, seq))
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with cast:
            logits = model(tokens)
        loss_fn(logits, tokens)
    return sum(seen.values())


@pytest.mark.parametrize("model_name", ["tiny", "small"])
@pytest.mark.parametrize("mode", ["fp32", "half", "autocast"])
@pytest.mark.parametrize("policy", ["none", "all", "every_k"])
def test_activation_bytes_are_what_autograd_saves(model_name: str, mode: str, policy: str) -> None:
    batch, seq = 2, 48
    m = local_config(1, [f"model={model_name}"]).model
    predicted = activations(m, batch, seq, mode, policy, every_k=2).saved
    if mode == "autocast":  # the weight casts are saved too; the planner counts them as a buffer
        predicted += autocast_weight_copies(m, policy, 2)
    measured = _saved_bytes(model_name, mode, policy, batch, seq)
    # The accounting is exact: a change to the model that it misses shows here first.
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


STRATEGIES = ("ddp", "fsdp_no_shard", "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_hybrid_shard", "zero1", "zero2",
              "zero3", "zero3_offload")
STATE_OVERRIDES = ("model=tiny", "train.seq_len=32", "train.micro_batch_size=1")


def _cases(precision: str, grad_accum: int = 1, names: tuple[str, ...] = STRATEGIES) -> dict[str, list[str]]:
    return {f"{name} {precision}": [*STATE_OVERRIDES, f"strategy={name}", f"strategy.mixed_precision={precision}",
                                    f"train.grad_accum={grad_accum}"] for name in names}


@pytest.mark.parametrize("world", [2, 4])  # (1 rank is the 2-rank arithmetic without the division: 57 s of suite)
def test_model_states_are_what_every_rank_of_every_engine_holds(world: int, tmp_path) -> None:
    """bf16 (the GPU case: DeepSpeed's BF16_Optimizer, FSDP's mixed precision) at 2 and 4 ranks, and
    DeepSpeed in fp32 (its other optimizer path; DDP and FSDP keep fp32 state either way) with two
    micro-batches per step (ZeRO-1 then holds whole gradients) at 2 ranks, one process group per size."""
    from hpc.bench.harness import run_ranks
    from hpc.bench.memory_census import census_cases
    from hpc.estimate.memory import model_states

    fp32 = _cases("fp32", grad_accum=2, names=("zero1", "zero2", "zero3")) if world == 2 else {}
    cases = {**_cases("bf16"), **fp32}
    measured = run_ranks(world, census_cases, {"cases": cases}, tmp_path, timeout_s=600)
    worst = {}
    for label, overrides in cases.items():
        predicted = model_states(local_config(world, overrides))
        for rank, held in enumerate(measured[label]):
            for kind in ("params", "grads", "optimizer"):
                want, got = getattr(predicted, kind), held[kind]
                error = abs(want - got) / got
                worst[kind] = max(worst.get(kind, 0.0), error)
                assert error <= 0.02, f"{label} rank {rank} {kind}: predicted {want}, holds {got}"
    print(f"world {world}: largest relative error per component {worst}")


def test_the_zero_papers_example_gives_the_papers_numbers() -> None:
    """ZeRO (Rajbhandari et al., 2020), figure 1: 7.5B parameters on 64 GPUs, mixed-precision (fp16)
    Adam: 120 / 31.4 / 16.6 / 1.9 GB of model states per GPU for DDP / ZeRO-1 / ZeRO-2 / ZeRO-3.
    (ZeRO-1 holds whole gradients while they accumulate: two micro-batches per step.)"""
    from hpc.estimate.memory import model_states

    shape = ["model.dim=4096", "model.n_layers=36", "model.n_heads=32", "model.n_kv_heads=32", "model.ffn_dim=11008",
             "model.vocab_size=26100", "nodes=8", "gpus_per_node=8", "strategy.mixed_precision=fp16",
             "train.grad_accum=2"]
    cfg = compose(["exp=70b_zero3", "cluster=slurm", *shape])
    assert abs(count_params(cfg.model) / 7.5e9 - 1) < 1e-3
    got = {}
    for name in ("ddp", "zero1", "zero2", "zero3"):
        states = model_states(compose(["exp=70b_zero3", "cluster=slurm", *shape, f"strategy={name}"]))
        got[name] = round((states.params + states.grads + states.optimizer) / 1e9, 1)
    assert got == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
