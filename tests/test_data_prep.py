"""data_prep end to end on real text: real tokenizer, real faiss, real webdataset tars read back."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.neighbors import exclusion_ranges
from data_prep.pipeline import main as prepare
from retro_dist.data.format import Layout, load_manifest
from data_prep.corpora import stdlib_docstrings, write_corpus
from tests.dataset_checks import assert_no_leak

OPTS = ["--vocab-size", "600", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-256",
        "--val-fraction", "0.1", "--num-neighbors", "3", "--shard-samples", "20", "--block-size", "256"]


def build(corpus: Path, out: Path, *extra: str) -> int:
    return prepare(["--input", str(corpus), "--out", str(out), *OPTS, *extra])


@pytest.fixture(scope="module")
def docs():
    return stdlib_docstrings(150)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("prep")
    corpus = write_corpus(root / "corpus", docs)
    assert build(corpus, root / "ds") == 0
    return root / "ds"


def test_layout_and_manifest(dataset):
    m, layout = load_manifest(dataset), Layout(dataset)
    assert m["format"] == "retro_dist.dataset" and m["version"] == 1
    assert all(m["stages"][s]["done"] for s in ("tokenize", "embed", "index", "neighbors", "shard"))
    assert all(m["stages"][s]["wall_time_s"] >= 0 for s in m["stages"])
    assert m["chunk_size"] == 16 and m["seq_len"] == 64 and m["num_neighbors"] == 3 and m["pad_id"] == 0
    chunks, docs = np.load(layout.chunks("train")), np.load(layout.chunk_docs("train"))
    assert chunks.dtype == np.int32 and chunks.shape == (m["counts"]["train"]["chunks"], 16)
    assert docs.dtype == np.int64 and docs.shape == (len(chunks), 2) and (np.diff(docs[:, 0]) >= 0).all()
    emb = np.load(layout.embeddings("train"))
    assert emb.dtype == np.float16 and emb.shape == (len(chunks), 256)
    neighbors = np.load(layout.neighbors("train"))
    assert neighbors.dtype == np.int32 and neighbors.shape == (len(chunks), 3)
    assert np.load(layout.neighbors("val")).shape == (m["counts"]["val"]["chunks"], 3)
    assert m["embedder"]["name"] == "hash-256" and m["index"]["factory"] == "Flat"
    assert (layout.root / "tokenizer.json").is_file()
    # the stream: documents joined by eos, so eos count == documents
    stream = chunks.reshape(-1)[: m["counts"]["train"]["tokens"]]
    assert (stream == m["eos_id"]).sum() == m["counts"]["train"]["documents"] and stream[-1] == m["eos_id"]


def test_tokenizer_round_trip(dataset, docs):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Layout(dataset).tokenizer))
    assert tok.decode(tok.encode(docs[0]).ids) == docs[0]


def test_shards_read_back(dataset):
    m, layout = load_manifest(dataset), Layout(dataset)
    for split in ("train", "val"):
        stream = np.load(layout.chunks(split)).reshape(-1)
        neighbors = np.load(layout.neighbors(split))
        listed = m["shards"][split]
        assert sum(s["samples"] for s in listed) == m["counts"][split]["samples"]
        urls = [str(layout.shards / s["name"]) for s in listed]
        seen = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            s = int(sample["__key__"].split("-")[1])
            assert sample["__key__"] == f"{split}-{s:09d}" and s == seen
            np.testing.assert_array_equal(sample["tokens.npy"], stream[s * 64: s * 64 + 65])
            np.testing.assert_array_equal(sample["neighbors.npy"], neighbors[s * 4: s * 4 + 4])
            assert sample["tokens.npy"].dtype == np.int32 and sample["neighbors.npy"].shape == (4, 3)
            seen += 1
        assert seen == m["counts"][split]["samples"]


def test_no_leakage(dataset):
    neighbors = assert_no_leak(dataset)
    assert (neighbors >= 0).mean() > 0.99


class _RowReads:
    """chunk_docs that records how many rows each read gathers: the per-block ranges must never read a column."""

    def __init__(self, array: np.ndarray):
        self.array, self.largest = array, 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        assert isinstance(rows, np.ndarray) and rows.ndim == 1, "rows are gathered by index, never sliced"
        self.largest = max(self.largest, len(rows))
        return self.array[rows]


@pytest.mark.parametrize("giant", [False, True])
def test_exclusion_ranges_equal_brute_force(giant):
    """Per block of rows (blocks that start and end mid-sample too), the ranges equal the banned set by brute force."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=80)  # document lengths in tokens, some shorter than a chunk
    if giant:
        lengths[30] = 700  # one document spanning many blocks and samples
    ends = np.cumsum(lengths)
    cs, k = 8, 4
    first = np.arange(0, ends[-1], cs)
    last = np.minimum(first + cs, ends[-1]) - 1
    docs = np.stack([np.searchsorted(ends, first, "right"), np.searchsorted(ends, last, "right")], 1)
    num_samples = (ends[-1] - 1) // (cs * k)
    n = len(docs)
    banned_by_brute_force = []
    for c in range(n):
        s = c // k
        if s < num_samples:
            tokens = np.arange(s * cs * k, s * cs * k + cs * k + 1)
            sample_docs = set(np.searchsorted(ends, tokens, "right"))
        else:
            sample_docs = set(range(docs[c, 0], docs[c, 1] + 1))
        banned_by_brute_force.append(
            {j for j in range(n) if set(range(docs[j, 0], docs[min(j + 1, n - 1), 1] + 1)) & sample_docs})
    for block in (1, 3, 4, 10, 64, n):
        reads = _RowReads(docs)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            ranges = exclusion_ranges(reads, lo, hi, chunks_per_sample=k, num_samples=num_samples)
            assert ranges.shape == (hi - lo, 2) and ranges.dtype == np.int64
            for c in range(lo, hi):
                assert banned_by_brute_force[c] == set(range(*ranges[c - lo])), (block, c)
        assert reads.largest <= block, "a read gathered more rows than the block has"


