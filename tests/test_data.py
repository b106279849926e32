"""Token sources and the global batch order: determinism, learnability, files, errors, resume."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc.config.schema import DataConfig
from hpc.train.data import DataError, GlobalBatches, SyntheticTokens, TokenFile, open_source

ROOT = Path(__file__).resolve().parents[1]


def make_tokens(out: Path, *inputs: Path, dtype: str = "uint16") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "make_tokens.py"), str(out), *map(str, inputs),
           "--dtype", dtype]
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def write_tokens(path: Path, tokens: np.ndarray, dtype: str = "uint16", **meta: object) -> Path:
    """A token file with its sidecar, as tools/make_tokens.py would write it."""
    np.asarray(tokens, dtype=dtype).tofile(path)
    sidecar = {"dtype": dtype, "num_tokens": len(tokens), **meta}
    Path(str(path) + ".json").write_text(json.dumps(sidecar))
    return path


# --- synthetic stream -------------------------------------------------------------------------

def test_synthetic_sample_is_a_pure_function_of_seed_and_index() -> None:
    a, b = SyntheticTokens(512, 64, seed=3), SyntheticTokens(512, 64, seed=3)
    first = a.sample(7)
    a.sample(8)  # reading other samples in between must not change anything
    assert first.dtype == np.int64 and first.shape == (65,)
    assert np.array_equal(first, a.sample(7))
    assert np.array_equal(first, b.sample(7))
    assert not np.array_equal(a.sample(7), a.sample(8))
    assert 0 <= first.min() and first.max() < 512


def test_synthetic_seeds_differ() -> None:
    a, b = SyntheticTokens(512, 64, seed=0), SyntheticTokens(512, 64, seed=1)
    assert not np.array_equal(a.sample(0), b.sample(0))
    # The chain itself (not only the walk through it) depends on the seed.
    assert not np.array_equal(a.successors(5), b.successors(5))


def test_synthetic_stream_is_learnable() -> None:
    """Next-token entropy far below ln(vocab): a model has something to learn."""
    vocab = 256
    src = SyntheticTokens(vocab, 256, seed=0)
    pairs = Counter()
    for i in range(200):
        s = src.sample(i)
        pairs.update(zip(s[:-1].tolist(), s[1:].tolist()))
    prev = Counter()
    for (a, _), n in pairs.items():
        prev[a] += n
    total = sum(pairs.values())
    entropy = -sum(n / total * math.log(n / prev[a]) for (a, _), n in pairs.items())
    assert entropy < 0.3 * math.log(vocab), entropy
    # Every observed successor is one of the token's few table successors.
    for (a, b) in pairs:
        assert b in src.successors(a)
    # And the unigram is broad: the stream is not stuck in a corner of the vocabulary.
    assert len(prev) > 0.9 * vocab


def test_synthetic_tiny_vocab_and_bad_arguments() -> None:
    assert set(SyntheticTokens(1, 8, seed=0).sample(0).tolist()) == {0}
    assert SyntheticTokens(3, 8, seed=0).sample(0).max() < 3
    with pytest.raises(DataError, match="must be at least 1"):
        SyntheticTokens(0, 8, seed=0)
    with pytest.raises(DataError, match="seed >= 0"):
        SyntheticTokens(8, 8, seed=-1)


# --- token files ------------------------------------------------------------------------------

def test_make_tokens_round_trip(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    texts = {"a.txt": "hello world\n" * 50, "b.md": "# Überschrift — naïve café ☕\n" * 30,
             "sub/c.py": "print('x')\n" * 40}
    for name, text in texts.items():
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    out = tmp_path / "out" / "tok.bin"
    out.parent.mkdir()
    result = make_tokens(out, corpus)
    assert "3 files (1 skipped)" in result.stdout and "tokens" in result.stdout
    assert "skipping" in result.stderr and "blob.bin" in result.stderr

    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["tokenizer"] == "bytes"
    tokens = np.fromfile(out, dtype=np.uint16)
    assert meta["num_tokens"] == len(tokens)
    # Documents come back byte for byte, in sorted path order, separated by the end-of-document id.
    docs, doc = [], []
    for t in tokens.tolist():
        if t == 256:
            docs.append(bytes(doc).decode("utf-8"))
            doc = []
        else:
            doc.append(t)
    docs.append(bytes(doc).decode("utf-8"))
    assert docs == [texts["a.txt"], texts["b.md"], texts["sub/c.py"]]

    seq = 16
    tf = TokenFile(str(out), seq, vocab_size=257)
    assert tf.dtype == "uint16" and tf.num_samples == (len(tokens) - 1) // seq
    assert np.array_equal(tf.sample(2), tokens[2 * seq:3 * seq + 1].astype(np.int64))
    assert bytes(tf.sample(0)[:seq].tolist()).decode() == texts["a.txt"][:seq]
    assert not list(out.parent.glob("*.tmp-*")), "temporary files left behind"


def test_make_tokens_uint32(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("abc" * 20)
    out = tmp_path / "x.bin"
    make_tokens(out, tmp_path / "x.txt", dtype="uint32")
    assert out.stat().st_size == 60 * 4
    assert TokenFile(str(out), 8).sample(0)[:3].tolist() == [97, 98, 99]


def test_make_tokens_streams_characters_split_across_chunks(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("make_tokens", ROOT / "tools" / "make_tokens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "CHUNK", 3)  # every multi-byte character straddles a chunk boundary
    text = "añ€😀" * 10
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    meta = tool.make_tokens(str(tmp_path / "u.bin"), [str(tmp_path / "u.txt")])
    assert meta["skipped_files"] == 0 and meta["num_tokens"] == len(text.encode())
    assert bytes(np.fromfile(tmp_path / "u.bin", dtype=np.uint16).tolist()).decode() == text


def test_token_file_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.bin: no such token file; write one with python tools/make_tokens\.py"):
        TokenFile(str(tmp_path / "nope.bin"), 8)


def test_token_file_auto_dtype_needs_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=r"data.dtype=auto needs the sidecar .*raw\.bin\.json.*set data.dtype=uint16"):
        TokenFile(str(path), 8)
    assert TokenFile(str(path), 8, dtype="uint16").num_samples == 99 // 8


def test_token_file_size_not_a_multiple_of_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00" * 20 + b"\x01")
    with pytest.raises(DataError, match=r"odd\.bin: 41 bytes is not a whole number of uint16 tokens"):
        TokenFile(str(path), 4, dtype="uint16")


def test_token_file_too_few_tokens(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "short.bin", np.arange(8), vocab_size=257)
    with pytest.raises(DataError, match=r"short\.bin: 8 tokens are too few for one sample of "
                                        r"train.seq_len=8 \(needs 9\)"):
        TokenFile(str(path), 8)
    assert TokenFile(str(path), 7).num_samples == 1


def test_token_file_vocab_larger_than_model(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "big.bin", np.arange(100), vocab_size=50000)
    with pytest.raises(DataError, match=r"vocab_size=50000 is larger than model.vocab_size=512.*"
                                        r"set model.vocab_size=50000"):
        TokenFile(str(path), 8, vocab_size=512)


def test_token_file_id_past_vocab_without_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "raw.bin"
    np.full(20, 600, dtype=np.uint16).tofile(path)
    tf = TokenFile(str(path), 8, dtype="uint16", vocab_size=512)
    with pytest.raises(DataError, match="token id 600 in sample 0 is not below model.vocab_size=512"):
        tf.sample(0)


def test_token_file_dtype_and_length_disagree_with_sidecar(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "t.bin", np.arange(100), dtype="uint16", vocab_size=257)
    with pytest.raises(DataError, match="data.dtype=uint32 but its sidecar says uint16"):
        TokenFile(str(path), 8, dtype="uint32")
    Path(str(path) + ".json").write_text(json.dumps({"dtype": "uint16", "num_tokens": 200}))
    with pytest.raises(DataError, match="sidecar says 200 tokens but the file holds 100"):
        TokenFile(str(path), 8)


def test_open_source(tmp_path: Path) -> None:
    src = open_source(DataConfig(), vocab_size=64, seq_len=16, seed=1)
    assert isinstance(src, SyntheticTokens) and src.sample(0).shape == (17,)
    path = write_tokens(tmp_path / "t.bin", np.arange(100) % 257, vocab_size=257)
    src = open_source(DataConfig(source="tokens", path=str(path)), vocab_size=300, seq_len=8, seed=1)
    assert isinstance(src, TokenFile) and src.num_samples == 12


# --- global batches ---------------------------------------------------------------------------

def consumed(layout: tuple[int, int, int], seed: int = 0, steps: int = 1, consumed_samples: int = 0,
             source: object | None = None) -> list[Counter]:
    """Per step, the multiset of sample indices all ranks read under (dp_size, mbs, grad_accum)."""
    dp, mbs, ga = layout
    source = source or SyntheticTokens(64, 8, seed=seed, num_samples=1000)
    loaders = [GlobalBatches(source, seed=seed, micro_batch_size=mbs, grad_accum=ga, dp_rank=r,
                             dp_size=dp, consumed_samples=consumed_samples) for r in range(dp)]
    rows = {tuple(source.sample(i).tolist()): i for i in range(source.num_samples)}
    out = []
    for _ in range(steps):
        seen = Counter()
        for loader in loaders:
            micro = loader.next_step()
            assert len(micro) == ga
            for inputs, targets in micro:
                assert inputs.shape == targets.shape == (mbs, 8) and inputs.dtype == torch.int64
                assert torch.equal(inputs[:, 1:], targets[:, :-1])
                for x, y in zip(inputs.tolist(), targets.tolist()):
                    seen[rows[tuple(x + y[-1:])]] += 1
        out.append(seen)
    return out


def test_step_multiset_is_independent_of_layout() -> None:
    layouts = [(1, 8, 1), (2, 4, 1), (2, 1, 4), (4, 2, 1), (1, 1, 8), (8, 1, 1)]
    reference = consumed(layouts[0], steps=3)
    assert sum(reference[0].values()) == 8 and reference[0] != reference[1]
    for layout in layouts[1:]:
        assert consumed(layout, steps=3) == reference, layout
    assert consumed(layouts[0], seed=1, steps=3) != reference


def test_ranks_read_disjoint_slices() -> None:
    src = SyntheticTokens(64, 8, seed=0, num_samples=1000)
    loaders = [GlobalBatches(src, seed=0, micro_batch_size=2, grad_accum=3, dp_rank=r, dp_size=2)
               for r in range(2)]
    a = np.concatenate(loaders[0].step_positions())
    b = np.concatenate(loaders[1].step_positions())
    assert not set(a) & set(b) and sorted({*a, *b}) == list(range(12))
    # The documented layout: micro-step m of rank r starts at c + (m * dp_size + r) * mbs.
    loaders[1].consumed_samples = 100
    assert [m.tolist() for m in loaders[1].step_positions()] == [[102, 103], [106, 107], [110, 111]]


def test_resume_at_a_different_dp_size() -> None:
    src = SyntheticTokens(64, 8, seed=0, num_samples=1000)
    straight = consumed((1, 8, 1), steps=4, source=src)
    loader = GlobalBatches(src, seed=0, micro_batch_size=4, grad_accum=1, dp_rank=0, dp_size=2)
    loader.next_step()
    loader.next_step()
    state = loader.state_dict()
    assert state == {"consumed_samples": 16, "seed": 0, "num_samples": 1000}
    # Resume on four ranks (with a new split of the same global batch) from the saved state.
    resumed = []
    for r in range(4):
        fresh = GlobalBatches(src, seed=0, micro_batch_size=1, grad_accum=2, dp_rank=r, dp_size=4)
        fresh.load_state_dict(dict(state))
        resumed.append(fresh)
    positions = sorted(int(p) for fresh in resumed for m in fresh.step_positions() for p in m)
    assert positions == list(range(16, 24))
    assert consumed((4, 1, 2), steps=2, consumed_samples=16, source=src) == straight[2:]


def test_load_state_over_other_data_is_an_error() -> None:
    saved = GlobalBatches(SyntheticTokens(64, 8, seed=0, num_samples=100), seed=0, micro_batch_size=1,
                          grad_accum=1, dp_rank=0, dp_size=1).state_dict()
    other = GlobalBatches(SyntheticTokens(64, 8, seed=0, num_samples=90), seed=0, micro_batch_size=1,
                          grad_accum=1, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match="saved over 100 samples but the data now has 90"):
        other.load_state_dict(saved)


def test_load_state_with_another_seed_is_an_error() -> None:
    src = SyntheticTokens(64, 8, seed=0, num_samples=100)
    loader = GlobalBatches(src, seed=1, micro_batch_size=1, grad_accum=1, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=r"saved with seed=0 but this run has train.seed=1.*"
                                        r"resume with train.seed=0"):
        loader.load_state_dict({"consumed_samples": 5, "seed": 0})
    assert loader.consumed_samples == 0


def test_bad_rank_is_an_error() -> None:
    src = SyntheticTokens(64, 8, seed=0, num_samples=100)
    with pytest.raises(DataError, match=r"dp_rank=2: must be in \[0, dp_size=2\)"):
        GlobalBatches(src, seed=0, micro_batch_size=1, grad_accum=1, dp_rank=2, dp_size=2)


def test_epoch_wrap_around(tmp_path: Path) -> None:
    seq = 4
    path = write_tokens(tmp_path / "t.bin", np.arange(10 * seq + 1), vocab_size=257)
    src = TokenFile(str(path), seq)
    assert src.num_samples == 10
    loader = GlobalBatches(src, seed=5, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=1)
    order = []
    for _ in range(3):
        for inputs, _ in loader.next_step():
            order += [row[0] // seq for row in inputs.tolist()]  # sample i starts at token i*seq
    assert loader.consumed_samples == 12
    assert sorted(order[:10]) == list(range(10)), "epoch 0 must see every sample exactly once"
    epoch1 = loader.indices(np.arange(10, 20))
    assert order[10:] == epoch1[:2].tolist()
    assert sorted(epoch1.tolist()) == list(range(10))
    assert not np.array_equal(epoch1, loader.indices(np.arange(10))), "epoch 1 reuses epoch 0's order"
