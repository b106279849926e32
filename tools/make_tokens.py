"""Write a token file for data.source=tokens from local text files, with no downloads.

    python tools/make_tokens.py OUT.bin FILE_OR_DIR [...] [--dtype auto|uint16|uint32]
                                [--tokenizer tokenizer.json [--eod TOKEN]]

Each file is one document; an end-of-document id goes between two documents. Directories are
walked in sorted order (hidden entries skipped); files that are not valid UTF-8 are skipped with a
note. OUT.bin and its sidecar OUT.bin.json (dtype, num_tokens, vocab_size, tokenizer, eod_id, ...)
are each written to a temporary file and renamed into place, so a reader never sees a half-written
file, and a job refuses a file whose vocab_size exceeds model.vocab_size. Input is read in pieces,
so a corpus larger than memory is fine; on a terminal a progress bar follows inputs over 16 MB.

Without --tokenizer the tokenizer is byte-level: each UTF-8 byte is its own id (0..255) and id
256 ends a document, so model.vocab_size must be at least 257 (numpy only: starts quickly).

With --tokenizer PATH, a Hugging Face `tokenizer.json` (any model's, or one you trained) encodes
the text through the `tokenizers` library (`pip install 'hpc[hf]'`), without special tokens (no
BOS per piece). The end-of-document id is --eod's token, else the first of </s>, <|endoftext|>,
<|end_of_text|>, <eos> the vocabulary has, else one id past the vocabulary (vocab_size grows by
one). A document is encoded in pieces of about 256 kB, each cut after a line break where the next line
starts with text (where pre-tokenizers split anyway: the ids are those of encoding it whole).
--dtype auto (the default) picks uint16 when every id fits, else uint32.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

EOD = 256
VOCAB_SIZE = 257
CHUNK = 8 << 20  # bytes read at a time: large enough to amortise numpy calls, small enough for RAM
PIECE = 256 << 10  # characters a tokenizer encodes at a time (cut only where a line starts)
TEXT_CHUNK = 2 << 20  # bytes read at a time for a tokenizer: its encodings take ~60x the text in memory
EOD_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
PROGRESS_MIN_BYTES = 16 << 20


def iter_files(inputs: list[str], skip: set[str]) -> Iterator[str]:
    """Every file under the inputs, in a stable (sorted) order, minus the paths in `skip`."""
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                # Hidden folders are version control and caches, never a corpus.
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if not name.startswith(".") and os.path.realpath(path) not in skip:
                        yield path
        elif os.path.isfile(item):
            if os.path.realpath(item) not in skip:
                yield item
        else:
            raise SystemExit(f"make_tokens: {item}: no such file or directory")


def copy_document(path: str, out: BinaryIO, dtype: np.dtype, progress: Callable[[int], object] = lambda n: None) -> int:
    """Append one file's bytes as token ids; return the count, or raise UnicodeDecodeError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            # Decoding only validates: the ids are the raw bytes. A multi-byte character split
            # across two chunks is carried over by the incremental decoder.
            decoder.decode(chunk)
            out.write(np.frombuffer(chunk, dtype=np.uint8).astype(dtype).tobytes())
            count += len(chunk)
            progress(len(chunk))
    decoder.decode(b"", final=True)
    return count


