"""Hugging Face export and import (hpc/checkpoint/convert/hf.py), checked against transformers itself:
the exported folder loads as a LlamaForCausalLM with our logits, reads back bit for bit, refuses a
folder of another shape by name, and a real job started with checkpoint.init_from trains from it
(step-1 loss equal to transformers' loss on the job's own batch) under FSDP2, DDP and ZeRO-3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from checkpoint_jobs import MemoryReader, metrics, ok, rank0_log, submit

from hpc.bench.harness import local_config
from hpc.checkpoint.convert.hf import CONFIG, INDEX, HfReader, export_hf, model_config_from_hf
from hpc.checkpoint.convert.hf_layout import hf_name
from hpc.checkpoint.convert.neutral import model_key
from hpc.config.schema import ModelConfig
from hpc.train.data import batches_for
from hpc.train.model import Transformer, loss_fn
from hpc.train.strategies.base import build_full_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RTOL = 1e-5
TINY = local_config(2, []).model  # the model the tiny_cpu jobs train


def _model(cfg: ModelConfig, seed: int) -> Transformer:
    """Weights far from the usual 0.02 init: attention then really depends on the rotary layout,
    and the loss differs clearly from a model initialised from the run's seed."""
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.reset_buffers()
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            param.copy_(base + torch.randn(param.shape, generator=gen) * (0.1 if base else 0.15))
    return model


def _reader(model: Transformer) -> MemoryReader:
    return MemoryReader({model_key(n): p.detach().clone() for n, p in model.named_parameters()})


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Transformer, Path]:
    """A tiny GQA model (4 heads, 2 key/value heads) exported in fp32 over several shards."""
    model = _model(TINY, seed=1)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    files = export_hf(_reader(model), out, TINY, dtype=torch.float32, max_shard_bytes=300_000)
    assert len(files) >= 3, files  # the index and shard naming are exercised
    return model, out


def test_transformers_loads_the_export_and_gives_our_logits(exported) -> None:
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.rope_parameters["rope_theta"] == TINY.rope_theta
    tokens = torch.randint(0, TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert _relative(theirs, ours) < RTOL
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"][hf_name("layers.1.feed_forward.w1.weight")].endswith(".safetensors")
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())


def test_reading_the_export_back_is_bitwise_exact(exported, tmp_path) -> None:
    model, out = exported
    expected = dict(model.named_parameters())
    reader = HfReader(out, TINY)
    assert [i.key for i in reader.infos()] == [model_key(n) for n in expected]
    assert reader.state.strategy == "hf" and reader.state.step == 0
    for name, param in expected.items():
        assert torch.equal(reader.read(model_key(name)), param.detach()), name
    wq = model_key("layers.0.attention.wq.weight")  # partial reads: rows across a head, flat ranges
    assert torch.equal(reader.read_rows(wq, 20, 77), reader.read(wq)[20:77])
    assert torch.equal(reader.read_flat(wq, 1000, 9001), reader.read(wq).reshape(-1)[1000:9001])
    reader.close()
    assert ModelConfig(name=TINY.name, **model_config_from_hf(out)) == TINY
    # bf16: what is written is the weights rounded once, and they read back as exactly that.
    export_hf(_reader(model), tmp_path / "bf16", TINY, dtype=torch.bfloat16)
    bf16 = HfReader(tmp_path / "bf16")
    for name, param in expected.items():
        assert torch.equal(bf16.read(model_key(name)), param.detach().to(torch.bfloat16)), name


def test_a_folder_of_another_shape_is_refused_by_name(tmp_path) -> None:
    other = ModelConfig(name="other", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=512)
    export_hf(_reader(_model(other, seed=2)), tmp_path / "dim64", other, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^model\.embed_tokens\.weight \(tok_embeddings\.weight\) in .*dim64 "
                       r"has shape \(512, 64\); model preset tiny expects \(512, 128\); pick the model preset "
                       r"that matches config\.json \(or set model\.dim=64\)$"):
        HfReader(tmp_path / "dim64", TINY)
    # Same shapes, other head count: the rotary row order would be wrong, so it is refused too.
    heads8 = ModelConfig(name="heads8", n_heads=8, n_kv_heads=4)
    export_hf(_reader(_model(heads8, seed=3)), tmp_path / "heads8", heads8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"has 8 attention heads \(4 key/value\), model preset tiny 4 \(2\); "
                       r"pick the model preset that matches config\.json \(or set model\.n_heads=8 "
                       r"model\.n_kv_heads=4\)"):
        HfReader(tmp_path / "heads8", TINY)


