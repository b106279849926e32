"""Training tokens: a seeded synthetic stream or a binary token file, and the global batch order.

A source maps a sample index to `seq_len + 1` token ids; `GlobalBatches` decides which indices
each data-parallel rank reads. The position in the data is one global count of consumed samples,
so a run can resume on a different number of ranks and continue with exactly the next samples.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

import numpy as np
import torch

from hpc.config.errors import ConfigError
from hpc.config.schema import Config, DataConfig

DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
MAKE_TOKENS = "python tools/make_tokens.py OUT.bin TEXT_DIR"


class DataError(ConfigError):
    """A token source or data position cannot be used; the message names the file and the fix. A
    ConfigError: found while a job sets up, it is not requeued (a rerun would meet it again)."""


def _require_seed(seed: int) -> None:
    # numpy seeds from non-negative integers only; say so here rather than deep inside numpy.
    if seed < 0:
        raise DataError(f"train.seed={seed}: the data order needs a seed >= 0")


class TokenSource(Protocol):
    """What `GlobalBatches` reads: `num_samples` windows of `seq_len + 1` tokens each."""

    seq_len: int
    num_samples: int

    def sample(self, index: int) -> np.ndarray: ...


class SyntheticTokens:
    """A learnable token stream that needs no files: a fixed random first-order Markov chain.

    Each token has (up to) four likely successors with skewed probabilities, so the stream's
    next-token entropy is about 1.2 nats against ln(vocab_size) for a model that knows nothing;
    a tiny model's loss falls visibly within a few dozen steps.
    """

    # Skewed rather than uniform so there is a clear "most likely next token" to learn.
    PROBS = (0.5, 0.25, 0.15, 0.10)

    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_samples: int = 1 << 20) -> None:
        if vocab_size < 1 or seq_len < 1 or num_samples < 1:
            raise DataError(f"SyntheticTokens(vocab_size={vocab_size}, seq_len={seq_len}, "
                            f"num_samples={num_samples}): all three must be at least 1")
        _require_seed(seed)
        self.vocab_size, self.seq_len, self.seed, self.num_samples = vocab_size, seq_len, seed, num_samples
        table = np.random.default_rng([seed, 0x7AB1E])
        # The chain walks a hidden ring of states: state' = state + delta[k], token = perm[state].
        # Successors of a token are perm[perm^-1(token) + deltas], which looks like a random table,
        # yet a whole sequence is one cumsum: no Python loop per token (the sample budget is ~1 ms).
        k = min(len(self.PROBS), vocab_size)
        self._deltas = table.choice(vocab_size, size=k, replace=False).astype(np.int64)
        self._perm = table.permutation(vocab_size).astype(np.int64)
        probs = np.asarray(self.PROBS[:k]) / sum(self.PROBS[:k])
        self._cdf = np.cumsum(probs)
        self._cdf[-1] = 1.0  # rounding must not leave a uniform draw past the last bucket

    def successors(self, token: int) -> np.ndarray:
        """The tokens that may follow `token`, most likely first (for tests and sanity checks)."""
        state = int(np.argmax(self._perm == token))
        return self._perm[(state + self._deltas) % self.vocab_size]

    def sample(self, index: int) -> np.ndarray:
        """Sample `index`: `seq_len + 1` int64 tokens, a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        steps = self._deltas[np.searchsorted(self._cdf, rng.random(self.seq_len), side="right")]
        states = np.empty(self.seq_len + 1, dtype=np.int64)
        states[0] = rng.integers(self.vocab_size)
        np.cumsum(steps, out=states[1:])
        states[1:] += states[0]
        return self._perm[states % self.vocab_size]


def _read_sidecar(path: str) -> dict[str, Any] | None:
    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable token file sidecar ({e}); rewrite it with "
                        f"{MAKE_TOKENS}, or delete it and set data.dtype") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: sidecar must be a JSON object; rewrite it with {MAKE_TOKENS}")
    return meta


