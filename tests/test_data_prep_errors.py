"""data_prep on bad input: one clear line, exit code 2, and nothing half-written that a later stage would take."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.pipeline import main as prepare
from retro_dist.data.format import Layout, load_manifest
from data_prep.corpora import stdlib_docstrings, write_corpus

OPTS = ["--vocab-size", "400", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-64",
        "--val-fraction", "0.1", "--num-neighbors", "2"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith(("tokenize", "embed"))]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def docs():
    return stdlib_docstrings(40)


def test_empty_input(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("--input", tmp_path / "empty", "--out", tmp_path / "ds", *OPTS), "no documents in")
    one_line_error(run("--out", tmp_path / "ds2", *OPTS), "no input: pass --input")
    one_line_error(run("--input", tmp_path / "nope", "--out", tmp_path / "ds3", *OPTS), "does not exist")


def test_bad_utf8_skipped_with_count_or_error(tmp_path, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "ds"), *OPTS]) == 0
    stats = load_manifest(tmp_path / "ds")["input_stats"]
    assert stats["bad_utf8_bytes"] == 80 and stats["files_with_bad_utf8"] == 1
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds2", *OPTS, "--on-bad-utf8", "error"),
                   "latin1.txt is not valid UTF-8 (80 undecodable bytes)")
    assert not (tmp_path / "ds2" / "tokenizer.json").exists()


def test_short_documents_and_jsonl(tmp_path, docs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": d}) for d in docs] + [json.dumps({"text": "tiny"})] * 5
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "ds"), *OPTS]) == 0
    m = load_manifest(tmp_path / "ds")
    assert m["counts"]["train"]["documents"] + m["counts"]["val"]["documents"] == len(docs) + 5
    (corpus / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds2", *OPTS), "bad.jsonl:2: not a JSON object")


def test_corpus_too_small_for_seq_len(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", ["a short text."] * 3)
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds", *OPTS), "too few for one sample")
    assert not (tmp_path / "ds" / "manifest.json").exists()  # refused before any output: nothing recorded


def test_tokenizer_without_pad_or_eos(tmp_path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    tok.save(str(tmp_path / "tok.json"))
    corpus = write_corpus(tmp_path / "corpus", docs)
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds", *OPTS, "--tokenizer", tmp_path / "tok.json"),
                   "has no eos token")


def test_other_format_version(tmp_path, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "ds"), *OPTS, "--stage", "tokenize"]) == 0
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["version"] = 0
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run("--out", tmp_path / "ds", "--stage", "embed"), "version 0; this retro_dist reads")


def test_stage_before_its_inputs(tmp_path):
    one_line_error(run("--out", tmp_path / "ds", "--stage", "neighbors"), "not a retro_dist dataset")


def test_bad_options(tmp_path, docs):
    corpus = write_corpus(tmp_path / "corpus", docs)
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds", *OPTS, "--seq-len", "60"),
                   "must be a positive multiple of chunk_size=16")
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds", *OPTS, "--embedder", "bert"), "bert")
    one_line_error(run("--input", corpus, "--out", tmp_path / "ds", *OPTS, "--index-factory", "Nonsense42"),
                   "Nonsense42")


def test_disk_full_leaves_nothing_half_written(tmp_path, docs):
    """A dataset on a 160 KB filesystem: the stage that runs out of space fails with one line, and every file a
    later stage reads is either absent or whole."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the disk-full path is not exercised")
    try:
        corpus = write_corpus(tmp_path / "corpus", docs)
        result = run("--input", corpus, "--out", mount / "ds", *OPTS, "--embedder", "hash-1024")
        one_line_error(result, "disk full while writing")
        layout, manifest = Layout(mount / "ds"), load_manifest(mount / "ds")
        for path in (layout.chunks("train"), layout.chunk_docs("train"), layout.embeddings("train"),
                     layout.embeddings("val"), layout.index, layout.neighbors("train")):
            if path.exists():
                np.load(path) if path.suffix == ".npy" else path.read_bytes()  # whole: parses
        done = [s for s, r in manifest["stages"].items() if r.get("done")]
        assert "shard" not in done
        assert not list((mount / "ds").rglob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", str(mount)])
