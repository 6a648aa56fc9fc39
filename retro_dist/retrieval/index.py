"""faiss index over chunk embeddings: choose, train, fill in blocks, tune, save, load, and search with per-query
excluded id ranges.

Vectors are L2-normalised, so every index uses the inner-product metric (IP = cosine). Ids are row numbers of the
embedding array, 0..ntotal-1, which is what lets `search` exclude a query's own document as an id range.

An IVF index is filled from standalone codes (`encode_block`, then `add_encoded`), so ranks can encode fixed blocks
of rows in parallel and one process joins them in row order: the result does not depend on how the blocks were
dealt. Its search parameters (nprobe, and the re-rank depth of a compressed index) are tuned by `tune_search` until
recall@10 against exact search reaches a target on a sample of the database's own rows.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from retro_dist.atomic import atomic_path
from retro_dist.retrieval.centroids import balanced_centroids

# Exact all-vs-all search (the neighbors stage) grows as n^2: measured 41 CPU-s at 2**16 chunks (hash-256, one
# thread of a shared 2-core CPU) but ~914 CPU-s just under the former 200k switch; IVF, tuned to recall, above.
EXACT_MAX = 2**16
ROWS_PER_LIST = 128  # IVF lists of a fixed size: a query scanning nprobe lists costs the same at any corpus size
NLIST_MAX = 2**18  # Megatron's list count for ~67M chunks; past NLIST_MAX * ROWS_PER_LIST (~33M chunks) lists grow
TRAIN_MAX = 2**21  # at most this many rows (2 GB as float32 at 256 dims) train the centroids, however many lists
HNSW_M = 32  # links per centroid of the coarse quantizer: a query finds its nprobe lists in ~log(nlist) steps
QUANTIZER_EF = 64  # the coarse quantizer's beam: its nearest list is the exact one for nearly every vector
MAX_BYTES_PER_CHUNK = 64  # a compressed index's budget per vector, its 8-byte id included
ID_BYTES = 8  # faiss stores one int64 id per vector in the inverted lists
TRAIN_SIZE = 65_536  # 256 rows per PQ centroid, faiss's own cap; raised to 39 per IVF list when that is more
MAX_EXTRA = 1024  # at most this many extra candidates per query before falling back to an IDSelector search
FALLBACK_EFFORTS = (1, 4, 16, 64)  # efSearch / nprobe multipliers tried in turn for a row still short of k
MARGIN = 16  # candidates kept past k (and re-scored for exact indexes) so float noise cannot change the top k
RESCORE_VALUES = 2**22  # embedding values gathered at a time to re-score candidates
RERANK_DEPTHS = (64, 128, 256)  # candidates of a compressed index re-scored exactly, tried in turn at each nprobe


def ivf_nlist(num_vectors: int) -> int:
    """IVF list count: num_vectors / ROWS_PER_LIST (lists of a fixed size), at most NLIST_MAX."""
    return max(1, min(num_vectors // ROWS_PER_LIST, NLIST_MAX))


def pq_size(num_vectors: int, dim: int, nlist: int) -> int:
    """PQ sub-quantizers m (one byte each, m divides dim) that keep an IVF-PQ index within MAX_BYTES_PER_CHUNK per
    vector, counting its id and its share of the centroids, their graph, the PQ codebooks and the list sizes. (Far
    below the size where --index-memory-mb forces compression, that share alone can exceed the budget: m is then 1.)"""
    fixed = (nlist + 256) * dim * 4 + nlist * 8 + nlist * 2 * HNSW_M * 4  # last: the centroid graph's links
    budget = MAX_BYTES_PER_CHUNK - ID_BYTES - fixed / max(num_vectors, 1)
    return max((m for m in range(1, dim + 1) if dim % m == 0 and m <= budget), default=1)


def default_factory(num_vectors: int, dim: int, memory_mb: int = 2048) -> str:
    """faiss factory string for `num_vectors` vectors of `dim` in about `memory_mb`: exact (Flat) below EXACT_MAX,
    then IVF with ROWS_PER_LIST rows per list and an HNSW coarse quantizer, storing full vectors while vectors and
    ids fit, else 8-bit scalar codes while those fit, else PQ within 64 bytes per vector (`search` re-ranks the
    candidates of SQ and PQ exactly from the stored embeddings).

    Lists of a fixed size make a query's cost (nprobe lists of ROWS_PER_LIST rows, plus a walk of the centroid
    graph) independent of the corpus size, so the neighbors stage grows linearly, wherever the tuned nprobe stays
    put: it does on embeddings that cluster (minilm, minilm-static); hash-256 vectors barely cluster and need a
    growing share of the lists. The HNSW quantizer also makes the k-means behind many lists affordable on a CPU:
    each training vector finds its centroid by a graph walk instead of against every centroid.
    Measured on hash-256 embeddings of real text (108k chunks, recall@10 on 1,000 database rows): HNSW32,Flat over
    the vectors themselves gave 0.73-0.75 at its default efSearch and cannot be filled in parallel blocks;
    OPQ32 before IVF-PQ trained ~10x slower and re-ranked no better than plain PQ. 4-bit fast-scan PQ needs ~4x the
    re-rank depth for recall@10 0.9 and its lists (codes packed in blocks of 32) cannot be filled from standalone
    codes (`add_sa_codes`).
    """
    if num_vectors < EXACT_MAX:
        return "Flat"
    nlist = ivf_nlist(num_vectors)
    ivf = f"IVF{nlist}_HNSW{HNSW_M}"
    if num_vectors * (4 * dim + ID_BYTES) <= memory_mb * 2**20:
        return f"{ivf},Flat"
    if num_vectors * (dim + ID_BYTES) <= memory_mb * 2**20:
        return f"{ivf},SQ8"
    return f"{ivf},PQ{pq_size(num_vectors, dim, nlist)}"


def _make(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string, or a one-line ValueError."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(f"faiss cannot parse the index factory string {factory!r}: "
                         "use e.g. 'Flat', 'IVF1024,Flat' or 'IVF1024,PQ32'") from None


def _is_hnsw(index: faiss.Index) -> bool:
    """Whether `index` (under any pre-transform) is an HNSW graph."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _is_hnsw(index.index)
    return isinstance(index, faiss.IndexHNSW)


