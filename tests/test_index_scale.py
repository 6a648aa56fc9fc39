"""The index at scale: `auto` at its thresholds, compressed IVF-PQ recall on real text embeddings after tuning, exact
re-ranking, memory-mapped loading, and the index stage filled by 2 ranks equal to 1 rank and to one process."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from data_prep import index as index_stage
from data_prep.config import PrepareConfig
from data_prep.corpora import stdlib_docstrings, stdlib_sources
from data_prep.parallel import World
from data_prep.stage import StageContext
from retro_dist.data.format import Layout, save_npy
from retro_dist.retrieval import build_index, get_embedder, load_index, save_index, search
from retro_dist.retrieval.index import (EXACT_MAX, HNSW_M, MAX_BYTES_PER_CHUNK, NLIST_MAX, RERANK_DEPTHS,
                                        RESCORE_VALUES, ROWS_PER_LIST, _rescored_best_k, default_factory,
                                        ivf_nlist, pq_size, train_index)
from retro_dist.retrieval.centroids import balanced_centroids
from tests.mpi_helpers import MPIRUN, mpi_env
from retro_dist.retrieval.tuning import exact_top_scores, measure_recall, recall_sample, tune_search


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # on a shared 2-core box faiss's many small OpenMP regions (PQ k-means) run 3-4x slower with 2 threads
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def text_embeddings() -> np.ndarray:
    """float16 hash-256 embeddings of ~108k 128-character chunks of the standard library's source (real text with
    its real duplicates: licence headers, generated codecs)."""
    text = "\n".join(stdlib_sources())
    chunks = [text[i:i + 128] for i in range(0, len(text), 128)]
    embedder = get_embedder("hash-256")
    return np.concatenate([embedder.embed(chunks[i:i + 8192]) for i in range(0, len(chunks), 8192)]).astype(np.float16)


def dataset(root: Path, embeddings: np.ndarray) -> np.ndarray:
    """A dataset directory holding just db/embeddings.npy, the index stage's input; returns it memory-mapped."""
    save_npy(Layout(root).embeddings("train"), embeddings)
    return np.load(Layout(root).embeddings("train"), mmap_mode="r")


def run_stage(root: Path, world: World | None = None, **options) -> tuple[dict, dict]:
    ctx = StageContext(root=root, config=PrepareConfig(**options), world=world or World(), manifest={},
                       fingerprint="f" * 32)
    counts = index_stage.run(ctx)
    return counts, ctx.facts.get("index")


# ---------------------------------------------------------------- auto

def test_auto_at_its_thresholds():
    assert default_factory(EXACT_MAX - 1, 256) == "Flat"
    assert default_factory(EXACT_MAX, 256) == "IVF512_HNSW32,Flat"  # lists of ROWS_PER_LIST rows
    fits = 256 * 2**20 // (4 * 256 + 8)  # vectors and ids in 256 MB
    assert default_factory(fits, 256, memory_mb=256) == "IVF2032_HNSW32,Flat"
    assert default_factory(fits + 1, 256, memory_mb=256) == "IVF2032_HNSW32,SQ8"  # 8-bit codes fit
    codes_fit = 256 * 2**20 // (256 + 8)
    assert default_factory(codes_fit + 1, 256, memory_mb=256) == f"IVF{(codes_fit + 1) // ROWS_PER_LIST}_HNSW32,PQ32"
    assert default_factory(10**8, 384) == "IVF262144_HNSW32,PQ48"
    assert default_factory(10**8, 256) == "IVF262144_HNSW32,PQ32"
    assert default_factory(10**5, 384, memory_mb=8) == "IVF781_HNSW32,PQ32"  # centroids leave no room for 48
    assert ivf_nlist(10 * ROWS_PER_LIST) == 10 and ivf_nlist(10**12) == NLIST_MAX  # a bounded training sample


