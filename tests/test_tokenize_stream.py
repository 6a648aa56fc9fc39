"""Streaming, block-parallel tokenize: the same dataset as tokenizing every document in memory, from every input kind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

import data_prep.tokenize as tokenize_mod
from data_prep.corpora import stdlib_docstrings
from data_prep.pipeline import main as prepare
from data_prep.tokenize import is_val, special_ids, train_tokenizer
from retro_dist.data.format import Layout, load_manifest

OPTS = ["--stage", "tokenize", "--vocab-size", "400", "--chunk-size", "16", "--seq-len", "64", "--val-fraction",
        "0.1"]


def reference(docs: list[str], *, vocab_size: int, chunk_size: int, val_fraction: float, align: int = 1):
    """The in-memory path: every document in a list, the tokenizer trained on all train text, each encoded whole."""
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for doc in docs:
        if doc.strip():
            splits["val" if is_val(doc, val_fraction) else "train"].append(doc)
    if val_fraction > 0 and not splits["val"] and len(splits["train"]) > 1:
        splits["val"].append(splits["train"].pop())
    tokenizer = train_tokenizer(splits["train"], vocab_size)
    pad_id, eos_id = special_ids(tokenizer, "reference")
    out = {}
    for split, texts in splits.items():
        ids = [tokenizer.encode(t, add_special_tokens=False).ids + [eos_id] for t in texts]
        ids = [d + [pad_id] * (-len(d) % align) for d in ids]
        stream = np.asarray([i for d in ids for i in d], np.int32)
        ends = np.cumsum([len(d) for d in ids])
        n = -(-len(stream) // chunk_size)
        chunks = np.full(n * chunk_size, pad_id, np.int32)
        chunks[:len(stream)] = stream
        first = np.arange(n) * chunk_size
        last = np.minimum(first + chunk_size, len(stream)) - 1
        chunk_docs = np.stack([np.searchsorted(ends, first, "right"), np.searchsorted(ends, last, "right")], 1)
        out[split] = (chunks.reshape(n, chunk_size), chunk_docs, len(texts))
    return tokenizer, out


def mixed_corpus(root: Path, docs: list[str]) -> list[str]:
    """`docs` spread over every input kind, in the order the reader visits them; returns that order."""
    root.mkdir(parents=True)
    groups = [docs[i::6] for i in range(6)]
    (root / "a_plain").mkdir()
    for i, doc in enumerate(groups[0]):
        (root / "a_plain" / f"{i:04d}.txt").write_text(doc)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in groups[1])
    (root / "b.jsonl").write_text(lines)  # large enough to be cut into several byte ranges
    (root / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in groups[2]).encode()))
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in groups[3]).encode()))
    (root / "e_noext").mkdir()
    for i, doc in enumerate(groups[4]):
        (root / "e_noext" / f"LICENSE{i:04d}").write_text(doc)  # no extension: read because it is text
    (root / "e_noext" / "zz.bin").write_bytes(bytes(range(256)) * 8)  # binary: skipped and counted
    (root / "f.md.gz").write_bytes(gzip.compress("\n\n".join(groups[5]).encode()))
    return groups[0] + groups[1] + groups[2] + groups[3] + groups[4] + ["\n\n".join(groups[5])]


def check_equal(out: Path, docs: list[str], **kw) -> None:
    tokenizer, expected = reference(docs, vocab_size=400, chunk_size=16, val_fraction=0.1, **kw)
    layout, manifest = Layout(out), load_manifest(out)
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(layout.tokenizer)).get_vocab() == tokenizer.get_vocab()
    for split, (chunks, chunk_docs, documents) in expected.items():
        np.testing.assert_array_equal(np.load(layout.chunks(split)), chunks, err_msg=split)
        np.testing.assert_array_equal(np.load(layout.chunk_docs(split)), chunk_docs, err_msg=split)
        assert manifest["counts"][split]["documents"] == documents


@pytest.fixture(scope="module")
def docs() -> list[str]:
    texts = stdlib_docstrings(240)
    texts[7] = "   \n"  # an empty document: dropped and counted
    return texts


def test_streaming_equals_in_memory_from_every_input_kind(tmp_path, docs, monkeypatch):
    monkeypatch.setattr(tokenize_mod, "PIECE_CHARS", 3000)  # long documents are encoded in pieces
    monkeypatch.setattr(tokenize_mod, "BATCH_BYTES", 20000)  # batches end inside documents
    order = mixed_corpus(tmp_path / "corpus", docs)
    assert max(map(len, order)) > 2 * 3000
    out = tmp_path / "ds"
    assert prepare(["--input", str(tmp_path / "corpus"), "--out", str(out), *OPTS, "--tokenize-block-mb", "0.02"]) == 0
    check_equal(out, order)
    manifest = load_manifest(out)
    assert manifest["input_stats"]["skipped_binary_files"] == 1
    assert manifest["input_stats"]["empty_documents"] == 1
    assert manifest["stages"]["tokenize"]["counts"]["blocks"] > 6  # the plain JSON-lines file was cut too
    assert not list(out.glob(".tokenize.parts-*"))


def test_doc_align_and_one_block(tmp_path, docs):
    order = mixed_corpus(tmp_path / "corpus", docs[:60])
    out = tmp_path / "ds"
    assert prepare(["--input", str(tmp_path / "corpus"), "--out", str(out), *OPTS, "--doc-align", "chunk"]) == 0
    check_equal(out, order, align=16)
    # a_plain + b.jsonl, c.jsonl.gz, d.jsonl.zst, e_noext, f.md.gz: a compressed file is a block alone
    assert load_manifest(out)["stages"]["tokenize"]["counts"]["blocks"] == 5


def test_kill_mid_tokenize_resumes_with_finished_blocks(tmp_path, docs, monkeypatch):
    order = mixed_corpus(tmp_path / "corpus", docs)
    out, args = tmp_path / "ds", ["--input", str(tmp_path / "corpus"), "--out", str(tmp_path / "ds"), *OPTS,
                                  "--tokenize-block-mb", "0.02"]
    real, calls = tokenize_mod._tokenize_block, []

    def dies_on_the_fourth(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tokenize_mod, "_tokenize_block", dies_on_the_fourth)
    assert prepare(args) == 130
    monkeypatch.setattr(tokenize_mod, "_tokenize_block", real)
    assert prepare(args) == 0
    counts = load_manifest(out)["stages"]["tokenize"]["counts"]
    assert counts["blocks_computed"] == counts["blocks"] - 3
    check_equal(out, order)


def test_tokenizer_trained_on_a_bounded_sample(tmp_path):
    docs = [f"document {i} " + "lorem ipsum dolor sit amet " * 400 for i in range(200)]  # ~2.2 MB
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "ds"
    assert prepare(["--input", str(corpus), "--out", str(out), *OPTS, "--tokenizer-sample-mb", "1"]) == 0
    sample = load_manifest(out)["tokenizer_sample"]
    assert sample["bytes"] == 1 << 20 and sample["documents"] < 100  # the last one cut at the budget


def test_corrupt_compressed_file_names_file_and_line(tmp_path, capsys):
    lines = "".join(json.dumps({"text": f"line {i} " * 50}) + "\n" for i in range(400)).encode()
    data = gzip.compress(lines)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert prepare(["--input", str(tmp_path / "c"), "--out", str(tmp_path / "ds"), *OPTS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl.gz" in err[0] and "corrupt gzip data at line" in err[0], err


def test_one_giant_document_warns(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "big.txt").write_text("word " * 50000)
    (tmp_path / "c" / "small.txt").write_text("a short one")
    assert prepare(["--input", str(tmp_path / "c"), "--out", str(tmp_path / "ds"), *OPTS, "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning: one document holds" in out and "no neighbors" in out



class _Recording:
    """The real tokenizer, recording the tokens each encode_batch call returns."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def encode_batch(self, texts, **kwargs):
        encodings = self.tokenizer.encode_batch(texts, **kwargs)
        self.calls.append(sum(len(e.ids) for e in encodings))
        return encodings

    encode_batch_fast = encode_batch


