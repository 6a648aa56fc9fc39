"""Checks of a prepared dataset that several test modules run: no leakage, and two preparations byte-identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retro_dist.data.format import Layout, load_manifest

# prepare options of the small MPI comparisons: 2 ranks against 1
MPI_PREP_OPTS = ["--vocab-size", "500", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-128",
                 "--val-fraction", "0.1", "--num-neighbors", "2", "--block-size", "100", "--shard-samples", "30"]


def assert_no_leak(dataset) -> np.ndarray:
    """No train chunk retrieves a neighbor (chunk or continuation) sharing a document with its training sample."""
    m, layout = load_manifest(dataset), Layout(dataset)
    docs = np.load(layout.chunk_docs("train"))
    neighbors = np.load(layout.neighbors("train"))
    k, n = m["seq_len"] // m["chunk_size"], len(docs)
    for c in range(n):
        s = c // k
        if s < m["counts"]["train"]["samples"]:
            lo, label = docs[s * k, 0], (s + 1) * k
            hi = docs[label, 0] if label < n else docs[-1, 1]
        else:
            lo, hi = docs[c]
        for j in neighbors[c]:
            if j < 0:
                continue
            span = (docs[j, 0], docs[min(j + 1, n - 1), 1])
            assert span[1] < lo or span[0] > hi, f"chunk {c} (docs {lo}..{hi}) retrieved {j} (docs {span})"
    return neighbors


def assert_same_dataset(single: Path, parallel: Path, *, block_size: int) -> None:
    """Byte-identical files (the manifest aside: wall times differ), and rank 0 computed only its share."""
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file() and p.name != ".lock")
    for rel in files:
        if rel.name != "manifest.json":
            assert (single / rel).read_bytes() == (parallel / rel).read_bytes(), rel
    a, b = load_manifest(single), load_manifest(parallel)
    for key in ("counts", "shards", "embedder", "index", "vocab_size"):
        assert a[key] == b[key]
    blocks = b["stages"]["embed"]["counts"]["train_blocks_computed"]
    assert blocks < -(-a["counts"]["train"]["chunks"] // block_size)
