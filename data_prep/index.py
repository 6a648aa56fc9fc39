"""Stage 3, index: a faiss index over the database embeddings (db/index.faiss), built by every rank.

Rank 0 trains the empty index on a bounded sample and saves it, while the other ranks score a seeded sample of 1,000
database rows exactly against every row. Every rank then encodes fixed blocks of block_size rows (round-robin) into
part files of standalone codes (id = row number); rank 0 joins them in row order, so the index is the same bytes for
any number of ranks. All ranks then tune nprobe (and the re-rank depth of a compressed index), each on its share of
the sample, until recall@10 reaches --index-recall, and rank 0 saves the index. Indexes that do not fill from codes
(Flat, HNSW, pre-transforms) are filled by rank 0 alone: a Flat index is the embeddings themselves. Parts live in a
directory named by the stage fingerprint, so a killed run keeps the blocks it finished.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retro_dist.data.format import Layout, load_npy, save_npy
from retro_dist.retrieval.index import (add_encoded, add_rows, default_factory, encode_block, fills_in_blocks,
                                        list_sizes, load_index, reserve_lists, save_index, train_index)
from retro_dist.retrieval.tuning import exact_top_scores, recall_sample, tune_search

from .stage import StageContext


def _part(parts: Path, lo: int, hi: int) -> Path:
    return parts / f"rows-{lo:012d}-{hi:012d}.npy"  # named by rows, so a changed block_size never reuses a part


def _share(items: np.ndarray, ranks: int, rank: int) -> np.ndarray:
    """This rank's contiguous share: the shares of ranks 0, 1, ... concatenated give `items` back, in order."""
    return np.array_split(items, ranks)[rank] if 0 <= rank < ranks else items[:0]


def run(ctx: StageContext) -> dict[str, Any]:
    c, layout, world = ctx.config, Layout(ctx.root), ctx.world
    embeddings = load_npy(layout.embeddings("train"))
    n, dim = embeddings.shape
    factory = c.index_factory
    if factory == "auto":
        factory = default_factory(n, dim, c.index_memory_mb)
    ctx.log(f"[index] {factory} over {n} vectors of {dim} dims")
    parts = layout.db / f".index.parts-{ctx.fingerprint[:16]}"
    trained, joined = parts / "trained.faiss", parts / "joined.faiss"
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    # rank 0 trains; meanwhile the other ranks (or, alone, rank 0 afterwards) score the recall queries exactly
    query_ids = recall_sample(n)
    scorers = max(world.size - 1, 1)
    my_queries = _share(query_ids, scorers, world.rank - 1 if world.size > 1 else 0)
    top, error = None, None
    try:
        if world.is_main:
            parts.mkdir(parents=True, exist_ok=True)
            if not trained.exists():
                save_index(train_index(embeddings, factory), trained)
        if not world.is_main or world.size == 1:
            top = exact_top_scores(embeddings, my_queries)
    except Exception as e:  # noqa: BLE001 - raised on every rank by check
        error = e
    world.check(error)
    lap("train_s")

    # every rank encodes its blocks (round-robin) into part files; a rerun keeps the parts it finds
    index = load_index(trained)
    encode = fills_in_blocks(index)
    blocks = [(lo, min(n, lo + c.block_size)) for lo in range(0, n, c.block_size)]
    mine = [blocks[b] for b in world.my_blocks(len(blocks))] if encode else []
    encoded, error = 0, None
    try:
        with tqdm(total=sum(hi - lo for lo, hi in mine), unit="vec", unit_scale=True, mininterval=1.0,
                  desc=f"index encode (rank 0 of {world.size})" if world.size > 1 else "index encode",
                  disable=not world.is_main or not mine) as bar:
            for lo, hi in mine:
                if not _part(parts, lo, hi).exists():
                    save_npy(_part(parts, lo, hi), encode_block(index, np.asarray(embeddings[lo:hi], np.float32)))
                    encoded += 1
                bar.update(hi - lo)
    except Exception as e:  # noqa: BLE001 - raised on every rank by check
        error = e
    world.check(error)
    lap("encode_s")

    def join() -> None:  # in row order, whichever rank encoded which block
        if encode:
            codes = [load_npy(_part(parts, lo, hi)) for lo, hi in blocks]
            reserve_lists(index, sum(list_sizes(index, part) for part in codes))
            for (lo, _), part in zip(blocks, codes):
                add_encoded(index, part, lo)
        else:
            add_rows(index, embeddings, progress=True)
        if world.size > 1:
            save_index(index, joined)

    world.on_main(join)
    lap("join_s")

    # every rank tunes on its share of the queries: rank 0 on the index it holds, the others on the joined file
    top = np.concatenate([part for part in world.allgather(top) if part is not None])
    share = _share(np.arange(len(query_ids)), world.size, world.rank)
    tuning = tune_search(index if world.is_main else load_index(joined, mmap=True), embeddings,
                         target=c.index_recall, query_ids=query_ids[share], top=top[share],
                         combine=lambda recalls: np.concatenate(world.allgather(recalls)))
    lap("tune_s")

    def save() -> None:
        save_index(index, layout.index)
        shutil.rmtree(parts)
        for stale in layout.db.glob(".index.parts-*"):  # parts of runs with other settings
            shutil.rmtree(stale, ignore_errors=True)

    world.on_main(save)
    settings = {key: tuning[key] for key in ("nprobe", "efSearch") if key in tuning}
    if not tuning["reached"]:
        ctx.log(f"[index] warning: recall@10 {tuning['recall_at_10']:.3f} stays below --index-recall "
                f"{c.index_recall} at the costliest setting tried ({settings}, rerank {tuning['rerank']})")
    size = layout.index.stat().st_size
    ctx.facts["index"] = {"factory": factory, "file": "db/index.faiss", "vectors": n,
                          "recall_at_10": tuning["recall_at_10"], "recall_queries": tuning["recall_queries"],
                          **settings, "rerank": tuning["rerank"], "bytes": size,
                          "bytes_per_chunk": round(size / max(n, 1), 2)}
    return {"factory": factory, "vectors": n, "blocks_encoded": encoded, **seconds,
            "encode_vectors_per_s": round(n / max(seconds["encode_s"], 0.1), 1),
            "recall_at_10": tuning["recall_at_10"], **settings, "rerank": tuning["rerank"]}