def test_encode_batches_are_bounded_in_bytes(docs, monkeypatch):
    """The tokenizer's per-token objects (~150 B a token) are the bulk of tokenize's memory, so one encode_batch call
    must hold a bounded number of tokens whatever the text: a byte-level BPE gives at most one token per UTF-8 byte,
    and text outside its merges (here CJK, 3 bytes and 3 tokens a character) gives about that many. Bounded in
    characters, a call held 3x its budget in tokens."""
    budget, piece = 20000, 3000
    monkeypatch.setattr(tokenize_mod, "BATCH_BYTES", budget)
    monkeypatch.setattr(tokenize_mod, "PIECE_CHARS", piece)
    tokenizer = train_tokenizer(docs[:100], 400)
    pad_id, eos_id = special_ids(tokenizer, "test")
    rng = np.random.default_rng(0)
    cjk = ["".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, n)) for n in rng.integers(200, 4000, 60)]
    texts = [t for pair in zip(docs[:60], cjk) for t in pair]
    recording = _Recording(tokenizer)
    got = list(tokenize_mod.encode_documents(recording, texts, eos_id, pad_id=pad_id))
    expected = [tokenizer.encode(t, add_special_tokens=False).ids + [eos_id] for t in texts]
    assert [g.tolist() for g in got] == expected
    one_piece = 3 * 2 * piece  # a piece is cut within [PIECE_CHARS, 2 PIECE_CHARS) characters, 3 bytes each
    print(f"tokens per encode_batch call: max {max(recording.calls)}, budget {budget} bytes + one piece {one_piece}")
    assert max(recording.calls) <= budget + one_piece