def test_planted_duplicates_are_found_but_own_documents_are_not(tmp_path, docs):
    """Each planted document appears twice (two document ids): its chunks retrieve the copy's chunks, never their own."""
    planted = [d for d in docs if len(d) > 600][:6]
    corpus = write_corpus(tmp_path / "corpus", docs[:60] + planted)
    for i, d in enumerate(planted):
        (tmp_path / "corpus" / f"zcopy{i}.txt").write_text(d)
    assert build(corpus, tmp_path / "ds", "--val-fraction", "0") == 0
    neighbors = assert_no_leak(tmp_path / "ds")
    docs_of = np.load(Layout(tmp_path / "ds").chunk_docs("train"))
    n = len(docs_of)
    # files sort as doc00000.. then zcopy0..: planted document i has id 60 + i, its copy 60 + len(planted) + i
    hits = inside = 0
    for i in range(len(planted)):
        original, copy = 60 + i, 60 + len(planted) + i
        for c in np.flatnonzero((docs_of[:, 0] == original) & (docs_of[:, 1] == original)):
            inside += 1
            hits += any(j >= 0 and docs_of[j, 0] <= copy <= docs_of[min(j + 1, n - 1), 1] for j in neighbors[c])
    assert inside > 20 and hits / inside > 0.9


def test_doc_align_chunk_starts_every_document_on_a_chunk(tmp_path, docs):
    """--doc-align chunk: every document's first token opens a chunk, the padding is pad, nothing is lost; the same
    text at the start of two documents then gives identical chunks."""
    corpus = write_corpus(tmp_path / "corpus", docs[:40] + [docs[0]])
    assert build(corpus, tmp_path / "ds", "--val-fraction", "0", "--doc-align", "chunk") == 0
    layout, manifest = Layout(tmp_path / "ds"), load_manifest(tmp_path / "ds")
    chunks, chunk_docs = np.load(layout.chunks("train")), np.load(layout.chunk_docs("train"))
    assert manifest["doc_align"] == "chunk"
    assert (chunk_docs[:, 0] == chunk_docs[:, 1]).all()  # no chunk holds two documents
    starts = np.flatnonzero(np.diff(chunk_docs[:, 0], prepend=-1))
    assert len(starts) == 41
    eos, pad = manifest["eos_id"], manifest["pad_id"]
    for a, b in zip(starts, list(starts[1:]) + [len(chunks)]):
        tokens = chunks[a:b].reshape(-1)
        end = np.flatnonzero(tokens == eos)[-1]
        assert (tokens[end + 1:] == pad).all() and len(tokens) - end - 1 < 16
    first = {tuple(chunks[a]) for a in starts}
    assert len(first) == 40  # doc 0 and its copy (doc 40) open with the same chunk
    assert (chunks[starts[0]] == chunks[starts[40]]).all()


