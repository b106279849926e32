"""Write a token file for data.source=tokens from local text files, with no downloads.

    python tools/make_tokens.py OUT.bin FILE_OR_DIR [...] [--dtype uint16|uint32]

The tokenizer is byte-level: each UTF-8 byte is its own id (0..255) and id 256 marks the end of
one document between two files, so model.vocab_size must be at least 257. Directories are walked
in sorted order (hidden entries skipped); files that are not valid UTF-8 are skipped with a note.
OUT.bin and its sidecar OUT.bin.json (dtype, num_tokens, vocab_size, ...) are each written to a
temporary file and renamed into place, so a reader never sees a half-written file. Input is read
in chunks, so a corpus larger than memory is fine. Imports only numpy, to start quickly.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

EOD = 256
VOCAB_SIZE = 257
CHUNK = 8 << 20  # bytes read at a time: large enough to amortise numpy calls, small enough for RAM


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


def copy_document(path: str, out: BinaryIO, dtype: np.dtype) -> int:
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
    decoder.decode(b"", final=True)
    return count


def _atomic_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def make_tokens(out_path: str, inputs: list[str], dtype_name: str = "uint16") -> dict:
    """Tokenize the inputs into `out_path` (+ `.json` sidecar); return the sidecar contents."""
    dtype = np.dtype(dtype_name)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    skip = {os.path.realpath(p) for p in (out_path, tmp, out_path + ".json")}
    eod = np.array([EOD], dtype=dtype).tobytes()
    tokens = documents = skipped = 0
    try:
        with open(tmp, "wb") as out:
            for path in iter_files(inputs, skip):
                start = out.tell()
                if documents:
                    out.write(eod)
                try:
                    count = copy_document(path, out, dtype)
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
        if not documents:
            raise SystemExit("make_tokens: no UTF-8 text files found in " + ", ".join(inputs))
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"dtype": dtype_name, "num_tokens": tokens, "vocab_size": VOCAB_SIZE, "tokenizer": "bytes",
            "eod_id": EOD, "num_documents": documents, "skipped_files": skipped}
    _atomic_json(out_path + ".json", meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="token file to write, e.g. data/corpus.bin")
    parser.add_argument("inputs", nargs="+", help="text files or folders to read")
    parser.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16",
                        help="token id type (uint16 holds the 257 byte-level ids)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    meta = make_tokens(args.out, args.inputs, args.dtype)
    seconds = time.perf_counter() - started
    text_mb = (meta["num_tokens"] - meta["num_documents"] + 1) / 1e6
    print(f"wrote {args.out}: {meta['num_documents']} files ({meta['skipped_files']} skipped), "
          f"{meta['num_tokens']:,} tokens, {text_mb:.1f} MB of text, {seconds:.2f} s "
          f"({text_mb / max(seconds, 1e-9):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
