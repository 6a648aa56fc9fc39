"""data_prep under `mpirun -np 2` writes the same bytes as a single process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.pipeline import main as prepare
from retro_dist.data.format import load_manifest
from data_prep.corpora import stdlib_docstrings, write_corpus

OPTS = ["--vocab-size", "500", "--chunk-size", "16", "--seq-len", "64", "--embedder", "hash-128",
        "--val-fraction", "0.1", "--num-neighbors", "2", "--block-size", "100", "--shard-samples", "30"]
MPIRUN = shutil.which("mpirun")


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (apt-get install openmpi-bin; .ci/run does)")
def test_two_ranks_equal_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(120))
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "single"), *OPTS]) == 0
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-m", "data_prep", "--input", str(corpus),
                             "--out", str(tmp_path / "mpi"), *OPTS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_dataset(tmp_path / "single", tmp_path / "mpi", block_size=100)


def assert_same_dataset(single: Path, parallel: Path, *, block_size: int) -> None:
    """Byte-identical files (the manifest aside: wall times differ), and rank 0 computed only its share."""
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file() and p.name != ".lock")
    for rel in files:
        if rel.name != "manifest.json":
            assert (single / rel).read_bytes() == (parallel / rel).read_bytes(), rel
    a, b = load_manifest(single), load_manifest(parallel)
    for key in ("counts", "shards", "embedder", "index", "vocab_size"):
        assert a[key] == b[key]
    blocks = b["stages"]["embed"]["counts"]["train_blocks_computed"]
    assert blocks < -(-a["counts"]["train"]["chunks"] // block_size)