@pytest.mark.parametrize("dim", [64, 128, 256, 384, 768, 1024])
@pytest.mark.parametrize("growth", [1, 10, 1000])
def test_compressed_index_fits_64_bytes_per_chunk(growth, dim):
    num_vectors = growth * (2048 * 2**20 // (dim + 8) + 1)  # from where the default 2048 MB no longer holds SQ8 codes
    factory = default_factory(num_vectors, dim)
    nlist, m = ivf_nlist(num_vectors), pq_size(num_vectors, dim, ivf_nlist(num_vectors))
    assert factory == f"IVF{nlist}_HNSW32,PQ{m}" and dim % m == 0
    # codes, ids, centroids, codebooks, lists, the centroid graph's level-0 links
    total = num_vectors * (m + 8) + (nlist + 256) * dim * 4 + nlist * 8 + nlist * 2 * HNSW_M * 4
    assert total / num_vectors <= MAX_BYTES_PER_CHUNK


# ---------------------------------------------------------------- recall on real embeddings

@pytest.mark.slow
def test_compressed_index_recall_after_tuning(tmp_path, text_embeddings):
    x = dataset(tmp_path, text_embeddings)
    counts, facts = run_stage(tmp_path, index_memory_mb=16)  # 108k full vectors would take 106 MB: compress
    assert facts["factory"] == f"IVF{ivf_nlist(len(x))}_HNSW32,PQ32" and facts["vectors"] == len(x) == counts["vectors"]
    assert facts["recall_at_10"] >= 0.9 and facts["recall_queries"] == 1000
    assert facts["bytes_per_chunk"] <= MAX_BYTES_PER_CHUNK
    assert facts["bytes"] == Layout(tmp_path).index.stat().st_size
    assert sorted(p.name for p in Layout(tmp_path).db.iterdir()) == ["embeddings.npy", "index.faiss"]  # no parts left

    # the tuned nprobe is saved in the index, and the re-rank depth is what the recall needs
    index = load_index(Layout(tmp_path).index, mmap=True)
    assert index.nprobe == facts["nprobe"] and facts["rerank"] in RERANK_DEPTHS
    queries = recall_sample(len(x), seed=1)  # other queries than the tuning ones
    top = exact_top_scores(x, queries)
    assert measure_recall(index, x, queries, top, rerank=facts["rerank"]) >= 0.88
    # what tuning fixed: faiss's usual nprobe, or PQ scores without exact re-ranking, fall well short
    assert measure_recall(index, np.asarray(x), queries, top, rerank=1) < 0.8
    index.nprobe = 8
    assert measure_recall(index, x, queries, top, rerank=facts["rerank"]) < 0.85


def test_tuning_stops_at_the_target_and_says_when_it_cannot_reach_it(text_embeddings):
    x = text_embeddings[:20_000]
    index = build_index(x, "IVF64,PQ8")
    low = tune_search(index, x, target=0.5)
    assert low["reached"] and low["recall_at_10"] >= 0.5 and low["nprobe"] < 64
    high = tune_search(index, x, target=1.0)
    assert not high["reached"] and high["recall_at_10"] < 1.0
    assert (high["nprobe"], high["rerank"]) == (64, RERANK_DEPTHS[-1]) == (index.nprobe, RERANK_DEPTHS[-1])
    assert tune_search(build_index(x[:5000], "Flat"), x[:5000], target=0.9) == {
        "rerank": None, "recall_at_10": 1.0, "recall_queries": 1000, "reached": True}


def test_static_embeddings_reach_the_recall_target_scanning_few_lists(tmp_path):
    """minilm-static vectors of real English cluster: the IVF that auto builds for a large corpus (lists of
    ROWS_PER_LIST rows, HNSW coarse quantizer), tuned on 1,000 of the database's own rows, reaches recall@10 0.9
    scanning a small share of its lists, so a query's cost does not grow with the corpus. hash-256 vectors of the
    same chunks need a far larger share."""
    words = [word for doc in stdlib_docstrings(min_chars=1) for word in doc.split()]
    chunks = [" ".join(words[i:i + 48]) for i in range(0, 48 * 6000, 48)]  # ~one 64-token LM chunk each
    nlist = ivf_nlist(len(chunks))
    shares = {}
    for name in ("minilm-static", "hash-256"):
        root = tmp_path / name
        dataset(root, get_embedder(name).embed(chunks).astype(np.float16))
        _, facts = run_stage(root, index_factory=f"IVF{nlist}_HNSW{HNSW_M},Flat", index_recall=0.9)
        assert facts["recall_at_10"] >= 0.9 and facts["recall_queries"] == 1000
        shares[name] = facts["nprobe"] / nlist
    assert shares["minilm-static"] <= 1 / 4 and shares["hash-256"] >= 2 * shares["minilm-static"]


def test_balanced_centroids_share_the_rows_out_evenly_and_repeat_their_bytes(text_embeddings):
    """The lists of auto's IVF hold about equal shares of the database: real text has dense regions (licence
    headers, generated tables) that one k-means over every list covers with a few huge lists, which every query
    landing there scans. The centroids are unit vectors, the same bytes on every run, and auto's index uses them."""
    x = np.asarray(text_embeddings, dtype=np.float32)
    nlist = ivf_nlist(len(x))

    def own_list(centroids: np.ndarray) -> float:  # rows in a row's own list, averaged over rows
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(centroids)
        sizes = np.bincount(flat.search(x, 1)[1][:, 0], minlength=len(centroids)).astype(float)
        return (sizes ** 2).sum() / sizes.sum()

    balanced = balanced_centroids(x, nlist)
    assert balanced.shape == (nlist, x.shape[1]) and balanced.tobytes() == balanced_centroids(x, nlist).tobytes()
    assert np.allclose(np.linalg.norm(balanced, axis=1), 1, atol=1e-5)
    one = faiss.Clustering(x.shape[1], nlist)
    one.niter = 10
    one.train(x, faiss.IndexFlatIP(x.shape[1]))
    kmeans = faiss.vector_float_to_array(one.centroids).reshape(nlist, -1)
    assert own_list(balanced) <= 0.5 * own_list(kmeans)

    index = train_index(text_embeddings, f"IVF{nlist}_HNSW{HNSW_M},SQ8", train_size=len(x))
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert np.array_equal(quantizer.reconstruct_n(0, nlist), balanced)


# ---------------------------------------------------------------- search with exact re-ranking

def test_reranked_search_honours_exclusion_and_batching(text_embeddings):
    x = text_embeddings[:20_000]
    index = build_index(x, "IVF64,PQ16")
    index.nprobe = 8
    q_ids = np.arange(0, 20_000, 37)
    widths = np.array([0, 1, 40, 1500])[np.arange(len(q_ids)) % 4]  # 1500 > 1024: IDSelector fallback
    exclude = np.stack([q_ids - widths // 2, q_ids - widths // 2 + widths], 1)
    queries = x[q_ids].astype(np.float32)
    results = [search(index, queries, 10, exclude=exclude, vectors=x, rerank=64, batch_size=b) for b in (4096, 7, 1)]
    for scores, ids in results[1:]:
        np.testing.assert_array_equal(scores, results[0][0])
        np.testing.assert_array_equal(ids, results[0][1])
    scores, ids = results[0]
    assert not ((ids >= exclude[:, :1]) & (ids < exclude[:, 1:])).any() and (ids >= 0).all()
    # re-ranked scores are the exact inner products of the stored float16 vectors, best first, ties to the lower id
    exact = np.einsum("qd,qkd->qk", queries, x[ids].astype(np.float32))
    np.testing.assert_allclose(scores, exact, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    tied = np.diff(scores, axis=1) == 0
    assert (np.diff(ids, axis=1)[tied] > 0).all()
    with pytest.raises(ValueError, match="vectors must be the index's 20000 stored embeddings"):
        search(index, queries, 10, vectors=x[:10])


def test_rescoring_gathers_a_bounded_block_of_embeddings(text_embeddings):
    """Re-scoring a block of queries' candidates (the neighbors stage: 4,096 queries at re-rank depth 64) reads the
    embeddings RESCORE_VALUES at a time: the rank's private memory must not grow with the re-rank depth."""
    gathered = []

    class Recording:  # the stored embeddings, recording the size of every gather
        shape, dtype = text_embeddings.shape, text_embeddings.dtype

        def __getitem__(self, index):
            rows = text_embeddings[index]
            gathered.append(rows.size)
            return rows

    rng = np.random.default_rng(0)
    queries = np.asarray(text_embeddings[:4096], np.float32)
    ids = rng.integers(0, len(text_embeddings), (4096, 64))
    scores, top = _rescored_best_k(Recording(), queries, ids, 2)
    assert max(gathered) <= RESCORE_VALUES and sum(gathered) == ids.size * text_embeddings.shape[1]
    assert np.array_equal((scores, top), _rescored_best_k(text_embeddings, queries, ids, 2))


def test_exact_indexes_ignore_vectors(text_embeddings):
    x = text_embeddings[:5_000]
    for factory in ("Flat", "IVF16,Flat"):
        index = build_index(x, factory)
        for got, want in zip(search(index, x[:50], 5, vectors=x, rerank=200), search(index, x[:50], 5)):
            np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- memory-mapped loading

def mapped_shared(path: Path) -> bool:
    """Whether this process maps `path` shared (pages in the page cache, one copy for every rank of a node)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return any(line.endswith(str(path)) and line.split()[1][3] == "s" for line in maps)


@pytest.mark.parametrize("num_vectors,memory_mb,expected", [(3_000, 2048, "Flat"),
                                                             (EXACT_MAX, 2048, "IVF512_HNSW32,Flat"),
                                                             (EXACT_MAX, 32, "IVF512_HNSW32,SQ8"),
                                                             (EXACT_MAX, 16, "IVF512_HNSW32,PQ32")])
def test_mmap_load_equals_normal_load_for_every_auto_index(tmp_path, text_embeddings, num_vectors, memory_mb,
                                                           expected):
    x = text_embeddings[:num_vectors]
    factory = default_factory(len(x), x.shape[1], memory_mb)
    assert factory == expected
    path = tmp_path / f"{factory}.faiss"
    save_index(build_index(x, factory, train_size=20_000), path)
    queries = x[::211].astype(np.float32)
    want = search(load_index(path), queries, 10, vectors=x)
    mapped = load_index(path, mmap=True)
    assert mapped_shared(path)
    for got, expected in zip(search(mapped, queries, 10, vectors=x), want):
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- parallel fill

class ThreadComm:
    """The mpi4py COMM_WORLD calls World makes, for `size` ranks that are threads of this process."""

    def __init__(self, shared: SimpleNamespace, rank: int):
        self.shared, self.rank = shared, rank

    def Ibarrier(self):  # noqa: N802 - mpi4py's name
        self.shared.barrier.wait()
        return SimpleNamespace(Test=lambda: True)

    def allgather(self, value):
        self.shared.slots[self.rank] = pickle.dumps(value)  # each rank gets its own copy, as over MPI
        self.shared.barrier.wait()
        out = [pickle.loads(slot) for slot in self.shared.slots]
        self.shared.barrier.wait()
        return out

    def gather(self, value, root=0):
        out = self.allgather(value)
        return out if self.rank == root else None

    def bcast(self, value, root=0):
        return self.allgather(value)[root]


def run_ranks(root: Path, size: int, **options) -> list[tuple[dict, dict]]:
    """The index stage on `size` ranks (threads), each with its own World; returns each rank's (counts, facts)."""
    shared = SimpleNamespace(barrier=threading.Barrier(size, timeout=300), slots=[None] * size)
    results, errors = [None] * size, []

    def rank_main(rank: int) -> None:
        world = World()
        world.comm, world.rank, world.size = ThreadComm(shared, rank), rank, size
        try:
            results[rank] = run_stage(root, world, **options)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            shared.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# an HNSW coarse quantizer as auto builds it; a short tuning ladder
OPTIONS = {"index_factory": "IVF128_HNSW32,PQ32", "block_size": 3_000, "index_recall": 0.6}


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_one_process(tmp_path, text_embeddings):
    x = dataset(tmp_path / "one", text_embeddings[:20_000])
    dataset(tmp_path / "two", text_embeddings[:20_000])
    counts, facts = run_stage(tmp_path / "one", **OPTIONS)
    (counts0, facts0), (counts1, _) = run_ranks(tmp_path / "two", 2, **OPTIONS)
    one, two = Layout(tmp_path / "one").index.read_bytes(), Layout(tmp_path / "two").index.read_bytes()
    assert one == two and facts == facts0
    assert counts["blocks_encoded"] == 7 and (counts0["blocks_encoded"], counts1["blocks_encoded"]) == (4, 3)
    assert sorted(p.name for p in Layout(tmp_path / "two").db.iterdir()) == ["embeddings.npy", "index.faiss"]

    # one process, no blocks: the same index (its tuning too)
    index = build_index(x, OPTIONS["index_factory"], add_batch=4096)
    tune_search(index, x, target=OPTIONS["index_recall"])
    save_index(index, tmp_path / "alone.faiss")
    assert (tmp_path / "alone.faiss").read_bytes() == one


def test_killed_fill_resumes_with_its_finished_blocks(tmp_path, text_embeddings, monkeypatch):
    dataset(tmp_path / "fresh", text_embeddings[:20_000])
    dataset(tmp_path / "killed", text_embeddings[:20_000])
    run_stage(tmp_path / "fresh", **OPTIONS)
    real, calls = index_stage.encode_block, []

    def dies_at_the_fourth_block(index, rows):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(index, rows)

    monkeypatch.setattr(index_stage, "encode_block", dies_at_the_fourth_block)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(tmp_path / "killed", **OPTIONS)
    parts = next(Layout(tmp_path / "killed").db.glob(".index.parts-*"))
    assert len(list(parts.glob("rows-*.npy"))) == 3 and (parts / "trained.faiss").exists()
    monkeypatch.setattr(index_stage, "encode_block", real)
    counts, _ = run_stage(tmp_path / "killed", **OPTIONS)
    assert counts["blocks_encoded"] == 4 and not parts.exists()
    assert Layout(tmp_path / "killed").index.read_bytes() == Layout(tmp_path / "fresh").index.read_bytes()


STAGE_ALONE = """
import json, sys
from pathlib import Path
from data_prep import index
from data_prep.config import PrepareConfig
from data_prep.parallel import World
from data_prep.stage import StageContext
world = World()
ctx = StageContext(root=Path(sys.argv[1]), config=PrepareConfig(**json.loads(sys.argv[2])), world=world, manifest={},
                   fingerprint="f" * 32)
index.run(ctx)
if world.is_main:
    print(json.dumps(ctx.facts["index"]))
"""


@pytest.mark.slow
@pytest.mark.mpi
def test_mpirun_two_ranks_equal_one(tmp_path, text_embeddings):
    dataset(tmp_path / "one", text_embeddings[:20_000])
    dataset(tmp_path / "mpi", text_embeddings[:20_000])
    _, facts = run_stage(tmp_path / "one", **OPTIONS)
    env = mpi_env(OMP_NUM_THREADS="1")
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-c", STAGE_ALONE,
                             str(tmp_path / "mpi"), json.dumps(OPTIONS)], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == facts
    assert Layout(tmp_path / "mpi").index.read_bytes() == Layout(tmp_path / "one").index.read_bytes()
