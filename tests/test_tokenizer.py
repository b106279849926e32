"""tools/make_tokens.py --tokenizer: a Hugging Face tokenizer.json (a small BPE trained here from
this repository's text, nothing downloaded), streamed in pieces; the vocabulary recorded and checked
against the model at submit and in the job; a job trains on the file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc.train.data import DataError, TokenFile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of text: the README and the trainer's sources."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in [ROOT / "README.md", *sorted((ROOT / "hpc" / "train").glob("*.py"))]:
        (folder / path.name).write_text(path.read_text())
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of 400 ids with <|endoftext|>, trained on the README and some sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = [str(p) for p in (ROOT / "hpc" / "train").glob("*.py")] + [str(ROOT / "README.md")]
    tok.train(files, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _tool():
    spec = importlib.util.spec_from_file_location("make_tokens", ROOT / "tools" / "make_tokens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _documents(*inputs: Path) -> list[Path]:
    tool = _tool()
    return [Path(p) for p in tool.iter_files([str(p) for p in inputs], set())]


def test_ids_are_the_tokenizers_with_the_end_of_document_token_between_files(tokenizer, corpus, tmp_path) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "corpus.bin"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tokens.py"), str(out), str(corpus),
                           "--tokenizer", str(tokenizer)], capture_output=True, text=True, check=True)
    meta = json.loads(Path(f"{out}.json").read_text())
    tok = Tokenizer.from_file(str(tokenizer))
    eod = tok.token_to_id("<|endoftext|>")
    assert meta["vocab_size"] == tok.get_vocab_size() == 400
    assert meta["eod_id"] == eod and meta["eod_token"] == "<|endoftext|>" and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == str(tokenizer)
    expected: list[int] = []
    for i, doc in enumerate(_documents(corpus)):
        expected += ([eod] if i else []) + tok.encode(doc.read_text(), add_special_tokens=False).ids
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == len(_documents(corpus))
    assert f"{len(expected):,} tokens (uint16, vocab_size 400)" in proc.stdout


def test_pieces_cut_at_line_breaks_give_the_ids_of_the_whole_file(tokenizer, tmp_path, monkeypatch) -> None:
    """Streaming: with pieces of ~50 characters and chunks of 64 bytes (characters split across
    chunks, blank lines and indented lines at the cuts), the ids equal encoding each file whole."""
    from tokenizers import Tokenizer

    tool = _tool()
    monkeypatch.setattr(tool, "PIECE", 50)
    monkeypatch.setattr(tool, "TEXT_CHUNK", 64)
    doc = tmp_path / "doc.txt"
    doc.write_text("Grüße aus München 😀\n\n\n    indented line\n" * 40 + (ROOT / "README.md").read_text()[:5000])
    meta = tool.make_tokens(str(tmp_path / "d.bin"), [str(doc)], tokenizer=str(tokenizer))
    whole = Tokenizer.from_file(str(tokenizer)).encode(doc.read_text(), add_special_tokens=False).ids
    assert np.fromfile(tmp_path / "d.bin", dtype=np.uint16).tolist() == whole
    assert meta["num_tokens"] == len(whole)
    assert len(list(tool._text_pieces(str(doc)))) > 10  # it really was cut


def test_a_tokenizer_without_an_end_of_document_token_gets_one_past_its_vocabulary(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(ROOT / "README.md")], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "t.json"))
    (tmp_path / "a.txt").write_text("the job")
    (tmp_path / "b.txt").write_text("the run")
    meta = _tool().make_tokens(str(tmp_path / "o.bin"), [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                               tokenizer=str(tmp_path / "t.json"))
    vocab = tok.get_vocab_size()
    assert meta["eod_id"] == vocab and meta["vocab_size"] == vocab + 1 and meta["eod_token"] is None
    assert vocab in np.fromfile(tmp_path / "o.bin", dtype=np.uint16).tolist()


def test_bad_tokenizer_arguments_are_refused_by_name(tokenizer, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "tools" / "make_tokens.py"), str(tmp_path / "o.bin"),
                               str(tmp_path / "a.txt"), *args], capture_output=True, text=True)

    (tmp_path / "junk.json").write_text("{not json")
    for args, message in ((["--tokenizer", str(tmp_path / "junk.json")], "junk.json: not a tokenizer.json"),
                          (["--tokenizer", str(tokenizer), "--eod", "</eos>"], "--eod '</eos>' is not in"),
                          (["--eod", "</s>"], "--eod needs --tokenizer")):
        proc = run(*args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "o.bin").exists()


def test_a_job_trains_on_the_file_and_one_whose_vocabulary_is_too_large_is_refused(tokenizer, corpus,
                                                                                   tmp_path) -> None:
    out = tmp_path / "corpus.bin"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_tokens.py"), str(out), str(corpus),
                    "--tokenizer", str(tokenizer)], capture_output=True, text=True, check=True)
    base = [sys.executable, "-m", "hpc.submit", "exp=tiny_cpu", "cluster=local", "data.source=tokens",
            f"data.path={out}", f"run.root={tmp_path}", f"cluster.scratch_dir={tmp_path}/scratch/{{job_id}}",
            "train.max_steps=30", "train.log_every=1"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([*base, "run.name=job"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1, losses  # from about ln(512) = 6.2

    # model.vocab_size 300 < the tokenizer's 400: refused at submit, before anything is queued ...
    small = subprocess.run([*base, "model.vocab_size=300", "run.name=small"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
    assert small.returncode == 2, small.stdout + small.stderr
    assert (f"data.path={out}: its tokenizer's vocab_size=400 is larger than model.vocab_size=300"
            in small.stderr)
    assert not (tmp_path / "small").exists()
    # ... and by the job itself, where the file is read.
    with pytest.raises(DataError, match="tokenizer vocab_size=400 is larger than model.vocab_size=300"):
        TokenFile(str(out), 64, vocab_size=300)
