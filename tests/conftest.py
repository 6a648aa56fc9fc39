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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is present and skip, saying so, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (nccl, bf16 on CUDA, fused attention); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """The tests skipped for lack of Open MPI or SLURM, named again at the very end of a long run with the one command
    that enables them (`make test` installs the packages itself where it can: as root, with apt-get)."""
    skipped = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(word in reason for word in ("mpirun", "SLURM", "slurmd")):
            skipped.append(report.nodeid)
    if skipped:
        terminalreporter.section("skipped for lack of Open MPI / SLURM")
        for nodeid in skipped:
            terminalreporter.write_line(nodeid)
        terminalreporter.write_line("enable them with: sudo tools/system_packages.sh   (then `make test` as root: the "
                                    "SLURM tests start slurmd and munged)")
