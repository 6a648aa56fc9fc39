"""Tuning an index's search to a recall target: recall@10 against exact search, measured on the database's own rows.

The index stage scores a seeded sample of database rows exactly (in parts that ranks compute and merge), then walks
nprobe / efSearch and the re-rank depth of a compressed index until `search` reaches the target on that sample.
"""

from __future__ import annotations

from typing import Any, Callable

import faiss
import numpy as np

from .index import MARGIN, RERANK_DEPTHS, _exact_scores, _is_hnsw, _rows_f32, search

RECALL_QUERIES = 1000  # database rows whose recall@10 against exact search tunes the search parameters
RECALL_K = 10
# nprobe values tried in turn: 2^i and 1.5 * 2^i
LADDER = sorted({2**i for i in range(31)} | {3 * 2**i for i in range(30)})
TIE_TOLERANCE = 1e-6  # an approximate neighbor scoring within this of the k-th exact score is as good as it


def recall_sample(num_vectors: int, count: int = RECALL_QUERIES, *, seed: int = 0) -> np.ndarray:
    """Sorted ids of `count` seeded random database rows (all of them when fewer): the queries that tune search."""
    return np.sort(np.random.default_rng(seed).choice(num_vectors, size=min(count, num_vectors), replace=False))


def exact_top_scores(vectors: np.ndarray, query_ids: np.ndarray, *, k: int = RECALL_K, lo: int = 0,
                     hi: int | None = None, batch: int = 8192) -> np.ndarray:
    """float64 [q, k]: the k best exact scores, best first (-inf where fewer), of each query row of `vectors`
    against rows [lo, hi), its own row left out. Parts over disjoint row ranges join with `merge_top_scores`."""
    hi = len(vectors) if hi is None else hi
    queries = _rows_f32(vectors, query_ids)
    top = np.full((len(queries), k), -np.inf)
    for start in range(lo, hi, batch):
        rows = _rows_f32(vectors, slice(start, min(start + batch, hi)))
        scores = queries @ rows.T
        own = query_ids - start
        mine = (own >= 0) & (own < len(rows))
        scores[np.flatnonzero(mine), own[mine]] = -np.inf
        depth = min(k + MARGIN, len(rows))
        candidates = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        # BLAS rounding depends on the batch: the candidates are scored again pair by pair, in float64
        exact = np.einsum("qd,qcd->qc", queries.astype(np.float64), rows[candidates].astype(np.float64))
        exact[np.isneginf(np.take_along_axis(scores, candidates, 1))] = -np.inf
        top = merge_top_scores([top, exact], k)
    return top


def merge_top_scores(parts: list[np.ndarray], k: int = RECALL_K) -> np.ndarray:
    """The k best scores per row of several `exact_top_scores` parts."""
    return -np.sort(-np.concatenate(parts, axis=1), axis=1)[:, :k]


def query_recalls(index: faiss.Index, vectors: np.ndarray, query_ids: np.ndarray, top: np.ndarray, *,
                  rerank: int | None = None) -> np.ndarray:
    """Tie-aware recall@k of `search` (own row excluded) per query, against the exact top scores `top` [q, k]: a
    neighbor counts when its exact score reaches the k-th exact score less TIE_TOLERANCE, so that equal-scoring
    duplicates are all right. A query's value depends on that query alone."""
    k = top.shape[1]
    if len(query_ids) == 0:
        return np.zeros(0)
    queries = _rows_f32(vectors, query_ids)
    _, ids = search(index, queries, k, exclude=np.stack([query_ids, query_ids + 1], 1), vectors=vectors,
                    rerank=rerank)
    scores = np.einsum("qd,qcd->qc", queries.astype(np.float64), vectors[np.maximum(ids, 0)].astype(np.float64))
    expected = np.isfinite(top).sum(1)
    kth = top[np.arange(len(top)), np.maximum(expected - 1, 0)]
    hits = ((ids >= 0) & (scores >= kth[:, None] - TIE_TOLERANCE)).sum(1)
    return np.where(expected > 0, np.minimum(hits, expected) / np.maximum(expected, 1), 1.0)


def measure_recall(index: faiss.Index, vectors: np.ndarray, query_ids: np.ndarray, top: np.ndarray, *,
                   rerank: int | None = None) -> float:
    """Mean of `query_recalls` (1.0 with no queries: a database of one row has no neighbors to miss)."""
    recalls = query_recalls(index, vectors, query_ids, top, rerank=rerank)
    return float(recalls.mean()) if len(recalls) else 1.0


def search_ladder(index: faiss.Index) -> tuple[str | None, list[int | None], tuple[int | None, ...]]:
    """(knob, its values from cheap to costly, re-rank depths from cheap to costly): nprobe in steps of at most 1.5x
    up to nlist (IVF: a query's cost is proportional to it, so the tuned cost lands within 1.5x of the least that
    reaches the target) or efSearch doubling (HNSW), and the re-rank depths of a compressed index (None: exact, no
    re-rank)."""
    knob, values = None, [None]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        knob, values = "nprobe", [v for v in LADDER if v < ivf.nlist] + [ivf.nlist]
    elif _is_hnsw(index):
        knob, values = "efSearch", [2**i for i in range(4, 13)]
    return knob, values, (None,) if _exact_scores(index) else RERANK_DEPTHS


def tune_search(index: faiss.Index, vectors: np.ndarray, *, target: float, query_ids: np.ndarray | None = None,
                top: np.ndarray | None = None,
                combine: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """The cheapest `search_ladder` setting whose recall@10 on `query_ids` (default: `recall_sample`) reaches
    `target`: the smallest nprobe / efSearch that reaches it at the deepest re-rank, then the shallowest re-rank that
    still does there. Without one, the costliest setting.

    Leaves the index at the chosen nprobe / efSearch (saved with it) and returns {nprobe or efSearch, "rerank" (the
    depth to pass to `search`; None for an exact index), "recall_at_10", "recall_queries", "reached"}. `top` =
    exact_top_scores of the queries (computed here when not given). Processes that each hold a share of the queries
    pass `combine`, which joins every process's `query_recalls` in query order; every process then decides alike.
    """
    query_ids = recall_sample(len(vectors)) if query_ids is None else query_ids
    top = exact_top_scores(vectors, query_ids) if top is None else top
    knob, values, reranks = search_ladder(index)
    space, count = faiss.ParameterSpace(), [len(query_ids)]

    def recall(value: int | None, rerank: int | None) -> float:
        if knob is not None:
            space.set_index_parameter(index, knob, value)
        recalls = query_recalls(index, vectors, query_ids, top, rerank=rerank)
        recalls = combine(recalls) if combine is not None else recalls
        count[0] = len(recalls)
        return float(recalls.mean()) if len(recalls) else 1.0

    for value in values:  # recall rises with either knob: one pass over nprobe, then one over the re-rank depth
        best = recall(value, reranks[-1])
        if best >= target:
            break
    reached, chosen = best >= target, reranks[-1]
    for rerank in reranks[:-1] if reached else ():
        shallower = recall(value, rerank)
        if shallower >= target:
            chosen, best = rerank, shallower
            break
    setting = {knob: value} if knob is not None else {}
    return {**setting, "rerank": chosen, "recall_at_10": round(best, 4), "recall_queries": count[0],
            "reached": reached}
