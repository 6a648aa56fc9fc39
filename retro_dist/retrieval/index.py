"""faiss index over chunk embeddings: choose, build, save, load, and search with per-query excluded id ranges.

Vectors are L2-normalised, so every index uses the inner-product metric (IP = cosine). Ids are row numbers of the
embedding array, 0..ntotal-1, which is what lets `search` exclude a query's own document as an id range.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

EXACT_MAX = 200_000  # exact all-vs-all search grows as n^2: ~1 hour at 1M chunks on a 2-core CPU, ~2.5 min at 200k
HNSW_MAX = 5_000_000  # HNSW32,Flat keeps vectors + ~256 B of links: ~9 GB at 5M x 384-d; beyond, IVF is leaner
IVF_FLAT_MAX = 20_000_000  # IVF-Flat keeps full vectors: ~31 GB at 20M x 384-d; above, PQ codes of dim/4 bytes
MAX_EXTRA = 1024  # at most this many extra candidates per query before falling back to an IDSelector search
FALLBACK_EFFORTS = (1, 4, 16, 64)  # efSearch / nprobe multipliers tried in turn for a row still short of k
MARGIN = 16  # candidates kept past k (and re-scored for exact indexes) so float noise cannot change the top k


def ivf_nlist(num_vectors: int) -> int:
    """IVF list count: the power of two nearest 4 * sqrt(num_vectors), with >= 39 training points per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(num_vectors, 1))))
    return max(1, min(nlist, num_vectors // 39))


def default_factory(num_vectors: int, dim: int) -> str:
    """faiss factory string for `num_vectors` vectors of `dim`: exact, then HNSW, then IVF as the corpus grows.

    Measured on a 2-core CPU on real MiniLM embeddings (20k chunks): HNSW32 reaches recall@10 0.98 at efSearch 16 (~40k
    queries/s), IVF-Flat 0.95 at nprobe 32, IVF-PQ alone ~0.64, so PQ is used only where full vectors no longer fit.
    """
    if num_vectors < EXACT_MAX:
        return "Flat"
    if num_vectors <= HNSW_MAX:
        return "HNSW32,Flat"
    nlist = ivf_nlist(num_vectors)
    if num_vectors <= IVF_FLAT_MAX:
        return f"IVF{nlist},Flat"
    pq = max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)  # PQ needs m | dim
    return f"IVF{nlist},PQ{pq}"


def _make(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, or a one-line ValueError."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(f"faiss cannot parse the index factory string {factory!r}: "
                         "use e.g. 'Flat', 'HNSW32,Flat' or 'IVF1024,Flat'") from None


def _is_hnsw(index: faiss.Index) -> bool:
    """Whether `index` (under any pre-transform) is an HNSW graph."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _is_hnsw(index.index)
    return isinstance(index, faiss.IndexHNSW)


def _set_search_defaults(index: faiss.Index) -> None:
    """HNSW efSearch >= 64, IVF nprobe = max(32, sqrt(nlist)): measured recall@10 0.98 at 16 (HNSW), 0.95 at nprobe 32 (IVF) on MiniLM embeddings."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        _set_search_defaults(index.index)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(64, index.hnsw.efSearch)
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, max(32, math.isqrt(index.nlist)))