class TextTokenizer:
    """A Hugging Face tokenizer.json, and the end-of-document id this file uses with it."""

    def __init__(self, path: str, eod: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SystemExit("make_tokens: --tokenizer needs the tokenizers package: "
                             "pip install 'hpc[hf]' (or pip install tokenizers)") from None
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises its own Exception for a bad file
            raise SystemExit(f"make_tokens: {path}: not a tokenizer.json the tokenizers library reads: {e}") from None
        self.path = path
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        names = [eod] if eod else [n for n in EOD_NAMES if self.tokenizer.token_to_id(n) is not None][:1]
        if eod and self.tokenizer.token_to_id(eod) is None:
            raise SystemExit(f"make_tokens: --eod {eod!r} is not in {path}'s vocabulary")
        self.eod_token = names[0] if names else None
        self.eod_id = self.tokenizer.token_to_id(self.eod_token) if self.eod_token else vocab
        self.vocab_size = max(vocab, self.eod_id + 1)

    def copy_document(self, path: str, out: BinaryIO, dtype: np.dtype,
                      progress: Callable[[int], object] = lambda n: None) -> int:
        """Append one file's ids; return the count, or raise UnicodeDecodeError."""
        count = 0
        for pieces, nbytes in _text_pieces(path):
            for encoding in self.tokenizer.encode_batch(pieces, add_special_tokens=False):
                ids = np.asarray(encoding.ids, dtype=np.int64)
                out.write(ids.astype(dtype).tobytes())
                count += len(ids)
            progress(nbytes)
        return count


def _text_pieces(path: str) -> Iterator[tuple[list[str], int]]:
    """The file's text as lists of pieces of about PIECE characters, each cut where a line ends
    and the next starts with text, with the bytes read for them. Text without such a break is held
    until one comes (a file of one enormous line is encoded whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as f:
        while chunk := f.read(TEXT_CHUNK):
            text = carry + decoder.decode(chunk)
            pieces, start = [], 0
            while len(text) - start > PIECE:
                cut = _line_break_after(text, start + PIECE)
                if cut < 0:
                    break
                pieces.append(text[start:cut])
                start = cut
            carry = text[start:]
            yield pieces, len(chunk)
    carry += decoder.decode(b"", final=True)
    if carry:
        yield [carry], 0


def _line_break_after(text: str, at: int) -> int:
    """The first index after `at` that follows a newline and holds a character other than white
    space, or -1: pre-tokenizers split there anyway, so encoding the two sides apart gives the ids
    of encoding them together."""
    i = text.find("\n", at)
    while i >= 0:
        j = i + 1
        while j < len(text) and text[j] in "\r\n":
            j += 1
        if j < len(text) and not text[j].isspace():
            return j
        i = text.find("\n", j)
    return -1


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool | None) -> Any:
    """A tqdm bar over the input bytes on a terminal for inputs over PROGRESS_MIN_BYTES (or when
    `show` says so); else nothing (tqdm is imported only then)."""
    if show is None:
        show = sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="make_tokens", file=sys.stderr)


def _atomic_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def make_tokens(out_path: str, inputs: list[str], dtype_name: str = "auto", tokenizer: str | None = None,
                eod_token: str | None = None, show_progress: bool | None = None) -> dict:
    """Tokenize the inputs into `out_path` (+ `.json` sidecar); return the sidecar contents."""
    text = TextTokenizer(tokenizer, eod_token) if tokenizer else None
    vocab_size, eod_id = (text.vocab_size, text.eod_id) if text else (VOCAB_SIZE, EOD)
    if dtype_name == "auto":
        dtype_name = "uint16" if vocab_size <= 1 << 16 else "uint32"
    elif vocab_size > np.iinfo(dtype_name).max + 1:
        raise SystemExit(f"make_tokens: --dtype {dtype_name} cannot hold ids up to {vocab_size - 1}; "
                         "use --dtype uint32 (or auto)")
    copy = text.copy_document if text else copy_document
    dtype = np.dtype(dtype_name)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    skip = {os.path.realpath(p) for p in (out_path, tmp, out_path + ".json")}
    files = list(iter_files(inputs, skip))
    bar = _progress(sum(_size(p) for p in files), show_progress)
    eod = np.array([eod_id], dtype=dtype).tobytes()
    tokens = documents = skipped = 0
    try:
        with open(tmp, "wb") as out:
            for path in files:
                start = out.tell()
                if documents:
                    out.write(eod)
                try:
                    count = copy(path, out, dtype, bar.update)
                except UnicodeDecodeError as e:
                    # Roll back this file's partial output rather than read every file twice.
                    out.seek(start)
                    out.truncate()
                    skipped += 1
                    print(f"make_tokens: skipping {path}: not UTF-8 text ({e.reason} at byte "
                          f"{e.start} of a chunk)", file=sys.stderr)
                    continue
                except OSError as e:
                    out.seek(start)
                    out.truncate()
                    skipped += 1
                    print(f"make_tokens: skipping {path}: {e.strerror}", file=sys.stderr)
                    continue
                tokens += count + (1 if documents else 0)
                documents += 1
            out.flush()
            os.fsync(out.fileno())
        bar.close()
        if not documents:
            raise SystemExit("make_tokens: no UTF-8 text files found in " + ", ".join(inputs))
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"dtype": dtype_name, "num_tokens": tokens, "vocab_size": vocab_size,
            "tokenizer": os.path.abspath(text.path) if text else "bytes", "eod_id": eod_id,
            "num_documents": documents, "skipped_files": skipped}
    if text:
        meta["eod_token"] = text.eod_token
    _atomic_json(out_path + ".json", meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="token file to write, e.g. data/corpus.bin")
    parser.add_argument("inputs", nargs="+", help="text files or folders to read")
    parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                        help="token id type; auto: uint16 when the vocabulary fits (the 257 byte-level ids do)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                        help="a Hugging Face tokenizer.json (needs the tokenizers package); default: bytes")
    parser.add_argument("--eod", metavar="TOKEN", help="the end-of-document token of --tokenizer's vocabulary")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar (default: on a terminal, for inputs over 16 MB)")
    args = parser.parse_args(argv)
    if args.eod and not args.tokenizer:
        parser.error("--eod needs --tokenizer")
    started = time.perf_counter()
    meta = make_tokens(args.out, args.inputs, args.dtype, args.tokenizer, args.eod, args.progress)
    seconds = time.perf_counter() - started
    read_mb = sum(_size(p) for p in iter_files(args.inputs, {os.path.realpath(args.out)})) / 1e6
    print(f"wrote {args.out}: {meta['num_documents']} files ({meta['skipped_files']} skipped), "
          f"{meta['num_tokens']:,} tokens ({meta['dtype']}, vocab_size {meta['vocab_size']}), "
          f"{read_mb:.1f} MB of text, {seconds:.2f} s ({read_mb / max(seconds, 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