def test_missing_and_unexpected_tensors_are_named(tmp_path, exported) -> None:
    from safetensors.torch import load_file, save_file

    _, out = exported
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    config = (out / CONFIG).read_text()
    for name, change in (("missing", {"model.norm.weight": None}),
                         ("biased", {"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / CONFIG).write_text(config)
        save_file({k: v for k, v in {**tensors, **change}.items() if v is not None}, folder / "model.safetensors")
        with pytest.raises(ValueError) as err:
            HfReader(folder, TINY)
        message = str(err.value)
        assert ("has no tensor model.norm.weight (norm.weight)" in message if name == "missing" else
                message.startswith("model.layers.0.self_attn.q_proj.bias in ") and "no place" in message)
    with pytest.raises(ValueError, match="no config.json; point at a Hugging Face model folder"):
        HfReader(tmp_path, TINY)
    # Tied embeddings (e.g. Llama 3.2 1B): no lm_head.weight; our separate output layer starts as a copy.
    folder = tmp_path / "tied"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({**json.loads(config), "tie_word_embeddings": True}))
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, folder / "model.safetensors")
    tied = HfReader(folder, TINY)
    assert torch.equal(tied.read(model_key("output.weight")), tensors["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> Path:
    """The tiny_cpu model's shape, weights unlike any seed's, exported for checkpoint.init_from."""
    out = tmp_path_factory.mktemp("init") / "llama"
    export_hf(_reader(_model(TINY, seed=4)), out, TINY, dtype=torch.float32)
    return out


def _hf_step_loss(folder: Path, world_size: int) -> float:
    """transformers' loss on the global batch of a tiny_cpu job's first step (every rank's samples)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = local_config(world_size, [])
    inputs, targets = zip(*(batches_for(cfg, r, world_size).next_step()[0] for r in range(world_size)))
    with torch.no_grad():
        logits = hf(torch.cat(inputs)).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat(targets).flatten()))


@pytest.mark.dist
def test_a_run_starts_from_init_from_under_fsdp_zero3_and_ddp(tmp_path, init_folder, torch_extensions_dir) -> None:
    # FSDP2 ranks read their rows and ZeRO-3 ranks their flat partitions (2 ranks each); DDP reads
    # whole tensors, the same on any number of ranks (1 here: a quicker job).
    losses, read_mb = {}, {}
    for strategy, ranks in (("fsdp_full_shard", 2), ("zero3", 2), ("ddp", 1)):
        ok(submit(tmp_path, strategy, f"strategy={strategy}", f"gpus_per_node={ranks}", "train.max_steps=2",
                  f"checkpoint.init_from={init_folder}", extensions=torch_extensions_dir))
        losses[strategy] = [m["loss"] for m in metrics(tmp_path / strategy)]
        read_mb[strategy] = float(re.findall(r"\(checkpoint\.init_from\): ([\d.]+) MB read by rank 0",
                                             rank0_log(tmp_path / strategy))[0])
        expected = _hf_step_loss(init_folder, ranks)
        assert abs(losses[strategy][0] - expected) <= RTOL * expected, (strategy, losses[strategy], expected)
    # Step 2 runs on what the optimizer stepped: DeepSpeed's fp32 master copy got the weights too,
    # else its step 2 would start again from the seed's weights.
    fsdp, zero3 = losses["fsdp_full_shard"][1], losses["zero3"][1]
    assert abs(zero3 - fsdp) <= RTOL * fsdp, losses
    # A sharded rank reads about its half (q/k slices read whole heads), DDP the whole model.
    for strategy in ("fsdp_full_shard", "zero3"):
        assert read_mb[strategy] < 0.6 * read_mb["ddp"], read_mb
    # The seed's own weights give another loss: the folder's weights really were loaded.
    cfg = local_config(1, [])
    inputs, targets = batches_for(cfg, 0, 1).next_step()[0]
    with torch.no_grad():
        seeded = float(loss_fn(build_full_model(cfg, torch.device("cpu"))(inputs), targets))
    assert abs(seeded - losses["ddp"][0]) > 0.1
