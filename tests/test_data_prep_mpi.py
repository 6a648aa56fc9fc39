"""data_prep under `mpirun -np 2` writes the same bytes as a single process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_prep.corpora import stdlib_docstrings, write_corpus
from data_prep.pipeline import main as prepare
from tests.dataset_checks import MPI_PREP_OPTS, assert_same_dataset
from tests.mpi_helpers import MPIRUN, mpi_env


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", stdlib_docstrings(120))
    assert prepare(["--input", str(corpus), "--out", str(tmp_path / "single"), *MPI_PREP_OPTS]) == 0
    result = subprocess.run([MPIRUN, "-np", "2", sys.executable, "-m", "data_prep", "--input", str(corpus),
                             "--out", str(tmp_path / "mpi"), *MPI_PREP_OPTS], env=mpi_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_dataset(tmp_path / "single", tmp_path / "mpi", block_size=100)
