"""Stage 4, neighbors: the k nearest database chunks of every chunk of every split ({split}/neighbors.npy).

No leakage: a train chunk never gets a neighbor whose chunk or continuation shares a document with any token of the
training sample that holds it (its seq_len tokens and the label token after them), nor itself. Because documents
are contiguous in the stream, that excluded set is one contiguous range of database ids per sample, which the
search drops (searching extra candidates, then an exact IDSelector search where needed). Validation chunks search
freely: their documents are not in the database.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retro_dist.data.format import Layout, load_npy
from retro_dist.retrieval.index import load_index, search

from .blocks import compute_blocks
from .stage import StageContext


def exclusion_ranges(chunk_docs: np.ndarray, *, chunks_per_sample: int, num_samples: int) -> np.ndarray:
    """int64 [num_chunks, 2]: for each train chunk, the half-open range of database ids it must not retrieve.

    Neighbor j spans the documents of chunk j and of its continuation j + 1: [docs[j, 0], docs[j + 1, 1]]. Both
    ends grow with j, so the ids whose span meets the sample's documents [lo, hi] are those with
    span_end >= lo and span_start <= hi: one contiguous range found by two binary searches.
    """
    n = len(chunk_docs)
    span_start = chunk_docs[:, 0]
    span_end = np.concatenate([chunk_docs[1:, 1], chunk_docs[-1:, 1]])
    chunk = np.arange(n)
    sample = chunk // chunks_per_sample
    in_sample = sample < num_samples
    first = np.minimum(sample * chunks_per_sample, n - 1)
    label = (sample + 1) * chunks_per_sample  # the chunk whose first token is the sample's label token
    lo = np.where(in_sample, chunk_docs[first, 0], chunk_docs[:, 0])
    hi_sample = np.where(label < n, chunk_docs[np.minimum(label, n - 1), 0], chunk_docs[-1, 1])
    hi = np.where(in_sample, hi_sample, chunk_docs[:, 1])  # a chunk in no full sample: its own documents
    return np.stack([np.searchsorted(span_end, lo, side="left"),
                     np.searchsorted(span_start, hi, side="right")], axis=1).astype(np.int64)


def run(ctx: StageContext) -> dict[str, Any]:
    c, layout, manifest = ctx.config, Layout(ctx.root), ctx.manifest
    index = load_index(layout.index)
    k = c.num_neighbors
    counts: dict[str, Any] = {}
    for split in ("train", "val"):
        queries = load_npy(layout.embeddings(split)) if manifest["counts"][split]["chunks"] else None
        if queries is None:
            continue
        exclude = None
        if split == "train":
            exclude = exclusion_ranges(load_npy(layout.chunk_docs(split), mmap=False),
                                       chunks_per_sample=manifest["seq_len"] // manifest["chunk_size"],
                                       num_samples=manifest["counts"][split]["samples"])

        def compute(lo: int, hi: int, queries=queries, exclude=exclude):
            _, ids = search(index, np.asarray(queries[lo:hi], dtype=np.float32), k,
                            exclude=None if exclude is None else exclude[lo:hi])
            return ids

        out = layout.neighbors(split)
        compute_blocks(ctx, out=out, num_rows=len(queries), width=k, dtype="int32", compute=compute,
                       desc=f"neighbors {split}", unit="query")
        if ctx.world.is_main:
            counts[f"{split}_missing"] = int((np.load(out, mmap_mode="r") < 0).sum())
            counts[f"{split}_queries"] = len(queries)
    ctx.facts["num_neighbors"] = k
    return counts


if __name__ == "__main__":
    from data_prep.pipeline import main
    raise SystemExit(main(stage="neighbors"))
