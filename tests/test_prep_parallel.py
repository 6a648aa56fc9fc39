"""Stages that ranks share: blocks written in place and resumed, shards split across ranks, embed on a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep.blocks import compute_blocks
from data_prep.config import PrepareConfig
from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.parallel import World
from tests.mpi_helpers import MPIRUN, mpi_env
from data_prep.pipeline import main as prepare
from data_prep.stage import StageContext
from retro_dist.data.format import load_manifest, save_npy

ROWS, WIDTH = 1000, 3
SKIP = ("manifest.json", ".lock")  # wall times differ; the lock records each run's holder
OPTS = ["--vocab-size", "500", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-128",
        "--val-fraction", "0.1", "--num-neighbors", "2", "--block-size", "100", "--shard-samples", "10"]


def rows(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo * WIDTH, hi * WIDTH, dtype=np.float32).reshape(-1, WIDTH) / 7


def context(tmp_path, block_size: int) -> StageContext:
    return StageContext(root=tmp_path, config=PrepareConfig(block_size=block_size), world=World(), manifest={},
                        fingerprint="f" * 32)


def run_blocks(tmp_path, *, block_size: int = 64, fail_at: int | None = None) -> list[tuple[int, int]]:
    """compute_blocks into tmp_path/out.npy; `fail_at` kills the run (an exception) at that block. Returns the blocks
    computed."""
    computed = []

    def compute(lo: int, hi: int) -> np.ndarray:
        if len(computed) == fail_at:
            raise RuntimeError("killed")
        computed.append((lo, hi))
        return rows(lo, hi)

    compute_blocks(context(tmp_path, block_size), out=tmp_path / "out.npy", num_rows=ROWS, width=WIDTH,
                   dtype="float16", compute=compute, desc="test")
    return computed


def expected_bytes(tmp_path) -> bytes:
    save_npy(tmp_path / "expected.npy", rows(0, ROWS).astype(np.float16))
    return (tmp_path / "expected.npy").read_bytes()


def test_blocks_resume_after_kill_gives_identical_bytes(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run_blocks(tmp_path, fail_at=5)
    work = next(tmp_path.glob(".out.parts-*"))
    markers = sorted(p.name for p in work.glob("*.done"))
    assert len(markers) == 5 and not (tmp_path / "out.npy").exists()
    # a kill between a block's write and its marker: the block is redone; junk in unmarked rows is overwritten
    (work / markers[2]).unlink()
    with open(work / "out.npy", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\xff" * 100)
    computed = run_blocks(tmp_path)
    assert computed[0] == (128, 192) and (0, 64) not in computed and len(computed) == 16 - 4
    assert (tmp_path / "out.npy").read_bytes() == expected_bytes(tmp_path)
    assert not list(tmp_path.glob(".out.parts-*"))


def test_blocks_resumed_with_another_block_size_reuse_nothing_wrong(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run_blocks(tmp_path, fail_at=3)
    computed = run_blocks(tmp_path, block_size=100)  # markers name rows, so 64-row blocks never stand for 100-row ones
    assert len(computed) == 10
    assert (tmp_path / "out.npy").read_bytes() == expected_bytes(tmp_path)


def test_blocks_shape_change_starts_over(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run_blocks(tmp_path, fail_at=3)
    computed = []

    def compute(lo: int, hi: int) -> np.ndarray:
        computed.append((lo, hi))
        return rows(lo, hi)[:, :2]

    compute_blocks(context(tmp_path, 64), out=tmp_path / "out.npy", num_rows=ROWS, width=2, dtype="float16",
                   compute=compute, desc="test")
    assert len(computed) == 16
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), rows(0, ROWS)[:, :2].astype(np.float16))


@pytest.mark.mpi
def test_neighbors_and_shard_on_two_ranks_equal_one(tmp_path):
    """Redo neighbors and shard under mpirun -np 2 on a dataset one process made: the same bytes, rank 0 did its
    share only."""
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(120))
    single = tmp_path / "single"
    assert prepare(["--input", str(corpus), "--out", str(single), *OPTS]) == 0
    parallel = tmp_path / "mpi"
    shutil.copytree(single, parallel)
    shutil.rmtree(parallel / "shards")
    (parallel / "train" / "neighbors.npy").unlink()
    env = mpi_env()
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-m", "data_prep", "--stage", "neighbors",
                             "--stage", "shard", "--force", "--out", str(parallel)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.name not in SKIP)
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file() and p.name not in SKIP)
    for rel in files:
        assert (single / rel).read_bytes() == (parallel / rel).read_bytes(), rel
    a, b = load_manifest(single), load_manifest(parallel)
    assert a["shards"] == b["shards"]
    counts = b["stages"]["shard"]["counts"]
    total = counts["train_shards"] + counts["val_shards"]
    assert total >= 4 and counts["shards_written"] < total  # the other rank wrote the rest
    assert b["stages"]["neighbors"]["counts"]["train_blocks_computed"] < -(-a["counts"]["train"]["chunks"] // 100)
    assert counts["samples_per_s"] > 0 and b["stages"]["neighbors"]["counts"]["train_rows_per_s"] > 0


@pytest.mark.gpu
def test_minilm_on_gpu_matches_cpu():
    from retro_dist.retrieval.embedders import MiniLMEmbedder

    texts = [" ".join(doc.split()[:60]) for doc in stdlib_docstrings(200)] + ["", "   "]
    cpu = MiniLMEmbedder(device="cpu")
    cpu.bf16 = False
    gpu = MiniLMEmbedder()  # "auto": the GPU
    assert gpu.device.type == "cuda" and gpu.batch_size >= 512 and (gpu.bf16 or gpu.fp16)
    a, b = cpu.embed(texts), gpu.embed(texts)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-3)
    assert (a * b).sum(1).min() >= 0.999
