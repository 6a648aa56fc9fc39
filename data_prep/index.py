"""Stage 3, index: a faiss index over the database embeddings (db/index.faiss), built by every rank.

Rank 0 trains the empty index on a bounded sample and saves it. Every rank then takes fixed blocks of block_size
rows (round-robin), encodes each into a part file of standalone codes (row number = id), and scores the same rows
exactly against a seeded sample of 1,000 database rows. Rank 0 joins the parts in row order, so the index is the same
bytes for any number of ranks, tunes nprobe (and the re-rank depth of a compressed index) until recall@10 on that
sample reaches --index-recall, and saves it. Indexes that do not fill from codes (Flat, HNSW, pre-transforms) are
filled by rank 0 alone: a Flat index is the embeddings themselves. Parts live in a directory named by the stage
fingerprint, so a killed run keeps the blocks it finished.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retro_dist.data.format import Layout, load_npy, save_npy
from retro_dist.retrieval.index import (RECALL_K, add_encoded, add_rows, default_factory, encode_block,
                                        exact_top_scores, fills_in_blocks, list_sizes, load_index, merge_top_scores,
                                        recall_sample, reserve_lists, save_index, train_index, tune_search)

from .parallel import World
from .stage import StageContext


def _part(parts: Path, lo: int, hi: int) -> Path:
    return parts / f"rows-{lo:012d}-{hi:012d}.npy"  # named by rows, so a changed block_size never reuses a part


def _gather(world: World, value: Any) -> list[Any]:
    """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
    if world.comm is None:
        return [value]
    world.barrier()  # sleep until all arrive, rather than spin inside gather
    return world.comm.gather(value, root=0)


def run(ctx: StageContext) -> dict[str, Any]:
    c, layout, world = ctx.config, Layout(ctx.root), ctx.world
    embeddings = load_npy(layout.embeddings("train"))
    n, dim = embeddings.shape
    factory = c.index_factory
    if factory == "auto":
        factory = default_factory(n, dim, c.index_memory_mb)
    ctx.log(f"[index] {factory} over {n} vectors of {dim} dims")
    parts = layout.db / f".index.parts-{ctx.fingerprint[:16]}"
    trained = parts / "trained.faiss"
    start = time.perf_counter()

    def train() -> None:
        parts.mkdir(parents=True, exist_ok=True)
        if not trained.exists():
            save_index(train_index(embeddings, factory), trained)

    world.on_main(train)
    train_s = time.perf_counter() - start
    index = load_index(trained)
    encode = fills_in_blocks(index)
    blocks = [(lo, min(n, lo + c.block_size)) for lo in range(0, n, c.block_size)]
    mine = [blocks[b] for b in world.my_blocks(len(blocks))]
    query_ids = recall_sample(n)
    top = np.full((len(query_ids), RECALL_K), -np.inf)
    encoded, error = 0, None
    try:
        with tqdm(total=sum(hi - lo for lo, hi in mine), unit="vec", unit_scale=True, mininterval=1.0,
                  desc=f"index encode (rank 0 of {world.size})" if world.size > 1 else "index encode",
                  disable=not world.is_main) as bar:
            for lo, hi in mine:
                if encode and not _part(parts, lo, hi).exists():
                    save_npy(_part(parts, lo, hi), encode_block(index, np.asarray(embeddings[lo:hi], np.float32)))
                    encoded += 1
                # exact scores are not saved with the parts: a rerun recomputes them for every block (cheap)
                top = merge_top_scores([top, exact_top_scores(embeddings, query_ids, lo=lo, hi=hi)])
                bar.update(hi - lo)
    except Exception as e:  # noqa: BLE001 - raised on every rank by check
        error = e
    world.check(error)
    fill_start = time.perf_counter()
    tops = _gather(world, top)

    def fill_tune_save() -> dict[str, Any]:
        if encode:
            codes = [load_npy(_part(parts, lo, hi)) for lo, hi in blocks]
            reserve_lists(index, sum(list_sizes(index, part) for part in codes))
            for (lo, _), part in zip(blocks, codes):
                add_encoded(index, part, lo)
        else:
            add_rows(index, embeddings, progress=True)
        fill_s = time.perf_counter() - fill_start
        tuning = tune_search(index, embeddings, target=c.index_recall, query_ids=query_ids,
                             top=merge_top_scores(tops))
        save_index(index, layout.index)
        shutil.rmtree(parts)
        for stale in layout.db.glob(".index.parts-*"):  # parts of runs with other settings
            shutil.rmtree(stale, ignore_errors=True)
        return {**tuning, "fill_s": fill_s}

    result = world.on_main(fill_tune_save)
    settings = {key: result[key] for key in ("nprobe", "efSearch") if key in result}
    if not result["reached"]:
        ctx.log(f"[index] warning: recall@10 {result['recall_at_10']:.3f} stays below --index-recall "
                f"{c.index_recall} at the costliest setting tried ({settings}, rerank {result['rerank']})")
    size = layout.index.stat().st_size
    ctx.facts["index"] = {"factory": factory, "file": "db/index.faiss", "vectors": n,
                          "recall_at_10": result["recall_at_10"], "recall_queries": result["recall_queries"],
                          **settings, "rerank": result["rerank"], "bytes": size,
                          "bytes_per_chunk": round(size / max(n, 1), 2)}
    wall = time.perf_counter() - start
    return {"factory": factory, "vectors": n, "blocks_encoded": encoded, "train_s": round(train_s, 1),
            "fill_s": round(result["fill_s"], 1), "vectors_per_s": round(n / max(wall, 1e-9), 1),
            "recall_at_10": result["recall_at_10"], **settings, "rerank": result["rerank"]}

