"""Stage 4, neighbors: the k nearest database chunks of every chunk of every split ({split}/neighbors.npy).

No leakage: a train chunk never gets a neighbor whose chunk or continuation shares a document with any token of the
training sample that holds it (its seq_len tokens and the label token after them), nor itself. Because documents
are contiguous in the stream, that excluded set is one contiguous range of database ids per sample, which the
search drops (searching extra candidates, then an exact IDSelector search where needed). Validation chunks search
freely: their documents are not in the database.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from retro_dist.data.format import Layout, load_npy
from retro_dist.retrieval.index import load_index, search

from .blocks import compute_blocks
from .stage import StageContext


def exclusion_ranges(chunk_docs: np.ndarray, lo: int, hi: int, *, chunks_per_sample: int,
                     num_samples: int) -> np.ndarray:
    """int64 [hi - lo, 2]: for train chunks lo..hi-1, the half-open range of database ids each must not retrieve.

    Neighbor j spans the documents of chunk j and of its continuation j + 1: [docs[j, 0], docs[j + 1, 1]]. Both
    ends grow with j, so the ids whose span meets the sample's documents [first, last] are those with
    span_end >= first and span_start <= last: one contiguous range found by two binary searches. `chunk_docs` may be
    a memory map: only the block's rows and the rows the searches probe are read, never a column of every chunk.
    """
    n = len(chunk_docs)
    chunk = np.arange(lo, hi)
    sample = chunk // chunks_per_sample
    in_sample = sample < num_samples
    label = (sample + 1) * chunks_per_sample  # the chunk whose first token is the sample's label token
    own = _rows(chunk_docs, chunk)
    sample_first = _rows(chunk_docs, np.minimum(sample * chunks_per_sample, n - 1))[:, 0]
    label_doc = _rows(chunk_docs, np.minimum(label, n - 1))[:, 0]
    sample_last = np.where(label < n, label_doc, _rows(chunk_docs, [n - 1])[0, 1])
    first = np.where(in_sample, sample_first, own[:, 0])  # a chunk in no full sample: its own documents
    last = np.where(in_sample, sample_last, own[:, 1])

    def span_start(j: np.ndarray) -> np.ndarray:
        return _rows(chunk_docs, j)[:, 0]

    def span_end(j: np.ndarray) -> np.ndarray:
        return _rows(chunk_docs, np.minimum(j + 1, n - 1))[:, 1]

    return np.stack([_first_index(span_end, n, first, strict=False),
                     _first_index(span_start, n, last, strict=True)], axis=1)


def _rows(array: np.ndarray, index) -> np.ndarray:
    """array[index] reading each distinct row once, in order (a memory map then touches only those pages)."""
    rows, inverse = np.unique(np.asarray(index, dtype=np.int64), return_inverse=True)
    return np.asarray(array[rows])[inverse.reshape(-1)]


def _first_index(key: Callable[[np.ndarray], np.ndarray], n: int, values: np.ndarray, *, strict: bool) -> np.ndarray:
    """For a nondecreasing key(0..n-1): per value, the first i with key(i) >= value (> value when strict), or n.

    np.searchsorted would need the whole key column in memory; this bisects every distinct value at once and reads
    only the probed rows, ~log2(n) small gathers.
    """
    values, inverse = np.unique(values, return_inverse=True)
    lo, hi = np.zeros(len(values), np.int64), np.full(len(values), n, np.int64)
    while (active := np.flatnonzero(lo < hi)).size:
        mid = (lo[active] + hi[active]) // 2
        k = key(mid)
        right = k <= values[active] if strict else k < values[active]
        lo[active] = np.where(right, mid + 1, lo[active])
        hi[active] = np.where(right, hi[active], mid)
    return lo[inverse.reshape(-1)]


def run(ctx: StageContext) -> dict[str, Any]:
    c, layout, manifest = ctx.config, Layout(ctx.root), ctx.manifest
    index = load_index(layout.index, mmap=True)  # ranks on a node share its pages
    vectors = load_npy(layout.embeddings("train"))  # exact re-scoring of a compressed index's candidates
    rerank = manifest.get("index", {}).get("rerank")  # the depth the index stage tuned (None: exact index)
    k = c.num_neighbors
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        queries = load_npy(layout.embeddings(split)) if manifest["counts"][split]["chunks"] else None
        if queries is None:
            continue
        chunk_docs = load_npy(layout.chunk_docs(split)) if split == "train" else None

        def compute(lo: int, hi: int, queries=queries, chunk_docs=chunk_docs):
            exclude = None if chunk_docs is None else exclusion_ranges(
                chunk_docs, lo, hi, chunks_per_sample=manifest["seq_len"] // manifest["chunk_size"],
                num_samples=manifest["counts"]["train"]["samples"])
            _, ids = search(index, np.asarray(queries[lo:hi], dtype=np.float32), k, exclude=exclude, vectors=vectors,
                            rerank=rerank)
            return ids

        out = layout.neighbors(split)
        stats = compute_blocks(ctx, out=out, num_rows=len(queries), width=k, dtype="int32", compute=compute,
                               desc=f"neighbors {split}", unit="query")
        counts[f"{split}_queries"] = len(queries)
        counts[f"{split}_blocks_computed"] = stats.blocks_computed
        counts[f"{split}_rows_per_s"] = stats.rows_per_s
        if ctx.world.is_main:
            counts[f"{split}_missing"] = _count_missing(out)
    ctx.facts["num_neighbors"] = k
    return counts


def _count_missing(path, block: int = 1 << 20) -> int:
    """Neighbor slots left at -1, counted a block of rows at a time."""
    neighbors = np.load(path, mmap_mode="r")
    return sum(int((neighbors[i:i + block] < 0).sum()) for i in range(0, len(neighbors), block))
