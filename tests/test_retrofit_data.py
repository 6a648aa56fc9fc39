"""`retro-dist prepare --tokenizer` with a Llama-3-style tokenizer (BOS, EOS, reserved special tokens, no pad token):
pad is a reserved special token that text never yields, documents are joined by EOS without BOS, and special
tokens typed inside a document are tokenized as text."""

from __future__ import annotations

import json

import numpy as np

from retro_dist.retrofit.base import BOS, EOS, RESERVED, llama_style_tokenizer


def test_llama_tokenizer_pad_eos_and_no_bos(tmp_path):
    from data_prep.corpora import stdlib_docstrings, write_corpus
    from data_prep.pipeline import main as prepare

    texts = stdlib_docstrings(120)
    tokenizer = llama_style_tokenizer(texts, 400)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    # documents that spell out the special tokens: they must stay text
    docs = [f"{t} {EOS} {RESERVED} {BOS}" if i % 10 == 0 else t for i, t in enumerate(texts)]
    corpus = write_corpus(tmp_path / "corpus", docs)
    args = ["--input", str(corpus), "--out", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tokenizer.json"),
            "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-64", "--num-neighbors", "2",
            "--shard-samples", "40", "--val-fraction", "0.05"]
    assert prepare(args) == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    pad, eos, bos = (tokenizer.token_to_id(t) for t in (RESERVED, EOS, BOS))
    assert manifest["pad_id"] == pad and manifest["eos_id"] == eos
    stream = np.load(tmp_path / "ds" / "db" / "chunks.npy").reshape(-1)
    documents = manifest["counts"]["train"]["documents"]
    tokens = stream[: np.flatnonzero(stream != pad)[-1] + 1]  # the last chunk's padding cut off
    assert bos not in tokens and pad not in tokens  # no BOS, and pad only past the stream's end
    assert tokens[-1] == eos  # every document ends with EOS
    assert int((tokens == eos).sum()) == documents  # and EOS comes from nowhere else, not from spelled-out text
