import os
import sys
import types

import pytest
import torch


@pytest.fixture(scope="session")
def retro_pytorch():
    """RETRO-pytorch 0.3.9, the reference implementation. Its retrieval module imports autofaiss at import time
    (which pins numpy<2 and breaks here); the model never uses it, so a placeholder module satisfies the import."""
    if "autofaiss" not in sys.modules:
        sys.modules["autofaiss"] = types.SimpleNamespace(build_index=None)
    import retro_pytorch
    return retro_pytorch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _missing() -> dict[str, str | None]:
    """Why each marker's tests cannot run on this machine (None: they can)."""
    from tests import slurm_cluster
    from tests.mpi_helpers import MPIRUN
    slurm = None
    if not slurm_cluster.available():
        slurm = "SLURM packages are not installed (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)"
    elif os.geteuid() != 0:
        slurm = "starting slurmd and munged as the SLURM tests do needs root"
    return {"gpu": None if torch.cuda.is_available() else
            "needs a CUDA GPU (nccl, bf16 on CUDA, fused attention); none on this machine",
            "mpi": None if MPIRUN else "mpirun not installed (apt-get install openmpi-bin; .ci/run does)",
            "slurm": slurm}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu`, `mpi` or `slurm` (every test using the `slurm` cluster fixture) run where their machine
    has what they need, and skip, saying why, elsewhere."""
    missing = _missing()
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
        for marker, reason in missing.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter):
    """The tests skipped for lack of Open MPI or SLURM, named again at the very end of a long run with the one command
    that enables them (`make test` installs the packages itself where it can: as root, with apt-get)."""
    skipped = [report.nodeid for report in terminalreporter.stats.get("skipped", [])
               if {"mpi", "slurm"} & set(getattr(report, "keywords", {}))]
    if skipped:
        terminalreporter.section("skipped for lack of Open MPI / SLURM")
        for nodeid in skipped:
            terminalreporter.write_line(nodeid)
        terminalreporter.write_line("enable them with: sudo tools/system_packages.sh   (then `make test` as root: the "
                                    "SLURM tests start slurmd and munged)")