def test_idempotent_and_invalidating(dataset, capsys, tmp_path):
    corpus = Path(load_manifest(dataset)["config"]["inputs"][0])
    mtimes = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")
              if p.is_file() and p.name not in ("manifest.json", ".lock")}  # the lock records each run's holder
    assert build(corpus, dataset) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 5
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    # a new neighbor count redoes neighbors and shard only
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    assert prepare(["--out", str(copy), "--num-neighbors", "2"]) == 0
    out = capsys.readouterr().out
    assert "[tokenize] up to date" in out and "[index] up to date" in out and "[neighbors] done" in out
    assert np.load(Layout(copy).neighbors("train")).shape[1] == 2
    assert load_manifest(copy)["config"]["num_neighbors"] == 2


def test_single_stage_and_order(tmp_path, docs):
    corpus = write_corpus(tmp_path / "corpus", docs[:40])
    out = tmp_path / "ds"
    assert prepare(["--out", str(out), "--stage", "tokenize", "--input", str(corpus), *OPTS]) == 0
    code = subprocess.run([sys.executable, "-m", "data_prep", "--stage", "index", "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert code.returncode == 2 and "needs stage 'embed' first" in code.stderr
    assert code.stderr.strip().count("\n") == 0
    for stage in ("embed", "index", "neighbors", "shard"):
        r = subprocess.run([sys.executable, "-m", "data_prep", "--stage", stage, "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert load_manifest(out)["stages"]["shard"]["done"]


@pytest.mark.slow
def test_resume_after_kill(tmp_path, docs):
    """Kill the embed stage after some blocks: the rerun reuses them and the result equals an uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus", docs[:60])  # a few hundred chunks through MiniLM
    slow = ["--embedder", "minilm", "--block-size", "64", "--embed-batch", "16"]
    args = ["--input", str(corpus), *OPTS, *slow]
    out = tmp_path / "killed"
    assert prepare(["--out", str(out), "--stage", "tokenize", *args]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--stage", "embed", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "db"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob(".embeddings.parts-*/*.done"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob(".embeddings.parts-*/*.done")))
    assert done_before >= 2 and not (parts / "embeddings.npy").exists()
    assert not load_manifest(out)["stages"]["embed"]["done"]
    assert prepare(["--out", str(out), "--stage", "embed"]) == 0
    m = load_manifest(out)
    total = -(-m["counts"]["train"]["chunks"] // 64)
    assert m["stages"]["embed"]["counts"]["train_blocks_computed"] <= total - done_before
    fresh = tmp_path / "fresh"
    assert prepare(["--out", str(fresh), "--stage", "tokenize", "--stage", "embed", *args]) == 0
    np.testing.assert_array_equal(np.load(Layout(out).embeddings("train")), np.load(Layout(fresh).embeddings("train")))