def _exact_scores(index: faiss.Index) -> bool:
    """Whether faiss scores `index`'s candidates with the full vectors (Flat, IVF-Flat, HNSW-Flat): re-ranking them
    from the stored embeddings could not change them."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(index.storage), faiss.IndexFlat)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """`index` as an IndexIVF when it is one (not under a pre-transform): one that fills from standalone codes."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def _hnsw_quantizer(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW coarse quantizer of an IVF index, or None."""
    ivf = faiss.try_extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


@contextlib.contextmanager
def _graph_threads(index: faiss.Index):
    """One faiss thread while an HNSW coarse quantizer is built: its graph (inserted by k-means at every iteration)
    depends on the order of parallel insertions, and the index must be the same bytes on every run."""
    threads = faiss.omp_get_max_threads()
    if _hnsw_quantizer(index) is not None:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _set_search_defaults(index: faiss.Index) -> None:
    """HNSW efSearch >= 64, IVF nprobe = max(32, sqrt(nlist)), an HNSW quantizer's efSearch QUANTIZER_EF: the
    settings before `tune_search` picks its own."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        _set_search_defaults(index.index)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(64, index.hnsw.efSearch)
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, max(32, math.isqrt(index.nlist)))
        quantizer = _hnsw_quantizer(index)
        if quantizer is not None:
            quantizer.hnsw.efSearch = QUANTIZER_EF


def _rows_f32(embeddings: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Just these rows as contiguous float32: a memmap is read, and converted, one batch at a time."""
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def _check_embeddings(embeddings: np.ndarray) -> None:
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise ValueError(f"embeddings must be a 2-D float array [n, dim], got {embeddings.dtype} {embeddings.shape}")