def _rows_f32(embeddings: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Just these rows as contiguous float32: a memmap is read, and converted, one batch at a time."""
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def build_index(embeddings: np.ndarray, factory: str, *, train_size: int = 200_000, add_batch: int = 65_536,
                seed: int = 0, progress: bool = False) -> faiss.Index:
    """Build an inner-product index over `embeddings` [n, d] (float16/32, memmaps too), read `add_batch` rows at a time.

    An untrained index (IVF, PQ) is trained on a seeded random sample of train_size rows, raised to 39 per IVF list
    when that is more (faiss's k-means wants that many). Row i gets id i.
    """
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise ValueError(f"embeddings must be a 2-D float array [n, dim], got {embeddings.dtype} {embeddings.shape}")
    n, dim = embeddings.shape
    index = _make(factory, dim)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        size = min(n, max(train_size, 39 * ivf.nlist if ivf is not None else 0))
        if size == 0:
            raise ValueError(f"index {factory!r} needs training vectors but the embeddings are empty: use 'Flat'")
        sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        train = np.empty((size, dim), np.float32)
        for start in range(0, size, add_batch):
            train[start:start + add_batch] = _rows_f32(embeddings, sample[start:start + add_batch])
        index.train(train)
        del train
    with tqdm(total=n, unit="vec", desc=f"index {factory}", disable=not progress) as bar:
        for start in range(0, n, add_batch):
            batch = _rows_f32(embeddings, slice(start, start + add_batch))
            index.add(batch)
            bar.update(len(batch))
    _set_search_defaults(index)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write `index` to `path` atomically: a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_index(path: str | Path, *, mmap: bool = False) -> faiss.Index:
    """Read an index written by `save_index`; `mmap=True` maps its vectors/codes read-only (no add) instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no faiss index at {path}: build one with build_index() and save_index() first")
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


def _flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The vectors of an inner-product IndexFlat as a zero-copy [ntotal, d] view, else None."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT or not index.ntotal:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, candidates (id -1 = none) ordered by (score desc, id asc), cut or padded with (-inf, -1) to k."""
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    pad = ((0, 0), (0, k - scores.shape[1]))
    return np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)


def _rescored_best_k(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """`_best_k` with every score recomputed pair by pair, so it cannot depend on the rows batched with it."""
    # faiss's batched BLAS rounds a query's scores differently depending on its position in the batch
    scores = np.empty(ids.shape, np.float32)
    step = max(1, 2**25 // max(ids.size // max(len(ids), 1) * vectors.shape[1], 1))  # ~128 MB gathered at a time
    for s in range(0, len(ids), step):
        scores[s:s + step] = np.einsum("qd,qcd->qc", queries[s:s + step], vectors[np.maximum(ids[s:s + step], 0)])
    return _best_k(scores, ids, k)


def _knn(index: faiss.Index, x: np.ndarray, k: int, sel: faiss.IDSelector | None = None,
         effort: int = 1) -> tuple[np.ndarray, ...]:
    """faiss search of k per row (HNSW efSearch / IVF nprobe times `effort`); only an exact index's own scores
    may depend on the batch (callers re-score them)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
        return _knn(index.index, x, k, sel, effort)
    if isinstance(index, faiss.IndexHNSW):  # each query walks the graph on its own
        params = faiss.SearchParametersHNSW(efSearch=index.hnsw.efSearch * effort, sel=sel)
        return index.search(x, k, params=params)
    if isinstance(index, faiss.IndexIVF):
        nprobe = min(index.nprobe * effort, index.nlist)
        # the lists a query scans come from a flat search over the centroids: make that choice batch-independent
        centroids = _flat_vectors(index.quantizer)
        if centroids is None:
            list_scores, lists = index.quantizer.search(x, nprobe)
        else:
            _, candidates = index.quantizer.search(x, min(nprobe + MARGIN, index.nlist))
            list_scores, lists = _rescored_best_k(centroids, x, candidates, nprobe)
        scores, ids = np.empty((len(x), k), np.float32), np.empty((len(x), k), np.int64)
        params = faiss.SearchParametersIVF(nprobe=nprobe, max_codes=index.max_codes, sel=sel)
        # the Python wrapper of search_preassigned refuses params (and with them the IDSelector): call the C++ one
        index.search_preassigned_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(np.ascontiguousarray(lists)),
                                   faiss.swig_ptr(np.ascontiguousarray(list_scores)), faiss.swig_ptr(scores),
                                   faiss.swig_ptr(ids), False, params)
        return scores, ids
    return index.search(x, k, params=faiss.SearchParameters(sel=sel) if sel is not None else None)


def search(index: faiss.Index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
           vectors: np.ndarray | None = None, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores float32 [q, k], ids int64 [q, k]) best first; ids in exclude[i] = [lo, hi) never come back.

    Each batch searches k + 16 + extra candidates, extra = min(widest excluded range in the batch, 1024), and keeps
    the best k that are not excluded. Rows left short are searched again alone with a faiss IDSelector excluding
    their range (at the index's efSearch / nprobe, then 4, 16 and 64 times it while still short: a filtered search
    starves inside a large excluded neighbourhood), and only then padded with (-inf, -1). Ties go to the lower id.

    A query's result depends neither on batch_size nor on the other queries: exact indexes re-score candidates pair
    by pair (faiss's batched BLAS rounds a row by its position in the batch), IVF does so for its centroids, and
    HNSW, whose beam widens with the candidate count, takes extra per query (its range width rounded up to a power
    of two) and searches each value apart. Only a pre-transform (PCA, OPQ) keeps its batched rounding.
    Ids are assumed to be row numbers 0..ntotal-1, as build_index assigns them. `vectors` (the stored db
    embeddings [ntotal, d], a memmap is fine) lets a compressed index re-score its candidates exactly.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("search expects an inner-product index (best = highest score): build it with build_index")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be [q, {index.d}] to match the index, got {queries.shape}")
    n, depth = len(queries), k + MARGIN
    exclude = np.zeros((n, 2), np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if exclude.shape != (n, 2):
        raise ValueError(f"exclude must be int64 [q, 2] = [lo, hi) per query, got shape {exclude.shape} for q={n}")
    lo, hi = exclude[:, :1], exclude[:, 1:]
    widths = np.clip(hi - lo, 0, None)[:, 0]
    per_query = _is_hnsw(index)
    if per_query:
        widths_up = 2 ** np.ceil(np.log2(np.maximum(widths, 1))).astype(np.int64)
        extras = np.minimum(np.where(widths > 0, widths_up, 0), MAX_EXTRA)
    vectors = _flat_vectors(index)

    def best(rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = (ids >= 0) & ~((ids >= lo[rows]) & (ids < hi[rows]))
        first = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # the first `depth` kept, in faiss's order
        kept = np.take_along_axis(keep, first, 1)
        scores = np.where(kept, np.take_along_axis(scores, first, 1), -np.inf)
        ids = np.where(kept, np.take_along_axis(ids, first, 1), -1)
        top = _best_k(scores, ids, k) if vectors is None else _rescored_best_k(vectors, queries[rows], ids, k)
        return *top, kept.sum(1)

    out_scores, out_ids = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    if n == 0 or index.ntotal == 0:
        return out_scores, out_ids
    found = np.zeros(n, np.int64)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        groups = np.unique(extras[rows]) if per_query else [min(int(widths[rows].max()), MAX_EXTRA)]
        for extra in groups:
            group = rows[extras[rows] == extra] if per_query else rows
            scores, ids = _knn(index, queries[group], min(depth + int(extra), index.ntotal))
            out_scores[group], out_ids[group], found[group] = best(group, scores, ids)

    # rows that lost too many candidates to their range while the index holds more outside it
    outside = index.ntotal - np.clip(np.minimum(hi, index.ntotal) - np.maximum(lo, 0), 0, None)[:, 0]
    needed = np.minimum(depth, outside)
    approximate = per_query or faiss.try_extract_index_ivf(index) is not None
    efforts = FALLBACK_EFFORTS if approximate else (1,)
    for row in np.flatnonzero((widths > 0) & (found < needed)):
        inside = faiss.IDSelectorRange(int(lo[row, 0]), int(hi[row, 0]))
        not_inside = faiss.IDSelectorNot(inside)
        for effort in efforts:  # a filtered graph walk / list scan can starve inside a big excluded neighbourhood
            scores, ids = _knn(index, queries[row:row + 1], min(depth, index.ntotal), not_inside, effort)
            row_scores, row_ids, row_found = best(np.array([row]), scores, ids)
            if row_found[0] >= needed[row]:
                break
        out_scores[row], out_ids[row] = row_scores[0], row_ids[0]
    return out_scores, out_ids


def recall_at_k(index: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k ids that `index` also returns in its top k."""
    _, approx = search(index, queries, k)
    _, truth = search(exact, queries, k)
    hits = [np.isin(t[t >= 0], a).sum() / max((t >= 0).sum(), 1) for a, t in zip(approx, truth)]
    return float(np.mean(hits))