class TokenFile:
    """A flat binary file of token ids (uint16 or uint32), read through a memory map.

    Sample i is the window tokens[i*seq_len : i*seq_len + seq_len + 1]: windows overlap by the one
    token that is both the last target of sample i and the first input of sample i+1.
    """

    def __init__(self, path: str, seq_len: int, dtype: str = "auto", vocab_size: int | None = None) -> None:
        self.path, self.seq_len, self.vocab_size = path, seq_len, vocab_size
        if not os.path.isfile(path):
            raise DataError(f"data.path={path}: no such token file; write one with {MAKE_TOKENS}")
        meta = _read_sidecar(path)
        self.meta: dict[str, Any] = meta or {}
        self.dtype = self._resolve_dtype(dtype, meta)
        size, item = os.path.getsize(path), DTYPES[self.dtype].itemsize
        if size % item:
            raise DataError(f"{path}: {size} bytes is not a whole number of {self.dtype} tokens "
                            f"({item} bytes each); the file is truncated or data.dtype is wrong")
        self.num_tokens = size // item
        if meta is not None and "num_tokens" in meta and meta["num_tokens"] != self.num_tokens:
            raise DataError(f"{path}: sidecar says {meta['num_tokens']} tokens but the file holds "
                            f"{self.num_tokens}; the file was cut short or replaced: rewrite it")
        if self.num_tokens < seq_len + 1:
            raise DataError(f"{path}: {self.num_tokens} tokens are too few for one sample of "
                            f"train.seq_len={seq_len} (needs {seq_len + 1}); use more text or a "
                            "shorter train.seq_len")
        file_vocab = self.meta.get("vocab_size")
        if vocab_size is not None and file_vocab is not None and file_vocab > vocab_size:
            raise DataError(f"{path}: tokenizer vocab_size={file_vocab} is larger than "
                            f"model.vocab_size={vocab_size}; ids past the embedding table would "
                            f"crash the model: set model.vocab_size={file_vocab} or more")
        self.num_samples = (self.num_tokens - 1) // seq_len
        self._tokens = np.memmap(path, dtype=DTYPES[self.dtype], mode="r")

    def _resolve_dtype(self, dtype: str, meta: dict[str, Any] | None) -> str:
        if dtype not in ("auto", *DTYPES):
            raise DataError(f"data.dtype='{dtype}' is not one of auto, {', '.join(DTYPES)}")
        stored = None if meta is None else meta.get("dtype")
        if stored is not None and stored not in DTYPES:
            raise DataError(f"{self.path}.json: dtype '{stored}' is not one of {', '.join(DTYPES)}")
        if dtype == "auto":
            if stored is None:
                raise DataError(f"{self.path}: data.dtype=auto needs the sidecar {self.path}.json "
                                "to say the token type, and there is none; set data.dtype=uint16 "
                                "or data.dtype=uint32")
            return stored
        if stored is not None and stored != dtype:
            raise DataError(f"{self.path}: data.dtype={dtype} but its sidecar says {stored}; "
                            f"reading it as {dtype} would give garbage ids: set data.dtype=auto")
        return dtype

    def sample(self, index: int) -> np.ndarray:
        """Sample `index`: `seq_len + 1` int64 tokens."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        start = index * self.seq_len
        out = np.asarray(self._tokens[start:start + self.seq_len + 1], dtype=np.int64)
        # Without a sidecar the vocabulary is unknown; one bad id would surface as a CUDA assert far
        # from here, so check each window (a max over a few thousand ids costs microseconds).
        if self.vocab_size is not None and out.max() >= self.vocab_size:
            raise DataError(f"{self.path}: token id {int(out.max())} in sample {index} is not below "
                            f"model.vocab_size={self.vocab_size}; raise model.vocab_size or check "
                            "data.dtype")
        return out


def open_source(data: DataConfig, *, vocab_size: int, seq_len: int, seed: int) -> TokenSource:
    """The token source a data config names."""
    if data.source == "synthetic":
        return SyntheticTokens(vocab_size, seq_len, seed)
    if data.source == "tokens":
        assert data.path is not None  # DataConfig validates this
        return TokenFile(data.path, seq_len, data.dtype, vocab_size=vocab_size)
    raise DataError(f"data.source='{data.source}' is not one of synthetic, tokens")


class GlobalBatches:
    """A deterministic global sample order, read one optimizer step at a time by each rank.

    Global position p is sample perm_e[p % N] with epoch e = p // N and perm_e a permutation seeded
    by (seed, e). A step covers positions [c, c + G) for G = micro_batch_size * grad_accum *
    dp_size; micro-step m of rank r reads c + (m * dp_size + r) * micro_batch_size onwards. The
    samples a step consumes therefore depend only on c and G, not on how G is split into ranks and
    micro-batches, and `consumed_samples` stays meaningful when the world size changes.
    """

    def __init__(self, source: TokenSource, *, seed: int, micro_batch_size: int, grad_accum: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0) -> None:
        for key, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum),
                           ("dp_size", dp_size)):
            if value < 1:
                raise DataError(f"{key}={value}: must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples={consumed_samples}: must be >= 0")
        _require_seed(seed)
        self.source, self.seed = source, seed
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by all ranks together in one optimizer step."""
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            # Keep at most the two epochs a step can straddle; older ones are never read again.
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_samples)
            self._perms[epoch] = perm
        return perm

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at the given global positions."""
        n = self.source.num_samples
        epochs, within = np.divmod(positions, n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[within[mask]]
        return out

    def step_positions(self) -> list[np.ndarray]:
        """Global positions this rank reads in the next step, one array per micro-batch."""
        mbs, c = self.micro_batch_size, self.consumed_samples
        return [c + (m * self.dp_size + self.dp_rank) * mbs + np.arange(mbs, dtype=np.int64)
                for m in range(self.grad_accum)]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum` micro-batches (inputs, targets), each (mbs, seq_len) int64."""
        batches = []
        for positions in self.step_positions():
            rows = np.stack([self.source.sample(int(i)) for i in self.indices(positions)])
            tokens = torch.from_numpy(rows)
            batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, int]:
        """The data position, for the checkpoint; valid at any world size."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": self.source.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; the seed must match or the order would silently change."""
        if state["seed"] != self.seed:
            raise DataError(f"data position was saved with seed={state['seed']} but this run has "
                            f"train.seed={self.seed}; the sample order would silently change: "
                            f"resume with train.seed={state['seed']} or start a new run")
        saved_n = state.get("num_samples")
        if saved_n is not None and int(saved_n) != self.source.num_samples:
            raise DataError(f"data position was saved over {saved_n} samples but the data now has "
                            f"{self.source.num_samples} (token file or seq_len changed); the "
                            "permutation, and so every later batch, would differ: restore the data "
                            "or start a new run")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise DataError(f"consumed_samples={consumed} in the data state: must be >= 0")
        self.consumed_samples = consumed


def batches_for(cfg: Config, dp_rank: int, dp_size: int) -> GlobalBatches:
    """The global batch order a config trains on, from position 0, as data-parallel rank `dp_rank`
    of `dp_size`: the loop and the benchmarks build it here so they read the very same samples."""
    t = cfg.train
    source = open_source(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=t.seq_len, seed=t.seed)
    return GlobalBatches(source, seed=t.seed, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
                         dp_rank=dp_rank, dp_size=dp_size)
