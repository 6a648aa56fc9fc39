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