# build: train, encode blocks, fill --------------------------------------------------------------------------------

def train_index(embeddings: np.ndarray, factory: str, *, train_size: int = TRAIN_SIZE, batch: int = 65_536,
                seed: int = 0) -> faiss.Index:
    """An empty inner-product index over vectors like `embeddings` [n, d] (float16/32, memmaps too), trained if it
    needs it (IVF, PQ) on a seeded random sample of min(n, max(train_size, 39 * nlist)) rows (faiss's k-means wants
    39 per list), read `batch` rows at a time. The sample is bounded whatever n: nlist <= NLIST_MAX."""
    _check_embeddings(embeddings)
    n, dim = embeddings.shape
    index = _make(factory, dim)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        size = min(n, max(train_size, min(39 * ivf.nlist if ivf is not None else 0, TRAIN_MAX)))
        if size == 0:
            raise ValueError(f"index {factory!r} needs training vectors but the embeddings are empty: use 'Flat'")
        sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        train = np.empty((size, dim), np.float32)
        for start in range(0, size, batch):
            train[start:start + batch] = _rows_f32(embeddings, sample[start:start + batch])
        pq = faiss.downcast_index(ivf) if ivf is not None else None
        if isinstance(pq, faiss.IndexIVFPQ):
            pq.do_polysemous_training = False  # ~2/3 of IVF-PQ's training time (measured), for codes search never uses
            # 64 residuals per PQ centroid, not faiss's 256: PQ training ~4x faster, re-ranked recall@10 the same
            # (measured 0.808 vs 0.810 on hash-256 text embeddings)
            pq.pq.cp.max_points_per_centroid = 64
        with _graph_threads(index):
            if (quantizer := _hnsw_quantizer(index)) is not None:
                quantizer.add(balanced_centroids(train, ivf.nlist, seed=seed))
                ivf.is_trained = True  # faiss then trains only the encoder (SQ ranges, PQ codebooks), if any
            index.train(train)
        del train
    _set_search_defaults(index)
    return index


def _lists(ivf: faiss.IndexIVF, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The nprobe best lists of each row (scores, list numbers), chosen by exact per-pair scores against the
    centroids: faiss's batched BLAS would let near-ties depend on the other rows of the batch."""
    centroids = _flat_vectors(ivf.quantizer)
    if centroids is None:
        return ivf.quantizer.search(x, nprobe)
    _, candidates = ivf.quantizer.search(x, min(nprobe + MARGIN, ivf.nlist))
    return _rescored_best_k(centroids, x, candidates, nprobe)


def fills_in_blocks(index: faiss.Index) -> bool:
    """Whether `index` is filled by `encode_block` + `add_encoded` (IVF), so ranks can encode blocks in parallel;
    others (Flat, HNSW, pre-transforms) are filled by `add_rows` in one process."""
    return _ivf(index) is not None


def encode_block(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """Standalone codes of `rows` for a trained IVF index: uint8 [n, sa_code_size], the row's list number
    (coarse_code_size bytes, little-endian) then its code. A row's code depends on that row alone: its list is the
    one `search` scans first for a query equal to it."""
    ivf = _ivf(index)
    if ivf is None or not ivf.is_trained:
        raise ValueError("encode_block needs a trained IVF index (build others with add_rows)")
    x = np.ascontiguousarray(rows, dtype=np.float32)
    lists = np.ascontiguousarray(_lists(ivf, x, 1)[1][:, 0])
    codes = np.empty((len(x), ivf.sa_code_size()), np.uint8)
    ivf.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes), True)
    return codes


def list_sizes(index: faiss.Index, codes: np.ndarray) -> np.ndarray:
    """int64 [nlist]: how many of these standalone codes fall in each inverted list."""
    ivf = _ivf(index)
    size = ivf.coarse_code_size()
    head = np.asarray(codes[:, :size], dtype=np.int64)
    return np.bincount((head << (8 * np.arange(size))).sum(1), minlength=ivf.nlist)


