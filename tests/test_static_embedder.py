"""minilm-static: distilled offline from the packaged MiniLM, cached, byte-identical across processes, MPI ranks and
fresh builds, rebuilt from a dataset manifest; a dataset prepared with it has no leakage and the same bytes on 1 and 2
ranks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from retro_dist.data.format import Layout, load_manifest
from retro_dist.retrieval import embedder_record, get_embedder
from retro_dist.retrieval.static import StaticEmbedder, cache_dir
from tests.dataset_checks import assert_no_leak
from tests.mpi_helpers import MPI_ENV, MPIRUN

TEXTS = ["The cat sat on the mat.", "", "   ", "Return the sum of two numbers, raising ValueError on overflow.",
         "A socket is an endpoint for sending and receiving data across a network.", "naïve café ☃ 東京"]
# prints the sha256 of the vectors of the texts in argv[1] (JSON) and where the table came from
EMBED = ("import hashlib, json, os, sys; from retro_dist.retrieval import get_embedder; "
         "e = get_embedder('minilm-static'); v = e.embed(json.loads(sys.argv[1])); "
         "print(json.dumps({'vectors': hashlib.sha256(v.tobytes()).hexdigest(), 'table': e.sha256, "
         "'rank': os.environ.get('OMPI_COMM_WORLD_RANK', '0')}))")


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def static() -> StaticEmbedder:
    """The embedder from the user's cache (built there on the first run of the suite)."""
    return get_embedder("minilm-static")


def texts(n: int) -> list[str]:
    return [" ".join(doc.split()[:48]) for doc in stdlib_docstrings(n)]


def test_vectors_are_unit_rows_and_semantic(static):
    v = static.embed(TEXTS)
    assert v.dtype == np.float32 and v.shape == (len(TEXTS), 256) and static.dim == 256
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v[1], v[2])  # no token: the fixed unit vector
    np.testing.assert_allclose(v[1], 1 / 16)
    # meaning, not word overlap: no shared word, yet closer than an unrelated sentence sharing one
    a, b, c = static.embed(["The puppy is sleeping.", "A young dog naps.", "The stock market is sleeping."])
    assert a @ b > a @ c
    # a text's row does not depend on its companions, and embedding nothing gives no rows
    np.testing.assert_array_equal(static.embed(TEXTS[3:4])[0], v[3])
    np.testing.assert_array_equal(static.embed(TEXTS[::-1])[::-1], v)
    assert static.embed([]).shape == (0, 256)


def test_record_rebuilds_the_embedder_and_refuses_another_table(static):
    record = embedder_record(static)
    assert record == {"name": "minilm-static", "dim": 256, "sha256": static.sha256}
    again = get_embedder(**json.loads(json.dumps(record)))  # as the manifest stores it
    np.testing.assert_array_equal(again.embed(TEXTS), static.embed(TEXTS))
    with pytest.raises(ValueError, match="differs from the one the dataset was built with"):
        get_embedder(**{**record, "sha256": "0" * 64})
    assert embedder_record(get_embedder("hash-64")) == {"name": "hash-64", "dim": 64}
    with pytest.raises(ValueError, match="minilm-static dimension must be 1..384"):
        get_embedder("minilm-static-999")


def test_the_cache_is_keyed_by_the_recipe(static):
    assert static.path.parent == cache_dir() / "embedders"
    assert static.path.name.startswith("minilm-static-256-") and static.path.with_suffix(".json").is_file()
    assert json.loads(static.path.with_suffix(".json").read_text())["dim"] == 256
    assert hashlib.sha256(static.path.read_bytes()).hexdigest() == static.sha256


def test_two_processes_offline_give_identical_vectors(static):
    want = hashlib.sha256(static.embed(TEXTS).tobytes()).hexdigest()
    for threads in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", EMBED, json.dumps(TEXTS)], capture_output=True, text=True,
                                env=offline_env(OMP_NUM_THREADS=threads, RAYON_NUM_THREADS=threads), timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout.splitlines()[-1])["vectors"] == want


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_ranks_build_one_table_identical_to_the_cached_one(static, tmp_path):
    """Two ranks start on an empty cache: one distils the table while the other waits on its lock, and the fresh
    build (other threads, other process) has the very bytes of the cached one, so both ranks' vectors match."""
    batch = TEXTS + texts(200)
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-c", EMBED, json.dumps(batch)], capture_output=True,
                            text=True, timeout=900,
                            env=offline_env(**MPI_ENV, RETRO_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == ["0", "1"]
    assert {line["table"] for line in lines} == {static.sha256}
    assert {line["vectors"] for line in lines} == {hashlib.sha256(static.embed(batch).tobytes()).hexdigest()}
    assert len(list((tmp_path / "embedders").glob("minilm-static-256-*.npy"))) == 1


OPTS = ["--vocab-size", "600", "--chunk-size", "16", "--seq-len", "64", "--embedder", "minilm-static",
        "--val-fraction", "0.1", "--num-neighbors", "3", "--shard-samples", "20", "--block-size", "256"]


@pytest.mark.mpi
def test_dataset_has_no_leakage_and_the_same_bytes_on_two_ranks(static, tmp_path):

    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(150))
    single = tmp_path / "single"
    assert prepare(["--input", str(corpus), "--out", str(single), *OPTS]) == 0
    m = load_manifest(single)
    assert m["embedder"] == embedder_record(static)
    neighbors = assert_no_leak(single)
    assert (neighbors >= 0).mean() > 0.99
    # the embeddings are the embedder's own rows (float16), and its vectors retrieve what MiniLM-like vectors would
    emb = np.load(Layout(single).embeddings("train"))
    assert emb.dtype == np.float16 and emb.shape[1] == 256

    parallel = tmp_path / "mpi"
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-m", "data_prep", "--input", str(corpus),
                             "--out", str(parallel), *OPTS], env=offline_env(**MPI_ENV), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    skip = ("manifest.json", ".lock")
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.name not in skip)
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file() and p.name not in skip)
    for rel in files:
        assert (single / rel).read_bytes() == (parallel / rel).read_bytes(), rel
    assert load_manifest(parallel)["embedder"] == m["embedder"]
