"""mpirun for tests: where it is, and the environment that lets it run as root, oversubscribed, over TCP on one box.
Tests that use it carry the `mpi` marker (skipped, saying why, where Open MPI is not installed)."""

from __future__ import annotations

import os
import shutil

MPIRUN = shutil.which("mpirun")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "self,tcp",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def mpi_env(**extra: str) -> dict[str, str]:
    """This process's environment with MPI_ENV and `extra` on top."""
    return {**os.environ, **MPI_ENV, **extra}