def reserve_lists(index: faiss.Index, sizes: np.ndarray) -> None:
    """Allocate room for `sizes` [nlist] more entries per list up front, so filling never reallocates (a list
    growing by doubling can hold up to twice its entries, and the index twice its size, at the end of a fill)."""
    invlists = faiss.downcast_InvertedLists(_ivf(index).invlists)
    if not isinstance(invlists, faiss.ArrayInvertedLists):
        return
    for list_no in np.flatnonzero(sizes):
        now = invlists.list_size(int(list_no))
        invlists.resize(int(list_no), now + int(sizes[list_no]))  # a shrinking resize keeps the capacity
        invlists.resize(int(list_no), now)


def add_encoded(index: faiss.Index, codes: np.ndarray, first_id: int) -> None:
    """Append standalone codes from `encode_block`, with ids first_id, first_id + 1, ... (their row numbers)."""
    ids = np.arange(first_id, first_id + len(codes), dtype=np.int64)
    _ivf(index).add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8), ids)


def add_rows(index: faiss.Index, embeddings: np.ndarray, *, batch: int = 65_536, progress: bool = False) -> None:
    """Add every row of `embeddings` to an empty trained index, `batch` rows at a time; row i gets id i."""
    _check_embeddings(embeddings)
    if index.ntotal:
        raise ValueError(f"add_rows fills an empty index, this one holds {index.ntotal} vectors")
    n = len(embeddings)
    with tqdm(total=n, unit="vec", desc="index add", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, n, batch):
            rows = _rows_f32(embeddings, slice(start, start + batch))
            if fills_in_blocks(index):
                add_encoded(index, encode_block(index, rows), start)
            else:
                index.add(rows)
            bar.update(len(rows))


def build_index(embeddings: np.ndarray, factory: str, *, train_size: int = TRAIN_SIZE, add_batch: int = 65_536,
                seed: int = 0, progress: bool = False) -> faiss.Index:
    """Build an inner-product index over `embeddings` [n, d] in one process: `train_index`, then `add_rows`.

    The same index, byte for byte, as ranks encoding blocks of rows (`encode_block`) joined in row order by
    `add_encoded`. Its search parameters are faiss-ish defaults until `tune_search` sets them.
    """
    index = train_index(embeddings, factory, train_size=train_size, batch=add_batch, seed=seed)
    add_rows(index, embeddings, batch=add_batch, progress=progress)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write `index` to `path` atomically (a whole file or none)."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | Path, *, mmap: bool = False) -> faiss.Index:
    """Read an index written by `save_index`. `mmap=True` maps the file read-only and shared, so ranks on one node
    share its pages: an IVF index's inverted lists (faiss IO_FLAG_MMAP), a flat index's vectors or codes
    (IO_FLAG_MMAP_IFC); such an index cannot be added to."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no faiss index at {path}: build one with build_index() and save_index() first")
    flags = 0
    if mmap:
        with open(path, "rb") as f:
            fourcc = f.read(4)
        # IVF types are "Iw.." / "Iv.." ("IxPT", a pre-transform, may wrap one); the two flags cannot be combined
        ivf = fourcc[:2] in (b"Iw", b"Iv") or fourcc == b"IxPT"
        flags = (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags)


# search -----------------------------------------------------------------------------------------------------------

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
    # RESCORE_VALUES gathered at a time (with their float32 copy, ~24 MB from float16): the neighbors stage's private
    # memory is otherwise dominated by this buffer, and grows with the re-rank depth of a compressed index
    step = max(1, RESCORE_VALUES // max(ids.size // max(len(ids), 1) * vectors.shape[1], 1))
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
        list_scores, lists = _lists(index, x, nprobe)  # the lists a query scans do not depend on the batch
        scores, ids = np.empty((len(x), k), np.float32), np.empty((len(x), k), np.int64)
        params = faiss.SearchParametersIVF(nprobe=nprobe, max_codes=index.max_codes, sel=sel)
        # the Python wrapper of search_preassigned refuses params (and with them the IDSelector): call the C++ one
        index.search_preassigned_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(np.ascontiguousarray(lists)),
                                   faiss.swig_ptr(np.ascontiguousarray(list_scores)), faiss.swig_ptr(scores),
                                   faiss.swig_ptr(ids), False, params)
        return scores, ids
    return index.search(x, k, params=faiss.SearchParameters(sel=sel) if sel is not None else None)


def search(index: faiss.Index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
           vectors: np.ndarray | None = None, rerank: int | None = None,
           batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores float32 [q, k], ids int64 [q, k]) best first; ids in exclude[i] = [lo, hi) never come back.

    Each batch searches depth + extra candidates, extra = min(widest excluded range in the batch, 1024), and keeps
    the best k of the first `depth` that are not excluded; depth = k + 16, or for a compressed index (PQ) given
    `vectors` (the stored db embeddings [ntotal, d], a memmap is fine) max(k + 16, rerank), all re-scored exactly
    from `vectors`: pass the depth `tune_search` chose (the manifest's index.rerank); None takes the deepest it tries.
    Rows left short of k + 16 are searched again alone with a faiss IDSelector excluding their range (at the
    index's efSearch / nprobe, then 4, 16 and 64 times it while still short: a filtered search starves inside a
    large excluded neighbourhood), and only then padded with (-inf, -1). Ties go to the lower id.

    A query's result depends neither on batch_size nor on the other queries: exact indexes and re-ranked ones
    re-score candidates pair by pair (faiss's batched BLAS rounds a row by its position in the batch), IVF does so
    for its centroids, and HNSW, whose beam widens with the candidate count, takes extra per query (its range width
    rounded up to a power of two) and searches each value apart. Only a pre-transform (PCA, OPQ) keeps its batched
    rounding. Ids are assumed to be row numbers 0..ntotal-1, as build_index assigns them.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rerank is not None and rerank < 1:
        raise ValueError(f"rerank must be >= 1 candidates, got {rerank}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("search expects an inner-product index (best = highest score): build it with build_index")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be [q, {index.d}] to match the index, got {queries.shape}")
    n, depth = len(queries), k + MARGIN
    exclude = np.zeros((n, 2), np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if exclude.shape != (n, 2):
        raise ValueError(f"exclude must be int64 [q, 2] = [lo, hi) per query, got shape {exclude.shape} for q={n}")
    rescore = _flat_vectors(index)  # an exact index re-scores its own candidates
    if vectors is not None and not _exact_scores(index):
        if vectors.shape != (index.ntotal, index.d):
            raise ValueError(f"vectors must be the index's {index.ntotal} stored embeddings of dim {index.d}, "
                             f"got shape {vectors.shape}")
        rescore, depth = vectors, max(depth, rerank or RERANK_DEPTHS[-1])
    lo, hi = exclude[:, :1], exclude[:, 1:]
    widths = np.clip(hi - lo, 0, None)[:, 0]
    per_query = _is_hnsw(index)
    if per_query:
        widths_up = 2 ** np.ceil(np.log2(np.maximum(widths, 1))).astype(np.int64)
        extras = np.minimum(np.where(widths > 0, widths_up, 0), MAX_EXTRA)

    def best(rows: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = (ids >= 0) & ~((ids >= lo[rows]) & (ids < hi[rows]))
        first = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # the first `depth` kept, in faiss's order
        kept = np.take_along_axis(keep, first, 1)
        scores = np.where(kept, np.take_along_axis(scores, first, 1), -np.inf)
        ids = np.where(kept, np.take_along_axis(ids, first, 1), -1)
        top = _best_k(scores, ids, k) if rescore is None else _rescored_best_k(rescore, queries[rows], ids, k)
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
    needed = np.minimum(k + MARGIN, outside)
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
